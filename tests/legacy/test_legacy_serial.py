"""Register-level tests of the 16550A UART, against the datasheet's behaviour."""

from __future__ import annotations

import threading

import pytest

from minivmm.devices.legacy.serial import (
    DATA,
    IER,
    IIR_FCR,
    LCR,
    LSR,
    MCR,
    MSR,
    SCR,
    Serial,
)

from .helpers_legacy import RecordingLine, RecordingSink, rd, wr

IIR_NONE, IIR_MS, IIR_THRE, IIR_RDA, IIR_RLS = 0x01, 0x00, 0x02, 0x04, 0x06


def make(
    input_capacity: int = 64 * 1024, output_buffer: int = 256
) -> tuple[Serial, RecordingLine, RecordingSink]:
    line, sink = RecordingLine(), RecordingSink()
    uart = Serial(line, sink, input_capacity=input_capacity, output_buffer=output_buffer)
    return uart, line, sink


def test_reset_state() -> None:
    uart, line, _ = make()
    assert rd(uart, LSR) == 0x60  # THRE | TEMT
    assert rd(uart, IIR_FCR) == IIR_NONE
    assert rd(uart, MSR) == 0xB0  # CTS | DSR | DCD
    assert rd(uart, IER) == 0
    assert line.levels == []


def test_scratch_register() -> None:
    uart, _, _ = make()
    wr(uart, SCR, 0xA5)
    assert rd(uart, SCR) == 0xA5


def test_dlab_switches_offsets_0_and_1_to_the_divisor() -> None:
    uart, _, sink = make()
    wr(uart, IER, 0x05)
    wr(uart, LCR, 0x83)  # DLAB, 8 bits
    assert rd(uart, DATA) == 0x0C  # reset divisor: 9600 baud
    wr(uart, DATA, 0x01)  # DLL
    wr(uart, IER, 0x02)  # DLM
    assert (rd(uart, DATA), rd(uart, IER)) == (0x01, 0x02)
    wr(uart, LCR, 0x03)
    assert rd(uart, IER) == 0x05  # IER kept its own value
    assert rd(uart, LCR) == 0x03
    uart.flush()
    assert sink.data == b""  # the DLL write was not output
    wr(uart, DATA, ord("k"))
    uart.flush()
    assert sink.data == b"k"


def test_ier_keeps_only_the_four_enable_bits() -> None:
    # Linux's autoconfig: IER=0 reads 0, IER=0x0F reads 0x0F; bit 6 (XScale UUE) reads 0.
    uart, _, _ = make()
    wr(uart, IER, 0x00)
    assert rd(uart, IER) == 0
    wr(uart, IER, 0xFF)
    assert rd(uart, IER) == 0x0F


def test_output_is_buffered_until_newline_and_in_order() -> None:
    uart, _, sink = make()
    for b in b"hello":
        wr(uart, DATA, b)
    assert sink.writes == []
    wr(uart, DATA, ord("\n"))
    assert sink.writes == [b"hello\n"]
    for b in b"abc":
        wr(uart, DATA, b)
    uart.flush()
    uart.flush()
    assert sink.writes == [b"hello\n", b"abc"]
    assert uart.bytes_out == 9


def test_output_flushes_when_the_buffer_fills() -> None:
    uart, _, sink = make(output_buffer=4)
    for b in b"abcdefghij":
        wr(uart, DATA, b)
    assert sink.writes == [b"abcd", b"efgh"]
    uart.flush()
    assert sink.data == b"abcdefghij"


def test_ier_write_and_idle_iir_read_flush_output() -> None:
    uart, _, sink = make()
    wr(uart, DATA, ord("$"))
    wr(uart, IER, 0)  # Linux's console write restores IER after a burst
    assert sink.data == b"$"
    wr(uart, DATA, ord("#"))
    assert rd(uart, IIR_FCR) == IIR_NONE  # an interrupt handler's last IIR read
    assert sink.data == b"$#"


def test_first_byte_hook_runs_once_at_the_first_output_byte() -> None:
    calls: list[int] = []
    uart = Serial(RecordingLine(), RecordingSink(), first_byte=lambda: calls.append(1))
    wr(uart, LCR, 0x80)
    wr(uart, DATA, 1)  # a divisor write is not output
    wr(uart, LCR, 0x03)
    assert calls == []
    wr(uart, DATA, ord("a"))
    wr(uart, DATA, ord("b"))
    assert calls == [1]


