"""The machine: KVM VM, guest memory, boot, buses, devices and the vCPU run loop.

A :class:`Machine` is built from a :class:`MachineConfig`, then :meth:`Machine.run`
starts the vCPU thread and waits for the guest to end. The run loop is the hottest code
in minivmm: each iteration is one KVM_RUN ioctl plus the dispatch of one exit, so it
reads the kvm_run page with precompiled ``struct.Struct`` objects, looks devices up in
prebuilt tables and allocates as little as it can.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from . import hostinfo
from .bus import Bus
from .devices.legacy.serial import Serial
from .errors import VmmError
from .kvm import System, Vm
from .kvm import api as kvm_api
from .kvm import constants as c
from .kvm.structs import RUN_EXIT_REASON_OFFSET, RUN_EXIT_UNION_OFFSET
from .memory import GuestMemory
from .x86 import cpu as x86cpu
from .x86 import layout
from .x86.cpuid import CpuidMask, filter_cpuid

if TYPE_CHECKING:
    from .transport.placement import VirtioMmioDevices

log = logging.getLogger(__name__)

REQUIRED_CAPS: Final = (
    c.KVM_CAP_USER_MEMORY, c.KVM_CAP_IRQCHIP, c.KVM_CAP_PIT2, c.KVM_CAP_IRQFD,
    c.KVM_CAP_IOEVENTFD, c.KVM_CAP_SET_TSS_ADDR, c.KVM_CAP_SET_IDENTITY_MAP_ADDR,
    c.KVM_CAP_EXT_CPUID,
)

_IO_EXIT = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
# exit_reason, then the union read as kvm_run.mmio: phys_addr, data[8] (skipped), len,
# is_write. Offsets are asserted against the ctypes layout below.
_EXIT_HEAD = struct.Struct("<8xI20xQ8xIB")
_MMIO_DATA_OFFSET: Final = RUN_EXIT_UNION_OFFSET + 8
assert RUN_EXIT_REASON_OFFSET == 8 and RUN_EXIT_UNION_OFFSET == 32
_INTERNAL = struct.Struct("<II")
_SYSTEM_EVENT = struct.Struct("<I")
_KICK_SIGNAL: Final = signal.SIGUSR1


class IrqLine:
    """An interrupt controller input driven with KVM_IRQ_LINE (legacy ISA devices)."""

    def __init__(self, vm: Vm, irq: int) -> None:
        self.vm = vm
        self.irq = irq

    def trigger(self) -> None:
        self.vm.irq_line(self.irq, 1)
        self.vm.irq_line(self.irq, 0)

    def set_level(self, high: bool) -> None:
        self.vm.irq_line(self.irq, 1 if high else 0)


@dataclass
class RunResult:
    """How the guest ended. ``status`` is minivmm's exit status."""

    status: int
    reason: str  # "poweroff", "reboot", "debug-exit", "signal", "error"
    detail: str = ""


