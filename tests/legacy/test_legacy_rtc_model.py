"""Hypothesis: the RTC against a reference model written from the data sheet with Python's
datetime, driven by random register reads and writes and steps of an injected clock.

The model covers BCD and binary, 12- and 24-hour modes, SET, time bytes written by the
guest (while SET or while running), Linux's set-time sequence with the divider held,
the periodic rate, the alarm bytes (with don't-care values) and the flags of register C
and the IRQ level after every operation. A second test feeds hostile bytes to every
register and checks only what must always hold.
"""

from __future__ import annotations

import datetime as dt
import itertools
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from minivmm.devices.legacy.rtc import Rtc

from .helpers_legacy import FakeClock, RecordingLine, cmos_rd, cmos_wr, rd, wr

NS = 1_000_000_000
EPOCH = dt.datetime(1970, 1, 1)
UIP_WINDOW = 244_141  # ns before an update during which register A shows UIP
SET, DM, H24 = 0x80, 0x04, 0x02
ENABLES = 0x70  # PIE AIE UIE, at the same bits as PF AF UF in register C
UIE = 0x10
TIME_FIELDS = {0x00: (0, 59), 0x02: (0, 59), 0x04: (0, 23), 0x06: (1, 7), 0x07: (1, 28),
               0x08: (1, 12), 0x09: (0, 99), 0x32: (19, 20)}
ALARMS = (0x01, 0x03, 0x05)