def test_sink_errors_are_counted_not_raised() -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    uart = Serial(RecordingLine(), Broken())
    for b in b"x\ny\n":
        wr(uart, DATA, b)
    assert uart.output_errors == 2


def test_thre_interrupt_on_enable_cleared_by_iir_read() -> None:
    uart, line, _ = make()
    wr(uart, IER, 0x02)
    assert line.levels == [True]
    assert rd(uart, IIR_FCR) == IIR_THRE
    assert line.levels == [True, False]
    assert rd(uart, IIR_FCR) == IIR_NONE  # reading IIR cleared it
    wr(uart, IER, 0x02)  # no 0->1 change of ETBEI: no new interrupt
    assert line.levels == [True, False]


def test_thre_reasserted_after_reenable_like_linux_checks() -> None:
    # serial8250_do_startup: a real 16550 re-asserts THRE when ETBEI goes 0 -> 1 again
    # (otherwise Linux marks the port UART_BUG_THRE).
    uart, _, _ = make()
    wr(uart, IER, 0x02)
    assert rd(uart, IIR_FCR) == IIR_THRE
    wr(uart, IER, 0x00)
    wr(uart, IER, 0x02)
    assert rd(uart, IIR_FCR) == IIR_THRE


def test_thre_interrupt_after_each_thr_write() -> None:
    uart, line, sink = make()
    wr(uart, IER, 0x02)
    assert rd(uart, IIR_FCR) == IIR_THRE
    wr(uart, DATA, ord("a"))
    assert line.high
    assert rd(uart, IIR_FCR) == IIR_THRE
    assert not line.high
    wr(uart, IER, 0x00)
    wr(uart, DATA, ord("b"))  # disabled: the byte goes out, no interrupt
    assert not line.high
    assert rd(uart, IIR_FCR) == IIR_NONE
    assert sink.data == b"ab"


def test_disabling_thre_drops_a_pending_interrupt() -> None:
    uart, line, _ = make()
    wr(uart, IER, 0x02)
    wr(uart, IER, 0x00)
    assert line.levels == [True, False]
    assert rd(uart, IIR_FCR) == IIR_NONE


def test_received_data_interrupt_and_lsr_dr() -> None:
    uart, line, _ = make()
    assert uart.enqueue_input(b"hi") == 2
    assert line.levels == []  # not enabled yet
    assert rd(uart, LSR) & 0x01
    wr(uart, IER, 0x01)
    assert line.levels == [True]
    assert rd(uart, IIR_FCR) == IIR_RDA
    assert rd(uart, IIR_FCR) == IIR_RDA  # an IIR read does not clear RDA
    assert rd(uart, DATA) == ord("h")
    assert line.levels == [True]
    assert rd(uart, DATA) == ord("i")
    assert line.levels == [True, False]
    assert rd(uart, LSR) == 0x60
    assert rd(uart, DATA) == 0  # empty
    uart.enqueue_input(b"!")
    assert line.levels == [True, False, True]


def test_level_is_driven_only_when_it_changes() -> None:
    uart, line, _ = make()
    wr(uart, IER, 0x03)  # RDA and THRE: THRE fires at once
    uart.enqueue_input(b"a")
    uart.enqueue_input(b"b")
    assert rd(uart, IIR_FCR) == IIR_RDA
    rd(uart, DATA)
    rd(uart, DATA)
    assert rd(uart, IIR_FCR) == IIR_THRE  # still high: THRE is behind RDA
    assert line.levels == [True, False]
    for _ in range(5):
        rd(uart, LSR)
        rd(uart, MSR)
        rd(uart, IIR_FCR)
    assert line.levels == [True, False]


def test_iir_priority_rls_rda_thre_ms() -> None:
    uart, line, _ = make(input_capacity=2)
    wr(uart, MCR, 0x10)  # loopback: MSR lines change from CTS|DSR|DCD to none
    uart.enqueue_input(b"xyz")  # one byte dropped: overrun
    wr(uart, IER, 0x0F)
    assert line.high
    assert rd(uart, IIR_FCR) == IIR_RLS
    assert rd(uart, LSR) == 0x60 | 0x02 | 0x01  # OE | DR; reading LSR clears OE
    assert rd(uart, IIR_FCR) == IIR_RDA
    rd(uart, DATA)
    rd(uart, DATA)
    assert rd(uart, IIR_FCR) == IIR_THRE
    assert rd(uart, IIR_FCR) == IIR_MS
    assert rd(uart, MSR) & 0x0F == 0x0B  # DCTS | DDSR | DDCD
    assert rd(uart, IIR_FCR) == IIR_NONE
    assert not line.high


