"""The debug-exit port: a write of v reports status v."""

from __future__ import annotations

import pytest

from minivmm.bus import Bus
from minivmm.devices.legacy.debug_exit import DebugExit
from minivmm.x86 import layout

from .helpers_legacy import rd


@pytest.mark.parametrize("value", [0, 1, 2, 42, 127, 255])
def test_byte_write_reports_the_value(value: int) -> None:
    statuses: list[int] = []
    bus = Bus("pio")
    dev = DebugExit(statuses.append)
    bus.register(layout.DEBUG_EXIT_PORT, DebugExit.SIZE, dev)
    bus.write(0x501, memoryview(bytearray([value])))
    assert statuses == [value]
    assert dev.status == value


@pytest.mark.parametrize(
    ("raw", "status"), [(b"\x07\x01", 7), (b"\x00\xff", 0), (b"\xfe\x01\x02\x03", 0xFE)]
)
def test_wider_writes_use_the_low_byte(raw: bytes, status: int) -> None:
    statuses: list[int] = []
    DebugExit(statuses.append).write(0, memoryview(bytearray(raw)))
    assert statuses == [status]


@pytest.mark.parametrize("size", [1, 2, 4])
def test_reads_return_zero_like_qemu(size: int) -> None:
    statuses: list[int] = []
    dev = DebugExit(statuses.append)
    assert rd(dev, 0, size) == 0
    dev.write(0, memoryview(bytearray()))
    assert statuses == []
    assert dev.status is None


def test_on_exit_may_raise_to_unwind_the_run_loop() -> None:
    class Stop(Exception):
        pass

    def on_exit(v: int) -> None:
        raise Stop(v)

    with pytest.raises(Stop):
        DebugExit(on_exit).write(0, memoryview(bytearray([3])))
