"""Put a machine together from a user's configuration and run it.

This is the one place that knows every layer: it makes the :class:`~minivmm.vm.Machine`,
loads the kernel, writes the MP table, attaches the legacy devices (8250 UART, i8042,
debug-exit port) and the console, then runs the guest until it ends. ``minivmm run`` is
a thin wrapper around :func:`launch`; tests and embedders can call it directly.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .vm import Machine, RunResult, Timeline
from .x86 import layout
from .x86.loader import load_kernel
from .x86.mptable import write_mptable


@dataclass
class LaunchConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    mem_size: int = 128 << 20
    cpus: int = 1
    console: str = "stdio"
    prefer_pvh: bool = True
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


def build_machine(cfg: LaunchConfig, *, timeline: Timeline | None = None) -> Machine:
    from .console import open_sink
    from .devices.legacy.debug_exit import DebugExit
    from .devices.legacy.i8042 import I8042
    from .devices.legacy.serial import Serial

    sink = open_sink(cfg.console)  # first: a bad --console is a usage error, not a VM error
    machine = Machine(cfg.mem_size, cpus=cfg.cpus, timeline=timeline)
    try:
        boot = load_kernel(machine.memory, cfg.kernel, initrd=cfg.initrd, cmdline=cfg.cmdline,
                           prefer_pvh=cfg.prefer_pvh)
        write_mptable(machine.memory, cfg.cpus)
        machine.set_boot(boot.protocol, boot.entry, boot.boot_params_addr)
        machine.timeline.mark("kernel loaded")
        serial = Serial(machine.irq_line(layout.SERIAL_IRQ), sink,
                        first_byte=lambda: machine.timeline.mark("first console byte"))
        machine.serial = serial
        machine.pio_bus.register(layout.SERIAL_PORT, Serial.SIZE, serial)
        i8042 = I8042(on_reset=lambda: machine.request_stop(0, "reboot", "i8042 reset"))
        machine.pio_bus.register(layout.I8042_PORT, I8042.SIZE, i8042)
        machine.pio_bus.register(layout.DEBUG_EXIT_PORT, DebugExit.SIZE, DebugExit(
            on_exit=lambda v: machine.request_stop(v, "debug-exit", f"debug-exit {v}")))
        machine.on_stop(serial.flush)
        machine.on_stop(sink.close)
        for hook in cfg.setup_hooks:
            hook(machine)
    except BaseException:
        machine.close()
        raise
    return machine


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
