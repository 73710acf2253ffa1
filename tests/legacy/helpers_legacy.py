"""Fakes for the legacy-device tests: an interrupt line and a console sink that record."""

from __future__ import annotations

from minivmm.bus import BusDevice


class RecordingLine:
    """An InterruptLine that records every level it is driven to."""

    def __init__(self) -> None:
        self.levels: list[bool] = []
        self.edges = 0

    def trigger(self) -> None:
        self.edges += 1

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    @property
    def high(self) -> bool:
        return bool(self.levels) and self.levels[-1]


class RecordingSink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


def rd(dev: BusDevice, offset: int, size: int = 1) -> int:
    """A port read of ``size`` bytes, as an int (little-endian)."""
    buf = bytearray(size)
    dev.read(offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def wr(dev: BusDevice, offset: int, value: int, size: int = 1) -> None:
    dev.write(offset, memoryview(bytearray(value.to_bytes(size, "little"))))


class FakeClock:
    """An injectable host clock: UTC nanoseconds since the epoch, moved by the test."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns

    def step(self, ns: int) -> None:
        self.ns += ns


def cmos_rd(dev: BusDevice, index: int) -> int:
    """Read CMOS byte ``index`` as a guest does: the index to port 0x70, data from 0x71."""
    wr(dev, 0, index)
    return rd(dev, 1)


def cmos_wr(dev: BusDevice, index: int, value: int) -> None:
    wr(dev, 0, index)
    wr(dev, 1, value)
