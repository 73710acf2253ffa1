"""Legacy port-I/O devices of a PC, as much of them as a Linux guest and the probe need.

    serial      8250/16550A UART (COM1 at layout.SERIAL_PORT, IRQ layout.SERIAL_IRQ)
    i8042       keyboard controller: only what Linux needs to probe it and to reset the machine
    debug_exit  one write-only port; the guest writes its exit status to it
    rtc         MC146818 CMOS real-time clock (layout.RTC_PORT, IRQ layout.RTC_IRQ)
    acpi_pm     the ACPI sleep control/status registers: S5 from the guest powers off

Each is a bus device (minivmm.bus.BusDevice) registered over ``SIZE`` ports at its base.
All are pure Python and testable without /dev/kvm; their effects on the VM (an interrupt
level, the end of the VM) go through objects and callbacks the VMM passes in. Every
register access is guest-controlled: any offset and any access size is accepted, and
none of these devices raises from ``read`` or ``write``. The callbacks they invoke
(``on_reset``, ``on_exit``, ``on_poweroff``) run on the vCPU thread inside the port
access and may raise to unwind the run loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .acpi_pm import AcpiPm
    from .debug_exit import DebugExit
    from .i8042 import I8042
    from .rtc import Rtc
    from .serial import Serial, Sink

__all__ = ["I8042", "AcpiPm", "DebugExit", "Rtc", "Serial", "Sink"]

# Imported on first use, so that a VM pays only for the devices it has (acpi_pm brings
# the ACPI tables with it, and a VM with --acpi off has none).
_WHERE = {"AcpiPm": "acpi_pm", "DebugExit": "debug_exit", "I8042": "i8042", "Rtc": "rtc",
          "Serial": "serial", "Sink": "serial"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
