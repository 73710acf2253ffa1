"""The MC146818 CMOS RTC: registers, the update-in-progress window, setting the time the
way Linux does, and the periodic, alarm and update-ended interrupts (with a fake clock and
a recording IRQ line; one test with the real clock and the timer thread)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from guests import run_minivmm, tiny_elf
from hypothesis import given, settings
from hypothesis import strategies as st

from minivmm.bus import Bus
from minivmm.devices.legacy.rtc import (
    CENTURY,
    DAY_OF_MONTH,
    DAY_OF_WEEK,
    HOURS,
    HOURS_ALARM,
    MINUTES,
    MINUTES_ALARM,
    MONTH,
    REG_A,
    REG_B,
    REG_C,
    REG_D,
    SECONDS,
    SECONDS_ALARM,
    SHUTDOWN_STATUS,
    YEAR,
    Rtc,
    civil_from_days,
    days_from_civil,
)
from minivmm.x86 import layout

from .helpers_legacy import FakeClock, RecordingLine, cmos_rd, cmos_wr, rd, wr

NS = 1_000_000_000
UTC = dt.UTC
SET, PIE, AIE, UIE, DM, H24 = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
IRQF, PF, AF, UF = 0x80, 0x40, 0x20, 0x10
UIP = 0x80
UIP_WINDOW = 244_141  # ns: 8 cycles of 32.768 kHz, rounded up


def at(year: int, month: int, day: int, hour: int, minute: int, second: int,
       ns: int = 0) -> int:
    stamp = dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()
    return int(stamp) * NS + ns


T0 = at(2026, 12, 1, 13, 5, 30)  # a Tuesday


def make(start: int = T0) -> tuple[Rtc, RecordingLine, FakeClock]:
    line, clock = RecordingLine(), FakeClock(start)
    return Rtc(line, clock=clock, timer_thread=False), line, clock


def time_bytes(rtc: Rtc) -> list[int]:
    return [cmos_rd(rtc, i) for i in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH,
                                      MONTH, YEAR, CENTURY)]


def test_reset_state_reads_the_host_clock_in_bcd_24_hour() -> None:
    rtc, line, _ = make(T0 + 400_000_000)
    assert time_bytes(rtc) == [0x30, 0x05, 0x13, 0x03, 0x01, 0x12, 0x26, 0x20]
    assert cmos_rd(rtc, REG_A) == 0x26
    assert cmos_rd(rtc, REG_B) == H24
    assert cmos_rd(rtc, REG_C) == 0
    assert cmos_rd(rtc, REG_D) == 0x80  # VRT
    assert line.levels == []
    assert not rtc.timer_running


@pytest.mark.parametrize(
    ("b", "hour", "expected"),
    [
        (H24 | DM, 13, [30, 5, 13, 3, 1, 12, 26, 20]),
        (0, 13, [0x30, 0x05, 0x81, 0x03, 0x01, 0x12, 0x26, 0x20]),  # 1 PM
        (DM, 13, [30, 5, 0x81, 3, 1, 12, 26, 20]),
        (0, 0, [0x30, 0x05, 0x12, 0x03, 0x01, 0x12, 0x26, 0x20]),  # 12 AM
        (0, 12, [0x30, 0x05, 0x92, 0x03, 0x01, 0x12, 0x26, 0x20]),  # 12 PM
        (DM, 23, [30, 5, 0x8B, 3, 1, 12, 26, 20]),  # 11 PM
    ],
)
def test_binary_and_12_hour_modes(b: int, hour: int, expected: list[int]) -> None:
    rtc, _, _ = make(at(2026, 12, 1, hour, 5, 30))
    cmos_wr(rtc, REG_B, b)
    assert time_bytes(rtc) == expected


def test_uip_is_set_for_the_244_us_before_each_update() -> None:
    rtc, _, clock = make(T0 + NS - UIP_WINDOW - 1)
    assert cmos_rd(rtc, REG_A) == 0x26
    assert cmos_rd(rtc, SECONDS) == 0x30
    clock.step(1)
    assert cmos_rd(rtc, REG_A) == UIP | 0x26
    assert cmos_rd(rtc, SECONDS) == 0x30  # the update has not happened yet
    clock.ns = T0 + NS - 1
    assert cmos_rd(rtc, REG_A) & UIP
    clock.step(1)
    assert cmos_rd(rtc, REG_A) == 0x26
    assert cmos_rd(rtc, SECONDS) == 0x31
    cmos_wr(rtc, REG_B, SET | H24)
    clock.ns = T0 + 2 * NS - 1
    assert cmos_rd(rtc, REG_A) == 0x26  # no updates while SET: UIP stays 0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10 * NS))
def test_uip_clear_promises_244_us_without_an_update(offset: int) -> None:
    """What Linux's mc146818_avoid_UIP relies on."""
    rtc, _, clock = make(T0 + offset)
    seconds, uip = cmos_rd(rtc, SECONDS), cmos_rd(rtc, REG_A) & UIP
    clock.step(UIP_WINDOW - 1)
    if not uip:
        assert cmos_rd(rtc, SECONDS) == seconds