def test_fifo_enable_shows_in_iir() -> None:
    uart, _, _ = make()
    wr(uart, IIR_FCR, 0x01)
    assert rd(uart, IIR_FCR) == 0xC0 | IIR_NONE  # Linux reads IIR >> 6 == 3: a 16550A
    wr(uart, IER, 0x02)
    assert rd(uart, IIR_FCR) == 0xC0 | IIR_THRE
    wr(uart, IIR_FCR, 0x00)
    assert rd(uart, IIR_FCR) == IIR_NONE


def test_fifo_clear_discards_at_most_a_fifo_of_input() -> None:
    uart, _, _ = make()
    uart.enqueue_input(bytes(range(40)))
    wr(uart, IIR_FCR, 0x07)  # enable + clear RX + clear TX
    assert uart.pending_input == 40 - Serial.FIFO_DEPTH
    assert rd(uart, DATA) == Serial.FIFO_DEPTH


def test_input_overflow_is_counted_and_reported_once_as_overrun() -> None:
    uart, _, _ = make(input_capacity=4)
    assert uart.enqueue_input(b"0123456789") == 4
    assert uart.input_dropped == 6
    assert uart.enqueue_input(b"more") == 0
    assert uart.input_dropped == 10
    assert rd(uart, LSR) & 0x02
    assert not rd(uart, LSR) & 0x02
    assert bytes(rd(uart, DATA) for _ in range(4)) == b"0123"


def test_loopback_mirrors_mcr_in_msr() -> None:
    uart, _, _ = make()
    wr(uart, MCR, 0x10 | 0x0A)  # LOOP | RTS | OUT2: Linux's autoconfig expects 0x90
    assert rd(uart, MSR) & 0xF0 == 0x90
    wr(uart, MCR, 0x10 | 0x05)  # DTR | OUT1 -> DSR | RI
    assert rd(uart, MSR) == 0x60 | 0x01 | 0x02 | 0x08  # CTS, DSR, DCD changed
    wr(uart, MCR, 0x10)  # RI falls: trailing-edge indicator
    assert rd(uart, MSR) == 0x02 | 0x04
    assert rd(uart, MSR) == 0x00  # deltas clear on read
    wr(uart, MCR, 0x08)
    assert rd(uart, MSR) == 0xB0 | 0x0B
    assert rd(uart, MCR) == 0x08


def test_loopback_returns_output_as_input() -> None:
    uart, line, sink = make()
    wr(uart, MCR, 0x10)
    wr(uart, IER, 0x01)
    wr(uart, DATA, 0x55)
    assert line.high
    assert rd(uart, IIR_FCR) == IIR_RDA
    assert rd(uart, DATA) == 0x55
    assert not line.high
    uart.flush()
    assert sink.data == b""
    assert uart.bytes_out == 0


@pytest.mark.parametrize("size", [2, 4, 8])
def test_wide_accesses_use_the_low_byte(size: int) -> None:
    uart, _, sink = make()
    assert rd(uart, LSR, size) == int.from_bytes(b"\x60" + b"\xff" * (size - 1), "little")
    wr(uart, DATA, 0x4241 if size == 2 else 0x44434241, min(size, 4))
    uart.flush()
    assert sink.data == b"A"
    assert uart.wide_accesses == 2


def test_offsets_outside_the_uart_are_harmless() -> None:
    uart, _, _ = make()
    assert rd(uart, 9) == 0xFF
    wr(uart, 200, 1)
    uart.read(0, memoryview(bytearray()))
    uart.write(0, memoryview(bytearray()))
    assert rd(uart, LSR) == 0x60


def test_input_from_another_thread_arrives_in_order() -> None:
    uart, _, _ = make()
    payload = bytes(i % 251 for i in range(20000))

    def feed() -> None:
        for i in range(0, len(payload), 97):
            uart.enqueue_input(payload[i : i + 97])

    t = threading.Thread(target=feed)
    t.start()
    got = bytearray()
    while len(got) < len(payload):
        if rd(uart, LSR) & 0x01:
            got.append(rd(uart, DATA))
    t.join()
    assert bytes(got) == payload
    assert uart.input_dropped == 0
