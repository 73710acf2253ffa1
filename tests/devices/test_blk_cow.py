"""virtio-blk on a copy-on-write disk, through the transport (DeviceHarness): the guest
sees a raw disk, the image is never written."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm.devices import blkimage
from minivmm.devices.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockDevice,
)
from minivmm.devices.blkimage import CowImage, SectorMap
from minivmm.errors import UsageError
from minivmm.transport.testing import DeviceHarness
from minivmm.virtio.testing import UsedElem

from . import small_tmpfs

SECTORS = 128
S = 512


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


ORIGINAL = pattern(SECTORS * S)


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)  # struct virtio_blk_req (§5.2.6)


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


class Disk:
    """A cow BlockDevice behind the mmio transport, and the requests a driver sends."""

    def __init__(self, image: Path, **kw: object) -> None:
        self.device = BlockDevice(image, cow=True, **kw)  # type: ignore[arg-type]
        self.h = DeviceHarness(self.device)
        self.h.initialise()
        self.drv = self.h.drivers[0]

    def submit(self, readable: list[bytes], writable: list[int]) -> UsedElem:
        head = self.drv.publish(readable, writable, kick=False)
        self.h.kick(0)
        (used,) = self.drv.used()
        assert used.id == head
        return used

    def status(self, readable: list[bytes], writable: list[int] | None = None) -> int:
        used = self.submit(readable, writable or [1])
        return used.written[used.len - 1]

    def write(self, sector: int, data: bytes, pieces: int = 1) -> int:
        step = -(-len(data) // pieces)
        bufs = [data[i : i + step] for i in range(0, len(data), step)]
        return self.status([header(VIRTIO_BLK_T_OUT, sector), *bufs])

    def read(self, sector: int, count: int, split: list[int] | None = None) -> bytes:
        sizes = split or [count * S]
        assert sum(sizes) == count * S
        used = self.submit([header(VIRTIO_BLK_T_IN, sector)], [*sizes, 1])
        assert used.written[-1] == VIRTIO_BLK_S_OK and used.len == count * S + 1
        return used.written[:-1]

    def close(self) -> None:
        assert self.h.status & 0x40 == 0  # never DEVICE_NEEDS_RESET
        self.h.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(ORIGINAL)
    p.chmod(0o444)  # a cow disk opens its image read-only: a read-only file will do
    return p


@pytest.fixture
def disk(image: Path) -> Iterator[Disk]:
    d = Disk(image)
    yield d
    d.close()
    assert image.read_bytes() == ORIGINAL  # the image is never written


def test_overlapping_writes_read_back_the_latest(disk: Disk) -> None:
    assert disk.write(10, pattern(8 * S, 2)) == VIRTIO_BLK_S_OK  # sectors 10-17
    assert disk.write(14, pattern(8 * S, 3), pieces=3) == VIRTIO_BLK_S_OK  # 14-21
    assert disk.write(8, pattern(3 * S, 4)) == VIRTIO_BLK_S_OK  # 8-10
    want = bytearray(ORIGINAL)
    want[10 * S : 18 * S] = pattern(8 * S, 2)
    want[14 * S : 22 * S] = pattern(8 * S, 3)
    want[8 * S : 11 * S] = pattern(3 * S, 4)
    assert disk.read(0, SECTORS) == want
    assert disk.device.image.map.ranges() == [(8, 22)]  # type: ignore[attr-defined]


def test_reads_across_overlay_and_image_boundaries(disk: Disk) -> None:
    for sector in (3, 7, 20):  # overlay islands: 3, 7-8, 20
        assert disk.write(sector, pattern(S * (2 if sector == 7 else 1), sector)) == 0
    want = bytearray(ORIGINAL)
    want[3 * S : 4 * S] = pattern(S, 3)
    want[7 * S : 9 * S] = pattern(2 * S, 7)
    want[20 * S : 21 * S] = pattern(S, 20)
    # buffers whose edges fall inside pieces, and pieces that end inside buffers
    assert disk.read(1, 24, split=[700, 1300, 100, 24 * S - 2100]) == want[S : 25 * S]
    assert disk.read(3, 1) == want[3 * S : 4 * S]
    assert disk.read(2, 2, split=[S + 1, S - 1]) == want[2 * S : 4 * S]


def test_discard_and_write_zeroes_over_the_overlay(disk: Disk) -> None:
    assert disk.write(0, pattern(32 * S, 9)) == VIRTIO_BLK_S_OK
    assert disk.status([header(VIRTIO_BLK_T_DISCARD), segment(8, 8)]) == VIRTIO_BLK_S_OK
    assert disk.status([header(VIRTIO_BLK_T_WRITE_ZEROES),
                        segment(2, 2), segment(28, 8, 1)]) == VIRTIO_BLK_S_OK
    # and over sectors only the image holds: zeros read back too, the image keeps its own
    assert disk.status([header(VIRTIO_BLK_T_DISCARD), segment(64, 8)]) == VIRTIO_BLK_S_OK
    assert disk.status([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(100, 3)]) == 0
    want = bytearray(ORIGINAL)
    want[: 32 * S] = pattern(32 * S, 9)
    for start, count in ((8, 8), (2, 2), (28, 8), (64, 8), (100, 3)):
        want[start * S : (start + count) * S] = bytes(count * S)
    assert disk.read(0, SECTORS) == want
    # a write after a discard lands in the overlay again
    assert disk.write(10, pattern(S, 5)) == VIRTIO_BLK_S_OK
    assert disk.read(9, 3) == bytes(S) + pattern(S, 5) + bytes(S)


def test_flush_syncs_the_overlay_before_the_status(disk: Disk,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[int, int]] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append((fd, disk.drv.used_idx))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    assert disk.write(0, pattern(S)) == VIRTIO_BLK_S_OK
    assert disk.status([header(VIRTIO_BLK_T_FLUSH)]) == VIRTIO_BLK_S_OK
    image = disk.device.image
    assert isinstance(image, CowImage)
    assert synced == [(image.overlay_fd, 1)]  # the overlay, before the flush's used entry


def test_short_transfers_map_only_whole_sectors(disk: Disk,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """pwritev and preadv may move fewer bytes than asked: the device loops, and a sector
    is the overlay's only once all of it is written."""
    real_w, real_r = os.pwritev, os.preadv

    def short(real: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, views: list[memoryview], offset: int) -> int:
            return int(real(fd, blkimage._trim(views, 300), offset))
        return call

    monkeypatch.setattr(os, "pwritev", short(real_w))
    monkeypatch.setattr(os, "preadv", short(real_r))
    data = pattern(5 * S, 6)
    assert disk.write(4, data, pieces=2) == VIRTIO_BLK_S_OK
    assert disk.read(2, 9) == ORIGINAL[2 * S : 4 * S] + data + ORIGINAL[9 * S : 11 * S]
    assert disk.device.image.map.ranges() == [(4, 9)]  # type: ignore[attr-defined]


