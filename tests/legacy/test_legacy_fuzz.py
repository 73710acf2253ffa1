"""Hypothesis: a hostile guest's random register accesses never make a device raise.

For the UART it also checks what must hold whatever the guest does: the interrupt line is
driven only on changes, IIR reports a pending interrupt exactly when the line is high,
and every byte written to THR (outside DLAB and loopback) reaches the sink, in order.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minivmm.devices.legacy.debug_exit import DebugExit
from minivmm.devices.legacy.i8042 import I8042
from minivmm.devices.legacy.serial import IIR_FCR, LCR, MCR, Serial

from .helpers_legacy import RecordingLine, RecordingSink, rd

SIZES = st.sampled_from([0, 1, 2, 3, 4, 8])
access = st.tuples(
    st.sampled_from(["read", "write"]),
    st.integers(0, 15),
    SIZES,
    st.binary(min_size=8, max_size=8),
)
serial_op = st.one_of(
    access,
    st.tuples(st.just("input"), st.binary(max_size=40)),
    st.tuples(st.just("flush")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(serial_op, max_size=120), st.integers(1, 64), st.integers(1, 32))
def test_serial_survives_random_accesses(
    ops: list[tuple[object, ...]], capacity: int, out_buffer: int
) -> None:
    line, sink = RecordingLine(), RecordingSink()
    uart = Serial(line, sink, input_capacity=capacity, output_buffer=out_buffer)
    expected_out = bytearray()
    for op in ops:
        kind = op[0]
        if kind == "input":
            payload = op[1]
            assert isinstance(payload, bytes)
            uart.enqueue_input(payload)
        elif kind == "flush":
            uart.flush()
        else:
            _, offset, size, raw = op
            assert isinstance(offset, int) and isinstance(size, int)
            assert isinstance(raw, bytes)
            data = memoryview(bytearray(raw[:size]))
            if kind == "read":
                was_high = uart.irq_level
                uart.read(offset, data)
                if offset == IIR_FCR and size:
                    assert (data[0] & 1 == 0) == was_high
            else:
                if offset == 0 and size and not rd(uart, LCR) & 0x80 and not rd(uart, MCR) & 0x10:
                    expected_out.append(raw[0])
                uart.write(offset, data)
        assert uart.irq_level == line.high
    assert all(a != b for a, b in zip(line.levels, line.levels[1:], strict=False))
    assert line.levels[:1] in ([], [True])
    uart.flush()
    assert sink.data == bytes(expected_out)


@settings(max_examples=300, deadline=None)
@given(st.lists(access, max_size=80))
def test_i8042_survives_random_accesses(ops: list[tuple[str, int, int, bytes]]) -> None:
    resets: list[int] = []
    dev = I8042(lambda: resets.append(1))
    for kind, offset, size, raw in ops:
        data = memoryview(bytearray(raw[:size]))
        (dev.read if kind == "read" else dev.write)(offset, data)
    assert len(resets) == dev.resets


@settings(max_examples=200, deadline=None)
@given(st.lists(access, max_size=40))
def test_debug_exit_survives_random_accesses(ops: list[tuple[str, int, int, bytes]]) -> None:
    statuses: list[int] = []
    dev = DebugExit(statuses.append)
    expected = []
    for kind, offset, size, raw in ops:
        data = memoryview(bytearray(raw[:size]))
        if kind == "read":
            dev.read(offset, data)
            assert bytes(data) == bytes(size)
        else:
            dev.write(offset, data)
            if size:
                expected.append(raw[0])
    assert statuses == expected
