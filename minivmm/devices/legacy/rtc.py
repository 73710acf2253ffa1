"""The MC146818 CMOS real-time clock: the PC's RTC at ports 0x70/0x71, ISA IRQ 8.

Ports (register the device over ``RTC_PORT``..+``SIZE``, i.e. 0x70-0x71):

    0x70  write: the index of a CMOS byte (bits 6:0); bit 7 masks the NMI on a PC
          (kept in ``nmi_masked``; the VM has no NMI source). Read: 0xFF (write-only).
    0x71  the CMOS byte at the index

A 2- or 4-byte access at 0x70 is taken byte by byte (0x70, 0x71, then nothing).

CMOS bytes (Motorola MC146818A data sheet, "Address map" and "Register A-D"):

    0x00 seconds   0x01 seconds alarm   0x02 minutes   0x03 minutes alarm
    0x04 hours     0x05 hours alarm     0x06 day of week (1 = Sunday)
    0x07 day of month   0x08 month   0x09 year (00-99)
    0x0A A: UIP (bit 7, read-only), divider DV2-0 (6:4), periodic rate RS3-0 (3:0)
    0x0B B: SET PIE AIE UIE SQWE DM 24/12 DSE (bits 7..0)
    0x0C C: IRQF PF AF UF (7..4), read-only; a read returns them and clears them
    0x0D D: VRT (bit 7): valid RAM and time, always 1
    0x0E-0x7F  battery-backed RAM, read/write (0x0F: shutdown status; the PC's memory
               size bytes stay zero); 0x32 is the century, part of the clock as on PCs
               and in QEMU.

The clock. The guest's time is the host's UTC clock (``time.time_ns`` or an injected
clock) plus an offset, 0 until the guest sets the time; the date and time bytes show it
in BCD or binary (B.DM) and 24- or 12-hour form (B.24/12; 12-hour: PM in bit 7 of the
hours). The day of week follows the date. The update of each second is instantaneous,
at the guest's whole second; UIP reads 1 for the 244 us (8 cycles of 32.768 kHz) before
it, as the data sheet promises a guest that sees UIP = 0 at least that long. The
divider (DV) runs for 000, 001 and 010 (taken as the 32.768 kHz time base); 011-111 hold
it in reset. B.SET or a held divider stops the clock: its bytes keep what they showed
and the guest may write them. Clearing SET starts the clock from the bytes, keeping the
divider's phase; releasing the divider starts it so that the first update comes half a
second later (data sheet, "Divider control"; Linux's mach_set_cmos_time relies on it).
A time byte written while the clock runs moves the clock there (QEMU does the same).
The guest's bytes are never validated: out-of-range fields carry over (minute 61 is one
minute into the next hour), so every byte value is accepted. Setting SET clears UIE
(data sheet, register B). DSE and SQWE are stored only: no daylight-saving switch and
no square-wave pin.

Interrupts. PF at each period of RS (3.90625 ms for 1, 7.8125 ms for 2, 2^(RS-1)/32768 s
for 3-15, 0: none) while the divider runs; UF at each update; AF at an update whose
seconds, minutes and hours bytes equal the alarm bytes, an alarm byte of 0xC0-0xFF
matching any value. The flags are computed when the guest reads C (or changes a
register that moves them), from the time that passed: a polling guest needs no thread.
IRQF = PF.PIE + AF.AIE + UF.UIE drives IRQ 8 (``set_level``, called only on a change):
it rises when a flag is raised whose interrupt is enabled, and falls when the guest
reads C. The in-kernel IOAPIC takes ISA IRQ 8 as edge-triggered (the MP table says
"conforms to the bus"), so each interrupt needs that read before the next one, as on a
PC. For an enabled interrupt to come on time, one thread per device (started the first
time an interrupt is enabled, stopped by ``close()``) sleeps until the next event that
would raise the line, and is woken when the guest writes a clock register or reads C.

Everything is under one lock: several vCPU threads and the timer thread may call in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from minivmm.irq import InterruptLine
from minivmm.ratelimit import RateLimitedLog

from .state import Kind, check_mapping, restore_fields, save_fields

log = logging.getLogger(__name__)

INDEX_PORT: Final = 0  # offsets from the base port (0x70)
DATA_PORT: Final = 1
INDEX_MASK: Final = 0x7F
NMI_MASK: Final = 0x80

SECONDS: Final = 0x00
SECONDS_ALARM: Final = 0x01
MINUTES: Final = 0x02
MINUTES_ALARM: Final = 0x03
HOURS: Final = 0x04
HOURS_ALARM: Final = 0x05
DAY_OF_WEEK: Final = 0x06
DAY_OF_MONTH: Final = 0x07
MONTH: Final = 0x08
YEAR: Final = 0x09
REG_A: Final = 0x0A
REG_B: Final = 0x0B
REG_C: Final = 0x0C
REG_D: Final = 0x0D
SHUTDOWN_STATUS: Final = 0x0F
CENTURY: Final = 0x32
CMOS_SIZE: Final = 128
TIME_REGS: Final = frozenset({SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH,
                              YEAR, CENTURY})
CLOCK_REGS: Final = frozenset(range(REG_D + 1)) | {CENTURY}  # accesses that move the flags

A_UIP: Final = 0x80
A_DV: Final = 0x70
A_DV_RUNNING_MAX: Final = 0x20  # DV 000, 001, 010 run; 011-111 hold the divider
A_RS: Final = 0x0F
A_RESET_VALUE: Final = 0x26  # 32.768 kHz, 1024 Hz periodic rate (what PC firmware sets)

B_SET: Final = 0x80
B_PIE: Final = 0x40
B_AIE: Final = 0x20
B_UIE: Final = 0x10
B_SQWE: Final = 0x08
B_DM_BINARY: Final = 0x04
B_24H: Final = 0x02
B_DSE: Final = 0x01
B_RESET_VALUE: Final = B_24H  # BCD, 24-hour
B_ENABLES: Final = B_PIE | B_AIE | B_UIE

C_IRQF: Final = 0x80
C_PF: Final = 0x40  # each flag sits at the bit of its enable in B
C_AF: Final = 0x20
C_UF: Final = 0x10

D_VRT: Final = 0x80
ALARM_DONT_CARE: Final = 0xC0  # an alarm byte of 11xxxxxx matches every value
HOUR_PM: Final = 0x80

NS: Final = 1_000_000_000
TIME_BASE_HZ: Final = 32768
UIP_NS: Final = 8 * NS // TIME_BASE_HZ + 1  # 244.141 us, rounded up
DAY: Final = 86400
MAX_WAIT_S: Final = 10.0  # the timer thread re-reads the clock at least this often


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date; months outside 1-12 and days
    outside the month carry over, so every integer triple has an answer."""
    year += (month - 1) // 12
    month = (month - 1) % 12 + 1
    year -= month <= 2  # count years from March: the leap day ends a year
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """The inverse of ``days_from_civil`` for valid dates: (year, month, day)."""
    days += 719468
    era = days // 146097
    day_of_era = days - era * 146097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524
                   - day_of_era // 146096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_from_march = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_from_march + 2) // 5 + 1
    month = month_from_march + 3 if month_from_march < 10 else month_from_march - 9
    return year_of_era + era * 400 + (month <= 2), month, day


