"""The ACPI sleep control and sleep status registers: how a guest powers the machine off.

A hardware-reduced ACPI platform has no PM1 control block; the FADT points instead at
two byte-wide registers (ACPI 6.4 §4.8.3.7 "Sleep Control Register" and §4.8.3.8 "Sleep
Status Register"), here two I/O ports at ``layout.ACPI_PM_PORT``:

    +0  sleep control   bits 2-4 SLP_TYPx, bit 5 SLP_EN (write-only, reads 0);
                        bits 0-1 and 6-7 reserved
    +1  sleep status    bit 7 WAK_STS (write 1 to clear); other bits reserved, read 0

To enter a sleep state the guest clears WAK_STS, then writes SLP_TYPx (the value the DSDT's
``\\_Sx`` package gives) together with SLP_EN, and waits for WAK_STS (ACPICA's
AcpiHwExtendedSleep, which Linux's poweroff ends in). SLP_TYPx = acpi.SLEEP_TYPE_S5 with
SLP_EN calls ``on_poweroff()``: the VMM ends the VM with status 0. The DSDT declares no other
sleep state; a guest that enters one anyway is woken at once (WAK_STS set), so it does not
wait forever, and a rate-limited line is logged.

Any offset and access size is accepted: a multi-byte access touches each register it
covers, byte by byte; bytes past the two registers read 0 and are ignored when written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Final

from ...ratelimit import RateLimitedLog
from ...x86.acpi import SLEEP_TYPE_S5, SLP_EN, SLP_TYP_MASK, SLP_TYP_SHIFT, WAK_STS
from .state import Kind, check_mapping, restore_fields, save_fields

log = logging.getLogger(__name__)

CONTROL_OFFSET: Final = 0
STATUS_OFFSET: Final = 1


class AcpiPm:
    """``on_poweroff()`` is called on the vCPU thread, inside the port write; it may raise
    to unwind the run loop."""

    SIZE: Final = 2

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._lock = threading.Lock()  # two vCPUs may write at once
        self.sleep_type = 0  # SLP_TYPx as last written
        self.wake_status = False
        self._warn = RateLimitedLog(log)

    _STATE: Final[dict[str, Kind]] = {"sleep_type": "u8", "wake_status": "bool"}

    def save_state(self) -> dict[str, object]:
        """The sleep type and wake status (snapshots)."""
        with self._lock:
            return save_fields(self, self._STATE)

    def restore_state(self, state: Mapping[str, object]) -> None:
        """ValueError (one line) for state that does not fit."""
        check_mapping("acpi_pm", state)
        sleep_type = state.get("sleep_type")
        if isinstance(sleep_type, int) and sleep_type > SLP_TYP_MASK >> SLP_TYP_SHIFT:
            raise ValueError(f"acpi_pm: saved sleep type {sleep_type} is wider than SLP_TYPx "
                             "(3 bits)")
        with self._lock:
            restore_fields(self, "acpi_pm", state, self._STATE)

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            for i in range(len(data)):
                reg = offset + i
                if reg == CONTROL_OFFSET:
                    data[i] = self.sleep_type << SLP_TYP_SHIFT  # SLP_EN reads as 0
                elif reg == STATUS_OFFSET:
                    data[i] = WAK_STS if self.wake_status else 0
                else:
                    data[i] = 0

    def write(self, offset: int, data: memoryview) -> None:
        poweroff = False
        with self._lock:
            for i in range(len(data)):
                reg, value = offset + i, data[i]
                if reg == STATUS_OFFSET:
                    if value & WAK_STS:
                        self.wake_status = False
                elif reg == CONTROL_OFFSET:
                    self.sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
                    if not value & SLP_EN:
                        continue
                    if self.sleep_type == SLEEP_TYPE_S5:
                        poweroff = True
                    else:
                        self._warn("acpi: the guest entered undeclared sleep type %d; "
                                   "waking it at once", self.sleep_type)
                        self.wake_status = True
        if poweroff:
            self._on_poweroff()
