"""virtio-blk (virtio 1.2 §5.2): a disk backed by a raw image file.

One request queue. A request (§5.2.6) is a chain: a 16-byte header (type, reserved,
sector) in the readable part, then the data (readable for OUT, DISCARD and WRITE_ZEROES,
writable for IN and GET_ID), then one writable status byte, the chain's last byte.

A malformed request is the guest's mistake about one request, not about the queue: it is
answered with VIRTIO_BLK_S_IOERR (or S_UNSUPP for an unknown type or flag) and a
rate-limited log line naming what the guest did, and the device keeps working. Host I/O
errors (EIO, ENOSPC, ...) are answered the same way; the VMM keeps running. Broken
chains (the engine's VirtQueueError) still set DEVICE_NEEDS_RESET, as for every device.

The files behind the disk are minivmm.devices.blkimage's: a raw image read and written in
place, or (``cow``) the image read-only under a private copy-on-write overlay. Data
moves between those files and the chain's guest memoryviews (no bounce buffer): on a
host with io_uring, a wake-up's requests are walked and answered in one C call, the
reads through io_uring (minivmm.devices.blk_uring; off with ``io_uring=off`` or
MINIVMM_IO_URING=off; a cow disk's writes, which change its map, stay in Python);
otherwise, and for every request the batch path leaves to Python, with
``preadv``/``pwritev``, one request after the other, looping over short transfers (the
synchronous path: the same answers, request for request). FLUSH is ``fdatasync`` of the
file the writes go to (the image, or the overlay) before the status is written. DISCARD
punches holes; WRITE_ZEROES uses ``fallocate`` ZERO_RANGE (PUNCH_HOLE when the driver
allows unmapping) and writes zeros where the filesystem cannot (EOPNOTSUPP).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

from ..errors import UsageError
from ..virtio.chain import DescriptorChain, Reader
from .base import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_ID_BLOCK,
    VirtioDevice,
    bit,
)
from .blkimage import (
    SECTOR_SIZE,
    CowImage,
    DiskImage,
    RawImage,
    check_image,
    decode_overlay,
)

if TYPE_CHECKING:
    from .blk_uring import BatchPath

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX: Final = 1
VIRTIO_BLK_F_SEG_MAX: Final = 2
VIRTIO_BLK_F_RO: Final = 5
VIRTIO_BLK_F_BLK_SIZE: Final = 6
VIRTIO_BLK_F_FLUSH: Final = 9
VIRTIO_BLK_F_DISCARD: Final = 13
VIRTIO_BLK_F_WRITE_ZEROES: Final = 14

# Request types and status values (§5.2.6)
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1
VIRTIO_BLK_ID_BYTES: Final = 20

# Layouts, named once (§5.2.4 and §5.2.6; little-endian)
#: struct virtio_blk_config: capacity, size_max, seg_max, geometry (cylinders, heads,
#: sectors), blk_size, topology (physical_block_exp, alignment_offset, min_io_size,
#: opt_io_size), writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
#: discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
#: write_zeroes_may_unmap, unused1[3], max_secure_erase_sectors, max_secure_erase_seg,
#: secure_erase_sector_alignment
BLK_CONFIG: Final = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")
#: struct virtio_blk_req header: type, reserved, sector
REQ_HEADER: Final = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
DWZ_SEGMENT: Final = struct.Struct("<QII")
assert BLK_CONFIG.size == 72 and REQ_HEADER.size == 16 and DWZ_SEGMENT.size == 16

QUEUE_SIZE: Final = 256
#: the most a cow disk's overlay may take in a snapshot's device state (base64 of zlib):
#: the state sits in the snapshot's JSON manifest
OVERLAY_STATE_MAX: Final = 8 << 20
SEG_MAX: Final = QUEUE_SIZE - 2  # a chain holds the header and the status besides data
BLK_SIZE: Final = 512
MAX_DISCARD_SECTORS: Final = 1 << 23  # 4 GiB per segment
MAX_DISCARD_SEG: Final = 32
DISCARD_SECTOR_ALIGNMENT: Final = 8  # 4 KiB, the page-cache granularity of hole punching
MAX_WRITE_ZEROES_SECTORS: Final = 1 << 23
MAX_WRITE_ZEROES_SEG: Final = 32

_KNOWN_TYPES: Final = frozenset((VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH,
                                 VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
                                 VIRTIO_BLK_T_WRITE_ZEROES))
_STATUS: Final = (b"\x00", b"\x01", b"\x02")


# -- one error class per way a guest can get a request wrong ---------------------------


class BlkRequestError(Exception):
    """A bad request: answered with ``status``; the device keeps working."""

    status = VIRTIO_BLK_S_IOERR


class HeaderTooShort(BlkRequestError):
    def __init__(self, readable: int) -> None:
        super().__init__(f"request has {readable} readable bytes, less than the "
                         f"{REQ_HEADER.size}-byte header")


class NoStatusByte(BlkRequestError):
    def __init__(self) -> None:
        super().__init__("request has no writable byte for the status (missing or readable)")


class StatusNotLast(BlkRequestError):
    def __init__(self, kind: int, writable: int) -> None:
        super().__init__(f"type {kind} request has {writable} writable bytes; only the "
                         "status byte, last in the chain, may be writable")


class UnexpectedData(BlkRequestError):
    def __init__(self, kind: int, extra: int) -> None:
        super().__init__(f"type {kind} request carries {extra} readable bytes after the "
                         "header; it takes none")


class DataNotSectorMultiple(BlkRequestError):
    def __init__(self, kind: int, length: int) -> None:
        super().__init__(f"type {kind} request has {length} data bytes, not a multiple "
                         f"of {SECTOR_SIZE}")


class SectorOutOfRange(BlkRequestError):
    def __init__(self, sector: int, count: int, capacity: int) -> None:
        super().__init__(f"request for sectors {sector}+{count} is outside the disk "
                         f"({capacity} sectors)")


class ReadOnlyDisk(BlkRequestError):
    def __init__(self, kind: int) -> None:
        super().__init__(f"type {kind} request modifies a read-only disk")


class UnsupportedRequest(BlkRequestError):
    status = VIRTIO_BLK_S_UNSUPP

    def __init__(self, kind: int) -> None:
        super().__init__(f"request type {kind} is not supported")


class BadSegmentList(BlkRequestError):
    def __init__(self, kind: int, length: int, limit: int) -> None:
        super().__init__(f"type {kind} request has {length} bytes of segments; it needs "
                         f"1 to {limit} segments of {DWZ_SEGMENT.size} bytes")


class SegmentTooLarge(BlkRequestError):
    def __init__(self, kind: int, count: int, limit: int) -> None:
        super().__init__(f"type {kind} segment of {count} sectors exceeds the limit {limit}")


class UnsupportedSegmentFlags(BlkRequestError):
    status = VIRTIO_BLK_S_UNSUPP

    def __init__(self, kind: int, flags: int) -> None:
        super().__init__(f"type {kind} segment has flags 0x{flags:x}, not allowed")


class ImageEnded(BlkRequestError):
    def __init__(self, offset: int) -> None:
        super().__init__(f"image file ended at byte {offset} (did it shrink?)")


class BlockDevice(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    name = "blk"
    kernel_option = "CONFIG_VIRTIO_BLK"

    def __init__(self, path: Path, *, read_only: bool = False,
                 serial: str | None = None, cow: bool = False,
                 cow_dir: Path | None = None, io_uring: bool = True) -> None:
        opt = str(path)
        ident = (serial or "").encode()
        if len(ident) > VIRTIO_BLK_ID_BYTES:
            raise UsageError(f"{opt}: the serial {serial!r} is {len(ident)} bytes; "
                             f"use at most {VIRTIO_BLK_ID_BYTES}", field="drives")
        self.path = path
        self.read_only = read_only
        #: writes go to a private overlay, the image is never written (a read-only disk
        #: needs none: it is never written either)
        self.cow = cow and not read_only
        fd = _open_image(path, read_only or self.cow, opt)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            os.close(fd)
            raise UsageError(f"{opt}: cannot find its size ({e.strerror})",
                             field="drives") from None
        if self.cow:
            try:
                self.image: DiskImage = CowImage(fd, size, cow_dir)
            except OSError as e:
                os.close(fd)
                where = cow_dir or "the temporary directory"
                raise UsageError(f"{opt}: cannot make its copy-on-write overlay in {where} "
                                 f"({e.strerror}); set TMPDIR or cow_dir=",
                                 field="drives") from None
        else:
            self.image = RawImage(fd, size)
        #: the disk size in 512-byte sectors (a partial last sector is not addressable)
        self.capacity = size // SECTOR_SIZE
        self._id = ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0")  # §5.2.6: NUL padded
        features = (bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
                    | bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_SEG_MAX)
                    | bit(VIRTIO_BLK_F_BLK_SIZE))
        features |= bit(VIRTIO_BLK_F_RO) if read_only else (
            bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES))
        super().__init__(features, [QUEUE_SIZE])
        self._config = BLK_CONFIG.pack(
            self.capacity, 0, SEG_MAX, 0, 0, 0, BLK_SIZE, 0, 0, 0, 0, 0, 0, 1,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, 1, 0, 0, 0)
        self._batch: BatchPath | None = None
        if io_uring:
            try:
                from .uring import open_ring

                ring = open_ring()
                if ring is not None:
                    from .blk_uring import BatchPath

                    self._batch = BatchPath(self, ring)
            except BaseException:
                self.image.close()  # the device is not built: nobody else will
                raise

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Self:
        """``path=IMAGE[,ro][,serial=ID][,cow][,cow_dir=DIR]`` (``ro`` is short for
        ``read_only``)."""
        opts = dict(options)
        if "ro" in opts:
            opts["read_only"] = opts.pop("ro")
        return super().from_options(opts)

    def config(self) -> bytes:
        return self._config

    def stats(self) -> dict[str, int]:
        """A cow disk: the bytes its overlay holds (what the guest wrote). ``io_uring`` 1
        or 0 (the path in use), and with it the batches so far and the reads and writes
        the batch path served."""
        out = ({"overlay_bytes": self.image.map.sectors * SECTOR_SIZE}
               if isinstance(self.image, CowImage) else {})
        b = self._batch
        if b is None:
            return {**out, "io_uring": 0}
        return {**out, "io_uring": int(b.active), "io_uring_batches": b.batches,
                "io_uring_requests": b.requests}

    @property
    def io_uring(self) -> bool:
        """Whether requests go through io_uring (else the synchronous path)."""
        return self._batch is not None and self._batch.active

    # -- snapshots (see VirtioDevice.quiesce; every request completes inside its kick,
    # so nothing is in flight to finish) -------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The image by path, size and modification time (a restore refuses another
        one), and for a cow disk what its overlay holds: the guest's memory (its page
        cache) may already know those writes, so they are part of the disk it saw."""
        st = os.fstat(self.image.image_fd)
        state: dict[str, object] = {"path": os.path.abspath(self.path), "size": st.st_size,
                                    "mtime_ns": st.st_mtime_ns}
        if isinstance(self.image, CowImage) and self.image.map.starts:
            import base64
            import zlib

            ranges, data = self.image.overlay_data()
            text = base64.b64encode(zlib.compress(data, 1)).decode()
            if len(text) > OVERLAY_STATE_MAX:
                raise UsageError(f"{self.path}: its copy-on-write overlay holds "
                                 f"{len(data) >> 20} MiB of the guest's writes, more than a "
                                 f"snapshot carries ({OVERLAY_STATE_MAX >> 20} MiB "
                                 "compressed); snapshot before the guest writes that much",
                                 field="snapshot")
            state["overlay"] = {"ranges": [list(r) for r in ranges], "zlib": text}
        return state

    def restore_state(self, state: Mapping[str, object]) -> None:
        """Check the image is the one saved, then put a saved overlay's writes back: into
        this disk's own overlay (cow), or into the image itself when the disk is not cow.
        ValueError (one line) for a changed image or a malformed state."""
        check_image(self.path, self.image.image_fd, state)
        overlay = state.get("overlay")
        if overlay is None:
            return
        if isinstance(overlay, Mapping) and len(str(overlay.get("zlib", ""))) > OVERLAY_STATE_MAX:
            raise ValueError(f"{self.path}: the snapshot's copy-on-write overlay is larger "
                             f"than a snapshot carries ({OVERLAY_STATE_MAX >> 20} MiB)")
        ranges, data = decode_overlay(overlay, self.capacity)
        if self.read_only:
            raise ValueError(f"{self.path}: the snapshot's disk has writes over the image; "
                             "restore it writable (cow or not), not read-only")
        view = memoryview(data)
        for start, end in ranges:
            offset, stop = start * SECTOR_SIZE, end * SECTOR_SIZE
            while offset < stop:
                put = self.image.writev([view[: stop - offset]], offset)
                if put == 0:
                    raise OSError(errno.EIO, "the disk took no bytes")
                view = view[put:]
                offset += put

    def on_reset(self) -> None:
        if self._batch is not None:
            self._batch.release()

    def close(self) -> None:
        try:
            super().close()
            if self._batch is not None:
                self._batch.close()
        finally:
            self.image.close()

    # -- the request queue ----------------------------------------------------------

    def process_queue(self, index: int) -> None:
        batch = self._batch
        queue = self.queues[0]
        if batch is not None and batch.active and queue.accelerable:
            batch.drain(queue)
        else:
            self.drain(queue, self._serve)

    def _serve(self, chain: DescriptorChain) -> None:
        w = chain.writer
        if w.total == 0:
            self.log("blk: %s; returned unanswered", NoStatusByte())
            return
        try:
            status = self._execute(chain.reader, chain)
        except BlkRequestError as e:
            self.log("blk: %s", e)
            status = e.status
        except OSError as e:
            self.log("blk: I/O error on %s: %s", self.path, e)
            status = VIRTIO_BLK_S_IOERR
        if w.remaining > 1:
            w.advance(w.remaining - 1)
        w.write(_STATUS[status])

    def _execute(self, r: Reader, chain: DescriptorChain) -> int:
        if r.remaining < REQ_HEADER.size:
            raise HeaderTooShort(r.remaining)
        kind, _, sector = r.read_struct(REQ_HEADER)
        if kind not in _KNOWN_TYPES:  # before any shape check: the shape is unknown too
            raise UnsupportedRequest(kind)
        w = chain.writer
        if kind == VIRTIO_BLK_T_IN:
            self._no_data(kind, r)
            self._check_range(kind, sector, w.remaining - 1)
            offset = sector * SECTOR_SIZE
            readv = self.image.readv
            while w.remaining > 1:
                got = readv(w.views(w.remaining - 1), offset)
                if got == 0:
                    raise ImageEnded(offset)
                w.advance(got)
                offset += got
            return VIRTIO_BLK_S_OK
        if kind == VIRTIO_BLK_T_GET_ID:
            self._no_data(kind, r)
            w.write(self._id[: min(w.remaining - 1, VIRTIO_BLK_ID_BYTES)])
            return VIRTIO_BLK_S_OK
        if w.remaining != 1:
            raise StatusNotLast(kind, w.remaining)
        if kind == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise ReadOnlyDisk(kind)
            self._check_range(kind, sector, r.remaining)
            offset = sector * SECTOR_SIZE
            writev = self.image.writev
            while r.remaining:
                put = writev(r.views(), offset)
                if put == 0:
                    raise OSError(errno.EIO, "the image took no bytes")
                r.consume(put)
                offset += put
        elif kind == VIRTIO_BLK_T_FLUSH:
            self._no_data(kind, r)
            self.image.flush()
        else:
            self._discard_or_zero(kind, r)
        return VIRTIO_BLK_S_OK

    def _no_data(self, kind: int, r: Reader) -> None:
        if r.remaining:
            raise UnexpectedData(kind, r.remaining)

    def _check_range(self, kind: int, sector: int, length: int) -> None:
        if length % SECTOR_SIZE:
            raise DataNotSectorMultiple(kind, length)
        count = length // SECTOR_SIZE
        # Python ints do not wrap: sector + count is the true end even near 2^64.
        if sector > self.capacity or sector + count > self.capacity:
            raise SectorOutOfRange(sector, count, self.capacity)

    def _discard_or_zero(self, kind: int, r: Reader) -> None:
        if self.read_only:
            raise ReadOnlyDisk(kind)
        discard = kind == VIRTIO_BLK_T_DISCARD
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        length = r.remaining
        if length == 0 or length % DWZ_SEGMENT.size or length // DWZ_SEGMENT.size > max_seg:
            raise BadSegmentList(kind, length, max_seg)
        segments = [r.read_struct(DWZ_SEGMENT) for _ in range(length // DWZ_SEGMENT.size)]
        allowed = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP  # §5.2.6.2
        for sector, count, flags in segments:  # all checked before any is done
            if flags & ~allowed:
                raise UnsupportedSegmentFlags(kind, flags)
            if count > max_sectors:
                raise SegmentTooLarge(kind, count, max_sectors)
            self._check_range(kind, sector, count * SECTOR_SIZE)
        for sector, count, flags in segments:
            offset, size = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if size == 0:
                continue
            if discard:
                self.image.discard(offset, size)
            else:
                self.image.write_zeroes(offset, size,
                                        bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))


def _open_image(path: Path, read_only: bool, opt: str) -> int:
    """Open the image for the device; UsageError (one line) for what the user must fix."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{opt}: no such file; create an image (truncate -s 64M {path}) "
                         "or fix the path", field="drives") from None
    except OSError as e:
        raise UsageError(f"{opt}: cannot use it ({e.strerror}); fix the path",
                         field="drives") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{opt}: is a directory; name a raw image file", field="drives")
    if not read_only and not st.st_mode & 0o222:
        raise UsageError(f"{opt}: the file is read-only; open it read-only (ro) or make "
                         "it writable",
                         field="drives")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as e:
        if not read_only and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UsageError(f"{opt}: cannot open it for writing ({e.strerror}); open it "
                             "read-only (ro) or make it writable", field="drives") from None
        raise UsageError(f"{opt}: cannot open it ({e.strerror})", field="drives") from None
