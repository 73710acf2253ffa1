"""The files behind a virtio-blk disk: a raw image, or a raw image with a private
copy-on-write overlay.

Both kinds have one small interface (:class:`DiskImage`), in bytes at guest offsets
(the device checks ranges and sector multiples before it calls in):

- ``readv(views, offset)`` / ``writev(views, offset)``: one ``preadv``/``pwritev``
  straight between the file and the guest's memoryviews (no bounce buffer); they return
  the bytes moved, which may be fewer than asked (the caller loops, like ``preadv``);
- ``read_pieces(offset, length)`` / ``write_pieces(offset, length)``: the range as
  ``(fd, file_offset, length)`` pieces in order, for an engine that submits the I/O
  itself (io_uring); ``write_pieces`` marks the range as the overlay's first, so a write
  always goes to the overlay and a failed one leaves the range undefined, as a failed
  write leaves a real disk's sectors;
- ``flush()`` (``fdatasync`` of the file the writes go to), ``discard(offset, length)``,
  ``write_zeroes(offset, length, unmap)``, ``size``, ``close()``.

:class:`CowImage` opens the image read-only and never writes it. Writes go to an
overlay: a sparse temporary file of the disk's size, unlinked as it is made (O_TMPFILE),
so it disappears with the VM. Which sectors live in the overlay is an interval map
(:class:`SectorMap`: sorted, disjoint sector ranges); a read is split at its
boundaries, overlay pieces read from the overlay, the rest from the image. DISCARD and
WRITE_ZEROES over a cow disk punch holes in the overlay (or write zeros) and map the
range to it, so zeros read back exactly as on a raw image; the image is untouched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

from .base import IOV_MAX

SECTOR_SIZE: Final = 512

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10
_ZEROS: Final = memoryview(bytes(64 << 10))

#: one piece of a request: (file descriptor, offset in that file, length in bytes)
Piece = tuple[int, int, int]


def _libc_fallocate() -> Callable[[int, int, int, int], None]:
    fn = ctypes.CDLL(None, use_errno=True).fallocate64
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if fn(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    return fallocate


#: fallocate(2) with a mode (os has only posix_fallocate)
fallocate: Callable[[int, int, int, int], None] = getattr(os, "fallocate", None) or (
    _libc_fallocate())


class DiskImage(Protocol):
    """What virtio-blk needs of the files behind a disk (see the module docstring)."""

    @property
    def size(self) -> int:
        """The disk's size in bytes."""

    @property
    def image_fd(self) -> int:
        """The image file's descriptor (read-only for a cow disk)."""

    def readv(self, views: Sequence[memoryview], offset: int) -> int: ...
    def writev(self, views: Sequence[memoryview], offset: int) -> int: ...
    def read_pieces(self, offset: int, length: int) -> list[Piece]: ...
    def write_pieces(self, offset: int, length: int) -> list[Piece]: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...
    def close(self) -> None: ...


def _trim(views: Sequence[memoryview], limit: int) -> Sequence[memoryview]:
    """At most IOV_MAX views holding at most ``limit`` bytes (slices: no copy)."""
    out: list[memoryview] = []
    for v in views:
        if limit <= 0 or len(out) == IOV_MAX:
            break
        out.append(v if len(v) <= limit else v[:limit])
        limit -= len(v)
    return out


