"""The legacy devices' snapshot state (save_state/restore_state): round trips, and
state from a corrupt snapshot refused with one line."""

from __future__ import annotations

import pytest

from minivmm.devices.legacy.acpi_pm import AcpiPm
from minivmm.devices.legacy.i8042 import I8042
from minivmm.devices.legacy.rtc import Rtc
from minivmm.devices.legacy.serial import Serial

from .helpers_legacy import RecordingLine, RecordingSink, rd, wr


def test_serial_round_trip_keeps_registers_and_input_and_flushes_output() -> None:
    sink = RecordingSink()
    a = Serial(RecordingLine(), sink)
    wr(a, 3, 0x03)  # LCR 8N1
    wr(a, 7, 0x5A)  # scratch
    wr(a, 1, 0x01)  # IER: received data
    wr(a, 0, ord("x"))  # buffered output (no newline yet)
    a.enqueue_input(b"hi")
    state = a.save_state()
    assert sink.data == b"x"  # output before the snapshot reached the sink
    line = RecordingLine()
    b = Serial(line, RecordingSink())
    b.restore_state(state)
    assert rd(b, 7) == 0x5A and rd(b, 3) == 0x03 and b.pending_input == 2
    assert line.high  # received data pending with IER.RDA: the line is driven again
    assert rd(b, 0) == ord("h") and rd(b, 0) == ord("i")
    assert b.save_state()["rx"] == ""


@pytest.mark.parametrize("bad", [
    {"ier": 256}, {"fifo": 1}, {"rx": "zz"}, {"unknown": 1}, {"ier": None}])
def test_serial_refuses_state_that_does_not_fit(bad: dict[str, object]) -> None:
    good = Serial(RecordingLine(), RecordingSink()).save_state()
    state = {**good, **bad}
    with pytest.raises(ValueError, match=r"^serial: saved"):
        Serial(RecordingLine(), RecordingSink()).restore_state(state)


def test_i8042_acpi_pm_and_rtc_round_trip() -> None:
    k = I8042(on_reset=lambda: None)
    wr(k, 4, 0x20)  # read the command byte: one byte queued for the guest
    state = k.save_state()
    k2 = I8042(on_reset=lambda: None)
    k2.restore_state(state)
    assert k2.save_state() == state and len(state["output"]) == 1  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="i8042"):
        k2.restore_state({**state, "output": [[300, False]]})
    pm = AcpiPm(on_poweroff=lambda: None)
    pm.sleep_type = 3
    pm2 = AcpiPm(on_poweroff=lambda: None)
    pm2.restore_state(pm.save_state())
    assert pm2.sleep_type == 3
    now = [1_700_000_000 * 10**9]
    r = Rtc(RecordingLine(), clock=lambda: now[0], timer_thread=False)
    wr(r, 0, 0x0E)
    wr(r, 1, 0x42)  # a CMOS byte
    r2 = Rtc(RecordingLine(), clock=lambda: now[0], timer_thread=False)
    r2.restore_state(r.save_state())
    wr(r2, 0, 0x0E)
    assert rd(r2, 1) == 0x42
    with pytest.raises(ValueError, match="rtc: saved CMOS"):
        r2.restore_state({**r.save_state(), "cmos": "00"})


def test_rtc_refuses_a_cmos_index_past_its_bytes() -> None:
    """The index register is 7 bits: a saved 0x90 would make the guest's next read of
    port 0x71 index past the CMOS (an internal error on its vCPU)."""
    now = [1_700_000_000 * 10**9]
    r = Rtc(RecordingLine(), clock=lambda: now[0], timer_thread=False)
    state = r.save_state()
    for index in (0x80, 0x90, 0xFF):
        with pytest.raises(ValueError, match=f"rtc: saved CMOS index {index} is past"):
            r.restore_state({**state, "index": index})
    cmos = bytearray(bytes.fromhex(str(state["cmos"])))
    cmos[0x7F] = 0xA5
    r.restore_state({**state, "index": 0x7F, "cmos": cmos.hex()})
    assert rd(r, 1) == 0xA5  # the last byte, through the restored index


@pytest.mark.parametrize("bad", [{"sleep_type": 8}, {"sleep_type": 256}, {"wake_status": 2},
                                 {"other": 1}])
def test_acpi_pm_refuses_state_that_does_not_fit(bad: dict[str, object]) -> None:
    """A sleep type over 3 bits would not fit the register byte the guest reads back."""
    pm = AcpiPm(on_poweroff=lambda: None)
    with pytest.raises(ValueError, match=r"^acpi_pm: saved"):
        pm.restore_state({**pm.save_state(), **bad})
    pm.restore_state({**pm.save_state(), "sleep_type": 7})
    assert rd(pm, 0) == 7 << 2
