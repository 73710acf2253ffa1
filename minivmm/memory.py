"""Guest memory: anonymous mappings, registered with KVM as memory slots.

A guest of ``size`` bytes gets RAM from 0 up to the start of the MMIO gap the platform
names (x86: ``layout.MMIO_GAP_START``); what does not fit below the gap continues at its
end (4 GiB). Everything that reads or writes guest memory goes
through :meth:`GuestMemory.translate`, which turns a guest-physical address and a length
into a zero-copy ``memoryview`` after checking that the whole range lies inside one
region. Nothing else in minivmm touches raw pointers.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .config import check_mem, format_size
from .errors import UsageError

_U64_LIMIT = 1 << 64


class GuestMemoryError(LookupError):
    """A guest-physical range that is not (entirely) backed by guest RAM. A LookupError:
    that is what the virtqueue engine (minivmm.virtio.mem) expects from ``translate``."""

    def __init__(self, gpa: int, length: int) -> None:
        super().__init__(f"guest range 0x{gpa:x}+0x{length:x} is not inside guest memory")
        self.gpa = gpa
        self.length = length


@dataclass(frozen=True)
class Region:
    """One contiguous piece of guest RAM."""

    gpa: int
    size: int
    mapping: mmap.mmap
    view: memoryview
    host_addr: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM: bounds-checked translation from guest-physical ranges to memoryviews."""

    def __init__(self, size: int, *, gap: tuple[int, int] | None = None,
                 hugepages: bool = True) -> None:
        """``gap``: (start, end) of the hole in the physical address map where RAM may not
        be (MMIO); None for one region from 0."""
        check_mem(size)
        self.size = size
        start, end = gap if gap is not None else (size, size)
        spans = [(0, min(size, start))]
        if size > start:
            spans.append((end, size - start))
        regions: list[Region] = []
        try:
            for gpa, length in spans:
                m = mmap.mmap(-1, length,
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
                if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
                    try:
                        m.madvise(mmap.MADV_HUGEPAGE)
                    except OSError:
                        pass  # THP disabled on this host: ordinary pages work too
                export = ctypes.c_char.from_buffer(m)
                host = ctypes.addressof(export)
                del export  # a live export would keep close() from unmapping
                regions.append(Region(gpa, length, m, memoryview(m), host))
        except OSError as e:
            for r in regions:
                r.view.release()
                r.mapping.close()
            raise UsageError(f"cannot reserve {format_size(size)} of guest memory "
                             f"({e.strerror}): ask for less", field="mem") from None
        self.regions: tuple[Region, ...] = tuple(regions)
        # The common case (all RAM below the gap) gets a one-comparison fast path.
        self._low = self.regions[0]
        self._low_end = self._low.end
        self._low_view = self._low.view

    def translate(self, gpa: int, length: int) -> memoryview:
        """The memoryview of ``length`` bytes at ``gpa``; GuestMemoryError if any byte is
        outside guest RAM (including ranges that straddle two regions or wrap)."""
        end = gpa + length
        if gpa >= 0 and length >= 0 and end <= self._low_end:
            return self._low_view[gpa:end]
        for r in self.regions[1:]:
            if r.gpa <= gpa and length >= 0 and end <= r.end:
                return r.view[gpa - r.gpa : end - r.gpa]
        raise GuestMemoryError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        if gpa < 0 or length < 0 or gpa + length > _U64_LIMIT:
            return False
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.translate(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.translate(gpa, len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        return int(struct.unpack_from("<Q", self.translate(gpa, 8))[0])

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.translate(gpa, 8), 0, value)

    def ram_ranges(self) -> Iterator[tuple[int, int]]:
        """(gpa, size) of each RAM region, in address order."""
        for r in self.regions:
            yield r.gpa, r.size

    @property
    def end(self) -> int:
        """One past the highest guest-physical RAM address."""
        return self.regions[-1].end

    def close(self) -> None:
        """Unmap guest RAM. KVM must be done with it (the VM fd closed) first. A view
        still held elsewhere keeps its mapping alive until that view is released."""
        for r in self.regions:
            r.view.release()
            try:
                r.mapping.close()
            except BufferError:
                pass  # a device still holds a view: the mapping goes with the last one

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