class Model:
    """The clock as the data sheet describes it, in datetime terms."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.offset = 0
        self.frozen: dict[int, int] | None = None  # the time bytes while SET
        self.binary = False
        self.h24 = True
        self.enables = 0
        self.rate = 6
        self.flags = 0
        self.alarm = {0x01: 0, 0x03: 0, 0x05: 0}
        self.ram: dict[int, int] = {}

    # encodings, written independently of the device's
    def enc(self, v: int) -> int:
        return v if self.binary else int(f"{v % 100:02d}", 16)

    def dec(self, b: int) -> int:
        return b if self.binary else int(f"{b:02x}")

    def enc_hour(self, h: int) -> int:
        if self.h24:
            return self.enc(h)
        return self.enc(12 if h % 12 == 0 else h % 12) | (0x80 if h >= 12 else 0)

    def moment(self, second: int) -> dt.datetime:
        return EPOCH + dt.timedelta(seconds=second)

    def shown(self) -> dict[int, int]:
        if self.frozen is not None:
            return dict(self.frozen)
        t = self.moment((self.now + self.offset) // NS)
        return {0x00: self.enc(t.second), 0x02: self.enc(t.minute),
                0x04: self.enc_hour(t.hour), 0x06: self.enc(t.isoweekday() % 7 + 1),
                0x07: self.enc(t.day), 0x08: self.enc(t.month),
                0x09: self.enc(t.year % 100), 0x32: self.enc(t.year // 100)}

    def start(self, fields: dict[int, int], phase: int) -> None:
        hours = fields[0x04]
        hour = self.dec(hours & 0x7F)
        if not self.h24:
            hour = hour % 12 + (12 if hours & 0x80 else 0)
        # A day past the month's end carries into the next month (data sheet: the
        # bytes are not checked; the device documents the carry).
        t = dt.datetime(self.dec(fields[0x32]) * 100 + self.dec(fields[0x09]),
                        self.dec(fields[0x08]), 1, hour, self.dec(fields[0x02]),
                        self.dec(fields[0x00])) + dt.timedelta(days=self.dec(fields[0x07]) - 1)
        seconds = (t - EPOCH) // dt.timedelta(seconds=1)
        self.offset = seconds * NS + phase - self.now

    def uip(self) -> bool:
        return self.frozen is None and (self.now + self.offset) % NS >= NS - UIP_WINDOW

    def alarm_matches(self, t: dt.datetime) -> bool:
        pairs = ((0x01, self.enc(t.second)), (0x03, self.enc(t.minute)),
                 (0x05, self.enc_hour(t.hour)))
        return all(self.alarm[i] >= 0xC0 or self.alarm[i] == b for i, b in pairs)

    def alarm_between(self, first: int, last: int) -> bool:
        """Does an update at a second in [first, last] match the alarm? Candidates are
        enumerated day by day from the alarm's own values, not second by second."""
        if all(self.alarm[i] >= 0xC0 for i in ALARMS):
            return first <= last
        exact = [[v for v in range(count) if self.alarm[i] >= 0xC0 or enc(v) == self.alarm[i]]
                 for i, count, enc in zip(ALARMS, (60, 60, 24),
                                          (self.enc, self.enc, self.enc_hour), strict=True)]
        for day in range(first // 86400, last // 86400 + 1):
            for h, m, s in itertools.product(exact[2], exact[1], exact[0]):
                second = day * 86400 + h * 3600 + m * 60 + s
                if first <= second <= last:
                    assert self.alarm_matches(self.moment(second))
                    return True
        return False

    def step(self, ns: int) -> None:
        a, b = self.now + self.offset, self.now + self.offset + ns
        self.now += ns
        if self.rate:
            ticks = 1 << (self.rate + 6 if self.rate <= 2 else self.rate - 1)
            period = Fraction(ticks * NS, 32768)
            if Fraction(b) // period > Fraction(a) // period:
                self.flags |= 0x40
        if self.frozen is None and b // NS > a // NS:
            self.flags |= 0x10
            if self.alarm_between(a // NS + 1, b // NS):
                self.flags |= 0x20

    @property
    def reg_b(self) -> int:
        return ((SET if self.frozen is not None else 0) | self.enables
                | (DM if self.binary else 0) | (H24 if self.h24 else 0))

    @property
    def level(self) -> bool:
        return bool(self.flags & self.enables)


STEPS = st.one_of(st.integers(0, 3 * NS), st.integers(0, 600 * NS),
                  st.integers(0, 3 * 86400 * NS), st.sampled_from([NS - UIP_WINDOW, 1]))
PHASES = st.sampled_from([0, 1, NS - 1, NS // 2 - 1, NS // 2, NS - UIP_WINDOW - 1,
                          NS - UIP_WINDOW])
ops = st.one_of(
    st.tuples(st.just("step"), STEPS),
    st.tuples(st.just("to_phase"), PHASES),
    st.tuples(st.just("alarm_soon"), st.integers(1, 3), st.integers(0, 7)),
    st.tuples(st.just("read"), st.sampled_from([*TIME_FIELDS, 0x0A, 0x0B, 0x0C, 0x0D])),
    st.tuples(st.just("mode"), st.booleans(), st.booleans()),
    st.tuples(st.just("set"), st.booleans()),
    st.tuples(st.just("enables"), st.sampled_from([0, 0x10, 0x20, 0x40, 0x70])),
    st.tuples(st.just("read"), st.just(0x0C)),
    st.tuples(st.just("rate"), st.sampled_from([0, 1, 2, 3, 6, 10, 15])),
    st.tuples(st.just("time"), st.sampled_from(sorted(TIME_FIELDS)), st.integers(0, 99)),
    st.tuples(st.just("alarm"), st.sampled_from(ALARMS), st.integers(0, 255),
              st.booleans()),
    st.tuples(st.just("linux_set_time"), st.datetimes(dt.datetime(1970, 1, 1),
                                                      dt.datetime(2069, 12, 31))),
    st.tuples(st.just("ram"), st.integers(0x0E, 0x7F).filter(lambda i: i != 0x32),
              st.integers(0, 255)),
)


def apply(op: tuple[Any, ...], rtc: Rtc, model: Model, clock: FakeClock) -> None:
    kind = op[0]
    if kind == "step":
        assert isinstance(op[1], int)
        clock.step(op[1])
        model.step(op[1])
        rtc.service()
    elif kind == "to_phase":  # step to a point of the guest's second: UIP, updates
        assert isinstance(op[1], int)
        ns = (op[1] - (model.now + model.offset)) % NS
        clock.step(ns)
        model.step(ns)
        rtc.service()
        assert cmos_rd(rtc, 0x0A) == (0x80 if model.uip() else 0) | 0x20 | model.rate
        assert cmos_rd(rtc, 0x00) == model.shown()[0x00]
    elif kind == "alarm_soon":  # an alarm a few seconds from now; some bytes don't care
        seconds, dont_care = op[1], op[2]
        assert isinstance(seconds, int) and isinstance(dont_care, int)
        t = model.moment((model.now + model.offset) // NS + seconds)
        for bit, (index, byte) in enumerate(((0x01, model.enc(t.second)),
                                             (0x03, model.enc(t.minute)),
                                             (0x05, model.enc_hour(t.hour)))):
            byte = 0xC0 | bit if dont_care >> bit & 1 else byte
            model.alarm[index] = byte
            cmos_wr(rtc, index, byte)
    elif kind == "read":
        index = op[1]
        assert isinstance(index, int)
        value = cmos_rd(rtc, index)
        if index == 0x0A:
            assert value == (0x80 if model.uip() else 0) | 0x20 | model.rate
        elif index == 0x0B:
            assert value == model.reg_b
        elif index == 0x0C:
            assert value == model.flags | (0x80 if model.level else 0)
            model.flags = 0
        elif index == 0x0D:
            assert value == 0x80
        else:
            assert value == model.shown()[index], f"CMOS byte 0x{index:02x}"
    elif kind == "mode" and model.frozen is None:  # a mode change wants new time bytes
        model.binary, model.h24 = bool(op[1]), bool(op[2])
        cmos_wr(rtc, 0x0B, model.reg_b)
    elif kind == "set" and op[1] != (model.frozen is not None):
        if op[1]:
            model.frozen = model.shown()
            model.enables &= ~UIE  # setting SET clears UIE
        else:
            fields, model.frozen = model.frozen, None
            assert fields is not None
            model.start(fields, (model.now + model.offset) % NS)
        cmos_wr(rtc, 0x0B, model.reg_b | (UIE if op[1] else 0))
    elif kind == "enables":
        assert isinstance(op[1], int)
        model.enables = op[1] & ~(UIE if model.frozen is not None else 0)
        cmos_wr(rtc, 0x0B, model.reg_b | op[1])
    elif kind == "rate":
        assert isinstance(op[1], int)
        model.rate = op[1]
        cmos_wr(rtc, 0x0A, 0x20 | model.rate)
    elif kind == "time":
        index, raw = op[1], op[2]
        assert isinstance(index, int) and isinstance(raw, int)
        low, high = TIME_FIELDS[index]
        v = low + raw % (high - low + 1)
        byte = model.enc_hour(v) if index == 0x04 else model.enc(v)
        cmos_wr(rtc, index, byte)
        if model.frozen is not None:
            model.frozen[index] = byte
        else:
            fields = model.shown()
            fields[index] = byte
            model.start(fields, (model.now + model.offset) % NS)
    elif kind == "alarm":
        index, raw, encoded = op[1], op[2], op[3]
        assert isinstance(index, int) and isinstance(raw, int)
        if encoded and raw < 0xC0:  # a value some time shows
            raw = model.enc_hour(raw % 24) if index == 0x05 else model.enc(raw % 60)
        model.alarm[index] = raw
        cmos_wr(rtc, index, raw)
    elif kind == "linux_set_time" and model.frozen is None:
        t = op[1]
        assert isinstance(t, dt.datetime)
        fields = {0x09: model.enc(t.year % 100), 0x08: model.enc(t.month),
                  0x07: model.enc(t.day), 0x04: model.enc_hour(t.hour),
                  0x02: model.enc(t.minute), 0x00: model.enc(t.second)}
        b = model.reg_b
        cmos_wr(rtc, 0x0B, b | SET)
        cmos_wr(rtc, 0x0A, 0x70 | model.rate)
        for index, byte in fields.items():
            cmos_wr(rtc, index, byte)
        cmos_wr(rtc, 0x0B, b)
        cmos_wr(rtc, 0x0A, 0x20 | model.rate)
        century = model.shown()[0x32]  # Linux without ACPI leaves the century alone
        model.start({**fields, 0x32: century}, NS // 2)
    elif kind == "ram":
        ram_index, ram_value = op[1], op[2]
        assert isinstance(ram_index, int) and isinstance(ram_value, int)
        cmos_wr(rtc, ram_index, ram_value)
        model.ram[ram_index] = ram_value
        assert all(cmos_rd(rtc, i) == v for i, v in model.ram.items())
    assert rtc.irq_level == model.level


@settings(max_examples=250, deadline=None)
@given(st.integers(0, 4_000_000_000 * NS), st.lists(ops, min_size=10, max_size=80))
def test_rtc_follows_the_reference_model(start: int, program: list[tuple[Any, ...]]) -> None:
    clock = FakeClock(start)
    line = RecordingLine()
    rtc = Rtc(line, clock=clock, timer_thread=False)
    model = Model(start)
    for op in program:
        apply(op, rtc, model, clock)
    assert all(a != b for a, b in zip(line.levels, line.levels[1:], strict=False))


hostile = st.one_of(
    st.tuples(st.just("step"), st.integers(-10 * NS, 400 * 86400 * NS)),
    st.tuples(st.sampled_from(["read", "write"]), st.integers(0, 3),
              st.sampled_from([0, 1, 2, 4]), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("cmos"), st.integers(0, 255), st.integers(0, 255)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile, max_size=80))
def test_hostile_register_values_never_raise(program: list[tuple[Any, ...]]) -> None:
    clock = FakeClock(1_800_000_000 * NS)
    line = RecordingLine()
    rtc = Rtc(line, clock=clock, timer_thread=False)
    for op in program:
        if op[0] == "step":
            clock.step(op[1])
            rtc.service()
        elif op[0] == "cmos":
            cmos_wr(rtc, op[1], op[2])
        elif op[0] == "write":
            rtc.write(op[1], memoryview(bytearray(op[3].to_bytes(4, "little")[: op[2]])))
        else:
            was_high = rtc.irq_level
            wr(rtc, 0, 0x0C)
            value = rd(rtc, 1)  # no time passed since service(): IRQF is the line
            assert bool(value & 0x80) == was_high
            assert not rtc.irq_level
            rtc.read(op[1], memoryview(bytearray(op[2])))
        assert rtc.irq_level == line.high
    assert all(a != b for a, b in zip(line.levels, line.levels[1:], strict=False))
