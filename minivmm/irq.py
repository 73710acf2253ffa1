"""How a device raises its interrupt, without knowing how the VM delivers it."""

from __future__ import annotations

from typing import Protocol


class InterruptLine(Protocol):
    """One interrupt input of the guest's interrupt controller (an IOAPIC/PIC pin)."""

    def trigger(self) -> None:
        """An edge: the line goes high and low again (virtio-mmio, irqfd style)."""

    def set_level(self, high: bool) -> None:
        """Drive a level-triggered line (the 8250 UART's interrupt output)."""
