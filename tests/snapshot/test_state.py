"""Snapshot state without a VM: the virtio-mmio transport with its queues, and guest
RAM written to a file and mapped back copy-on-write (the legacy devices' state:
tests/legacy/test_legacy_state.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minivmm.devices.rng import RngDevice
from minivmm.memory import GuestMemory
from minivmm.transport.mmio import DRIVER_OK, MmioTransport
from minivmm.transport.state import restore_transport, save_transport
from minivmm.transport.testing import DeviceHarness

# -- the transport -------------------------------------------------------------------------


def test_transport_round_trip_continues_the_rings() -> None:
    h = DeviceHarness(RngDevice())
    try:
        h.initialise()
        drv = h.drivers[0]
        for _ in range(3):
            drv.publish(writable=[8])
            h.kick(0)
        assert len(drv.used()) == 3
        state = save_transport(h.transport)
        assert state["queues"][0]["next_avail"] == 3  # type: ignore[index]
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        dev = RngDevice()
        t = MmioTransport(dev, h.memory, fd)
        restore_transport(t, state)
        assert t.status & DRIVER_OK and dev.is_activated
        assert dev.queues[0].next_used == 3
        head = drv.publish(writable=[8])  # the driver goes on with the same rings
        dev.kick(0)
        (used,) = drv.used()
        assert used.id == head and used.len == 8
        dev.close()
        os.close(fd)
    finally:
        h.close()


@pytest.mark.parametrize("change, message", [
    ({"device_type": 2}, "has device"),
    ({"acked_features": 1 << 60}, "does not offer"),
    ({"acked_features": 0}, "FEATURES_OK with features 0x0"),
    ({"queues": []}, "queues"),
    ({"queues": [7]}, "not a saved queue"),
    ({"status": "x"}, "status"),
    ({"status": 0x04}, "status 0x4 is not one a driver can reach"),
    ({"status": 0x0F | 0x10}, "status 0x1f is not one"),
    ({"selectors": [0, 0, 1 << 32, 0]}, "selector"),
    ({"selectors": [0, 0]}, "selectors are not a list of 4"),
    ({"interrupt_status": 4}, "interrupt_status"),
    ({"device": []}, "device state is not an object"),
    ({"q.size": 1 << 20}, "size"),
    ({"q.ready": 1}, "not a saved queue"),
    ({"q.next_avail": 0x10000}, "next_avail"),
    ({"q.next_used": -1}, "next_used"),
    ({"q.next_avail": 0x8000, "q.next_used": 0}, "32768 chains in flight in a queue of size"),
])
def test_transport_refuses_state_that_does_not_fit(change: dict[str, object],
                                                   message: str) -> None:
    h = DeviceHarness(RngDevice())
    try:
        h.initialise()
        state = save_transport(h.transport)
        queue = dict(state["queues"][0])  # type: ignore[index]
        for key, value in change.items():
            if key.startswith("q."):
                queue[key[2:]] = value
                state["queues"] = [queue]
            else:
                state[key] = value
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        t = MmioTransport(RngDevice(), h.memory, fd)
        with pytest.raises(ValueError, match=rf"^virtio-rng: .*{message}"):
            restore_transport(t, state)
        t.device.close()
        os.close(fd)
    finally:
        h.close()


def test_transport_refuses_a_queue_outside_guest_memory() -> None:
    h = DeviceHarness(RngDevice())
    try:
        h.initialise()
        state = save_transport(h.transport)
        state["queues"][0]["desc"] = 1 << 50  # type: ignore[index]
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        dev = RngDevice()
        t = MmioTransport(dev, h.memory, fd)
        restore_transport(t, state)  # as DRIVER_OK would: the device needs a reset
        assert not dev.is_activated and t.status & 64
        dev.close()
        os.close(fd)
    finally:
        h.close()


# -- guest RAM -------------------------------------------------------------------------------


def test_ram_saved_sparse_and_restored_copy_on_write(tmp_path: Path) -> None:
    gap = (48 << 20, 64 << 20)
    with GuestMemory(64 << 20, gap=gap) as m:
        m.write(0x1000, b"low")
        m.write(64 << 20, b"high")  # the region above the gap
        fd = os.open(tmp_path / "ram", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            written = m.save(fd)
        finally:
            os.close(fd)
    assert written <= 2 * 4096 * 512  # the touched pages (or huge pages), not 64 MiB
    assert os.stat(tmp_path / "ram").st_size == 64 << 20
    with GuestMemory.from_file(tmp_path / "ram", 64 << 20, gap=gap) as a, \
            GuestMemory.from_file(tmp_path / "ram", 64 << 20, gap=gap) as b:
        assert a.read(0x1000, 3) == b"low" and a.read(64 << 20, 4) == b"high"
        a.write(0x1000, b"AAA")
        assert b.read(0x1000, 3) == b"low"  # each mapping has its own copy
        fd = os.open(tmp_path / "ram2", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            a.save(fd)  # a restored VM saves its own RAM again
        finally:
            os.close(fd)
    assert (tmp_path / "ram").read_bytes()[0x1000:0x1003] == b"low"
    with GuestMemory.from_file(tmp_path / "ram2", 64 << 20, gap=gap) as c:
        assert c.read(0x1000, 3) == b"AAA" and c.read(64 << 20, 4) == b"high"