def linux_set_time(rtc: Rtc, fields: list[int], divider_reset: bool = True) -> None:
    """mc146818_set_time's sequence (Linux 6.1): SET, hold the divider (Intel; AMD keeps
    it running), the fields from year down to seconds, then restore B and A."""
    b, a = cmos_rd(rtc, REG_B), cmos_rd(rtc, REG_A)
    cmos_wr(rtc, REG_B, b | SET)
    cmos_wr(rtc, REG_A, a | 0x70 if divider_reset else a)
    for index, value in zip((YEAR, MONTH, DAY_OF_MONTH, HOURS, MINUTES, SECONDS), fields,
                            strict=True):
        cmos_wr(rtc, index, value)
    cmos_wr(rtc, REG_B, b)
    cmos_wr(rtc, REG_A, a)


def test_setting_the_time_with_the_divider_held_starts_half_a_second_early() -> None:
    rtc, _, clock = make(T0 + 123_456_789)
    linux_set_time(rtc, [0x99, 0x12, 0x31, 0x23, 0x59, 0x59])
    assert time_bytes(rtc)[:3] == [0x59, 0x59, 0x23]
    clock.step(NS // 2 - 1)
    assert cmos_rd(rtc, SECONDS) == 0x59
    clock.step(1)
    # Linux wrote no century (it does only with ACPI's FADT century field): it stayed 20,
    # so the clock went from 2099-12-31 into 2100-01-01, a Friday (6).
    assert time_bytes(rtc) == [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]


def test_setting_the_time_with_set_only_keeps_the_divider_phase() -> None:
    rtc, _, clock = make(T0 + 300_000_000)
    cmos_wr(rtc, REG_B, DM | H24)
    linux_set_time(rtc, [99, 12, 31, 23, 59, 59], divider_reset=False)
    assert cmos_rd(rtc, CENTURY) == 20
    cmos_wr(rtc, REG_B, SET | DM | H24)
    cmos_wr(rtc, CENTURY, 19)
    cmos_wr(rtc, REG_B, DM | H24)
    clock.step(NS - 300_000_000 - 1)
    assert cmos_rd(rtc, SECONDS) == 59
    clock.step(1)
    assert time_bytes(rtc) == [0, 0, 0, 7, 1, 1, 0, 20]  # 2000-01-01, a Saturday


def test_guest_time_keeps_its_offset_from_the_host_clock() -> None:
    rtc, _, clock = make()
    linux_set_time(rtc, [0x70, 0x01, 0x01, 0x00, 0x00, 0x00])  # 2070-01-01 00:00:00
    clock.step(3 * 86400 * NS + 3661 * NS)  # the clock started at 00:00:00.5
    assert time_bytes(rtc) == [0x01, 0x01, 0x01, 0x07, 0x04, 0x01, 0x70, 0x20]  # Saturday


def test_set_freezes_the_clock_and_clears_uie() -> None:
    rtc, _, clock = make()
    cmos_wr(rtc, REG_A, 0x20)  # no periodic flag
    cmos_wr(rtc, REG_B, UIE | H24)
    cmos_wr(rtc, REG_B, SET | UIE | H24)
    assert cmos_rd(rtc, REG_B) == SET | H24
    clock.step(100 * NS)
    assert cmos_rd(rtc, SECONDS) == 0x30
    assert cmos_rd(rtc, REG_C) == 0  # no updates, no UF
    cmos_wr(rtc, MINUTES, 0x45)
    assert cmos_rd(rtc, MINUTES) == 0x45
    cmos_wr(rtc, REG_B, H24)
    clock.step(NS)
    assert time_bytes(rtc)[:3] == [0x31, 0x45, 0x13]


def test_a_time_byte_written_while_running_moves_the_clock() -> None:
    rtc, _, clock = make(T0 + 700_000_000)
    cmos_wr(rtc, HOURS, 0x02)
    assert time_bytes(rtc)[:3] == [0x30, 0x05, 0x02]
    clock.step(300_000_000)
    assert cmos_rd(rtc, SECONDS) == 0x31  # same phase: the update came on time


def test_hostile_time_bytes_carry_over_and_never_raise() -> None:
    rtc, _, _ = make()
    cmos_wr(rtc, REG_B, SET | H24)
    for index in (SECONDS, MINUTES, HOURS, DAY_OF_MONTH, MONTH, YEAR, CENTURY):
        cmos_wr(rtc, index, 0xFF)
    cmos_wr(rtc, REG_B, H24)
    assert len(time_bytes(rtc)) == 8
    cmos_wr(rtc, REG_B, SET | H24)
    for index, value in ((MONTH, 0), (DAY_OF_MONTH, 0), (YEAR, 0), (CENTURY, 0)):
        cmos_wr(rtc, index, value)
    cmos_wr(rtc, REG_B, H24)  # year 0, month 0, day 0: 30 Nov of year -1
    assert time_bytes(rtc)[4:6] == [0x30, 0x11]


def test_reading_c_returns_and_clears_the_flags() -> None:
    rtc, line, clock = make(T0 + NS // 2)
    clock.step(NS)
    assert cmos_rd(rtc, REG_C) == PF | UF  # flags without enables: no IRQF, no IRQ
    assert cmos_rd(rtc, REG_C) == 0
    assert line.levels == []
    clock.step(NS // 1024 + 1)  # the reset rate RS=6: 1024 Hz
    assert cmos_rd(rtc, REG_C) == PF
    cmos_wr(rtc, REG_C, 0xFF)  # read-only
    cmos_wr(rtc, REG_D, 0x00)
    assert cmos_rd(rtc, REG_C) == 0
    assert cmos_rd(rtc, REG_D) == 0x80


def test_update_interrupt_rises_each_second_and_falls_when_c_is_read() -> None:
    rtc, line, clock = make(T0 + NS // 4)
    cmos_wr(rtc, REG_A, 0x20)  # no periodic flag
    cmos_wr(rtc, REG_B, UIE | H24)
    assert rtc.service() == T0 + NS
    clock.ns = T0 + NS - 1
    assert rtc.service() == T0 + NS and line.levels == []
    clock.step(1)
    assert rtc.service() is None  # the line is high until C is read
    assert line.levels == [True]
    assert cmos_rd(rtc, REG_C) == IRQF | UF
    assert line.levels == [True, False]
    assert rtc.service() == T0 + 2 * NS


def test_periodic_interrupt_follows_the_rate_select_bits() -> None:
    rtc, line, clock = make(T0)
    cmos_wr(rtc, REG_A, 0x2F)  # RS=15: 500 ms
    cmos_wr(rtc, REG_B, PIE | H24)
    assert rtc.service() == T0 + NS // 2
    cmos_wr(rtc, REG_A, 0x23)  # RS=3: 122.07 us, 4 cycles of 32.768 kHz
    assert rtc.service() == T0 + 122_071
    cmos_wr(rtc, REG_A, 0x21)  # RS=1: 3.90625 ms
    assert rtc.service() == T0 + 3_906_250
    clock.step(3_906_250)
    rtc.service()
    assert line.high
    assert cmos_rd(rtc, REG_C) == IRQF | PF
    cmos_wr(rtc, REG_A, 0x20)  # RS=0: no periodic interrupt
    clock.step(NS // 2)
    assert rtc.service() is None
    assert not line.high
    cmos_wr(rtc, REG_A, 0x76)  # divider held: no periodic interrupt either
    assert rtc.service() is None


def test_enabling_an_interrupt_whose_flag_is_pending_raises_it_at_once() -> None:
    rtc, line, clock = make(T0)
    clock.step(NS // 1024 + 1)
    cmos_wr(rtc, REG_B, PIE | H24)
    assert line.levels == [True]
    cmos_wr(rtc, REG_B, H24)  # IRQF = PF.PIE + ...: disabling lowers it again
    assert line.levels == [True, False]


def test_alarm_fires_when_the_time_matches() -> None:
    rtc, line, clock = make(T0)
    cmos_wr(rtc, REG_A, 0x20)  # no periodic flag
    cmos_wr(rtc, HOURS_ALARM, 0x13)
    cmos_wr(rtc, MINUTES_ALARM, 0x06)
    cmos_wr(rtc, SECONDS_ALARM, 0x02)
    cmos_wr(rtc, REG_B, AIE | H24)
    assert rtc.service() == at(2026, 12, 1, 13, 6, 2)
    clock.ns = at(2026, 12, 1, 13, 6, 1, ns=NS - 1)
    rtc.service()
    assert not line.high
    clock.step(1)
    rtc.service()
    assert line.high
    assert cmos_rd(rtc, REG_C) == IRQF | AF | UF
    assert rtc.service() == at(2026, 12, 2, 13, 6, 2)  # the same time tomorrow


@pytest.mark.parametrize(
    ("b", "alarm", "expected"),
    [
        (H24, (0x30, 0xC0, 0xFF), at(2026, 12, 1, 13, 6, 30)),  # each minute at :30
        (H24, (0xC0, 0xC0, 0xC0), T0 + NS),  # every second
        (H24, (0x00, 0x00, 0xC5), at(2026, 12, 1, 14, 0, 0)),  # each hour
        (H24, (0x00, 0x00, 0x09), at(2026, 12, 2, 9, 0, 0)),  # passed today: tomorrow
        (0, (0x00, 0x00, 0x81), at(2026, 12, 2, 13, 0, 0)),  # 1 PM (12-hour)
        (DM | H24, (0, 10, 13), at(2026, 12, 1, 13, 10, 0)),  # binary
        (H24, (0x60, 0xC0, 0xC0), None),  # no time shows second 60
        (0, (0x00, 0x00, 0x13), None),  # nor hour 13 in 12-hour mode
    ],
)
def test_alarm_bytes_and_dont_care_values(
    b: int, alarm: tuple[int, int, int], expected: int | None
) -> None:
    rtc, _, _ = make(T0)
    for index, value in zip((SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM), alarm, strict=True):
        cmos_wr(rtc, index, value)
    cmos_wr(rtc, REG_B, AIE | b)
    assert rtc.service() == expected


def test_the_index_register_ignores_the_nmi_bit() -> None:
    rtc, _, _ = make()
    wr(rtc, 0, 0x80 | REG_D)
    assert rtc.nmi_masked
    assert rd(rtc, 1) == 0x80
    cmos_wr(rtc, 0x80 | 0x40, 0x5A)
    assert cmos_rd(rtc, 0x40) == 0x5A
    wr(rtc, 0, REG_D)
    assert not rtc.nmi_masked
    assert rd(rtc, 0) == 0xFF  # the index register is write-only


def test_cmos_ram_is_general_storage() -> None:
    rtc, _, _ = make()
    for index in range(0x0E, 0x80):
        if index != CENTURY:
            cmos_wr(rtc, index, index ^ 0xA5)
    assert all(cmos_rd(rtc, i) == i ^ 0xA5 for i in range(0x0E, 0x80) if i != CENTURY)
    assert cmos_rd(rtc, SHUTDOWN_STATUS) == SHUTDOWN_STATUS ^ 0xA5
    assert cmos_rd(rtc, CENTURY) == 0x20  # part of the clock


def test_wide_accesses_go_byte_by_byte_and_past_the_device_read_ones() -> None:
    rtc, _, _ = make()
    wr(rtc, 0, 0x77 << 8 | 0x20, size=2)  # index 0x20, then data 0x77
    assert cmos_rd(rtc, 0x20) == 0x77
    wr(rtc, 0, 0x20)
    assert rd(rtc, 0, size=4) == 0xFFFF77FF
    assert rd(rtc, 1, size=2) == 0xFF77
    wr(rtc, 1, 0)
    rtc.read(1, memoryview(bytearray()))
    rtc.write(5, memoryview(bytearray(b"\x01")))
    assert cmos_rd(rtc, 0x20) == 0


def test_on_the_bus_at_the_pc_ports() -> None:
    bus = Bus("pio")
    rtc, _, _ = make()
    bus.register(layout.RTC_PORT, Rtc.SIZE, rtc)
    bus.write(0x70, memoryview(bytearray([REG_D])))
    out = bytearray(1)
    bus.read(0x71, memoryview(out))
    assert out[0] == 0x80
    assert layout.RTC_IRQ == 8


@settings(max_examples=300, deadline=None)
@given(st.integers(-719_162, 2_900_000))
def test_calendar_arithmetic_matches_datetime(days: int) -> None:
    date = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    assert civil_from_days(days) == (date.year, date.month, date.day)
    assert days_from_civil(date.year, date.month, date.day) == days


def test_calendar_arithmetic_carries_out_of_range_fields() -> None:
    assert days_from_civil(2025, 13, 1) == days_from_civil(2026, 1, 1)
    assert days_from_civil(2026, 0, 1) == days_from_civil(2025, 12, 1)
    assert days_from_civil(2026, 3, 0) == days_from_civil(2026, 2, 28)


class EventLine(RecordingLine):
    def __init__(self) -> None:
        super().__init__()
        self.raised = threading.Event()

    def set_level(self, high: bool) -> None:
        super().set_level(high)
        if high:
            self.raised.set()


def test_the_timer_thread_raises_enabled_interrupts_and_stops_on_close() -> None:
    line = EventLine()
    rtc = Rtc(line)  # the host clock and the timer thread
    try:
        assert not rtc.timer_running  # no interrupt enabled: no thread
        cmos_wr(rtc, REG_B, UIE | H24)
        assert rtc.timer_running
        for _ in range(2):
            assert line.raised.wait(10), "no update-ended interrupt within 10 s"
            line.raised.clear()
            assert cmos_rd(rtc, REG_C) & (IRQF | UF) == IRQF | UF
        cmos_wr(rtc, REG_B, PIE | H24)
        assert line.raised.wait(10), "no periodic interrupt within 10 s"
        assert cmos_rd(rtc, REG_C) & (IRQF | PF) == IRQF | PF
    finally:
        rtc.close()
    assert not rtc.timer_running
    assert not any(t.name == "rtc" and t.is_alive() for t in threading.enumerate())
    cmos_wr(rtc, REG_B, UIE | H24)  # registers still work; no new thread
    assert not rtc.timer_running


def test_vcpus_and_the_timer_thread_at_once_keep_the_line_consistent() -> None:
    """Four "vCPUs" reading C and toggling the enables while the timer thread raises a
    fast periodic interrupt: nothing raises, and the line is only driven on changes."""
    line = RecordingLine()
    rtc = Rtc(line)
    cmos_wr(rtc, REG_A, 0x23)  # 8192 Hz
    errors: list[BaseException] = []

    def vcpu() -> None:
        try:
            for i in range(3000):
                # one 2-byte access: index and data together, as one exit
                wr(rtc, 0, (PIE | UIE | H24 if i % 3 else H24) << 8 | REG_B, size=2)
                rd(rtc, 0, size=2) if i % 2 else wr(rtc, 0, REG_C)
                rd(rtc, 1)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=vcpu) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        rtc.close()
    assert errors == []
    assert line.levels, "the periodic interrupt never fired"
    assert all(a != b for a, b in zip(line.levels, line.levels[1:], strict=False))
    assert line.levels[0] is True


_GUEST = """
.macro cmos_out idx          # CMOS byte idx to the UART
    mov $\\idx, %al
    out %al, $0x70
    in $0x71, %al
    mov $0x3f8, %dx
    out %al, %dx
.endm
.macro cmos_set idx, value
    mov $\\idx, %al
    out %al, $0x70
    mov $\\value, %al
    out %al, $0x71
.endm
    cmos_out 0x00
    cmos_out 0x02
    cmos_out 0x04
    cmos_out 0x07
    cmos_out 0x08
    cmos_out 0x09
    cmos_out 0x32
    cmos_out 0x0B
    cmos_out 0x8D            # register D, with the NMI-mask bit set
    cmos_set 0x0B, 0x82      # SET: 2010-09-08 05:06:07
    cmos_set 0x09, 0x10
    cmos_set 0x08, 0x09
    cmos_set 0x07, 0x08
    cmos_set 0x04, 0x05
    cmos_set 0x02, 0x06
    cmos_set 0x00, 0x07
    cmos_set 0x0B, 0x02
    cmos_out 0x04
    cmos_out 0x02
    cmos_out 0x00
    cmos_out 0x09
    mov $0x501, %dx          # debug-exit 0
    xor %al, %al
    out %al, %dx
    hlt
"""


@pytest.mark.kvm
def test_a_guest_reads_and_sets_the_clock_through_the_ports(tmp_path: Path) -> None:
    """minivmm run wires the RTC at 0x70/0x71: a tiny guest reads the host's time in BCD
    and sets its own."""
    elf = tiny_elf(tmp_path, "rtc", _GUEST)
    console = tmp_path / "console.bin"
    before = dt.datetime.now(UTC).replace(microsecond=0)
    p = run_minivmm("run", "--kernel", str(elf), "--mem", "32M", "--console",
                    f"file:{console}")
    after = dt.datetime.now(UTC)
    assert p.returncode == 0, p.stderr
    out = console.read_bytes()
    assert len(out) == 13, out
    bcd = [(b >> 4) * 10 + (b & 15) for b in out]
    sec, minute, hour, day, month, year, century = bcd[:7]
    seen = dt.datetime(century * 100 + year, month, day, hour, minute, sec, tzinfo=UTC)
    assert before <= seen <= after, (before, seen, after)
    assert out[7:9] == bytes([H24, 0x80])
    assert out[9:12] in (bytes([0x05, 0x06, 0x07]), bytes([0x05, 0x06, 0x08]))
    assert out[12] == 0x10