@dataclass
class Timeline:
    """Monotonic time stamps of the boot's milestones (seconds)."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.setdefault(name, time.monotonic() if at is None else at)

    def lines(self) -> list[str]:
        if not self.marks:
            return []
        t0 = min(self.marks.values())
        return [f"timeline: {name:<20} {1000 * (t - t0):9.2f} ms"
                for name, t in sorted(self.marks.items(), key=lambda kv: kv[1])]


class Machine:
    """One VM with one vCPU (SMP comes later)."""

    def __init__(self, mem_size: int, *, cpus: int = 1, cpuid_mask: CpuidMask | None = None,
                 timeline: Timeline | None = None) -> None:
        if cpus != 1:
            raise VmmError("--cpus: only 1 vCPU is supported so far")
        self.timeline = timeline or Timeline()
        self.system = System()
        try:
            self.system.require(*REQUIRED_CAPS)
            self.vm = self.system.create_vm()
            self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
            self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            self.memory = GuestMemory(mem_size)
            for region in self.memory.regions:
                self.vm.set_user_memory_region(region.gpa, region.size, region.host_addr)
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid2(filter_cpuid(self.system.supported_cpuid(), cpu_index=0,
                                              cpu_count=cpus, mask=cpuid_mask))
            x86cpu.setup_msrs(self.vcpu)
            x86cpu.setup_fpu(self.vcpu)
            x86cpu.setup_lapic(self.vcpu)
        except BaseException:
            self.system.close()
            raise
        self.timeline.mark("kvm ready")
        self.pio_bus = Bus("port I/O")
        self.mmio_bus = Bus("MMIO")
        #: exits by KVM exit reason
        self.exit_counts = [0] * 64
        self.result: RunResult | None = None
        self._stop_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._on_stop: list[Callable[[], None]] = []
        #: the 8250 UART, once attached
        self.serial: Serial | None = None
        #: where console input goes (the UART's or virtio-console's input), if anywhere
        self.console_input: Callable[[bytes], object] | None = None
        #: the virtio-mmio devices, once placed
        self.virtio: VirtioMmioDevices | None = None

    # -- boot -----------------------------------------------------------------------

    def set_boot(self, protocol: str, entry: int, boot_params: int) -> None:
        """Point the vCPU at a loaded kernel (see x86.loader.BootInfo)."""
        x86cpu.write_gdt(self.memory)
        if protocol == "linux64":
            x86cpu.write_identity_page_tables(self.memory)
            x86cpu.setup_long_mode(self.vcpu, entry, boot_params)
        elif protocol == "pvh":
            x86cpu.setup_pvh(self.vcpu, entry, boot_params)
        else:
            raise ValueError(f"unknown boot protocol {protocol!r}")

    def irq_line(self, irq: int) -> IrqLine:
        return IrqLine(self.vm, irq)

    # -- stopping -------------------------------------------------------------------

    def request_stop(self, status: int, reason: str, detail: str = "") -> None:
        """End the VM (from any thread): the first request wins."""
        with self._stop_lock:
            if self.result is None:
                self.result = RunResult(status, reason, detail)
        self.vcpu.run.immediate_exit = 1
        t = self._thread
        if t is not None and t.ident is not None and t is not threading.current_thread():
            try:
                signal.pthread_kill(t.ident, _KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the run loop has ended (device threads, terminal restore)."""
        self._on_stop.append(fn)

    # -- running --------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run the vCPU on its own thread until the guest ends; return how it ended."""
        if threading.current_thread() is threading.main_thread():
            # KVM_RUN returns EINTR when this signal reaches the vCPU thread.
            signal.signal(_KICK_SIGNAL, lambda *_: None)
        self._thread = threading.Thread(target=self._vcpu_thread, name="vcpu0", daemon=True)
        self._thread.start()
        while self._thread.is_alive():
            self._thread.join(0.25)  # wakes for Python signal handlers in the main thread
        for fn in self._on_stop:
            try:
                fn()
            except Exception:
                log.exception("error while stopping")
        self.timeline.mark("vm exit")
        assert self.result is not None
        return self.result

    def _vcpu_thread(self) -> None:
        try:
            self._run_loop()
        except Exception as e:  # a VMM bug or a KVM failure: report it, never hang
            log.debug("vCPU thread failed", exc_info=True)
            self.request_stop(1, "error", f"vCPU 0: {e}")

    def _run_loop(self) -> None:
        """KVM_RUN and dispatch, until a stop is requested.

        Per exit this does one ioctl, one struct unpack for the exit reason and the MMIO
        fields together (harmless garbage for other exits), and, for MMIO, a range check
        against the device hit last time before falling back to the bus's bisect. The data
        memoryviews are made once, not per exit.
        """
        vcpu = self.vcpu
        fd = vcpu.fd
        run = vcpu.run
        view = vcpu.run_view
        kvm_run = kvm_api._ioctl_int_fn
        request = kvm_api.KVM_RUN
        get_errno = ctypes.get_errno
        counts = self.exit_counts
        head = _EXIT_HEAD.unpack_from
        io_exit = _IO_EXIT.unpack_from
        union = RUN_EXIT_UNION_OFFSET
        pio = self.pio_bus
        mmio = self.mmio_bus
        exit_io = c.KVM_EXIT_IO
        exit_mmio = c.KVM_EXIT_MMIO
        io_out = c.KVM_EXIT_IO_OUT
        mmio_data = [view[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + n] for n in range(9)]
        pio_data: dict[int, memoryview] = {}  # keyed by offset * 8 + size
        last_base = last_end = 0  # the MMIO device hit last
        last_read: Callable[[int, memoryview], None] = mmio.read
        last_write: Callable[[int, memoryview], None] = mmio.write
        self.timeline.mark("first KVM_RUN")
        while self.result is None:
            if kvm_run(fd, request, 0) < 0:
                err = get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    run.immediate_exit = 0
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
        if reason == c.KVM_EXIT_HLT:
            self.request_stop(0, "poweroff", "the guest halted with interrupts off")
        elif reason == c.KVM_EXIT_SHUTDOWN:
            self.request_stop(0, "reboot", "triple fault (the guest rebooted)")
        elif reason == c.KVM_EXIT_SYSTEM_EVENT:
            (kind,) = _SYSTEM_EVENT.unpack_from(view, union)
            if kind == c.KVM_SYSTEM_EVENT_SHUTDOWN:
                self.request_stop(0, "poweroff")
            elif kind == c.KVM_SYSTEM_EVENT_RESET:
                self.request_stop(0, "reboot")
            else:
                self.request_stop(1, "error", f"guest system event {kind} (crash)")
        elif reason == c.KVM_EXIT_INTERNAL_ERROR:
            suberror, _ndata = _INTERNAL.unpack_from(view, union)
            what = "emulation failure" if suberror == c.KVM_INTERNAL_ERROR_EMULATION else (
                f"internal error, suberror {suberror}")
            self.request_stop(1, "error", f"KVM {what}\n{self.describe_vcpu()}")
        elif reason == c.KVM_EXIT_FAIL_ENTRY:
            hw = self.vcpu.run.fail_entry.hardware_entry_failure_reason
            self.request_stop(1, "error",
                              f"KVM could not enter the guest (hardware reason 0x{hw:x})\n"
                              f"{self.describe_vcpu()}")
        elif reason in (c.KVM_EXIT_INTR, c.KVM_EXIT_IRQ_WINDOW_OPEN):
            pass
        else:
            name = c.EXIT_REASON_NAMES.get(reason, str(reason))
            self.request_stop(1, "error", f"unexpected KVM exit {name}\n{self.describe_vcpu()}")

    # -- reporting ------------------------------------------------------------------

    def describe_vcpu(self) -> str:
        """Register state and the instruction bytes at RIP, for a failure report."""
        try:
            r = self.vcpu.get_regs()
            sr = self.vcpu.get_sregs()
        except OSError as e:
            return f"(registers unavailable: {e})"
        names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                 "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
        lines = ["  " + "  ".join(f"{n}={getattr(r, n):016x}" for n in names[i:i + 4])
                 for i in range(0, len(names), 4)]
        lines.append(f"  cr0={sr.cr0:x} cr2={sr.cr2:x} cr3={sr.cr3:x} cr4={sr.cr4:x} "
                     f"efer={sr.efer:x} cs={sr.cs.selector:x} (dpl {sr.cs.dpl}, l={sr.cs.l})")
        rip = r.rip if sr.cr0 & c.X86_CR0_PG == 0 or sr.cr3 == 0 else self._translate(r.rip)
        code = "unavailable (RIP not in guest RAM)"
        if rip is not None and self.memory.contains(rip, 16):
            code = self.memory.read(rip, 16).hex(" ")
        lines.append(f"  code at rip: {code}")
        return "\n".join(lines)

    def _translate(self, va: int) -> int | None:
        """Walk the guest's 4-level page tables (long mode) for a diagnostic."""
        try:
            table = self.vcpu.get_sregs().cr3 & ~0xFFF
            for shift in (39, 30, 21, 12):
                entry = self.memory.read_u64(table + ((va >> shift) & 0x1FF) * 8)
                if not entry & 1:
                    return None
                if shift in (30, 21) and entry & x86cpu.PTE_PAGE_SIZE:
                    mask = (1 << shift) - 1
                    return (entry & 0x000FFFFFFFFFF000 & ~mask) | (va & mask)
                table = entry & 0x000FFFFFFFFFF000
            return int(table | (va & 0xFFF))
        except Exception:
            return None

    def stats_lines(self) -> list[str]:
        lines = [f"stats: exits {c.EXIT_REASON_NAMES.get(i, str(i))}: {n}"
                 for i, n in enumerate(self.exit_counts) if n]
        lines.append(f"stats: unhandled port I/O: {self.pio_bus.unhandled_reads} reads, "
                     f"{self.pio_bus.unhandled_writes} writes")
        lines.append(f"stats: unhandled MMIO: {self.mmio_bus.unhandled_reads} reads, "
                     f"{self.mmio_bus.unhandled_writes} writes")
        return lines

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.system.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def emulated_host_warning() -> str | None:
    return hostinfo.EMULATED_HOST_HINT if hostinfo.kvm_emulates_guest_kernel() else None
