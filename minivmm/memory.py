"""Guest memory: a memfd (or a saved snapshot's RAM file), registered with KVM as slots.

A guest of ``size`` bytes gets RAM from 0 up to the start of the MMIO gap the platform
names (x86: ``layout.MMIO_GAP_START``); what does not fit below the gap continues at its
end (4 GiB). Everything that reads or writes guest memory goes
through :meth:`GuestMemory.translate`, which turns a guest-physical address and a length
into a zero-copy ``memoryview`` after checking that the whole range lies inside one
region. Nothing else in minivmm touches raw pointers.

Backing: a running VM's RAM is one memfd (shared mappings of it, region after region
at consecutive file offsets), so a snapshot can write it out from the mappings once and
skip the pages the guest never touched (the memfd's holes, SEEK_DATA). A restored VM
maps the snapshot's RAM file MAP_PRIVATE (:meth:`GuestMemory.from_file`): pages are
read from the page cache on first touch and copied only when the guest writes them, so
a clone costs the pages it dirties. MADV_HUGEPAGE is asked for the memfd; whether the
kernel gives huge pages for it is the host's ``shmem_enabled`` setting (``advise`` or
``always``); a private file mapping gets none (its copies are 4 KiB pages).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

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


class Region(NamedTuple):
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
                 hugepages: bool = True, backing: str | os.PathLike[str] | None = None
                 ) -> None:
        """``gap``: (start, end) of the hole in the physical address map where RAM may not
        be (MMIO); None for one region from 0. ``backing``: None for a fresh memfd (zero
        RAM), or the path of a RAM file of exactly ``size`` bytes (a snapshot's), mapped
        copy-on-write."""
        check_mem(size)
        self.size = size
        start, end = gap if gap is not None else (size, size)
        spans = [(0, min(size, start))]
        if size > start:
            spans.append((end, size - start))
        #: the memfd behind a running VM's RAM (-1 for a private file mapping)
        self.fd = -1
        regions: list[Region] = []
        try:
            if backing is None:
                self.fd = os.memfd_create("minivmm-ram", os.MFD_CLOEXEC)
                os.ftruncate(self.fd, size)
                fd, flags = self.fd, mmap.MAP_SHARED
            else:
                fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
                flags = mmap.MAP_PRIVATE
            try:
                offset = 0
                for gpa, length in spans:
                    # An anonymous mmap object owns the address range (its close() and
                    # the views' reference counts decide when it is unmapped, as for any
                    # mmap) and the file is mapped over it: an mmap object made from an
                    # fd would keep a duplicate of it open for as long as it lives.
                    m = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                  | _NORESERVE)
                    export = ctypes.c_char.from_buffer(m)
                    host = ctypes.addressof(export)
                    del export  # a live export would keep close() from unmapping
                    try:
                        _map_over(host, length, fd, offset, flags)
                    except OSError:
                        m.close()
                        raise
                    offset += length
                    if hugepages and backing is None and hasattr(mmap, "MADV_HUGEPAGE"):
                        try:
                            m.madvise(mmap.MADV_HUGEPAGE)
                        except OSError:
                            pass  # THP disabled on this host: ordinary pages work too
                    regions.append(Region(gpa, length, m, memoryview(m), host))
            finally:
                if backing is not None:
                    os.close(fd)  # the mappings keep the file
        except OSError as e:
            for r in regions:
                r.view.release()
                r.mapping.close()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if backing is not None:
                raise UsageError(f"cannot map the guest memory file {os.fspath(backing)} "
                                 f"({e.strerror})", field="snapshot") from None
            raise UsageError(f"cannot reserve {format_size(size)} of guest memory "
                             f"({e.strerror}): ask for less", field="mem") from None
        self.regions: tuple[Region, ...] = tuple(regions)
        # The common case (all RAM below the gap) gets a one-comparison fast path.
        self._low = self.regions[0]
        self._low_end = self._low.end
        self._low_view = self._low.view

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], size: int, *,
                  gap: tuple[int, int] | None = None) -> GuestMemory:
        """Guest RAM from a file written by :meth:`save`, mapped copy-on-write."""
        return cls(size, gap=gap, backing=path)

    def save(self, fd: int) -> int:
        """Write all of guest RAM to the file ``fd`` (at offset 0, regions back to back,
        ``size`` bytes long), leaving holes where RAM is zero: a memfd's holes are
        found with SEEK_DATA/SEEK_HOLE, a private mapping's zero 2 MiB chunks are skipped.
        Returns the bytes written (the rest are holes)."""
        written = 0
        offset = 0
        for r in self.regions:
            for start, stop in self._data_extents(r, offset):
                at = start
                while at < stop:  # pwrite may write less than asked
                    n = os.pwrite(fd, r.view[at - offset:stop - offset], at)
                    at += n
                    written += n
            offset += r.size
        os.ftruncate(fd, self.size)
        return written

    def _data_extents(self, r: Region, offset: int) -> Iterator[tuple[int, int]]:
        """File ranges [start, stop) of region ``r`` (at file ``offset``) that may hold
        data."""
        end = offset + r.size
        if self.fd < 0:
            for at in range(0, r.size, _CHUNK):
                chunk = r.view[at:at + _CHUNK]
                if chunk.tobytes() != _ZEROS[:len(chunk)]:  # 20x faster than ==
                    yield offset + at, offset + at + len(chunk)
            return
        at = offset
        while at < end:
            try:
                start = os.lseek(self.fd, at, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return  # nothing but holes up to the end of the file
                raise
            if start >= end:
                return
            stop = min(os.lseek(self.fd, start, os.SEEK_HOLE), end)
            yield start, stop
            at = stop

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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_over(addr: int, length: int, fd: int, offset: int, flags: int) -> None:
    """mmap(2) ``fd`` at ``offset`` over [addr, addr + length), which we own."""
    got = _mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE,
                flags | _MAP_FIXED | _NORESERVE, fd, offset)
    if got == _MAP_FAILED or got != addr:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
_CHUNK = 2 << 20
_ZEROS = bytes(_CHUNK)
