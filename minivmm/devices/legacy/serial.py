"""An 8250/16550A UART: the guest's serial console (COM1).

Registers (offset from the base port; datasheet: TI/National PC16550D, "Register summary"):

    0  RBR (read) / THR (write)      DLL while LCR.DLAB is set
    1  IER: interrupt enables         DLM while LCR.DLAB is set
    2  IIR (read) / FCR (write)       IIR bits 7:6 read 11 while FCR enabled the FIFOs
    3  LCR   4  MCR (bit 4: loopback)   5  LSR   6  MSR   7  SCR (scratch)

What it models: output is immediate, so LSR always has THRE|TEMT; LSR.DR while input is
pending. Interrupt identification follows the datasheet's priorities: receiver line
status (an overrun: input was dropped) > received data available > THR empty > modem
status. The THRE interrupt is raised by a THR write and by IER.ETBEI going 0->1, and is
cleared by a THR write or by an IIR read that reports it. In loopback (MCR bit 4) THR
bytes come back as input and MSR reflects MCR (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD,
with delta bits); otherwise MSR reads CTS|DSR|DCD. The interrupt output is a level
driven through ``InterruptLine.set_level``, called only when the level changes.

What it does not model: baud rate and timing (the divisor is stored only), the
character-timeout interrupt (pending data always reports as 0x04, which Linux treats the
same), parity/framing/break errors, the FIFO trigger level, the OUT2 gating of the IRQ on
PC boards (as QEMU, the interrupt is not gated).

Input arrives from another thread through ``enqueue_input`` into a bounded buffer (it
stands for both the host-side backlog and the 16-byte receive FIFO); bytes beyond its
capacity are dropped, counted in ``input_dropped`` and reported to the guest as an
overrun. An FCR "clear receive FIFO" discards at most FIFO_DEPTH bytes, what the chip's
FIFO would hold, so input typed before the guest's driver starts is not lost.

Output is buffered and handed to the sink, in order, on a newline, when the buffer
fills, on an IER write (Linux's console write and its tty driver end a burst with one),
on an IIR read finding nothing pending, and on ``flush()``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from minivmm.irq import InterruptLine

from .state import Kind, restore_fields, save_fields

log = logging.getLogger(__name__)

# Register offsets.
DATA: Final = 0
IER: Final = 1
IIR_FCR: Final = 2
LCR: Final = 3
MCR: Final = 4
LSR: Final = 5
MSR: Final = 6
SCR: Final = 7

IER_RDA: Final = 0x01  # received data available
IER_THRE: Final = 0x02  # transmitter holding register empty
IER_RLS: Final = 0x04  # receiver line status
IER_MS: Final = 0x08  # modem status
IER_MASK: Final = 0x0F

IIR_NONE: Final = 0x01
IIR_RLS: Final = 0x06
IIR_RDA: Final = 0x04
IIR_THRE: Final = 0x02
IIR_MS: Final = 0x00
IIR_FIFO_ENABLED: Final = 0xC0

FCR_ENABLE: Final = 0x01
FCR_CLEAR_RX: Final = 0x02

LCR_DLAB: Final = 0x80

MCR_DTR: Final = 0x01
MCR_RTS: Final = 0x02
MCR_OUT1: Final = 0x04
MCR_OUT2: Final = 0x08
MCR_LOOP: Final = 0x10
MCR_MASK: Final = 0x1F

LSR_DR: Final = 0x01
LSR_OE: Final = 0x02
LSR_THRE: Final = 0x20
LSR_TEMT: Final = 0x40

MSR_CTS: Final = 0x10
MSR_DSR: Final = 0x20
MSR_RI: Final = 0x40
MSR_DCD: Final = 0x80
MSR_IDLE_LINES: Final = MSR_CTS | MSR_DSR | MSR_DCD  # a connected, ready peer
_LOOPBACK_WIRING: Final = (
    (MCR_RTS, MSR_CTS),
    (MCR_DTR, MSR_DSR),
    (MCR_OUT1, MSR_RI),
    (MCR_OUT2, MSR_DCD),
)

_ONES: Final = b"\xff" * 8


class Sink(Protocol):
    """Where console output goes (minivmm.console has stdio, file and none)."""

    def write(self, data: bytes) -> None:
        """Take all of ``data``; may raise OSError."""


class Serial:
    """A 16550A UART. Registers are accessed on the vCPU thread, input from any thread."""

    SIZE: Final = 8
    FIFO_DEPTH: Final = 16

    def __init__(
        self,
        interrupt: InterruptLine,
        sink: Sink,
        *,
        first_byte: Callable[[], None] | None = None,
        input_capacity: int = 64 * 1024,
        output_buffer: int = 256,
    ) -> None:
        self._irq = interrupt
        self._sink = sink
        self._first_byte = first_byte
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._rx_capacity = max(1, input_capacity)
        self._out = bytearray()
        self._out_max = max(1, output_buffer)
        self._ier = 0
        self._lcr = 0
        self._mcr = MCR_OUT2
        self._scr = 0
        self._dll = 0x0C  # 9600 baud from the PC's 1.8432 MHz clock
        self._dlm = 0
        self._fifo = False
        self._thre_pending = False
        self._overrun = False
        self._msr_delta = 0
        self._level = False
        self.bytes_out = 0
        self.input_dropped = 0
        self.output_errors = 0
        self.wide_accesses = 0

    # -- bus device -------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        if n > 1:
            self._wide(offset, n)
            data[1:] = _ONES[: n - 1]
        with self._lock:
            data[0] = self._read_reg(offset)

    def write(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        if n > 1:
            self._wide(offset, n)
        with self._lock:
            self._write_reg(offset, data[0])

    # -- the VMM's side ---------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes for the guest to read (thread-safe); returns how many were taken."""
        with self._lock:
            room = self._rx_capacity - len(self._rx)
            taken = data if len(data) <= room else data[: max(room, 0)]
            self._rx.extend(taken)
            dropped = len(data) - len(taken)
            if dropped:
                self.input_dropped += dropped
                self._overrun = True
            self._update()
            return len(taken)

    def flush(self) -> None:
        """Hand any buffered output to the sink."""
        with self._lock:
            self._flush_locked()

    @property
    def irq_level(self) -> bool:
        """The level the interrupt output was last driven to."""
        return self._level

    # -- snapshots (minivmm.snapshot) ------------------------------------------------

    _STATE: Final[dict[str, Kind]] = {
        "_ier": "u8", "_lcr": "u8", "_mcr": "u8", "_scr": "u8", "_dll": "u8", "_dlm": "u8",
        "_msr_delta": "u8", "_fifo": "bool", "_thre_pending": "bool", "_overrun": "bool",
        "_rx": "u8deque",
    }

    def save_state(self) -> dict[str, object]:
        """Registers and pending input. Buffered output goes to the sink first: it was
        the guest's output before the snapshot, so a restored VM does not repeat it."""
        with self._lock:
            self._flush_locked()
            return save_fields(self, self._STATE)

    def restore_state(self, state: Mapping[str, object]) -> None:
        """ValueError (one line) for state that does not fit; the interrupt output is
        driven to what the registers say."""
        with self._lock:
            restore_fields(self, "serial", state, self._STATE, max_bytes=self._rx_capacity)
            self._level = False
            self._update()

    @property
    def pending_input(self) -> int:
        return len(self._rx)

    # -- registers (called with the lock held) ----------------------------------------

    def _read_reg(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._dll
            if not self._rx:
                return 0
            value = self._rx.popleft()
            self._update()
            return value
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            iid = self._iir_id()
            if iid == IIR_THRE:
                self._thre_pending = False
                self._update()
            elif iid == IIR_NONE:
                self._flush_locked()
            return iid | (IIR_FIFO_ENABLED if self._fifo else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT
            if self._rx:
                value |= LSR_DR
            if self._overrun:
                value |= LSR_OE
                self._overrun = False
                self._update()
            return value
        if offset == MSR:
            value = self._msr_lines() | self._msr_delta
            if self._msr_delta:
                self._msr_delta = 0
                self._update()
            return value
        if offset == SCR:
            return self._scr
        return 0xFF

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                self._dll = value
                return
            if self._mcr & MCR_LOOP:
                if len(self._rx) < self._rx_capacity:
                    self._rx.append(value)
                else:
                    self.input_dropped += 1
                    self._overrun = True
            else:
                self._emit(value)
            self._thre_pending = True  # sent at once: the holding register is empty again
            self._update()
        elif offset == IER:
            if dlab:
                self._dlm = value
                return
            rising = value & ~self._ier
            self._ier = value & IER_MASK
            if not self._ier & IER_THRE:
                self._thre_pending = False
            elif rising & IER_THRE:
                self._thre_pending = True
            self._flush_locked()
            self._update()
        elif offset == IIR_FCR:
            enable = bool(value & FCR_ENABLE)
            if enable != self._fifo or value & FCR_CLEAR_RX:
                for _ in range(min(self.FIFO_DEPTH, len(self._rx))):
                    self._rx.popleft()
            self._fifo = enable
            self._update()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            old = self._msr_lines()
            self._mcr = value & MCR_MASK
            new = self._msr_lines()
            # Each delta bit sits 4 below its line: DCTS/DDSR/DDCD on any change of
            # CTS/DSR/DCD, TERI only when RI falls.
            changed = ((old ^ new) & ~MSR_RI) | (old & ~new & MSR_RI)
            self._msr_delta |= changed >> 4
            self._update()
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only; other offsets do not exist.

    def _msr_lines(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_IDLE_LINES
        return sum(line for bit, line in _LOOPBACK_WIRING if mcr & bit)

    def _iir_id(self) -> int:
        ier = self._ier
        if ier & IER_RLS and self._overrun:
            return IIR_RLS
        if ier & IER_RDA and self._rx:
            return IIR_RDA
        if ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        if ier & IER_MS and self._msr_delta:
            return IIR_MS
        return IIR_NONE

    def _update(self) -> None:
        high = self._iir_id() != IIR_NONE
        if high != self._level:
            self._level = high
            self._irq.set_level(high)

    def _emit(self, value: int) -> None:
        if self.bytes_out == 0 and self._first_byte is not None:
            self._first_byte()
        self.bytes_out += 1
        out = self._out
        out.append(value)
        if value == 0x0A or len(out) >= self._out_max:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._out:
            return
        data = bytes(self._out)
        self._out.clear()
        try:
            self._sink.write(data)
        except OSError as e:
            self.output_errors += 1
            if self.output_errors == 1:
                log.warning("serial: console output lost: %s (further losses are only counted)", e)

    def _wide(self, offset: int, size: int) -> None:
        self.wide_accesses += 1
        if self.wide_accesses == 1:
            log.debug(
                "serial: %d-byte access at offset %d; only its low byte is used", size, offset
            )