def test_two_cow_disks_of_one_image_see_only_their_own_writes(image: Path) -> None:
    a, b = Disk(image), Disk(image)
    try:
        assert a.write(0, pattern(S, 1)) == 0 and b.write(0, pattern(S, 2)) == 0
        assert a.read(0, 1) == pattern(S, 1) and b.read(0, 1) == pattern(S, 2)
    finally:
        a.close()
        b.close()
    assert image.read_bytes() == ORIGINAL


def test_full_overlay_fails_that_request_only(image: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "32k") as mnt:
        disk = Disk(image, cow_dir=mnt)
        assert disk.write(0, pattern(8 * S, 3)) == VIRTIO_BLK_S_OK  # 4 KiB: fits
        assert disk.write(16, pattern(64 * S, 4)) == VIRTIO_BLK_S_IOERR  # 32 KiB: ENOSPC
        assert disk.read(0, 8) == pattern(8 * S, 3)  # reads go on
        assert disk.read(100, 4) == ORIGINAL[100 * S : 104 * S]
        assert disk.write(0, pattern(8 * S, 5)) == VIRTIO_BLK_S_OK  # pages it already has
        assert disk.status([header(VIRTIO_BLK_T_FLUSH)]) == VIRTIO_BLK_S_OK
        assert disk.read(0, 8) == pattern(8 * S, 5)
        disk.close()
    assert image.read_bytes() == ORIGINAL


