"""virtio-blk through a fake driver: every request path, bad shapes, host I/O errors."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from minivmm.devices import blk, blkimage
from minivmm.devices.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockDevice,
)
from minivmm.errors import UsageError
from minivmm.virtio.testing import UsedElem

from . import Attached, attach, choose_io_path, small_tmpfs

SECTORS = 128


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(SECTORS * 512))
    return p


def header(kind: int, sector: int = 0) -> bytes:
    # struct virtio_blk_req (virtio 1.2 §5.2.6), spelled out here, not taken from blk
    return struct.pack("<IIQ", kind, 0, sector)


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


def submit(att: Attached, readable: list[bytes], writable: list[int],
           *, indirect: bool = False) -> UsedElem:
    drv = att.drivers[0]
    head = drv.publish(readable, writable, indirect=indirect, kick=False)
    att.device.kick(0)
    (used,) = drv.used()
    assert used.id == head
    return used


def status(used: UsedElem) -> int:
    assert used.len >= 1, "no status written"
    return used.written[used.len - 1]


@pytest.fixture(params=["io_uring", "sync"], autouse=True)
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on both paths: io_uring (where the host has it) and the
    synchronous one, forced with MINIVMM_IO_URING=off."""
    return choose_io_path(request, monkeypatch)


@pytest.fixture
def disk(image: Path, io_path: str) -> Iterator[Attached]:
    dev = BlockDevice(image, serial="vol-1")
    assert dev.io_uring == (io_path == "io_uring")
    att = attach(dev)
    yield att
    dev.close()
    assert att.resets == []  # no request in these tests may fail the device


# -- configuration and features ---------------------------------------------------------


def test_config_space_bytes(disk: Attached) -> None:
    cfg = disk.device.config()
    assert len(cfg) == 72

    def u32(off: int) -> int:
        return int.from_bytes(cfg[off : off + 4], "little")

    assert int.from_bytes(cfg[0:8], "little") == SECTORS  # capacity
    assert u32(12) == blk.SEG_MAX and u32(20) == 512  # seg_max, blk_size
    assert u32(36) == blk.MAX_DISCARD_SECTORS and u32(40) == blk.MAX_DISCARD_SEG
    assert u32(44) == blk.DISCARD_SECTOR_ALIGNMENT
    assert u32(48) == blk.MAX_WRITE_ZEROES_SECTORS and u32(52) == blk.MAX_WRITE_ZEROES_SEG
    assert cfg[56] == 1  # write_zeroes_may_unmap
    buf = bytearray(8)
    disk.device.read_config(68, memoryview(buf))
    assert buf == bytes(8)  # past the end reads zeros


def test_features_with_and_without_ro(image: Path) -> None:
    rw = BlockDevice(image).avail_features
    ro = BlockDevice(image, read_only=True).avail_features
    for n in (2, 6, 9, 29, 28, 32):  # SEG_MAX BLK_SIZE FLUSH EVENT_IDX INDIRECT VERSION_1
        assert rw >> n & 1 and ro >> n & 1, n
    assert rw >> 13 & 1 and rw >> 14 & 1 and not rw >> 5 & 1  # DISCARD, WRITE_ZEROES
    assert ro >> 5 & 1 and not ro >> 13 & 1 and not ro >> 14 & 1  # RO


def test_capacity_ignores_a_partial_last_sector(tmp_path: Path) -> None:
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(1000))
    assert BlockDevice(p).config()[:8] == (1).to_bytes(8, "little")


# -- the data path ----------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_read(disk: Attached, image: Path, indirect: bool) -> None:
    used = submit(disk, [header(VIRTIO_BLK_T_IN, 2)], [512, 1024, 1], indirect=indirect)
    assert status(used) == VIRTIO_BLK_S_OK and used.len == 1537
    assert used.written[:1536] == image.read_bytes()[1024 : 1024 + 1536]


