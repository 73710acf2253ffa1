"""virtio-blk's io_uring batch path next to its synchronous path: the same rings give the
same used ring, the same bytes and the same errors; what only a batch can get wrong
(completion order, overlaps, FLUSH after writes, a request failing alone, io_uring
failing under a batch); and the fallback when io_uring cannot be had."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm import accel
from minivmm.devices import uring
from minivmm.devices.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockDevice,
)
from minivmm.virtio.ring import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from minivmm.virtio.testing import FakeDriver

from . import Attached, attach, io_uring_missing

SECTORS = 64
MISSING = io_uring_missing()
needs_uring = pytest.mark.skipif(MISSING is not None, reason=f"io_uring path: {MISSING}")


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)  # virtio 1.2 §5.2.6


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


class Logs(logging.Handler):
    def __init__(self, image: Path) -> None:
        super().__init__(logging.DEBUG)
        self.image = str(image)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().replace(self.image, "IMG"))


def device(image: Path, accelerated: bool, size: int = 64, cow: bool = False) -> Attached:
    dev = BlockDevice(image, serial="eq", io_uring=accelerated, cow=cow)
    assert dev.io_uring == accelerated
    dev.log.burst = 1 << 30  # every message: the comparison must not depend on timing
    return attach(dev, size=size)


def statuses(att: Attached) -> dict[int, int]:
    return {u.id: u.written[u.len - 1] for u in att.drivers[0].used()}


@pytest.fixture(autouse=True)
def no_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's switches off: each test here picks its path itself."""
    monkeypatch.delenv(uring.ENV, raising=False)
    monkeypatch.delenv(accel.ENV, raising=False)


@pytest.fixture(params=["io_uring", "sync"])
def accelerated(request: pytest.FixtureRequest) -> bool:
    if request.param == "io_uring" and MISSING:
        pytest.skip(f"io_uring path: {MISSING}")
    return bool(request.param == "io_uring")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(SECTORS * 512, 1))
    return p


# -- the equivalence test ----------------------------------------------------------------

Request = tuple[list[bytes], list[int], bool, bool]  # readable, writable, indirect, broken


@st.composite
def requests(draw: st.DrawFn) -> Request:
    kind = draw(st.sampled_from([VIRTIO_BLK_T_IN] * 4 + [VIRTIO_BLK_T_OUT] * 3 + [
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES, 10]))
    sector = draw(st.one_of(st.integers(0, SECTORS + 1), st.just(2**64 - 1)))
    nbytes = draw(st.sampled_from([0, 512, 1024, 2048, 4096, 100]))
    hdr = header(kind, sector)
    if draw(st.integers(0, 15)) == 0:
        hdr = hdr[: draw(st.integers(1, 15))]  # too short
    parts = draw(st.integers(1, 3))
    cuts = sorted(draw(st.lists(st.integers(1, max(nbytes - 1, 1)), min_size=parts - 1,
                                max_size=parts - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, nbytes], strict=True) if b > a]
    readable, writable = [hdr], []
    if draw(st.integers(0, 7)) == 0:
        split = draw(st.integers(1, len(hdr)))  # the header over two buffers
        readable = [hdr[:split], hdr[split:]] if split < len(hdr) else [hdr]
    if kind == VIRTIO_BLK_T_OUT:
        data = pattern(nbytes, draw(st.integers(0, 255)))
        pos = 0
        for n in sizes:
            readable.append(data[pos : pos + n])
            pos += n
    elif kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        segs = draw(st.lists(st.tuples(st.integers(0, SECTORS + 1), st.integers(0, 9),
                                       st.integers(0, 1)), min_size=1, max_size=3))
        readable.append(b"".join(struct.pack("<QII", *s) for s in segs))
    elif kind == VIRTIO_BLK_T_GET_ID:
        writable.append(draw(st.sampled_from([8, 20])))
    elif kind != VIRTIO_BLK_T_FLUSH:
        writable += sizes
    if draw(st.integers(0, 9)) == 0 and kind == VIRTIO_BLK_T_IN:
        readable.append(b"junk")  # data on a read
    status = draw(st.sampled_from([1, 1, 1, 1, 1, 0, 2]))
    if status:
        writable.append(status)
    return ([b for b in readable if b], [n for n in writable if n], draw(st.booleans()),
            draw(st.integers(0, 24)) == 0)