def test_pieces_for_an_io_engine(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    cow = CowImage(fd, SECTORS * S)
    try:
        ov = cow.overlay_fd
        assert cow.read_pieces(0, 4 * S) == [(fd, 0, 4 * S)]
        assert cow.write_pieces(S, 2 * S) == [(ov, S, 2 * S)]  # mapped as it is handed out
        assert cow.read_pieces(0, 4 * S) == [(fd, 0, S), (ov, S, 2 * S), (fd, 3 * S, S)]
        assert cow.read_pieces(S + 100, 100) == [(ov, S + 100, 100)]
        assert cow.size == SECTORS * S
    finally:
        cow.close()
    raw = blkimage.RawImage(os.open(image, os.O_RDONLY | os.O_CLOEXEC), SECTORS * S)
    assert raw.read_pieces(S, S) == raw.write_pieces(S, S) == [(raw.fd, S, S)]
    raw.close()


@given(st.lists(st.tuples(st.integers(0, SECTORS - 1), st.integers(1, 16))))
def test_sector_map_is_the_union_of_what_was_added(adds: list[tuple[int, int]]) -> None:
    m = SectorMap()
    want: set[int] = set()
    for start, count in adds:
        m.add(start, start + count)
        want.update(range(start, start + count))
    got = {s for a, b in m.ranges() for s in range(a, b)}
    assert got == want and m.sectors == len(want)
    flat = [x for r in m.ranges() for x in r]
    assert all(a < b for a, b in pairwise(flat))  # disjoint, apart
    for sector in range(SECTORS + 20):
        inside, end = m.run(sector, SECTORS + 20)
        assert inside == (sector in want)
        assert all((s in want) == inside for s in range(sector, end))


_OPS = st.lists(st.tuples(st.sampled_from(["write", "discard", "zero", "zero_unmap"]),
                          st.integers(0, SECTORS - 1), st.integers(1, 12),
                          st.integers(1, 3)), max_size=12)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_OPS)
def test_a_cow_disk_reads_as_a_raw_disk_would(image: Path,
                                              ops: list[tuple[str, int, int, int]]) -> None:
    disk = Disk(image)
    model = bytearray(ORIGINAL)
    try:
        for i, (op, sector, count, pieces) in enumerate(ops):
            count = min(count, SECTORS - sector)
            if op == "write":
                data = pattern(count * S, i + 2)
                assert disk.write(sector, data, pieces) == VIRTIO_BLK_S_OK
                model[sector * S : (sector + count) * S] = data
            else:
                kind = VIRTIO_BLK_T_DISCARD if op == "discard" else VIRTIO_BLK_T_WRITE_ZEROES
                flags = 1 if op == "zero_unmap" else 0
                assert disk.status([header(kind), segment(sector, count, flags)]) == 0
                model[sector * S : (sector + count) * S] = bytes(count * S)
        assert disk.read(0, SECTORS, split=[1000, 3000, SECTORS * S - 4000]) == model
    finally:
        disk.close()
    assert image.read_bytes() == ORIGINAL


def test_overlay_where_tmpfile_is_unsupported(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Without O_TMPFILE the overlay is a named temporary file, unlinked at once."""
    real = os.open

    def no_tmpfile(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", no_tmpfile)
    fd = blkimage.make_overlay(1 << 20, tmp_path)
    try:
        assert os.fstat(fd).st_size == 1 << 20 and os.fstat(fd).st_blocks == 0  # sparse
        assert list(tmp_path.iterdir()) == []  # already unlinked
    finally:
        os.close(fd)


def test_overlay_directory_errors_and_stats(image: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        BlockDevice(image, cow=True, cow_dir=tmp_path / "missing")
    msg = str(info.value)
    assert "\n" not in msg and "copy-on-write overlay" in msg and "missing" in msg
    disk = Disk(image, cow_dir=tmp_path)
    assert disk.device.stats()["overlay_bytes"] == 0
    disk.write(3, pattern(2 * S))
    assert disk.device.stats()["overlay_bytes"] == 2 * S
    assert list(tmp_path.iterdir()) == [image]  # the overlay has no name
    disk.close()