def test_write_from_several_buffers(disk: Attached, image: Path) -> None:
    data = pattern(1024, seed=99)
    used = submit(disk, [header(VIRTIO_BLK_T_OUT, 5), data[:100], data[100:]], [1])
    assert status(used) == VIRTIO_BLK_S_OK and used.len == 1
    got = image.read_bytes()
    assert got[5 * 512 : 7 * 512] == data
    assert got[:5 * 512] == pattern(SECTORS * 512)[:5 * 512]


def test_header_split_across_buffers(disk: Attached, image: Path) -> None:
    h = header(VIRTIO_BLK_T_IN, 1)
    used = submit(disk, [h[:5], h[5:]], [512, 1])
    assert status(used) == VIRTIO_BLK_S_OK
    assert used.written[:512] == image.read_bytes()[512:1024]


def test_flush_syncs_before_the_status(disk: Attached, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    drv = disk.drivers[0]

    def fake_fdatasync(fd: int) -> None:
        calls.append(drv.used_idx)  # the used ring must not have the answer yet

    monkeypatch.setattr(os, "fdatasync", fake_fdatasync)
    used = submit(disk, [header(VIRTIO_BLK_T_FLUSH)], [1])
    assert status(used) == VIRTIO_BLK_S_OK
    assert calls == [0]


def test_flush_error_is_ioerr(disk: Attached, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    assert status(submit(disk, [header(VIRTIO_BLK_T_FLUSH)], [1])) == VIRTIO_BLK_S_IOERR


def test_get_id(disk: Attached, image: Path) -> None:
    used = submit(disk, [header(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert status(used) == VIRTIO_BLK_S_OK
    assert used.written[:20] == b"vol-1" + bytes(15)
    full = attach(BlockDevice(image, serial="A" * 20))
    assert submit(full, [header(VIRTIO_BLK_T_GET_ID)], [20, 1]).written[:20] == b"A" * 20


def test_discard_punches_holes(disk: Attached, image: Path) -> None:
    used = submit(disk, [header(VIRTIO_BLK_T_DISCARD), segment(8, 8), segment(32, 16)], [1])
    assert status(used) == VIRTIO_BLK_S_OK
    got, orig = image.read_bytes(), pattern(SECTORS * 512)
    assert got[8 * 512 : 16 * 512] == bytes(4096)
    assert got[32 * 512 : 48 * 512] == bytes(8192)
    assert got[:8 * 512] == orig[:8 * 512] and got[16 * 512 : 32 * 512] == orig[16 * 512 : 32 * 512]
    assert image.stat().st_size == SECTORS * 512  # KEEP_SIZE


@pytest.mark.parametrize("flags", [0, 1])
def test_write_zeroes(disk: Attached, image: Path, flags: int) -> None:
    used = submit(disk, [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(3, 5, flags)], [1])
    assert status(used) == VIRTIO_BLK_S_OK
    got, orig = image.read_bytes(), pattern(SECTORS * 512)
    assert got[3 * 512 : 8 * 512] == bytes(5 * 512)
    assert got[:3 * 512] == orig[:3 * 512] and got[8 * 512 :] == orig[8 * 512 :]


def test_write_zeroes_falls_back_to_writing(disk: Attached, image: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(blkimage, "fallocate", refuse)
    used = submit(disk, [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 200 - 72, 1)], [1])
    assert status(used) == VIRTIO_BLK_S_OK
    assert image.read_bytes() == bytes(SECTORS * 512)
    assert modes == [blkimage.FALLOC_FL_PUNCH_HOLE | 1, blkimage.FALLOC_FL_ZERO_RANGE | 1]


@pytest.mark.parametrize(
    ("kind", "segments", "expect"),
    [
        (VIRTIO_BLK_T_DISCARD, [segment(0, 8, 1)], VIRTIO_BLK_S_UNSUPP),  # unmap on discard
        (VIRTIO_BLK_T_WRITE_ZEROES, [segment(0, 8, 2)], VIRTIO_BLK_S_UNSUPP),  # unknown flag
        (VIRTIO_BLK_T_DISCARD, [segment(0, 8)] * 33, VIRTIO_BLK_S_IOERR),  # > max_discard_seg
        (VIRTIO_BLK_T_DISCARD, [segment(0, 8)[:12]], VIRTIO_BLK_S_IOERR),  # not 16 bytes
        (VIRTIO_BLK_T_DISCARD, [], VIRTIO_BLK_S_IOERR),  # no segment
        (VIRTIO_BLK_T_WRITE_ZEROES, [segment(0, 8), segment(SECTORS - 1, 2)], VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, [segment(2**64 - 1, 1)], VIRTIO_BLK_S_IOERR),
    ],
)
def test_bad_discard_and_write_zeroes(disk: Attached, image: Path, kind: int,
                                      segments: list[bytes], expect: int) -> None:
    body = [b"".join(segments)] if segments else []
    used = submit(disk, [header(kind), *body], [1])
    assert status(used) == expect
    assert image.read_bytes() == pattern(SECTORS * 512)  # nothing done, not even in part


def test_unsupported_type(disk: Attached) -> None:
    assert status(submit(disk, [header(10)], [1])) == VIRTIO_BLK_S_UNSUPP  # GET_LIFETIME
    assert status(submit(disk, [header(0xDEAD)], [64, 1])) == VIRTIO_BLK_S_UNSUPP


# -- bad shapes: an error status, never a failed device ---------------------------------


@pytest.mark.parametrize(
    ("readable", "writable"),
    [
        ([header(VIRTIO_BLK_T_IN)[:15]], [512, 1]),  # header too short
        ([header(VIRTIO_BLK_T_OUT), bytes(512)], [2]),  # a writable byte after the status
        ([header(VIRTIO_BLK_T_FLUSH)], [512, 1]),  # data where only the status may be
        ([header(VIRTIO_BLK_T_IN)], [100, 1]),  # not a multiple of 512
        ([header(VIRTIO_BLK_T_OUT), bytes(100)], [1]),
        ([header(VIRTIO_BLK_T_IN, SECTORS)], [512, 1]),  # past the end
        ([header(VIRTIO_BLK_T_IN, SECTORS - 1)], [1024, 1]),  # straddles the end
        ([header(VIRTIO_BLK_T_OUT, 2**64 - 1), bytes(512)], [1]),  # sector + count wraps u64
        ([header(VIRTIO_BLK_T_IN, 2**55)], [512, 1]),  # byte offset would pass 2^63
        ([header(VIRTIO_BLK_T_IN), b"junk"], [512, 1]),  # readable data on a read
    ],
)
def test_bad_shapes_get_ioerr(disk: Attached, image: Path, readable: list[bytes],
                              writable: list[int]) -> None:
    used = submit(disk, readable, writable)
    assert status(used) == VIRTIO_BLK_S_IOERR
    assert used.len == sum(writable)  # the status is the chain's last byte
    assert image.read_bytes() == pattern(SECTORS * 512)
    # and the device still works
    assert status(submit(disk, [header(VIRTIO_BLK_T_IN)], [512, 1])) == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("readable", [[header(VIRTIO_BLK_T_FLUSH)],
                                      [header(VIRTIO_BLK_T_FLUSH), b"\x00"]])
def test_no_writable_status_byte(disk: Attached, readable: list[bytes]) -> None:
    used = submit(disk, readable, [])  # status missing, or readable instead of writable
    assert used.len == 0
    assert status(submit(disk, [header(VIRTIO_BLK_T_FLUSH)], [1])) == VIRTIO_BLK_S_OK


@pytest.mark.parametrize(
    "request_",
    [
        [header(VIRTIO_BLK_T_OUT, 1), bytes(512)],
        [header(VIRTIO_BLK_T_DISCARD), segment(0, 8)],
        [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 8)],
    ],
)
def test_read_only_refuses_writes(image: Path, request_: list[bytes]) -> None:
    att = attach(BlockDevice(image, read_only=True))
    assert status(submit(att, request_, [1])) == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == pattern(SECTORS * 512)
    assert status(submit(att, [header(VIRTIO_BLK_T_IN)], [512, 1])) == VIRTIO_BLK_S_OK


# -- queue behaviour --------------------------------------------------------------------


def test_all_chains_then_one_interrupt(disk: Attached) -> None:
    drv = disk.drivers[0]
    for s in range(3):
        drv.publish([header(VIRTIO_BLK_T_IN, s)], [512, 1], kick=False)
    disk.device.kick(0)
    assert [u.written[-1] for u in drv.used()] == [0, 0, 0]
    assert disk.irq.used == 1


def test_event_idx_asks_for_the_next_kick(image: Path) -> None:
    att = attach(BlockDevice(image), event_idx=True)
    drv = att.drivers[0]
    drv.on_kick = lambda: att.device.kick(0)
    for s in range(3):
        drv.publish([header(VIRTIO_BLK_T_IN, s)], [512, 1])
        assert len(drv.used()) == 1, f"request {s} was not kicked or not served"
    assert drv.kicks == 3


def test_broken_chain_fails_the_device(disk: Attached) -> None:
    drv = disk.drivers[0]
    head = drv.publish([header(VIRTIO_BLK_T_IN)], [512, 1], kick=False)
    drv.patch_descriptor(head, addr=1 << 40)
    disk.device.kick(0)
    assert len(disk.resets) == 1
    disk.resets.clear()


# -- host I/O errors: S_IOERR, and the device keeps working -----------------------------


def fd_of(path: Path) -> int:
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"{path} is not open")


def test_failing_fd_gives_ioerr(disk: Attached, image: Path, tmp_path: Path) -> None:
    fd = fd_of(image)
    saved = os.dup(fd)
    bad = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # read: EISDIR, write: EBADF
    try:
        os.dup2(bad, fd)
        assert status(submit(disk, [header(VIRTIO_BLK_T_IN)], [512, 1])) == VIRTIO_BLK_S_IOERR
        out = [header(VIRTIO_BLK_T_OUT), bytes(512)]
        assert status(submit(disk, out, [1])) == VIRTIO_BLK_S_IOERR
        zero = [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 8)]
        assert status(submit(disk, zero, [1])) == VIRTIO_BLK_S_IOERR
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(bad)
    assert status(submit(disk, [header(VIRTIO_BLK_T_IN)], [512, 1])) == VIRTIO_BLK_S_OK


def test_full_filesystem_gives_ioerr(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "64k") as mnt:
        img = mnt / "sparse.img"
        with img.open("wb") as f:
            f.truncate(1 << 20)  # 1 MiB of holes on a 64 KiB filesystem
        dev = BlockDevice(img)
        att = attach(dev, size=64)
        data = pattern(128 << 10)
        used = submit(att, [header(VIRTIO_BLK_T_OUT), data], [1])
        assert status(used) == VIRTIO_BLK_S_IOERR  # ENOSPC
        used = submit(att, [header(VIRTIO_BLK_T_IN, 1024)], [512, 1])
        assert status(used) == VIRTIO_BLK_S_OK and used.written[:512] == bytes(512)
        assert att.resets == []
        dev.close()


# -- user errors ------------------------------------------------------------------------


def test_user_errors(tmp_path: Path, image: Path) -> None:
    def error(path: Path, **kw: object) -> str:
        with pytest.raises(UsageError) as info:
            BlockDevice(path, **kw)  # type: ignore[arg-type]
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg
        return msg

    assert "no such file" in error(tmp_path / "missing.img")
    assert "is a directory" in error(tmp_path)
    assert "at most 20" in error(image, serial="x" * 21)
    image.chmod(0o444)
    assert "read-only (ro)" in error(image)
    BlockDevice(image, read_only=True).close()  # fine with ,ro
