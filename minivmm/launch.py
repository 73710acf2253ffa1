"""Put a machine together from a user's configuration and run it.

This is the one place that knows every layer: it makes the :class:`~minivmm.vm.Machine`,
attaches the legacy devices (8250 UART, i8042, debug-exit port), the virtio-mmio devices
and the console, loads the kernel with a command line that names those devices, writes
the MP table, then runs the guest until it ends. ``minivmm run`` is a thin wrapper around
:func:`launch`; tests and embedders can call it directly.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import hostinfo
from .console import ConsoleSink
from .devices.base import VirtioDevice
from .devices.console import ConsoleDevice
from .errors import UsageError
from .eventloop import EventLoop
from .transport.placement import VirtioMmioDevices
from .vm import Machine, RunResult, Timeline
from .x86 import layout
from .x86.acpi import write_acpi_tables
from .x86.loader import load_kernel
from .x86.mptable import write_mptable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskSpec:
    """``--disk PATH[,ro][,serial=ID]``"""

    path: Path
    read_only: bool = False
    serial: str | None = None

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        path, *opts = text.split(",")
        if not path:
            raise UsageError(f"--disk {text!r}: give an image path, e.g. --disk disk.img,ro")
        read_only = False
        serial = None
        for opt in opts:
            if opt == "ro":
                read_only = True
            elif opt.startswith("serial="):
                serial = opt.removeprefix("serial=")
            else:
                raise UsageError(f"--disk {text!r}: unknown option {opt!r} "
                                 "(known: ro, serial=ID)")
        return cls(Path(path), read_only, serial)


@dataclass(frozen=True)
class NetSpec:
    """``--net tap=NAME[,mac=MAC]``"""

    tap: str
    mac: bytes | None = None

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        from .devices.net import parse_mac

        tap = None
        mac = None
        for opt in text.split(","):
            key, eq, value = opt.partition("=")
            if key == "tap" and eq and value:
                tap = value
            elif key == "mac" and eq:
                mac = parse_mac(value)
            else:
                raise UsageError(f"--net {text!r}: unknown option {opt!r} "
                                 "(known: tap=NAME, mac=52:54:00:xx:xx:xx)")
        if tap is None:
            raise UsageError(f"--net {text!r}: name a tap, e.g. --net tap=tap0")
        return cls(tap, mac)


@dataclass
class LaunchConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    mem_size: int = 128 << 20
    cpus: int = 1
    console: str = "stdio"
    #: "serial" (the 8250, ttyS0) or "virtio" (virtio-console, hvc0)
    console_device: str = "serial"
    disks: list[DiskSpec] = field(default_factory=list)
    nets: list[NetSpec] = field(default_factory=list)
    rng: bool = False
    prefer_pvh: bool = True
    #: ACPI tables, the RSDP handed to the kernel, and the S5 power-off registers
    acpi: bool = True
    #: extra virtio devices (embedders, device authors testing their own device)
    devices: list[VirtioDevice] = field(default_factory=list)
    #: called with the Machine once it is built, before it runs (tests, embedders)
    setup_hooks: list[Callable[[Machine], None]] = field(default_factory=list)


@contextmanager
def _stop_on_signals(machine: Machine) -> Iterator[None]:
    """SIGINT and SIGTERM end the VM cleanly with status 128+N (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        machine.request_stop(128 + signum, "signal", f"stopped by {name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _virtio_devices(cfg: LaunchConfig, sink: ConsoleSink,
                    console_in: int | None) -> list[VirtioDevice]:
    """The devices the configuration asks for, opened (user errors surface here)."""
    devices: list[VirtioDevice] = []
    for disk in cfg.disks:
        from .devices.blk import BlockDevice

        devices.append(BlockDevice(disk.path, read_only=disk.read_only, serial=disk.serial))
    for net in cfg.nets:
        from .devices.net import NetDevice

        devices.append(NetDevice(net.tap, mac=net.mac))
    if cfg.rng:
        from .devices.rng import RngDevice

        devices.append(RngDevice())
    if cfg.console_device == "virtio":
        devices.append(ConsoleDevice(output=sink, input_fd=console_in))
    elif cfg.console_device != "serial":
        raise UsageError(f"--console-device {cfg.console_device!r}: use serial or virtio")
    devices.extend(cfg.devices)
    return devices


def build_machine(cfg: LaunchConfig, *, timeline: Timeline | None = None) -> Machine:
    from .console import open_sink
    from .devices.legacy.debug_exit import DebugExit
    from .devices.legacy.i8042 import I8042
    from .devices.legacy.serial import Serial

    sink = open_sink(cfg.console)  # first: a bad --console is a usage error, not a VM error
    # virtio-console reads its input from a pipe that the stdin pump fills, so the pump
    # still sees Ctrl-A x; the pipe's capacity is the back-pressure.
    pipe = os.pipe2(os.O_CLOEXEC) if cfg.console_device == "virtio" else None
    virtio = _virtio_devices(cfg, sink, pipe[0] if pipe else None)
    machine = Machine(cfg.mem_size, cpus=cfg.cpus, timeline=timeline)
    try:
        # Output of both consoles goes to --console (a Linux with console=hvc0 leaves the
        # UART silent); input goes to the one --console-device names.
        serial = Serial(machine.irq_line(layout.SERIAL_IRQ), sink,
                        first_byte=lambda: machine.timeline.mark("first console byte"))
        machine.serial = serial
        machine.console_input = serial.enqueue_input
        machine.pio_bus.register(layout.SERIAL_PORT, Serial.SIZE, serial)
        i8042 = I8042(on_reset=lambda: machine.request_stop(0, "reboot", "i8042 reset"))
        machine.pio_bus.register(layout.I8042_PORT, I8042.SIZE, i8042)
        machine.pio_bus.register(layout.DEBUG_EXIT_PORT, DebugExit.SIZE, DebugExit(
            on_exit=lambda v: machine.request_stop(v, "debug-exit", f"debug-exit {v}")))
        machine.on_stop(serial.flush)

        loop = EventLoop()
        placed = VirtioMmioDevices(machine.vm, machine.memory, machine.mmio_bus, loop)
        for dev in virtio:
            placed.add(dev)
            if isinstance(dev, ConsoleDevice) and pipe is not None:
                machine.console_input = functools.partial(os.write, pipe[1])
                machine.on_stop(functools.partial(_close_pipe, pipe))
        machine.virtio = placed
        cmdline = " ".join(part for part in (cfg.cmdline, placed.cmdline()) if part)

        rsdp = None
        if cfg.acpi:
            from .devices.legacy.acpi_pm import AcpiPm

            machine.pio_bus.register(layout.ACPI_PM_PORT, AcpiPm.SIZE, AcpiPm(
                on_poweroff=lambda: machine.request_stop(0, "poweroff", "ACPI S5")))
            rsdp = write_acpi_tables(
                machine.memory, cpus=cfg.cpus, serial=True, rtc=True, i8042=True,
                virtio=[(s.base, layout.VIRTIO_MMIO_SIZE, s.irq) for s, _ in placed.transports])
        boot = load_kernel(machine.memory, cfg.kernel, initrd=cfg.initrd, cmdline=cmdline,
                           prefer_pvh=cfg.prefer_pvh, rsdp_addr=rsdp)
        write_mptable(machine.memory, cfg.cpus)
        machine.set_boot(boot.protocol, boot.entry, boot.boot_params_addr)
        machine.timeline.mark("kernel loaded")
        loop.start()
        machine.on_stop(loop.stop)
        machine.on_stop(placed.close)
        machine.on_stop(sink.close)
        for hook in cfg.setup_hooks:
            hook(machine)
    except BaseException:
        for dev in virtio:
            dev.close()
        machine.close()
        raise
    return machine


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        try:
            os.close(fd)
        except OSError:
            pass


def device_hints(machine: Machine, kernel: Path) -> list[str]:
    """kvmtool's courtesy: name the guest kernel option that is likely missing when a
    Linux guest never initialised one of its devices."""
    placed = machine.virtio
    if placed is None or not hostinfo.looks_like_linux(kernel):
        return []
    hints = []
    for slot, dev in placed.never_initialised():
        option = {"blk": "CONFIG_VIRTIO_BLK", "rng": "CONFIG_HW_RANDOM_VIRTIO",
                  "console": "CONFIG_VIRTIO_CONSOLE", "net": "CONFIG_VIRTIO_NET"}.get(
                      dev.name, "the driver for it")
        hints.append(f"the guest never initialised virtio-{dev.name} at 0x{slot.base:x} "
                     f"(IRQ {slot.irq}): is its kernel built with CONFIG_VIRTIO_MMIO, "
                     f"CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and {option}?")
    return hints


def launch(cfg: LaunchConfig, *, process_start: float | None = None) -> tuple[RunResult, Machine]:
    """Build the machine, run the guest until it ends, and return how it ended."""
    from .console import attach_stdin

    timeline = Timeline()
    if process_start is not None:
        timeline.mark("process start", process_start)
    machine = build_machine(cfg, timeline=timeline)
    with _stop_on_signals(machine), attach_stdin(cfg.console, machine):
        result = machine.run()
    machine.close()
    return result, machine