def run_batches(image: Path, accelerated: bool, batches: list[list[Request]],
                cow: bool = False) -> Any:
    handler = Logs(image)
    logger = logging.getLogger("minivmm.devices.blk")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    att = device(image, accelerated, cow=cow)
    drv = att.drivers[0]
    used: list[list[tuple[int, int, bytes]]] = []
    interrupts = []
    try:
        for batch in batches:
            for readable, writable, indirect, broken in batch:
                head = drv.publish(readable, writable, indirect=indirect, kick=False)
                if broken:
                    drv.patch_descriptor(head, addr=1 << 40)
            att.device.kick(0)
            used.append(sorted((u.id, u.len, u.written) for u in drv.used()))
            interrupts.append(att.irq.used)
            # The fake driver frees descriptors in used-ring order, which is completion
            # order: hand them out in one canonical order, so that both paths see the
            # same heads in the next batch.
            drv._free.sort(reverse=True)
        att.device.kick(0)  # what a broken chain left in the ring
        used.append(sorted((u.id, u.len, u.written) for u in drv.used()))
        if cow:  # what the guest sees of the disk: every sector read back
            for s in range(SECTORS):
                drv.publish([header(VIRTIO_BLK_T_IN, s)], [512, 1], indirect=True,
                            kick=False)
                if s % 16 == 15:
                    att.device.kick(0)
                    used.append(sorted((u.id, u.len, u.written) for u in drv.used()))
                    drv._free.sort(reverse=True)
    finally:
        att.device.close()
        logger.removeHandler(handler)
        logger.setLevel(old)
    return used, interrupts, sorted(handler.lines), list(att.resets), image.read_bytes()


@needs_uring
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(requests(), min_size=1, max_size=8), min_size=1, max_size=4),
       st.booleans())
