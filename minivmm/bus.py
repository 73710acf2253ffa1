"""Port-I/O and MMIO buses: route a vCPU's I/O exit to the device that owns the address.

A device registers a range ``[base, base + size)``; ranges may not overlap. On an exit the
bus finds the owner and calls ``read(offset, data)`` or ``write(offset, data)`` with the
offset inside the range and a memoryview of the exit's data bytes (1, 2, 4 or 8 of them),
which a read fills in place. Accesses nobody owns are counted, logged at debug level, and
read as all ones, as on real hardware with nothing on the bus.
"""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    def read(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` with the bytes at ``offset`` (len(data) is the access size)."""

    def write(self, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset``."""


class BusOverlapError(ValueError):
    """Two devices claimed overlapping address ranges."""


class Bus:
    """Non-overlapping ranges, each owned by one device."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []  # (base, end, device)
        self.unhandled_reads = 0
        self.unhandled_writes = 0

    def register(self, base: int, size: int, device: BusDevice) -> None:
        if size <= 0:
            raise ValueError(f"{self.name} bus: range size must be positive, got {size}")
        end = base + size
        i = bisect.bisect_right(self._starts, base)
        if i > 0 and self._entries[i - 1][1] > base:
            prev = self._entries[i - 1]
            raise BusOverlapError(f"{self.name} bus: 0x{base:x}-0x{end - 1:x} overlaps "
                                  f"0x{prev[0]:x}-0x{prev[1] - 1:x}")
        if i < len(self._entries) and self._entries[i][0] < end:
            nxt = self._entries[i]
            raise BusOverlapError(
                f"{self.name} bus: 0x{base:x}-0x{end - 1:x} overlaps 0x{nxt[0]:x}-0x{nxt[1] - 1:x}"
            )
        self._starts.insert(i, base)
        self._entries.insert(i, (base, end, device))

    def lookup(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device owning ``addr`` and the range's base, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, end, dev = self._entries[i]
            if addr < end:
                return dev, base
        return None

    def size_of(self, base: int) -> int:
        """The size of the range registered at ``base``."""
        i = bisect.bisect_left(self._starts, base)
        entry = self._entries[i]
        return entry[1] - entry[0]

    def read(self, addr: int, data: memoryview) -> None:
        hit = self.lookup(addr)
        if hit is None:
            self.unhandled_reads += 1
            log.debug("%s bus: unhandled read of %d bytes at 0x%x", self.name, len(data), addr)
            data[:] = b"\xff" * len(data)
            return
        dev, base = hit
        dev.read(addr - base, data)

    def write(self, addr: int, data: memoryview) -> None:
        hit = self.lookup(addr)
        if hit is None:
            self.unhandled_writes += 1
            log.debug("%s bus: unhandled write of %d bytes at 0x%x", self.name, len(data), addr)
            return
        dev, base = hit
        dev.write(addr - base, data)
