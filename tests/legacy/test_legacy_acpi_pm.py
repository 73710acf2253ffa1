"""The ACPI sleep control/status registers: S5 powers off, nothing else does, and a hostile
guest's accesses never raise."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivmm.bus import Bus
from minivmm.devices.legacy.acpi_pm import AcpiPm
from minivmm.x86 import acpi, layout

from .helpers_legacy import rd, wr

CONTROL, STATUS = 0, 1


class Power:
    def __init__(self) -> None:
        self.offs = 0

    def __call__(self) -> None:
        self.offs += 1


def s5_value() -> int:
    return (acpi.SLEEP_TYPE_S5 << 2) | 0x20  # SLP_TYPx in bits 2-4, SLP_EN bit 5


def test_linux_poweroff_sequence_through_the_bus() -> None:
    """What ACPICA's AcpiHwExtendedSleep does: clear WAK_STS, then SLP_TYP | SLP_EN."""
    power = Power()
    bus = Bus("pio")
    bus.register(layout.ACPI_PM_PORT, AcpiPm.SIZE, AcpiPm(power))
    bus.write(acpi.SLEEP_STATUS_PORT, memoryview(bytearray([0x80])))
    assert power.offs == 0
    bus.write(acpi.SLEEP_CONTROL_PORT, memoryview(bytearray([s5_value()])))
    assert power.offs == 1


def test_s5_type_without_slp_en_only_sets_the_type() -> None:
    power = Power()
    dev = AcpiPm(power)
    wr(dev, CONTROL, acpi.SLEEP_TYPE_S5 << 2)
    assert power.offs == 0
    assert rd(dev, CONTROL) == acpi.SLEEP_TYPE_S5 << 2  # SLP_EN reads as 0
    wr(dev, CONTROL, s5_value() | 0xC3)  # reserved bits set too: still S5
    assert power.offs == 1


@pytest.mark.parametrize("sleep_type", [t for t in range(8) if t != acpi.SLEEP_TYPE_S5])
def test_other_sleep_types_wake_at_once(sleep_type: int) -> None:
    power = Power()
    dev = AcpiPm(power)
    assert rd(dev, STATUS) == 0
    wr(dev, CONTROL, (sleep_type << 2) | 0x20)
    assert power.offs == 0
    assert rd(dev, STATUS) == 0x80  # WAK_STS: the guest's wait loop ends
    wr(dev, STATUS, 0x7F)  # writing 0 to WAK_STS leaves it
    assert rd(dev, STATUS) == 0x80
    wr(dev, STATUS, 0x80)  # write 1 to clear
    assert rd(dev, STATUS) == 0


def test_wide_accesses_cover_both_registers() -> None:
    power = Power()
    dev = AcpiPm(power)
    wr(dev, CONTROL, 0x20 | (1 << 2), size=2)  # S1 + SLP_EN; status byte 0
    assert rd(dev, CONTROL, size=4) == (1 << 2) | (0x80 << 8)
    wr(dev, CONTROL, 0x8000 | s5_value(), size=4)  # clear WAK_STS and enter S5
    assert power.offs == 1
    assert rd(dev, STATUS) == 0


def test_on_poweroff_runs_outside_the_lock_and_may_raise() -> None:
    class Stop(Exception):
        pass

    dev: AcpiPm

    def poweroff() -> None:
        rd(dev, STATUS)  # would deadlock if called with the lock held
        raise Stop

    dev = AcpiPm(poweroff)
    with pytest.raises(Stop):
        wr(dev, CONTROL, s5_value())


def test_two_vcpus_at_once() -> None:
    power = Power()
    dev = AcpiPm(power)

    def hammer() -> None:
        for _ in range(2000):
            wr(dev, CONTROL, (3 << 2) | 0x20)
            wr(dev, STATUS, 0x80)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert power.offs == 0
    wr(dev, CONTROL, s5_value())
    assert power.offs == 1


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.binary(max_size=8)),
                max_size=30))
def test_hostile_accesses_never_raise(ops: list[tuple[bool, int, bytes]]) -> None:
    power = Power()
    dev = AcpiPm(power)
    expected = 0
    for is_write, offset, data in ops:
        buf = memoryview(bytearray(data))
        if is_write:
            dev.write(offset, buf)
            for i, b in enumerate(data):
                if offset + i == CONTROL and b & 0x20 and (b >> 2) & 7 == acpi.SLEEP_TYPE_S5:
                    expected += 1
                    break  # one power-off per access at most
        else:
            dev.read(offset, buf)
            assert all(b == 0 for i, b in enumerate(buf) if offset + i > STATUS)
    assert power.offs == expected