def test_both_paths_give_the_same_used_ring_bytes_and_errors(
        batches: list[list[Request]], cow: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for accelerated in (True, False):
            img = Path(tmp) / ("a" if accelerated else "s") / "disk.img"
            img.parent.mkdir()
            img.write_bytes(pattern(SECTORS * 512, 1))
            results.append(run_batches(img, accelerated, batches, cow))
        uring_result, sync_result = results
        assert uring_result == sync_result


# -- hostile chains in the middle of a batch: the C walk keeps every guard of the engine --

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def _hostile(drv: Any, kind: str) -> None:
    """Publish one chain (or ring entry) that breaks a rule of virtio 1.2 §2.7."""
    if kind == "head_out_of_range":
        drv.push_head(drv.size + 3)
        return
    if kind == "avail_jump":
        drv.set_avail_idx(drv.avail_idx + drv.size + 1)
        return
    if kind in ("indirect_too_long", "indirect_loop"):
        hdr = drv.alloc(16)
        drv._view(hdr, 16)[:] = header(VIRTIO_BLK_T_IN)
        # indirect_loop: its entry 2 leads back to entry 1
        table, length = drv.write_table([(hdr, 16, F_NEXT, 1),
                                         (drv.alloc(512), 512, F_WRITE | F_NEXT, 2),
                                         (drv.alloc(1), 1, F_WRITE | F_NEXT, 1)])
        head = drv.publish([header(VIRTIO_BLK_T_IN)], [512, 1], kick=False)
        if kind == "indirect_too_long":  # a table of 32769 entries: over the maximum
            length = 32769 * 16
        drv.patch_descriptor(head, addr=table, len=length, flags=F_INDIRECT, next=0)
        return
    if kind.startswith("indirect_"):
        table, length = drv.write_table([(drv.alloc(16), 16, F_NEXT, 1), (drv.alloc(1), 1,
                                          F_WRITE, 0)])
        head = drv.publish([header(VIRTIO_BLK_T_IN)], [512, 1], kick=False)
        fields = {"indirect_nested": dict(addr=table, len=length, flags=F_INDIRECT, next=0),
                  "indirect_with_next": dict(addr=table, len=length,
                                             flags=F_INDIRECT | F_NEXT, next=1),
                  "indirect_bad_length": dict(addr=table, len=24, flags=F_INDIRECT, next=0),
                  "indirect_empty": dict(addr=table, len=0, flags=F_INDIRECT, next=0)}[kind]
        drv.patch_descriptor(head, **fields)
        if kind == "indirect_nested":  # a table whose entry is itself a table
            inner = drv.write_table([(table, length, F_INDIRECT, 0)])
            drv.patch_descriptor(head, addr=inner[0], len=inner[1])
        return
    head = drv.publish([header(VIRTIO_BLK_T_IN)], [512, 1], kick=False)
    second = drv.descriptor(head)[3]
    if kind == "loop":
        drv.make_loop(head)
    elif kind == "next_out_of_range":
        drv.patch_descriptor(head, next=drv.size + 5)
    elif kind == "readable_after_writable":
        drv.patch_descriptor(second, flags=F_NEXT)  # the data buffer made readable...
        drv.patch_descriptor(head, flags=F_WRITE | F_NEXT)  # ...after a writable one
    elif kind == "outside_memory":
        drv.patch_descriptor(second, addr=(1 << 64) - 256)
    elif kind == "length_beyond_memory":  # inside memory where it starts, not where it ends
        drv.patch_descriptor(second, len=0xFFFF_FFFF)


HOSTILE = ["head_out_of_range", "avail_jump", "indirect_nested", "indirect_with_next",
           "indirect_bad_length", "indirect_empty", "indirect_too_long", "indirect_loop",
           "loop", "next_out_of_range", "readable_after_writable", "outside_memory",
           "length_beyond_memory"]


def _hostile_run(image: Path, accelerated: bool, kind: str) -> Any:
    att = device(image, accelerated, size=32)
    drv = att.drivers[0]
    before = [drv.publish([header(VIRTIO_BLK_T_IN, s)], [512, 1], kick=False)
              for s in range(3)]
    _hostile(drv, kind)
    if kind != "avail_jump":
        drv.publish([header(VIRTIO_BLK_T_IN, 7)], [512, 1], kick=False)
    att.device.kick(0)
    att.device.kick(0)  # what is left after the bad one, if the queue still works
    used = sorted((u.id, u.len, u.written) for u in drv.used())
    q = att.device.queues[0]
    result = (used, [r.split(":")[-1] for r in att.resets], q.next_avail, q.next_used,
              type(q.broken).__name__)
    if accelerated and kind != "avail_jump":  # the good ones went through the ring
        assert att.device.stats()["io_uring_requests"] >= len(before)
    att.device.close()
    if kind != "avail_jump":  # a jump stops the queue before any chain is read
        assert set(before) <= {u[0] for u in used}, "the chains before it were not served"
    assert att.resets, "no DEVICE_NEEDS_RESET for a broken chain"
    return result


@needs_uring
@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_chains_are_refused_alike(tmp_path: Path, kind: str) -> None:
    results = []
    for accelerated in (True, False):
        img = tmp_path / f"{accelerated}.img"
        img.write_bytes(pattern(SECTORS * 512, 1))
        results.append(_hostile_run(img, accelerated, kind))
    assert results[0] == results[1]


# -- what only a batch can get wrong ---------------------------------------------------------


def test_each_completion_names_its_request(image: Path, accelerated: bool) -> None:
    att = device(image, accelerated, size=128)
    drv = att.drivers[0]
    heads = {drv.publish([header(VIRTIO_BLK_T_IN, s)], [512, 1], kick=False): s
             for s in range(32)}
    att.device.kick(0)
    used = drv.used()
    assert sorted(u.id for u in used) == sorted(heads) and att.irq.used == 1
    for u in used:
        s = heads[u.id]
        assert u.len == 513 and u.written == image.read_bytes()[s * 512 : s * 512 + 512] + b"\0"


def test_the_same_head_published_twice_is_answered_twice(image: Path,
                                                          accelerated: bool) -> None:
    att = device(image, accelerated)
    drv = att.drivers[0]
    head = drv.publish([header(VIRTIO_BLK_T_IN, 3)], [512, 1], kick=False)
    drv.push_head(head)  # a hostile driver: one chain, two ring entries
    att.device.kick(0)
    assert [u.id for u in drv.used()] == [head, head]
    assert att.resets == []


def test_a_read_after_a_write_in_one_batch_sees_it(image: Path, accelerated: bool) -> None:
    att = device(image, accelerated)
    drv = att.drivers[0]
    new = pattern(1024, 77)
    w = drv.publish([header(VIRTIO_BLK_T_OUT, 4), new], [1], kick=False)
    r = drv.publish([header(VIRTIO_BLK_T_IN, 5)], [512, 1], kick=False)
    w2 = drv.publish([header(VIRTIO_BLK_T_OUT, 5), pattern(512, 9)], [1], kick=False)
    att.device.kick(0)
    got = {u.id: u for u in drv.used()}
    assert got[r].written[:512] == new[512:]  # after the first write, before the second
    assert got[w].written == got[w2].written == b"\0"
    assert image.read_bytes()[5 * 512 : 6 * 512] == pattern(512, 9)


def test_flush_comes_after_every_earlier_write(image: Path, accelerated: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    att = device(image, accelerated)
    drv = att.drivers[0]
    seen: list[bytes] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: seen.append(image.read_bytes()))
    writes = [pattern(512, s) for s in range(8)]
    for s, data in enumerate(writes):
        drv.publish([header(VIRTIO_BLK_T_OUT, s), data], [1], kick=False)
    flush = drv.publish([header(VIRTIO_BLK_T_FLUSH)], [1], kick=False)
    att.device.kick(0)
    assert seen == [b"".join(writes) + pattern(SECTORS * 512, 1)[8 * 512 :]]
    assert statuses(att)[flush] == VIRTIO_BLK_S_OK


def test_a_failing_request_fails_alone(tmp_path: Path, accelerated: bool) -> None:
    img = tmp_path / "shrinks.img"
    img.write_bytes(pattern(SECTORS * 512, 1))
    att = device(img, accelerated)
    os.truncate(img, (SECTORS - 2) * 512 + 100)  # the image shrank under the device
    drv = att.drivers[0]
    ok = [drv.publish([header(VIRTIO_BLK_T_IN, s)], [512, 1], kick=False) for s in (0, 10)]
    short = drv.publish([header(VIRTIO_BLK_T_IN, SECTORS - 2)], [1024, 1], kick=False)
    gone = drv.publish([header(VIRTIO_BLK_T_IN, SECTORS - 1)], [512, 1], kick=False)
    att.device.kick(0)
    got = statuses(att)
    assert [got[h] for h in ok] == [VIRTIO_BLK_S_OK] * 2
    assert got[short] == got[gone] == VIRTIO_BLK_S_IOERR
    assert att.resets == []


@needs_uring
def test_a_cow_disk_reads_overlay_and_image_in_c(image: Path) -> None:
    att = device(image, True, cow=True)
    drv = att.drivers[0]
    new = pattern(1024, 55)
    drv.publish([header(VIRTIO_BLK_T_OUT, 4), new], [1], kick=False)  # to Python (the map)
    att.device.kick(0)
    drv.used()
    before = att.device.stats()["io_uring_requests"]
    reads = {s: drv.publish([header(VIRTIO_BLK_T_IN, s)], [n * 512, 1], kick=False)
             for s, n in ((4, 2), (10, 1), (3, 4))}  # overlay, image, across both
    att.device.kick(0)
    got = {u.id: u.written[:-1] for u in drv.used()}
    old = image.read_bytes()
    assert got[reads[4]] == new and got[reads[10]] == old[10 * 512 : 11 * 512]
    assert got[reads[3]] == old[3 * 512 : 4 * 512] + new + old[6 * 512 : 7 * 512]
    assert att.device.stats()["io_uring_requests"] - before == 2  # the third: Python's
    assert image.read_bytes() == pattern(SECTORS * 512, 1)  # the image is never written
    att.device.close()


def test_more_than_65536_requests(image: Path, accelerated: bool) -> None:
    att = device(image, accelerated, size=256)
    drv = att.drivers[0]
    total = 0
    while total < 70_000:
        heads = {drv.publish([header(VIRTIO_BLK_T_IN, (total + i) % SECTORS)], [512, 1],
                             indirect=True, kick=False): (total + i) % SECTORS
                 for i in range(125)}
        att.device.kick(0)
        used = drv.used()
        assert sorted(u.id for u in used) == sorted(heads)
        assert all(u.written[-1] == 0 for u in used)
        total += len(used)
    q = att.device.queues[0]
    assert q.next_avail == q.next_used == total % 65536 and q.broken is None


# -- io_uring failing, or not there ---------------------------------------------------------


def _ring_fds() -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[io_uring]":
                out.append(int(name))
        except OSError:
            continue
    return out


@needs_uring
def test_io_uring_failing_under_a_batch_falls_back(image: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    before = set(_ring_fds())
    att = device(image, True)
    drv = att.drivers[0]
    (fd,) = set(_ring_fds()) - before
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)  # io_uring_enter on it now fails (EOPNOTSUPP)
    os.close(null)
    heads = {drv.publish([header(VIRTIO_BLK_T_IN, s)], [512, 1], kick=False): s
             for s in range(4)}
    with caplog.at_level(logging.WARNING, "minivmm.devices.blk"):
        att.device.kick(0)
    used = drv.used()
    assert sorted(u.id for u in used) == sorted(heads)
    for u in used:
        s = heads[u.id]
        assert u.written == image.read_bytes()[s * 512 : s * 512 + 512] + b"\0"
    assert "io_uring failed" in caplog.text and not att.device.io_uring  # type: ignore[attr-defined]
    assert statuses_after(att, [header(VIRTIO_BLK_T_IN, 1)]) == VIRTIO_BLK_S_OK
    assert att.resets == []


def statuses_after(att: Attached, readable: list[bytes]) -> int:
    drv = att.drivers[0]
    head = drv.publish(readable, [512, 1], kick=False)
    att.device.kick(0)
    return statuses(att)[head]


@pytest.fixture
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setattr(accel, "_loaded", {})
    monkeypatch.setattr(accel, "_said", set())
    monkeypatch.setenv("MINIVMM_ACCEL_DIR", str(tmp_path / "accel"))
    monkeypatch.delenv(uring.ENV, raising=False)
    yield


@pytest.mark.parametrize("cc", ["false", "/nonexistent/cc"])
def test_no_compiler_means_the_synchronous_path_said_once_quietly(
        fresh_loader: None, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], cc: str) -> None:
    pytest.importorskip("cffi")  # without cffi the build is not even tried
    monkeypatch.setenv("CC", cc)  # a compiler that fails, or none: a real build attempt fails
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        devs = [BlockDevice(image), BlockDevice(image)]
    assert not any(d.io_uring for d in devs)
    said = [r for r in caplog.records if "accelerator off" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO  # once, not a warning
    assert "synchronous I/O" in said[0].getMessage()
    assert capfd.readouterr().err == ""  # the compiler's complaint is not on the terminal
    assert list((tmp_path / "accel").glob("*.failed"))  # later starts don't try again
    att = attach(devs[0])
    assert statuses_after(att, [header(VIRTIO_BLK_T_IN, 2)]) == VIRTIO_BLK_S_OK
    for d in devs:
        d.close()


def test_no_liburing_means_the_synchronous_path_said_once_at_info(
        fresh_loader: None, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """A host with a compiler but without liburing-dev: the header is not there (its
    name changed here, so the compiler looks for a file no host has)."""
    pytest.importorskip("cffi")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: test_no_compiler_... covers this host")
    from minivmm.devices import uring_build

    monkeypatch.setattr(uring_build, "SOURCE",
                        uring_build.SOURCE.replace("<liburing.h>", "<liburing-absent.h>"))
    with caplog.at_level(logging.DEBUG, "minivmm.accel"):
        devs = [BlockDevice(image), BlockDevice(image)]
    assert not any(d.io_uring for d in devs)
    said = [r for r in caplog.records if "accelerator off" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "liburing-absent.h" in said[0].getMessage()
    assert capfd.readouterr().err == ""
    assert statuses_after(attach(devs[0]), [header(VIRTIO_BLK_T_IN, 2)]) == VIRTIO_BLK_S_OK
    for d in devs:
        d.close()


@needs_uring
def test_a_kernel_refusing_io_uring_means_the_synchronous_path(
        image: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    acc = uring.accelerator()
    assert acc is not None
    ffi, lib = acc

    class Refusing:  # what io_uring_queue_init gives under kernel.io_uring_disabled=2
        def __getattr__(self, name: str) -> Any:
            return getattr(lib, name)

        def mv_ring_new(self, entries: int, out: Any) -> int:
            return -errno.EPERM

    monkeypatch.setattr(uring, "accelerator", lambda: (ffi, Refusing()))
    monkeypatch.setattr(accel, "_said", set())
    monkeypatch.delenv(uring.ENV, raising=False)
    with caplog.at_level(logging.INFO, "minivmm.accel"):
        dev = BlockDevice(image)
    assert not dev.io_uring
    assert "refused io_uring" in caplog.text and "Operation not permitted" in caplog.text
    assert statuses_after(attach(dev), [header(VIRTIO_BLK_T_IN)]) == VIRTIO_BLK_S_OK
    dev.close()


_SECCOMP_CHILD = r"""
import ctypes, logging, sys
from pathlib import Path

# A seccomp filter that answers io_uring_setup (x86-64: 425) with EPERM, as a container
# runtime's default profile does; everything else is allowed.
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
code = (Filter * 4)((0x20, 0, 0, 0), (0x15, 0, 1, 425), (0x06, 0, 0, 0x00050000 | 1),
                    (0x06, 0, 0, 0x7FFF0000))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(4, code)), 0, 0) == 0  # PR_SET_SECCOMP, FILTER

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from minivmm.devices.blk import BlockDevice
dev = BlockDevice(Path(sys.argv[1]))
print("io_uring", int(dev.io_uring))
"""


@needs_uring
def test_io_uring_forbidden_by_seccomp_means_the_synchronous_path(image: Path) -> None:
    uring.accelerator()  # built (and cached) here, where the compiler may run
    r = subprocess.run([sys.executable, "-c", _SECCOMP_CHILD, str(image)],
                       capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "io_uring 0"
    said = [ln for ln in r.stderr.splitlines() if "accelerator off" in ln]
    assert len(said) == 1 and said[0].startswith("INFO ") and "not permitted" in said[0]


@pytest.mark.parametrize(("name", "value"), [("MINIVMM_IO_URING", "off"),
                                             ("MINIVMM_IO_URING", "0"),
                                             ("MINIVMM_IO_URING", "no"),
                                             ("MINIVMM_ACCEL", "0")])
def test_the_environment_forces_the_synchronous_path(
        image: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    dev = BlockDevice(image)
    assert not dev.io_uring and dev.stats() == {"io_uring": 0}
    dev.close()


def _indirect_request(drv: FakeDriver, kind: int, sector: int,
                      readable: list[int], writable: list[int]) -> int:
    """A request in an indirect table of many small buffers (after the header): each
    buffer is one iovec of the C path's pool. Returns where its status byte is."""
    head = drv.publish([header(kind)], [512, 1], kick=False)
    hdr = drv.alloc(16)
    drv._view(hdr, 16)[:] = header(kind, sector)
    sizes = [(n, 0) for n in readable] + [(n, VIRTQ_DESC_F_WRITE) for n in writable]
    entries = [(hdr, 16, VIRTQ_DESC_F_NEXT, 1)]
    for i, (n, flag) in enumerate(sizes):
        entries.append((drv.alloc(n), n, flag | VIRTQ_DESC_F_NEXT, i + 2))
    status = drv.alloc(1)
    drv._view(status, 1)[0] = 0xFF
    entries.append((status, 1, VIRTQ_DESC_F_WRITE, 0))
    table, length = drv.write_table(entries)
    drv.patch_descriptor(head, addr=table, len=length, flags=VIRTQ_DESC_F_INDIRECT, next=0)
    return status


@needs_uring
def test_a_write_over_reads_in_flight_leaves_the_batch_path_whole(image: Path) -> None:
    """Reads of many buffers fill most of the C path's iovec pool; a write over them
    makes them complete first. The pool must be whole again after that: a guest must not
    be able to push the device off its batch path for good."""
    att = device(image, True, size=128)
    drv = att.drivers[0]
    status = [_indirect_request(drv, VIRTIO_BLK_T_IN, sector, [], [16] * 1024)
              for sector in (0, 32, 0)]
    status.append(_indirect_request(drv, VIRTIO_BLK_T_OUT, 0, [16] * 1015 + [144], []))
    att.device.kick(0)
    assert len(drv.used()) == 4
    assert [drv._view(at, 1)[0] for at in status] == [VIRTIO_BLK_S_OK] * 4
    for _ in range(3):
        before = att.device.stats()["io_uring_requests"]
        heads = [drv.publish([header(VIRTIO_BLK_T_IN, i)], [512, 1], kick=False)
                 for i in range(20)]
        att.device.kick(0)
        assert statuses(att) == dict.fromkeys(heads, VIRTIO_BLK_S_OK)
        assert att.device.stats()["io_uring_requests"] - before == 20  # all in C
    att.device.close()


@needs_uring
def test_a_read_of_more_buffers_than_iov_max_is_served_alike(tmp_path: Path) -> None:
    """1088 data buffers: over IOV_MAX (1024), which one preadv takes; the C path leaves
    it to Python, whose answer is the same as without the accelerator."""
    results = []
    for accelerated in (True, False):
        img = tmp_path / f"{accelerated}.img"
        img.write_bytes(pattern(SECTORS * 512, 1))
        att = device(img, accelerated, size=32)
        drv = att.drivers[0]
        status = _indirect_request(drv, VIRTIO_BLK_T_IN, 3, [], [16] * 1088)
        att.device.kick(0)
        used = [(u.len,) for u in drv.used()]
        results.append((used, drv._view(status, 1)[0], att.resets))
        att.device.close()
    assert results[0] == results[1]
    assert results[0][1] in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR) and results[0][0]
