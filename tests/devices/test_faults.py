"""DeviceHarness against a failing host: I/O errors, a slow backend, and the watchdog
that fails a test when a kicked chain goes unanswered.

A real virtio-blk on an image file behind the real transport; the faults act on its file
descriptor (minivmm.transport.faults), the device is unchanged. A tap that disappears
under virtio-net: tests/devices/test_net.py (it needs that file's network namespace).
"""

from __future__ import annotations

import errno
import inspect
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from minivmm.devices.base import VirtioDevice
from minivmm.devices.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDevice,
)
from minivmm.transport import faults
from minivmm.transport.mmio import DEVICE_NEEDS_RESET
from minivmm.transport.testing import DeviceHarness, WatchdogError
from minivmm.virtio.testing import UsedElem

from .test_blk import SECTORS, pattern


@pytest.fixture
def image(tmp_path: Path) -> Path:
    (tmp_path / "disk.img").write_bytes(pattern(SECTORS * 512))
    return tmp_path / "disk.img"


def disk(image: Path) -> BlockDevice:
    """virtio-blk on its synchronous I/O path, the one the faults reach (an io_uring path,
    where the device has one, does its I/O in C)."""
    if "io_uring" in inspect.signature(BlockDevice).parameters:
        return BlockDevice(image, **{"io_uring": False})  # type: ignore[arg-type]
    return BlockDevice(image)


def read_request(h: DeviceHarness, sector: int) -> int:
    return h.drivers[0].publish([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)], [512, 1])


def write_request(h: DeviceHarness, sector: int, data: bytes) -> int:
    return h.drivers[0].publish([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector), data], [1])


def statuses(used: list[UsedElem]) -> list[int]:
    return [u.written[u.len - 1] for u in used]


@pytest.fixture(autouse=True)
def nothing_left_armed() -> Iterator[None]:
    yield
    assert faults._armed == [] and os.preadv.__module__ == "posix"  # close() disarmed all


def test_blk_eio_on_the_third_request_fails_that_one_only(image: Path) -> None:
    h = DeviceHarness(disk(image), watchdog=30)
    try:
        h.initialise()
        fault = h.faults.io_error(image, nth=3)
        heads = [read_request(h, s) for s in range(5)]  # each publish kicks: one read each
        used = h.drivers[0].used()
        assert [u.id for u in used] == heads
        assert statuses(used) == [VIRTIO_BLK_S_OK] * 2 + [VIRTIO_BLK_S_IOERR] + [
            VIRTIO_BLK_S_OK] * 2
        for s, u in enumerate(used):
            if s != 2:
                assert u.written[:512] == pattern(SECTORS * 512)[s * 512 : (s + 1) * 512]
        assert (fault.calls, fault.hits) == (5, 1)
        assert not h.status & DEVICE_NEEDS_RESET
    finally:
        h.close()


def test_blk_failed_writes_and_flush_leave_the_rest_done(image: Path) -> None:
    h = DeviceHarness(disk(image), watchdog=30)
    try:
        h.initialise()
        writes = h.faults.io_error(image, nth=2, ops=["write"], errno=errno.ENOSPC)
        syncs = h.faults.io_error(image, ops=["sync"], count=0)
        for s in range(3):
            write_request(h, s, bytes([0xA0 + s]) * 512)
        h.drivers[0].publish([struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0)], [1])
        assert statuses(h.drivers[0].used()) == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR,
                                                 VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR]
        assert (writes.hits, syncs.hits) == (1, 1)
        data = image.read_bytes()
        assert data[:512] == b"\xa0" * 512 and data[1024:1536] == b"\xa2" * 512
        assert data[512:1024] == pattern(SECTORS * 512)[512:1024]  # the failed one
    finally:
        h.close()


def test_a_fault_on_a_path_needs_an_open_file(tmp_path: Path) -> None:
    other = tmp_path / "nobody-has-it-open"
    other.write_bytes(b"x")
    inj = faults.FaultInjector()
    with pytest.raises(ValueError, match="no descriptor of this process is open on it"):
        inj.io_error(other)
    fd = os.open(other, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="ops"):
            inj.io_error(fd, ops=["seek"])
        fault = inj.io_error(other, errno=errno.EIO)
        with pytest.raises(OSError, match=r"Input/output error \(injected: read/sync/write"):
            os.pread(fd, 1, 0)
        assert os.pread(fd, 1, 0) == b"x" and fault.hits == 1  # count=1: once
    finally:
        inj.clear()
        os.close(fd)


def test_slow_backend_trips_the_watchdog_naming_queue_and_head(image: Path) -> None:
    h = DeviceHarness(disk(image), watchdog=0.3)
    try:
        h.initialise()
        read_request(h, 0)  # before the backend slows down
        h.faults.delay(image, 2.0)
        head = h.drivers[0].publish([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1)], [512, 1],
                                    kick=False)
        with pytest.raises(WatchdogError) as e:
            h.kick(0)
        message = str(e.value)
        assert message.startswith(f"blk: queue 0: the chain with head {head} was kicked 0.3")
        assert "is unanswered (watchdog 0.3 s); the device is still in its kick:" in message
        assert "in _check" in message  # where it waits: the injected delay
        assert isinstance(e.value, AssertionError)  # pytest reports a failure
    finally:
        h.close()  # waits for the slow kick to end, then closes
    used = h.drivers[0].used()
    assert statuses(used) == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]  # late, but answered


class Hoarder(VirtioDevice):
    """A broken device: takes every chain and never answers."""

    device_type = 42
    name = "hoarder"

    def __init__(self) -> None:
        super().__init__(0, [8])
        self.held: list[object] = []

    def config(self) -> bytes:
        return b""

    def process_queue(self, index: int) -> None:
        while (chain := self.queues[index].pop()) is not None:
            self.held.append(chain)


def test_a_chain_never_answered_fails_the_test_at_close() -> None:
    h = DeviceHarness(Hoarder(), watchdog=0.2)
    h.initialise()
    head = h.drivers[0].publish([b"x"])
    with pytest.raises(WatchdogError, match=rf"hoarder: queue 0: the chain with head {head} "
                       r"was kicked 0\.2\d s ago and is unanswered \(watchdog 0\.2 s\)$"):
        h.close()


def test_watchdog_quiet_on_a_healthy_device_and_after_a_reset(image: Path) -> None:
    h = DeviceHarness(disk(image), watchdog=0.5)
    try:
        h.initialise()
        for s in range(20):
            read_request(h, s)
            write_request(h, s, bytes(512))
        assert len(h.drivers[0].used()) == 40
        h.check(wait=True)
        h.initialise()  # a reset, then a second life: nothing carried over
        read_request(h, 3)
        assert statuses(h.drivers[0].used()) == [VIRTIO_BLK_S_OK]
    finally:
        h.close()


def test_watchdog_quiet_after_the_device_asks_for_a_reset() -> None:
    h = DeviceHarness(Hoarder(), watchdog=0.1)
    try:
        h.initialise()
        h.drivers[0].publish([b"x"])
        h.device.fail("lost its backend")  # DEVICE_NEEDS_RESET: chains abandoned, not late
        h.check(wait=True)
        assert h.status & DEVICE_NEEDS_RESET
    finally:
        h.close()