def _punch(fd: int, offset: int, length: int) -> bool:
    """Punch a hole; False where the filesystem cannot (discard is only a hint)."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        return False
    return True


def _zero(fd: int, offset: int, length: int, unmap: bool) -> None:
    """Make the range read as zeros: ZERO_RANGE (PUNCH_HOLE first when the driver allows
    unmapping), or writing zeros where the filesystem can do neither."""
    modes = (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE) if unmap else (FALLOC_FL_ZERO_RANGE,)
    for mode in modes:
        try:
            fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
    end = offset + length
    while offset < end:
        put = os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - offset)], offset)
        if put == 0:
            raise OSError(errno.EIO, "the file took no bytes")
        offset += put


class RawImage:
    """A raw image file, read and written in place."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def image_fd(self) -> int:
        return self.fd

    def readv(self, views: Sequence[memoryview], offset: int) -> int:
        return os.preadv(self.fd, views if len(views) <= IOV_MAX else views[:IOV_MAX], offset)

    def writev(self, views: Sequence[memoryview], offset: int) -> int:
        return os.pwritev(self.fd, views if len(views) <= IOV_MAX else views[:IOV_MAX],
                          offset)

    def read_pieces(self, offset: int, length: int) -> list[Piece]:
        return [(self.fd, offset, length)]

    def write_pieces(self, offset: int, length: int) -> list[Piece]:
        return [(self.fd, offset, length)]

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        _punch(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        _zero(self.fd, offset, length, unmap)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SectorMap:
    """A set of sectors as sorted, disjoint, non-adjacent half-open ranges
    ``[starts[i], ends[i])``. Adding merges; lookups are a bisect."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        starts, ends = self.starts, self.ends
        i = bisect_left(ends, start)  # the first range ending at or after start
        j = bisect_right(starts, end)  # ranges from i to j-1 touch or overlap
        if i == j:  # touches none: a new range
            starts.insert(i, start)
            ends.insert(i, end)
            return
        if starts[i] < start:
            start = starts[i]
        if ends[j - 1] > end:
            end = ends[j - 1]
        starts[i] = start  # the first of them becomes the union, the others go
        ends[i] = end
        if j > i + 1:
            del starts[i + 1 : j], ends[i + 1 : j]

    def run(self, sector: int, limit: int) -> tuple[bool, int]:
        """Whether ``sector`` is in the set, and where that stays true (or false),
        capped at ``limit``."""
        i = bisect_right(self.starts, sector) - 1
        if i >= 0 and sector < self.ends[i]:
            return True, min(self.ends[i], limit)
        nxt = self.starts[i + 1] if i + 1 < len(self.starts) else limit
        return False, min(nxt, limit)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends, strict=True))

    @property
    def sectors(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))


def make_overlay(size: int, directory: Path | None = None) -> int:
    """A sparse, already unlinked, read-write file of ``size`` bytes in ``directory``
    (default: the temporary directory, $TMPDIR or /tmp)."""
    where = str(directory) if directory is not None else tempfile.gettempdir()
    try:
        fd = os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd, name = tempfile.mkstemp(prefix="minivmm-cow-", dir=where)
        os.unlink(name)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class CowImage:
    """A raw image, read only, under a private overlay that takes every write (see the
    module docstring). ``image_fd`` is open read-only; the overlay is made here."""

    def __init__(self, image_fd: int, size: int, overlay_dir: Path | None = None) -> None:
        self._image_fd = image_fd
        self._size = size
        self.overlay_fd = make_overlay(size, overlay_dir)
        #: the sectors whose data is the overlay's
        self.map = SectorMap()

    @property
    def size(self) -> int:
        return self._size

    @property
    def image_fd(self) -> int:
        return self._image_fd

    def _piece(self, offset: int, length: int) -> Piece:
        """The first piece of [offset, offset+length): which file, up to where."""
        sector = offset // SECTOR_SIZE
        last = -(-(offset + length) // SECTOR_SIZE)
        inside, end = self.map.run(sector, last)
        n = min(end * SECTOR_SIZE, offset + length) - offset
        return (self.overlay_fd if inside else self._image_fd), offset, n

    def readv(self, views: Sequence[memoryview], offset: int) -> int:
        if not self.map.starts:  # nothing written yet: all of it is the image's
            return os.preadv(self._image_fd, views if len(views) <= IOV_MAX
                             else views[:IOV_MAX], offset)
        total = sum(map(len, views))
        fd, _, n = self._piece(offset, total)
        if n == total:
            return os.preadv(fd, views if len(views) <= IOV_MAX else views[:IOV_MAX], offset)
        return os.preadv(fd, _trim(views, n), offset)

    def writev(self, views: Sequence[memoryview], offset: int) -> int:
        put = os.pwritev(self.overlay_fd, views if len(views) <= IOV_MAX else views[:IOV_MAX],
                         offset)
        # Sectors finished by this write are the overlay's now. A request starts on a
        # sector boundary and the caller's next call goes on where this one stopped, so
        # a sector this write began is mapped by the call that finishes it.
        self.map.add(offset // SECTOR_SIZE, (offset + put) // SECTOR_SIZE)
        return put

    def read_pieces(self, offset: int, length: int) -> list[Piece]:
        out: list[Piece] = []
        end = offset + length
        while offset < end:
            piece = self._piece(offset, end - offset)
            out.append(piece)
            offset += piece[2]
        return out

    def write_pieces(self, offset: int, length: int) -> list[Piece]:
        self._map(offset, length)
        return [(self.overlay_fd, offset, length)]

    def _map(self, offset: int, length: int) -> None:
        self.map.add(offset // SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE))

    def flush(self) -> None:
        os.fdatasync(self.overlay_fd)

    def discard(self, offset: int, length: int) -> None:
        if _punch(self.overlay_fd, offset, length):  # the overlay now reads zeros there
            self._map(offset, length)
        # else: a filesystem without holes keeps the data (discard is only a hint)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        _zero(self.overlay_fd, offset, length, unmap)
        self._map(offset, length)

    def overlay_data(self) -> tuple[list[tuple[int, int]], bytes]:
        """What the overlay holds: its sector ranges and their bytes, in order (for a
        snapshot)."""
        ranges = self.map.ranges()
        parts = []
        for start, end in ranges:
            want, offset = (end - start) * SECTOR_SIZE, start * SECTOR_SIZE
            data = os.pread(self.overlay_fd, want, offset)
            while len(data) < want:  # pread may be short: go on where it stopped
                more = os.pread(self.overlay_fd, want - len(data), offset + len(data))
                if not more:
                    raise OSError(errno.EIO, "the overlay ended early")
                data += more
            parts.append(data)
        return ranges, b"".join(parts)

    def close(self) -> None:
        for name in ("_image_fd", "overlay_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


# -- snapshots: checking a saved disk state (untrusted input: a snapshot file) ----------


def check_image(path: Path, fd: int, state: Mapping[str, object]) -> None:
    """ValueError (one line naming the image) unless the file open as ``fd`` (``path``)
    has the size a snapshot saved for its image, and, when it is that image (the same
    path), its modification time too. Another file (a restore told to use a copy, e.g.
    one made when the snapshot was taken) is the user's word for the disk's content."""
    saved, size, mtime = state.get("path"), state.get("size"), state.get("mtime_ns")
    if not (isinstance(saved, str) and _is_int(size) and _is_int(mtime)):
        raise ValueError(f"{path}: the snapshot's disk state is malformed")
    st = os.fstat(fd)
    if st.st_size != size:
        raise ValueError(f"{path}: the image is {st.st_size} bytes, the snapshot's was "
                         f"{size}; restore needs the image the snapshot was taken with")
    if st.st_mtime_ns != mtime and os.path.realpath(path) == os.path.realpath(saved):
        raise ValueError(f"{path}: the image was modified after the snapshot was taken; "
                         "restore needs it unchanged (or a copy made at the snapshot)")


def decode_overlay(obj: object, capacity: int) -> tuple[list[tuple[int, int]], bytes]:
    """A saved overlay's sector ranges and bytes; ValueError if malformed."""
    import base64
    import binascii
    import zlib

    bad = ValueError("the snapshot's copy-on-write overlay is malformed")
    if not isinstance(obj, Mapping) or not isinstance(obj.get("zlib"), str) or not (
            isinstance(obj.get("ranges"), list)):
        raise bad
    ranges: list[tuple[int, int]] = []
    prev = 0
    for r in obj["ranges"]:
        if not (isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r)
                and prev <= r[0] < r[1] <= capacity):
            raise bad
        ranges.append((r[0], r[1]))
        prev = r[1]
    total = sum(e - s for s, e in ranges) * SECTOR_SIZE
    try:
        z = zlib.decompressobj()
        data = z.decompress(base64.b64decode(obj["zlib"], validate=True), total + 1)
    except (binascii.Error, zlib.error):
        raise bad from None
    if len(data) != total or z.unconsumed_tail or not z.eof:
        raise bad
    return ranges, data


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
