"""minivmm's Python API: a VM built from a VmConfig, started, waited for, stopped.

::

    import minivmm
    cfg = minivmm.VmConfig(kernel="guest/out/probe.elf", mem="128M",
                           cmdline="probe.check=cpl3", console="none")
    with minivmm.Vm(cfg) as vm:        # KVM, memory, devices, kernel loaded
        vm.start()                     # vCPU threads run; returns at once
        result = vm.wait(timeout=30)   # RunResult(status, reason, detail), or None
        vm.stop()                      # from any thread, idempotent

    vm.pause(); vm.resume()            # every vCPU out of KVM_RUN, the device thread idle
    vm.snapshot("snap")                # pause, save to the directory, resume
    clone = minivmm.Vm.restore("snap", console="none")   # copy-on-write, not started

This is where the two stacks meet: the platform (minivmm.platform: KVM, memory, vCPUs,
buses) and the virtio devices (minivmm.transport.placement), with the legacy devices,
the console, the kernel and the firmware tables. One ``ExitStack`` owns everything the
VM opens; if building fails half way, what was opened is closed before the error leaves
the constructor. Several VMs can live in one process, each on its own threads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Protocol

from .config import VmConfig
from .console import ConsoleSink, PipeFeeder, open_sink
from .crashwatch import CrashWatch, Finding
from .devices.legacy.debug_exit import DebugExit
from .devices.legacy.i8042 import I8042
from .devices.legacy.rtc import Rtc
from .devices.legacy.serial import Serial
from .eventloop import EventLoop
from .pause import PauseError, PauseGate
from .platform import Platform
from .stop import RunResult, StopController
from .transport.placement import VirtioMmioDevices
from .vcpu import VcpuRunner
from .x86 import layout
from .x86.loader import load_kernel
from .x86.mptable import write_mptable

if TYPE_CHECKING:
    from .check import DriverChecker
    from .devices.base import VirtioDevice
    from .devices.legacy.acpi_pm import AcpiPm
    from .snapshot import Snapshot
    from .transport.mmio import MmioTransport
    from .transport.observe import Observer

__all__ = ["RunResult", "Timeline", "Vm"]

log = logging.getLogger(__name__)

_warned: set[str] = set()


class LegacyState(Protocol):
    """A legacy device whose registers a snapshot saves."""

    def save_state(self) -> dict[str, object]: ...

    def restore_state(self, state: Mapping[str, object]) -> None: ...


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


#: how long close() waits for a vCPU thread to leave KVM_RUN after a kick
_JOIN_TIMEOUT = 10.0


class Timeline:
    """Monotonic time stamps of the boot's milestones (seconds)."""

    def __init__(self, marks: dict[str, float] | None = None) -> None:
        self.marks: dict[str, float] = {} if marks is None else marks

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.setdefault(name, time.monotonic() if at is None else at)

    def lines(self) -> list[str]:
        if not self.marks:
            return []
        t0 = min(self.marks.values())
        return [f"timeline: {name:<20} {1000 * (t - t0):9.2f} ms"
                for name, t in sorted(self.marks.items(), key=lambda kv: kv[1])]


