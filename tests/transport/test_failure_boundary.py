"""One failure boundary (issue 10, defects 2, 3, 5, 6, 8, 10), without a VM.

Nothing a guest writes to a register or a ring may end the VM or escape to the vCPU
thread: a device that fails, the guest's fault or minivmm's, gets DEVICE_NEEDS_RESET and
the others keep running. No register access that changes no device state may wait on a
device's I/O.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from minivmm.devices.base import IOV_MAX, VIRTIO_ID_RNG, VirtioDevice
from minivmm.devices.console import ConsoleDevice
from minivmm.devices.rng import RngDevice
from minivmm.eventloop import EventLoop
from minivmm.transport.mmio import DEVICE_NEEDS_RESET, DRIVER_OK
from minivmm.transport.testing import DeviceHarness
from minivmm.virtio.chain import DescriptorChain

HANG = 30.0  # a bound that only a deadlock reaches; never a timing assertion
INTERRUPT_ACK, STATUS, QUEUE_SEL, CONFIG = 0x064, 0x070, 0x030, 0x100


@pytest.fixture
def rng() -> Iterator[DeviceHarness]:
    h = DeviceHarness(RngDevice())
    yield h
    h.close()


def needs_reset(h: DeviceHarness) -> bool:
    return bool(h.status & DEVICE_NEEDS_RESET)


# -- defect 2: nothing escapes a register write ------------------------------------------


def test_broken_receive_ring_at_driver_ok_marks_the_console(tmp_path: Path) -> None:
    """A console whose input is a regular file drains its receive queue at DRIVER_OK; a
    driver that broke that ring before DRIVER_OK gets DEVICE_NEEDS_RESET, no exception."""
    (tmp_path / "input").write_bytes(b"input")
    f = os.open(tmp_path / "input", os.O_RDONLY)  # a regular file: not pollable
    h = DeviceHarness(ConsoleDevice(output=_Sink(), input_fd=f))
    try:
        h.negotiate()
        h.setup_queue(0)
        h.setup_queue(1)
        h.drivers[0].set_avail_idx(1000)  # more chains than the ring holds: broken
        h.write32(STATUS, h.status | DRIVER_OK)  # must not raise
        assert needs_reset(h) and h.status & DRIVER_OK
        assert not h.device.is_activated
    finally:
        h.close()
        os.close(f)


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class Faulty(VirtioDevice):
    """A device with a bug where the test says."""

    device_type = VIRTIO_ID_RNG
    name = "faulty"

    def __init__(self, where: str) -> None:
        super().__init__(0, [16])
        self.where = where

    def config(self) -> bytes:
        if self.where == "config":
            raise ZeroDivisionError("config bug")
        return b"\0" * 8

    def on_activate(self) -> None:
        if self.where == "activate":
            raise OSError(24, "Too many open files")

    def on_reset(self) -> None:
        if self.where == "reset":
            raise RuntimeError("reset bug")

    def process_queue(self, index: int) -> None:
        raise RuntimeError("queue bug")


@pytest.mark.parametrize("where", ["activate", "queue", "config", "reset"])
def test_device_bugs_become_needs_reset(where: str, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    dev = Faulty(where)
    h = DeviceHarness(dev)
    try:
        h.initialise()
        if where == "queue":
            h.drivers[0].publish(writable=[8])
        elif where == "config":
            assert h.read_config(0, 4) == b"\0\0\0\0"  # read as zeros
        elif where == "reset":
            h.write32(STATUS, 0)
            assert h.status == 0  # the reset itself still happened
            h.initialise()
            h.write32(STATUS, 0)
            dev.where = ""  # let close() release it
            return
        assert needs_reset(h)
        assert "internal error (a bug in minivmm" in caplog.text
    finally:
        h.close()


# -- defect 3: no register access waits on device I/O ---------------------------------------


class Slow(VirtioDevice):
    """Queue work that blocks until the test lets it go (a FLUSH on a slow disk)."""

    device_type = VIRTIO_ID_RNG
    name = "slow"

    def __init__(self) -> None:
        super().__init__(0, [16])
        self.entered = threading.Event()
        self.release = threading.Event()

    def config(self) -> bytes:
        return b"\1\2\3\4"

    def process_queue(self, index: int) -> None:
        self.drain(self.queues[0], self._serve)

    def _serve(self, chain: DescriptorChain) -> None:
        self.entered.set()
        self.release.wait(HANG)


def _returns(fn: object) -> bool:
    t = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    t.start()
    t.join(HANG)
    return not t.is_alive()


def test_ack_selectors_and_reads_do_not_wait_for_queue_work() -> None:
    dev = Slow()
    h = DeviceHarness(dev)
    try:
        h.initialise()
        h.drivers[0].publish(writable=[8], kick=False)
        worker = threading.Thread(target=h.kick, args=(0,), daemon=True)
        worker.start()
        assert dev.entered.wait(HANG)
        got: dict[str, object] = {}
        assert _returns(lambda: h.write32(INTERRUPT_ACK, 1))
        assert _returns(lambda: h.write32(QUEUE_SEL, 0))
        assert _returns(lambda: got.setdefault("config", h.read_config(0, 4)))
        assert _returns(lambda: got.setdefault("status", h.status))
        assert worker.is_alive()  # the queue work is still blocked: nothing waited on it
        assert got == {"config": b"\1\2\3\4", "status": h.status}
        dev.release.set()
        worker.join(HANG)
        assert h.drivers[0].used()
    finally:
        dev.release.set()
        h.close()


# -- defect 5: a bad chain mid-batch keeps the interrupt for the good ones ---------------------


def test_bad_chain_after_good_ones_still_interrupts(rng: DeviceHarness,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rng.initialise()
    drv = rng.drivers[0]
    drv.publish(writable=[16], kick=False)
    drv.publish(writable=[16], kick=False)
    bad = drv.publish(writable=[16], kick=False)
    drv.patch_descriptor(bad, flags=1, next=drv.size + 5)  # NEXT to a descriptor >= size
    rng.interrupts()
    rng.kick(0)
    assert len(drv.used()) == 2
    assert rng.interrupts() >= 1 and rng.interrupt_status & 1
    assert needs_reset(rng)
    assert "queue 0: queue 0" not in caplog.text and "queue 0:" in caplog.text


# -- defect 6: a bug reaching the device thread ends the VM as an internal error ---------------


def test_event_loop_reports_callback_bugs() -> None:
    errors: list[str] = []
    loop = EventLoop(on_error=errors.append)
    loop.start()
    done = threading.Event()

    def bug() -> None:
        done.set()
        raise KeyError("bug")

    loop.call_soon(bug)
    assert done.wait(HANG)
    loop.stop()
    assert errors and "KeyError" in errors[0]


def test_event_loop_stop_leaves_fds_of_a_stuck_thread_open(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = EventLoop()
    loop.start()
    release, inside = threading.Event(), threading.Event()
    def stuck() -> None:
        inside.set()
        release.wait(HANG)

    loop.call_soon(stuck)
    assert inside.wait(HANG)
    with caplog.at_level(logging.ERROR):
        loop.stop(timeout=0.05)
    assert "did not stop" in caplog.text
    r, w = os.pipe()
    loop.add_reader(r, lambda: None)  # its epoll was not closed under the thread
    loop.remove_reader(r)
    os.close(r)
    os.close(w)
    release.set()
    loop.stop()


# -- defect 8: more buffers than one readv takes -----------------------------------------------


def test_console_receive_chain_longer_than_iov_max() -> None:
    a, b = socket.socketpair()
    dev = ConsoleDevice(output=_Sink(), input_fd=b.fileno())
    h = DeviceHarness(dev)
    watched: dict[int, object] = {}
    dev.fd_watch = lambda fd, cb: watched.__setitem__(fd, cb)
    try:
        h.initialise()
        a.sendall(b"x" * (IOV_MAX + 100))
        h.drivers[0].publish(writable=[1] * (IOV_MAX + 50), indirect=True)
        dev.on_input()
        used = h.drivers[0].used()
        assert used and used[0].len == IOV_MAX
        assert not dev.input_ended and not needs_reset(h)
    finally:
        h.close()
        a.close()
        b.close()