def periodic_ticks(rate: int) -> int:
    """The period of RS = ``rate`` (1-15) in cycles of the 32.768 kHz time base."""
    return 1 << (rate + 6 if rate <= 2 else rate - 1)


class Rtc:
    """The RTC; ``clock()`` returns the host's UTC time in nanoseconds since the epoch."""

    SIZE: Final = 2

    def __init__(self, interrupt: InterruptLine, *, clock: Callable[[], int] = time.time_ns,
                 timer_thread: bool = True) -> None:
        self._irq = interrupt
        self._clock = clock
        self._timer_thread = timer_thread
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = A_RESET_VALUE
        self._cmos[REG_B] = B_RESET_VALUE
        self._cmos[REG_D] = D_VRT
        self._index = 0
        self.nmi_masked = False
        self._offset = 0  # guest time minus host time, ns
        self._stopped = False  # SET or a held divider: the time bytes hold still
        self._shown: tuple[int, int] | None = None  # (guest second, B mode) in _cmos
        self._flags = 0  # PF | AF | UF
        self._seen = clock()  # host time up to which the flags account for events
        self._level = False
        self._rearm = False  # a register changed: the timer must recompute its deadline
        self._log_error = RateLimitedLog(log)

    # -- bus device -------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) == 0:
            return
        with self._lock:
            now = self._clock()
            for i in range(len(data)):
                data[i] = self._read_port(offset + i, now)
            self._settle()

    def write(self, offset: int, data: memoryview) -> None:
        if len(data) == 0:
            return
        with self._lock:
            now = self._clock()
            for i in range(len(data)):
                self._write_port(offset + i, data[i], now)
            self._settle()

    # -- the VMM's side ---------------------------------------------------------------

    def service(self) -> int | None:
        """Account for the time that passed and drive the IRQ; return the host time (ns)
        of the next event that would raise it, or None. The timer thread calls this."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            self._settle()
            return self._next_raise(now)

    def close(self) -> None:
        """Stop the timer thread (the registers keep working, without it)."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
            self._wake.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def irq_level(self) -> bool:
        """The level the interrupt output was last driven to."""
        return self._level

    # -- snapshots (minivmm.snapshot) ------------------------------------------------

    _STATE: Final[dict[str, Kind]] = {"_cmos": "bytes", "_index": "u8", "nmi_masked": "bool",
                                      "_offset": "int", "_stopped": "bool", "_flags": "u8"}

    def save_state(self) -> dict[str, object]:
        """The CMOS bytes and the clock's offset from the host's time: a restored RTC
        keeps following the host's wall clock (as a battery-backed one would), it does
        not resume from the time of the snapshot."""
        with self._lock:
            self._advance(self._clock())
            return save_fields(self, self._STATE)

    def restore_state(self, state: Mapping[str, object]) -> None:
        """ValueError (one line) for state that does not fit."""
        check_mapping("rtc", state)
        cmos = state.get("cmos")
        if not isinstance(cmos, str) or len(cmos) != 2 * CMOS_SIZE:
            raise ValueError(f"rtc: saved CMOS is not {CMOS_SIZE} bytes")
        index = state.get("index")
        if isinstance(index, int) and not 0 <= index <= INDEX_MASK:
            raise ValueError(f"rtc: saved CMOS index {index} is past its {CMOS_SIZE} bytes")
        with self._lock:
            restore_fields(self, "rtc", state, self._STATE)
            self._seen = self._clock()
            self._shown = None
            self._rearm = True
            self._level = False
            self._settle()

    @property
    def timer_running(self) -> bool:
        return self._thread is not None

    # -- ports and registers (called with the lock held) ------------------------------

    def _read_port(self, port: int, now: int) -> int:
        if port != DATA_PORT:
            return 0xFF
        index = self._index
        if index in CLOCK_REGS:
            self._advance(now)
        if index == REG_A:
            uip = not self._stopped and (now + self._offset) % NS >= NS - UIP_NS
            return self._cmos[REG_A] | (A_UIP if uip else 0)
        if index == REG_C:
            flags = self._flags
            self._flags = 0
            self._rearm = True
            return flags | (C_IRQF if flags & self._cmos[REG_B] else 0)
        if index in TIME_REGS:
            self._show_time(now)
        return self._cmos[index]

    def _write_port(self, port: int, value: int, now: int) -> None:
        if port == INDEX_PORT:
            self._index = value & INDEX_MASK
            self.nmi_masked = bool(value & NMI_MASK)
            return
        if port != DATA_PORT:
            return
        index = self._index
        if index not in CLOCK_REGS:
            self._cmos[index] = value
            return
        self._advance(now)
        self._show_time(now)
        self._rearm = True
        if index in (REG_A, REG_B):
            self._write_control(index, value, now)
        elif index in TIME_REGS:
            self._cmos[index] = value
            if not self._stopped:  # the clock runs on from the new time, same phase
                self._start_clock(now, (now + self._offset) % NS)
        elif index not in (REG_C, REG_D):  # C and D are read-only
            self._cmos[index] = value  # an alarm byte

    def _write_control(self, index: int, value: int, now: int) -> None:
        cmos = self._cmos
        divider_was_running = self._divider_running()
        if index == REG_A:
            cmos[REG_A] = value & ~A_UIP
        else:
            cmos[REG_B] = value & ~B_UIE if value & B_SET else value
        self._shown = None  # the mode may have changed
        stopped = bool(cmos[REG_B] & B_SET) or not self._divider_running()
        if not divider_was_running and self._divider_running():
            self._start_clock(now, NS // 2)  # first update half a second after release
        elif self._stopped and not stopped:
            self._start_clock(now, (now + self._offset) % NS)
        self._stopped = stopped

    def _divider_running(self) -> bool:
        return self._cmos[REG_A] & A_DV <= A_DV_RUNNING_MAX

    # -- the clock ---------------------------------------------------------------------

    def _start_clock(self, now: int, phase: int) -> None:
        """Run the clock from the time in the bytes, ``phase`` ns into its second."""
        self._offset = self._bytes_to_seconds() * NS + phase - now
        self._shown = None

    def _show_time(self, now: int) -> None:
        """While the clock runs, make the time bytes show the guest's current second."""
        if self._stopped:
            return
        second = (now + self._offset) // NS
        mode = self._cmos[REG_B] & (B_DM_BINARY | B_24H)
        if self._shown == (second, mode):
            return
        self._shown = (second, mode)
        days, second_of_day = divmod(second, DAY)
        year, month, day = civil_from_days(days)
        hour, rest = divmod(second_of_day, 3600)
        cmos, enc = self._cmos, self._encode
        cmos[SECONDS] = enc(rest % 60)
        cmos[MINUTES] = enc(rest // 60)
        cmos[HOURS] = self._encode_hour(hour)
        cmos[DAY_OF_WEEK] = enc((days + 4) % 7 + 1)  # 1970-01-01 was a Thursday (5)
        cmos[DAY_OF_MONTH] = enc(day)
        cmos[MONTH] = enc(month)
        cmos[YEAR] = enc(year % 100)
        cmos[CENTURY] = enc(year // 100)

    def _bytes_to_seconds(self) -> int:
        cmos, dec = self._cmos, self._decode
        hours = cmos[HOURS]
        hour = dec(hours & ~HOUR_PM)
        if not cmos[REG_B] & B_24H:
            hour = hour % 12 + (12 if hours & HOUR_PM else 0)
        year = dec(cmos[CENTURY]) * 100 + dec(cmos[YEAR])
        days = days_from_civil(year, dec(cmos[MONTH]), dec(cmos[DAY_OF_MONTH]))
        return days * DAY + hour * 3600 + dec(cmos[MINUTES]) * 60 + dec(cmos[SECONDS])

    def _encode(self, value: int) -> int:
        if self._cmos[REG_B] & B_DM_BINARY:
            return value & 0xFF
        value %= 100
        return (value // 10) << 4 | value % 10

    def _decode(self, byte: int) -> int:
        if self._cmos[REG_B] & B_DM_BINARY:
            return byte
        return (byte >> 4) * 10 + (byte & 0x0F)

    def _encode_hour(self, hour: int) -> int:
        if self._cmos[REG_B] & B_24H:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)

    # -- flags and the interrupt -------------------------------------------------------

    def _advance(self, now: int) -> None:
        """Raise the flags of the events in the guest time between the last call and now."""
        last, self._seen = self._seen, now
        if now <= last or not self._divider_running():
            return  # a host clock that stepped back skips the interval, raising nothing
        a, b = last + self._offset, now + self._offset
        rate = self._cmos[REG_A] & A_RS
        if rate:
            period = periodic_ticks(rate)
            if b * TIME_BASE_HZ // NS // period > a * TIME_BASE_HZ // NS // period:
                self._flags |= C_PF
        if not self._stopped and b // NS > a // NS:
            self._flags |= C_UF
            alarm = self._next_alarm(a // NS)
            if alarm is not None and alarm <= b // NS:
                self._flags |= C_AF

    def _next_raise(self, now: int) -> int | None:
        """Host time (ns) of the next event that would raise IRQF, or None."""
        pending = self._cmos[REG_B] & B_ENABLES & ~self._flags
        if self._level or not pending or not self._divider_running():
            return None
        guest = now + self._offset
        events: list[int] = []
        rate = self._cmos[REG_A] & A_RS
        if pending & C_PF and rate:
            period = periodic_ticks(rate)
            tick = (guest * TIME_BASE_HZ // NS // period + 1) * period
            events.append(-(-tick * NS // TIME_BASE_HZ))
        if not self._stopped:
            if pending & C_UF:
                events.append((guest // NS + 1) * NS)
            if pending & C_AF:
                alarm = self._next_alarm(guest // NS)
                if alarm is not None:
                    events.append(alarm * NS)
        return min(events) - self._offset if events else None

    def _next_alarm(self, after: int) -> int | None:
        """The first guest second after ``after`` whose update matches the alarm bytes."""
        cmos = self._cmos
        seconds = self._alarm_values(cmos[SECONDS_ALARM], 60, self._encode)
        minutes = self._alarm_values(cmos[MINUTES_ALARM], 60, self._encode)
        hours = self._alarm_values(cmos[HOURS_ALARM], 24, self._encode_hour)
        if not (seconds and minutes and hours):
            return None  # an alarm byte no time shows never matches
        day, second_of_day = divmod(after + 1, DAY)
        at = _first_match(hours, minutes, seconds, second_of_day)
        if at is None:
            at = DAY + hours[0] * 3600 + minutes[0] * 60 + seconds[0]
        return day * DAY + at

    @staticmethod
    def _alarm_values(byte: int, count: int, encode: Callable[[int], int]) -> Sequence[int]:
        if byte >= ALARM_DONT_CARE:
            return range(count)
        return [v for v in range(count) if encode(v) == byte]

    def _settle(self) -> None:
        """Drive the IRQ to IRQF; start the timer thread once an interrupt is enabled."""
        high = bool(self._flags & self._cmos[REG_B])
        if high != self._level:
            self._level = high
            self._irq.set_level(high)
        if self._thread is not None:
            if self._rearm:
                self._rearm = False
                self._wake.notify()
        elif self._timer_thread and not self._closed and self._cmos[REG_B] & B_ENABLES:
            self._thread = threading.Thread(target=self._timer, name="rtc", daemon=True)
            self._thread.start()

    def _timer(self) -> None:
        with self._lock:
            while not self._closed:
                try:
                    now = self._clock()
                    self._advance(now)
                    self._settle()
                    deadline = self._next_raise(now)
                except Exception as e:  # an IRQ the VM can't take must not kill the clock
                    self._log_error("rtc: timer: %s", e)
                    deadline = None
                wait = MAX_WAIT_S if deadline is None else (deadline - now) / NS
                self._wake.wait(min(max(wait, 0.0), MAX_WAIT_S))


def _first_match(hours: Sequence[int], minutes: Sequence[int], seconds: Sequence[int],
                 second_of_day: int) -> int | None:
    """The first second of the day at or after ``second_of_day`` whose hour, minute and
    second are in the (ascending) sets, or None."""
    h0, rest = divmod(second_of_day, 3600)
    m0, s0 = divmod(rest, 60)
    for h in hours:
        if h < h0:
            continue
        if h > h0:
            return h * 3600 + minutes[0] * 60 + seconds[0]
        for m in minutes:
            if m < m0:
                continue
            if m > m0:
                return h * 3600 + m * 60 + seconds[0]
            for s in seconds:
                if s >= s0:
                    return h * 3600 + m * 60 + s
    return None
