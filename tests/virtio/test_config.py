"""Queue configuration as the transport drives it: size, ring addresses, ready, reset."""

from __future__ import annotations

import pytest

from minivmm.memory import GuestMemory
from minivmm.virtio import ring
from minivmm.virtio.errors import (
    InvalidQueueSize,
    MisalignedRing,
    QueueNotReady,
    RingOutsideMemory,
    VirtQueueError,
)
from minivmm.virtio.queue import Queue
from minivmm.virtio.testing import FakeDriver


@pytest.mark.parametrize("size", [0, 3, 6, 100, 512, 65536])
def test_bad_queue_sizes_are_rejected_at_activation(size: int) -> None:
    drv = FakeDriver(size=256)
    q = Queue(max_size=256)
    drv.configure(q, activate=False)
    q.set_ready(False)
    q.set_size(size)
    q.set_ready(True)
    assert not q.is_valid(drv.mem)
    with pytest.raises(InvalidQueueSize, match=f"queue size {size}"):
        q.activate(drv.mem)
    assert not q.is_active()


def test_size_above_32768_is_rejected_even_if_max_size_would_allow() -> None:
    assert not ring.is_valid_size(65536, 65536)
    with pytest.raises(ValueError):
        Queue(max_size=65536)


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_power_of_two_sizes_work(size: int) -> None:
    drv = FakeDriver(size=size)
    q = drv.make_queue(max_size=32768)
    assert q.size == size and q.is_active()
    head = drv.publish([b"x"], [1], indirect=size == 1)
    with q.pop() as chain:  # type: ignore[union-attr]
        assert chain.head == head
    assert [u.id for u in drv.used()] == [head]


@pytest.mark.parametrize(("part", "align"), [("desc", 16), ("avail", 2), ("used", 4)])
def test_misaligned_rings_are_rejected(part: str, align: int) -> None:
    drv = FakeDriver(size=8)
    q = Queue(8)
    drv.misaligned(q, part)
    with pytest.raises(MisalignedRing, match=f"aligned to {align} bytes"):
        q.activate(drv.mem)
    assert not q.is_valid(drv.mem)


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_rings_outside_memory_are_rejected(part: str) -> None:
    drv = FakeDriver(size=8)
    q = Queue(8)
    drv.configure(q, activate=False)
    q.set_ready(False)
    # One ring straddles the end of the first region (into the hole); then far away.
    for addr in (drv.hole_start - 16, 1 << 40, 2**64 - 16):
        {"desc": q.set_desc_table_address, "avail": q.set_avail_ring_address,
         "used": q.set_used_ring_address}[part](addr & 0xFFFF_FFFF, addr >> 32)
        q.set_ready(True)
        with pytest.raises(RingOutsideMemory, match="not entirely inside guest memory"):
            q.activate(drv.mem)
        q.set_ready(False)


def test_activate_needs_ready_and_pop_needs_activate() -> None:
    drv = FakeDriver(size=8)
    q = Queue(8)
    drv.configure(q, activate=False)
    q.set_ready(False)
    with pytest.raises(QueueNotReady):
        q.activate(drv.mem)
    with pytest.raises(QueueNotReady):
        q.pop()
    with pytest.raises(QueueNotReady):
        q.add_used(0, 0)
    with pytest.raises(QueueNotReady):
        q.needs_notification()


def test_64bit_addresses_are_assembled_from_halves() -> None:
    q = Queue(16)
    q.set_desc_table_address(0x1000, None)
    q.set_desc_table_address(None, 0x2)
    q.set_avail_ring_address(high=0x3)
    q.set_avail_ring_address(low=0x4000)
    q.set_used_ring_address(0x5000, 0x6)
    assert q.desc_table_address == 0x2_0000_1000
    assert q.avail_ring_address == 0x3_0000_4000
    assert q.used_ring_address == 0x6_0000_5000


def test_configuration_writes_while_ready_are_ignored() -> None:
    drv = FakeDriver(size=8)
    q = drv.make_queue()
    q.set_size(4)
    q.set_desc_table_address(0x123456, 0)
    q.set_event_idx(True)
    assert (q.size, q.desc_table_address, q.event_idx) == (8, drv.desc_addr, False)


def test_reset_restores_defaults_and_drops_outstanding_chains() -> None:
    drv = FakeDriver(size=8)
    q = drv.make_queue()
    drv.publish([b"a"], [4])
    chain = q.pop()
    assert chain is not None
    q.reset()
    assert (q.size, q.next_avail, q.next_used, q.is_ready(), q.is_active()) == (
        8, 0, 0, False, False,
    )
    assert q.desc_table_address == q.avail_ring_address == q.used_ring_address == 0
    chain.writer.write(b"late")
    chain.complete()  # dropped: the used ring is not the device's any more
    assert drv.used_idx == 0
    drv2 = FakeDriver(size=8)
    drv2.configure(q)  # the queue works again after reset
    drv2.publish([b"b"], [1])
    assert q.pop() is not None


def test_next_indices_can_be_restored() -> None:
    drv = FakeDriver(size=8)
    q = drv.make_queue()
    drv.set_avail_idx(65534)
    drv.set_avail_entry(65534 % 8, 0)
    drv.set_descriptor(0, drv.heap_start, 4, 0, 0)
    q.next_avail = 65533
    drv.set_avail_entry(65533 % 8, 0)
    q.next_used = 65535
    assert (q.next_avail, q.next_used) == (65533, 65535)
    assert q.avail_idx() == 65534
    with q.pop() as c:  # type: ignore[union-attr]
        assert c.head == 0
    assert q.next_used == 0 and q.used_idx() == 0  # wrapped at 2^16


def test_works_on_real_guest_memory() -> None:
    mem = GuestMemory(16 << 20, hugepages=False)
    drv = FakeDriver(size=64, mem=mem, base=0x10000)
    q = drv.make_queue()
    head = drv.publish([b"hello"], [8], indirect=True)
    with q.pop() as chain:  # type: ignore[union-attr]
        chain.writer.write(chain.reader.read()[::-1])
    assert drv.used() == [(head, 5, b"olleh")]
    # A ring whose end lies past the end of RAM.
    q2 = Queue(64)
    q2.set_size(64)
    q2.set_desc_table_address((16 << 20) - 512, 0)
    q2.set_avail_ring_address(drv.avail_addr)
    q2.set_used_ring_address(drv.used_addr)
    q2.set_ready(True)
    with pytest.raises(VirtQueueError):
        q2.activate(mem)
