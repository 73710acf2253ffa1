"""One vCPU's thread: KVM_RUN, exit dispatch, and a kick that works from any thread.

The run loop is the hottest code in minivmm: each iteration is one KVM_RUN ioctl plus the
dispatch of one exit, so it reads the kvm_run page with precompiled ``struct.Struct``
objects, looks devices up in prebuilt tables and allocates as little as it can.

Kicking a vCPU out of KVM_RUN (to stop or pause it) works like QEMU's: the runner's
thread blocks :data:`KICK_SIGNAL` for itself but tells KVM to unblock it inside KVM_RUN
(KVM_SET_SIGNAL_MASK, api.rst §4.21). ``kick()`` sets ``immediate_exit`` (for a vCPU about
to enter) and sends the signal to the thread (for one inside): KVM_RUN returns EINTR and
the still-blocked signal is taken off the pending set with ``sigtimedwait``. No handler
is needed, so this works when the VM runs on threads other than the main one, and several
VMs can share a process.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import struct
import threading
from collections.abc import Callable
from typing import Final

from .bus import Bus
from .errors import InternalError
from .kvm import KvmError, Vcpu
from .kvm import api as kvm_api
from .kvm import constants as c
from .kvm.structs import RUN_EXIT_REASON_OFFSET, RUN_EXIT_UNION_OFFSET
from .memory import GuestMemory
from .pause import PauseGate
from .stop import StopController
from .x86.diagnose import describe_vcpu

log = logging.getLogger(__name__)

KICK_SIGNAL: Final = signal.SIGUSR1

_IO_EXIT = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
# exit_reason, then the union read as kvm_run.mmio: phys_addr, data[8] (skipped), len,
# is_write. Offsets are asserted against the ctypes layout below.
_EXIT_HEAD = struct.Struct("<8xI20xQ8xIB")
_MMIO_DATA_OFFSET: Final = RUN_EXIT_UNION_OFFSET + 8
assert RUN_EXIT_REASON_OFFSET == 8 and RUN_EXIT_UNION_OFFSET == 32
_INTERNAL = struct.Struct("<II")
_SYSTEM_EVENT = struct.Struct("<I")


class VcpuRunner:
    """Runs one vCPU on its own thread until the stop controller says stop."""

    def __init__(self, vcpu: Vcpu, *, pio: Bus, mmio: Bus, memory: GuestMemory,
                 stop: StopController, on_first_run: Callable[[], None] | None = None,
                 pause: PauseGate | None = None) -> None:
        self.vcpu = vcpu
        self.index = vcpu.index
        self.pio = pio
        self.mmio = mmio
        self.memory = memory
        self.stop = stop
        self._on_first_run = on_first_run
        self.pause_gate = pause
        #: exits by KVM exit reason
        self.exit_counts = [0] * 64
        self._thread: threading.Thread | None = None
        self._ident_ready = threading.Event()
        stop.add_kick(self.kick)

    # -- thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}",
                                        daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """The thread runs (started and not ended)."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True if it has (or never started)."""
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN now (any thread; harmless when it is not running)."""
        run = self.vcpu.run if self.vcpu.fd >= 0 else None
        if run is not None:
            run.immediate_exit = 1
        t = self._thread
        if (self._ident_ready.is_set() and t is not None and t.ident is not None
                and t is not threading.current_thread() and t.is_alive()):
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _thread_main(self) -> None:
        try:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
            self.vcpu.set_signal_mask(set(old) - {KICK_SIGNAL})
            self._ident_ready.set()
            self._run_loop()
        except KvmError as e:
            log.debug("vCPU %d: KVM failed", self.index, exc_info=True)
            self.stop.request(1, "host-error", f"vCPU {self.index}: {e}")
        except Exception as e:  # a bug in minivmm: say so, with the traceback in the log
            log.error("vCPU %d: internal error", self.index, exc_info=True)
            self.stop.request(1, "internal-error",
                              f"vCPU {self.index}: {InternalError.__name__}: "
                              f"{type(e).__name__}: {e}")

    # -- the loop -------------------------------------------------------------------

    def _run_loop(self) -> None:
        """KVM_RUN and dispatch, until a stop is requested.

        Per exit this does one ioctl, one struct unpack for the exit reason and the MMIO
        fields together (harmless garbage for other exits), and, for MMIO, a range check
        against the device hit last time before falling back to the bus's bisect. The data
        memoryviews are made once, not per exit.
        """
        view = self.vcpu.run_view
        mmio_data = [view[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + n] for n in range(9)]
        pio_data: dict[int, memoryview] = {}  # keyed by offset * 8 + size
        if self._on_first_run is not None:
            self._on_first_run()
        try:
            self._dispatch(mmio_data, pio_data)
        finally:  # views of the kvm_run page must not outlive the loop
            for v in (*mmio_data, *pio_data.values()):
                v.release()

    def _dispatch(self, mmio_data: list[memoryview], pio_data: dict[int, memoryview]
                  ) -> None:
        vcpu = self.vcpu
        fd = vcpu.fd
        run = vcpu.run
        view = vcpu.run_view
        kvm_run = kvm_api.kvm_run_fn  # (fd, KVM_RUN, 0): ints below 2**31
        request = kvm_api.KVM_RUN
        get_errno = ctypes.get_errno
        counts = self.exit_counts
        head = _EXIT_HEAD.unpack_from
        io_exit = _IO_EXIT.unpack_from
        union = RUN_EXIT_UNION_OFFSET
        pio = self.pio
        mmio = self.mmio
        stop = self.stop
        gate = self.pause_gate
        exit_io = c.KVM_EXIT_IO
        exit_mmio = c.KVM_EXIT_MMIO
        io_out = c.KVM_EXIT_IO_OUT
        last_base = last_end = 0  # the MMIO device hit last
        last_read: Callable[[int, memoryview], None] = mmio.read
        last_write: Callable[[int, memoryview], None] = mmio.write
        while not stop.stopping:
            if kvm_run(fd, request, 0) < 0:
                err = get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    run.immediate_exit = 0
                    signal.sigtimedwait((KICK_SIGNAL,), 0)  # take the kick off, if any
                    if gate is not None and gate.requested:
                        gate.park()  # paused (minivmm.pause): wait, then run on
                    continue
                raise kvm_api.KvmError(request, err)
            reason, addr, length, is_write = head(view)
            counts[reason & 63] += 1
            if reason == exit_mmio:
                data = mmio_data[length & 15] if length <= 8 else mmio_data[8]
                if not last_base <= addr < last_end:
                    hit = mmio.lookup(addr)
                    if hit is None:
                        (mmio.write if is_write else mmio.read)(addr, data)
                        continue
                    dev, last_base = hit
                    last_end = last_base + mmio.size_of(last_base)
                    last_read, last_write = dev.read, dev.write
                if is_write:
                    last_write(addr - last_base, data)
                else:
                    last_read(addr - last_base, data)
            elif reason == exit_io:
                direction, size, port, count, off = io_exit(view, union)
                for i in range(count):
                    at = off + i * size
                    data = pio_data.get(at * 8 + size)
                    if data is None:
                        data = pio_data[at * 8 + size] = view[at : at + size]
                    if direction == io_out:
                        pio.write(port, data)
                    else:
                        pio.read(port, data)
            else:
                self._slow_exit(reason)

    def _slow_exit(self, reason: int) -> None:
        view = self.vcpu.run_view
        union = RUN_EXIT_UNION_OFFSET
        request = self.stop.request
        if reason == c.KVM_EXIT_HLT:
            request(0, "poweroff", "the guest halted with interrupts off")
        elif reason == c.KVM_EXIT_SHUTDOWN:
            request(0, "reboot", f"triple fault on vCPU {self.index} (the guest rebooted)")
        elif reason == c.KVM_EXIT_SYSTEM_EVENT:
            (kind,) = _SYSTEM_EVENT.unpack_from(view, union)
            if kind == c.KVM_SYSTEM_EVENT_SHUTDOWN:
                request(0, "poweroff")
            elif kind == c.KVM_SYSTEM_EVENT_RESET:
                request(0, "reboot")
            else:
                request(1, "guest-error", f"guest system event {kind} (crash)")
        elif reason == c.KVM_EXIT_INTERNAL_ERROR:
            suberror, _ndata = _INTERNAL.unpack_from(view, union)
            what = "emulation failure" if suberror == c.KVM_INTERNAL_ERROR_EMULATION else (
                f"internal error, suberror {suberror}")
            request(1, "guest-error", f"KVM {what}\n{self.describe()}")
        elif reason == c.KVM_EXIT_FAIL_ENTRY:
            hw = self.vcpu.run.fail_entry.hardware_entry_failure_reason
            request(1, "guest-error", f"KVM could not enter the guest (hardware reason "
                                      f"0x{hw:x})\n{self.describe()}")
        elif reason in (c.KVM_EXIT_INTR, c.KVM_EXIT_IRQ_WINDOW_OPEN):
            pass
        else:
            name = c.EXIT_REASON_NAMES.get(reason, str(reason))
            request(1, "host-error", f"unexpected KVM exit {name}\n{self.describe()}")

    def describe(self) -> str:
        return describe_vcpu(self.vcpu, self.memory)

    def stats_lines(self) -> list[str]:
        return [f"stats: vcpu{self.index} exits {c.EXIT_REASON_NAMES.get(i, str(i))}: {n}"
                for i, n in enumerate(self.exit_counts) if n]