class Vm:
    """One virtual machine, built from ``config`` (see the module docstring).

    ``devices`` are extra virtio devices (yours), placed after the configured ones.
    ``setup_hooks`` are called with the built VM before it is returned (tests)."""

    def __init__(self, config: VmConfig, *, devices: Sequence[VirtioDevice] = (),
                 setup_hooks: Sequence[Callable[[Vm], None]] = (),
                 timeline: Timeline | None = None, _snapshot: Snapshot | None = None
                 ) -> None:
        self.config = config
        self.timeline = timeline or Timeline()
        self.stopper = StopController()
        self.pause_gate = PauseGate(self.stopper)
        self.result: RunResult | None = None
        self._started = False
        self._closed = False
        self._paused = False
        self._pause_lock = threading.RLock()  # pause, resume and snapshot, one at a time
        self._stack = ExitStack()
        with ExitStack() as building:
            building.callback(self.close)
            self._build(config, devices, _snapshot)
            if _snapshot is not None:
                from .snapshot import restore_into

                restore_into(self, _snapshot)
                self.timeline.mark("state restored")
            for hook in setup_hooks:
                hook(self)
            building.pop_all()

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, devices: Sequence[VirtioDevice] = (),
                setup_hooks: Sequence[Callable[[Vm], None]] = (),
                timeline: Timeline | None = None, **overrides: object) -> Vm:
        """A VM rebuilt from the snapshot directory ``path`` (see minivmm.snapshot), not
        started: ``start()`` or ``run()`` it and the guest goes on from where it was
        saved. Its RAM maps the snapshot's copy-on-write, so any number of VMs may be
        restored from one snapshot. ``overrides`` change how the machine reaches the host
        (``console``, ``drives``, ``network_interfaces``, ``vsock``, ``devices``: the same
        devices, other backends); ``devices`` are your own, as given to the saved VM.
        A snapshot that cannot be restored here is a UsageError (field "snapshot")."""
        from .snapshot import load

        timeline = timeline or Timeline()
        timeline.mark("restore")
        snap = load(path)
        if "drives" not in overrides:  # clones must not write one image: cow by default
            overrides["drives"] = tuple(dataclasses.replace(d, cow=True)
                                        for d in snap.config.drives)
        snap = snap.with_overrides(**overrides)
        return cls(snap.config, devices=devices, setup_hooks=setup_hooks, timeline=timeline,
                   _snapshot=snap)

    def _build(self, cfg: VmConfig, extra: Sequence[VirtioDevice],
               snap: Snapshot | None) -> None:
        own = self._stack
        # Usage errors first: a bad console or disk is reported before KVM is touched.
        # The crash detector reads every console line as it is written (crashwatch).
        self.crash_watch = CrashWatch(open_sink(cfg.console))
        self.sink: ConsoleSink = self.crash_watch
        own.callback(self.sink.close)
        self.stopper.add_kick(self._note_stop)  # the VM's end may be a finding too
        self.feeder: PipeFeeder | None = None
        if cfg.console_device == "virtio":
            # virtio-console reads from a pipe that the console input fills, so the
            # stdin pump still sees Ctrl-A x; the pipe's capacity is the back-pressure.
            self.feeder = PipeFeeder()
            own.callback(self.feeder.close)
        observer = self._observer(cfg)
        virtio = self._virtio_devices(cfg)
        self._configured_devices = len(virtio)
        virtio.extend(extra)
        if cfg.cpus > (os.cpu_count() or 1):
            _warn_once(f"{cfg.cpus} vCPUs on a host with {os.cpu_count()} CPUs: they will "
                       "take turns")
        self.platform = Platform(cfg.mem, cpus=cfg.cpus,
                                 ram_file=None if snap is None else snap.ram_file)
        own.callback(self.platform.close)
        self.timeline.mark("kvm ready")
        self.memory = self.platform.memory
        self.loop = EventLoop(on_error=self._internal_error)
        self.virtio = VirtioMmioDevices(self.platform.vm, self.memory, self.platform.mmio_bus,
                                        self.loop, observer)
        own.callback(self.virtio.close)
        own.callback(self.loop.stop)  # LIFO: the device thread ends before devices close
        for dev in virtio:
            self.virtio.add(dev)
        self._legacy_devices()
        own.callback(self.serial.flush)
        if snap is not None:  # the guest's memory and registers come from the snapshot
            self.cmdline = snap.cmdline
        else:
            cmdline = " ".join(part for part in (
                cfg.base_cmdline(), cfg.host_quirks_cmdline(), self.virtio.cmdline()) if part)
            rsdp = self._acpi() if cfg.acpi else None
            boot = load_kernel(self.memory, cfg.kernel, initrd=cfg.initrd, cmdline=cmdline,
                               prefer_pvh=cfg.prefer_pvh, rsdp_addr=rsdp)
            write_mptable(self.memory, cfg.cpus)
            self.platform.set_boot(boot.protocol, boot.entry, boot.boot_params_addr)
            self.cmdline = cmdline
            self.timeline.mark("kernel loaded")
        self.runners = [
            VcpuRunner(vcpu, pio=self.platform.pio_bus, mmio=self.platform.mmio_bus,
                       memory=self.memory, stop=self.stopper, pause=self.pause_gate,
                       on_first_run=lambda: self.timeline.mark("first KVM_RUN"))
            for vcpu in self.platform.vcpus]

    def _observer(self, cfg: VmConfig) -> Observer | None:
        """What watches the virtio devices: --check-driver's checker (``driver_check``)
        and --trace's tracer, or None (then nothing is watched, at no cost)."""
        self.driver_check: DriverChecker | None = None
        observers: list[Observer] = []
        if cfg.trace is not None:
            from .trace import open_trace

            tracer = open_trace(cfg.trace)
            self._stack.callback(tracer.close)
            observers.append(tracer)
        if cfg.check_driver != "off":
            from .check import DriverChecker

            self.driver_check = DriverChecker(strict=cfg.check_driver == "strict")
            self.driver_check.listeners = list(observers)
            observers.append(self.driver_check)
        if len(observers) < 2:
            return observers[0] if observers else None
        from .transport.observe import Observers

        return Observers(observers)

    def _virtio_devices(self, cfg: VmConfig) -> list[VirtioDevice]:
        """The configured devices, opened (user errors surface here), each closed with
        the VM however building ends."""
        devices: list[VirtioDevice] = []

        def owned(dev: VirtioDevice) -> None:
            self._stack.callback(dev.close)
            devices.append(dev)

        specs = cfg.virtio_devices()
        if specs:
            from .devices import plugins

            # One path for all: the built-in fields name built-in devices by their short
            # names, --device names any (minivmm.devices.plugins).
            for field_name, spec in specs:
                owned(plugins.build(spec, field=field_name))
        if self.feeder is not None:
            from .devices.console import ConsoleDevice

            owned(ConsoleDevice(output=self.sink, input_fd=self.feeder.read_fd))
        return devices

    def _legacy_devices(self) -> None:
        """The 8250 UART, the i8042 (for its reset line), the CMOS RTC and the debug-exit
        port. Output
        of both consoles goes to the sink; input goes to the one the config names."""
        pio = self.platform.pio_bus
        self.serial = Serial(self.platform.irq_line(layout.SERIAL_IRQ), self.sink,
                             first_byte=lambda: self.timeline.mark("first console byte"))
        pio.register(layout.SERIAL_PORT, Serial.SIZE, self.serial)
        self.i8042 = I8042(on_reset=lambda: self.request_stop(0, "reboot", "i8042 reset"))
        pio.register(layout.I8042_PORT, I8042.SIZE, self.i8042)
        pio.register(layout.DEBUG_EXIT_PORT, DebugExit.SIZE, DebugExit(
            on_exit=lambda v: self.request_stop(v, "debug-exit", f"debug-exit {v}")))
        self.rtc = Rtc(self.platform.irq_line(layout.RTC_IRQ))
        self._stack.callback(self.rtc.close)
        pio.register(layout.RTC_PORT, Rtc.SIZE, self.rtc)
        self.acpi_pm: AcpiPm | None = None
        if self.config.acpi:  # the sleep registers behind ACPI's S5
            from .devices.legacy.acpi_pm import AcpiPm

            self.acpi_pm = AcpiPm(
                on_poweroff=lambda: self.request_stop(0, "poweroff", "ACPI S5"))
            pio.register(layout.ACPI_PM_PORT, AcpiPm.SIZE, self.acpi_pm)

    def legacy_devices(self) -> dict[str, LegacyState]:
        """The legacy devices with state (snapshots), by name."""
        devices: dict[str, LegacyState] = {"serial": self.serial, "i8042": self.i8042,
                                           "rtc": self.rtc}
        if self.acpi_pm is not None:
            devices["acpi_pm"] = self.acpi_pm
        return devices

    def extra_transports(self) -> list[MmioTransport]:
        """The transports of the devices given as ``devices=`` (after the configured)."""
        return [t for _, t in self.virtio.transports[self._configured_devices:]]

    def _acpi(self) -> int:
        """ACPI tables for this machine; the RSDP's address. Kernels without ACPI ignore
        them (the MP table and the command line's virtio_mmio.device= describe the
        machine to them)."""
        from .x86.acpi import write_acpi_tables

        return write_acpi_tables(
            self.memory, cpus=self.config.cpus, serial=True, rtc=True, i8042=True,
            virtio=[(slot.base, layout.VIRTIO_MMIO_SIZE, slot.irq)
                    for slot, _ in self.virtio.transports])

    # -- running --------------------------------------------------------------------

    @property
    def console_input(self) -> Callable[[bytes], object]:
        """Where the user's console input goes: the guest's console device."""
        if self.feeder is not None:
            return self.feeder.feed
        return self.serial.enqueue_input

    def start(self) -> None:
        """Start the device thread and every vCPU thread; returns at once. A VM paused
        before it started starts paused."""
        if self._closed:
            raise RuntimeError("start() on a closed Vm")
        if self._started:
            return
        self._started = True
        self.loop.start()
        if self._paused:
            self._paused = False
            self.pause_gate.requested = True  # the first KVM_RUN returns at once
            for r in self.runners:
                r.kick()
            for r in self.runners:
                r.start()
            self.pause()
            return
        for r in self.runners:
            r.start()

    # -- pausing and snapshots --------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, timeout: float = 10.0) -> None:
        """Stop the guest where it is: every vCPU out of KVM_RUN, waiting, and the device
        thread idle (device work in progress finished first, its used entries written).
        Idempotent; from any thread but the VM's own. PauseError if the VM has ended or
        did not stop within ``timeout`` seconds."""
        with self._pause_lock:
            self._pause(timeout)

    def _pause(self, timeout: float) -> None:
        if self._closed:
            raise PauseError("the VM is closed")
        if self.stopper.result is not None:
            raise PauseError(f"the VM has ended ({self.stopper.result.reason})")
        if self._paused:
            return
        if self._started:
            runners = self.runners
            self.pause_gate.pause([r.kick for r in runners],
                                  lambda: sum(r.running for r in runners), timeout)
            if not self.loop.pause(timeout):
                self.pause_gate.resume()
                raise PauseError(f"the device thread did not go idle within {timeout:.0f} s")
        self._paused = True

    def resume(self) -> None:
        """Let a paused VM run on (idempotent)."""
        with self._pause_lock:
            if not self._paused:
                return
            self._paused = False
            self.loop.resume()
            self.pause_gate.resume()

    def snapshot(self, path: str | os.PathLike[str], *, resume: bool = True
                 ) -> dict[str, float]:
        """Save the VM to the directory ``path`` (replaced if it holds a snapshot):
        pause, save, then resume (``resume=False``: stay paused). Restore it with
        :meth:`Vm.restore`. Returns timings in seconds (``total_s`` ...) and
        ``ram_written`` (bytes of RAM that were not holes)."""
        from .snapshot import save

        with self._pause_lock:
            self.pause()
            try:
                return save(self, path)
            finally:
                if resume:
                    self.resume()

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """Wait until the VM has ended; its RunResult, or None if ``timeout`` seconds
        passed first. The vCPU threads have left KVM_RUN when a result is returned."""
        result = self.stopper.wait(timeout)
        if result is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.runners:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.join(left):
                return None
        self.result = result
        self.timeline.mark("vm exit")
        return result

    def run(self) -> RunResult:
        """start() and wait() until the guest ends."""
        self.start()
        result = None
        while result is None:
            result = self.wait(0.25)  # wakes the main thread for Python signal handlers
        return result

    def request_stop(self, status: int, reason: str, detail: str = "") -> None:
        """End the VM with this result unless another came first (any thread)."""
        self.stopper.request(status, reason, detail)

    def stop(self) -> None:
        """End the VM (status 0, reason "stopped") if nothing ended it yet. Any thread;
        idempotent."""
        self.stopper.request(0, "stopped", "stopped by the embedding program")

    @property
    def crash(self) -> Finding | None:
        """The first crash or warning seen so far: a console line ("Kernel panic",
        "BUG:", "Oops", "general protection fault", "WARNING: CPU:") as the guest printed
        it, or how the VM ended (a triple fault, an emulation failure, a KVM or minivmm
        failure); None if nothing was seen (minivmm.crashwatch)."""
        return self.crash_watch.first

    def on_crash(self, callback: Callable[[Finding], None]) -> None:
        """Call ``callback(finding)`` for each finding from now on, on the thread that saw
        it (a vCPU or the device thread): it must be quick and must not block."""
        self.crash_watch.on_finding(callback)

    def _note_stop(self) -> None:
        result = self.stopper.result
        if result is not None:
            self.crash_watch.vm_stopped(result.reason, result.detail)

    def _internal_error(self, what: str) -> None:
        self.stopper.request(1, "internal-error", what)

    # -- reporting ------------------------------------------------------------------

    def stats_lines(self) -> list[str]:
        lines: list[str] = []
        for r in self.runners:
            lines += r.stats_lines()
        pio, mmio = self.platform.pio_bus, self.platform.mmio_bus
        lines.append(f"stats: unhandled port I/O: {pio.unhandled_reads} reads, "
                     f"{pio.unhandled_writes} writes")
        lines.append(f"stats: unhandled MMIO: {mmio.unhandled_reads} reads, "
                     f"{mmio.unhandled_writes} writes")
        for slot, t in self.virtio.transports:
            for name, value in t.device.stats().items():
                lines.append(f"stats: virtio-{t.device.name}@0x{slot.base:x} {name}: {value}")
        return lines

    def device_hints(self) -> list[str]:
        """kvmtool's courtesy: name the guest kernel option that is likely missing when a
        Linux guest never initialised one of its devices."""
        from . import hostinfo

        if not hostinfo.looks_like_linux(self.config.kernel):
            return []
        return [f"the guest never initialised virtio-{dev.name} at 0x{slot.base:x} "
                f"(IRQ {slot.irq}): is its kernel built with CONFIG_VIRTIO_MMIO, "
                f"CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and {dev.kernel_option}?"
                for slot, dev in self.virtio.never_initialised()]

    # -- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the VM if it runs, wait for its threads, release everything (idempotent).
        If a vCPU thread does not leave KVM_RUN in time, its vCPU is left open (leaked)
        rather than closed under it."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self.stopper.request(0, "stopped", "the VM was closed")
            stuck = [r.index for r in getattr(self, "runners", ()) if not r.join(_JOIN_TIMEOUT)]
            if stuck:
                log.error("vCPU threads %s did not stop; leaving their KVM resources open",
                          stuck)
                return
        self._stack.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
