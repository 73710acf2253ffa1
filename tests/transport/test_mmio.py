"""The virtio-mmio transport's register file and status machine, with no VM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from minivmm.devices.base import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from minivmm.devices.rng import RngDevice
from minivmm.transport.mmio import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    MAGIC_VALUE,
)
from minivmm.transport.testing import DeviceHarness
from minivmm.virtio import ring


@pytest.fixture
def h() -> Iterator[DeviceHarness]:
    harness = DeviceHarness(RngDevice())
    yield harness
    harness.close()


def test_identification(h: DeviceHarness) -> None:
    assert h.read32(0x000) == MAGIC_VALUE
    assert h.read32(0x004) == 2
    assert h.read32(0x008) == 4
    assert h.device_features() & (1 << VIRTIO_F_VERSION_1)
    assert h.read32(0x0B0) == h.read32(0x0B4) == 0xFFFF_FFFF  # no shared memory
    assert h.read32(0x0FC) == 0


def test_full_initialisation_and_a_request(h: DeviceHarness) -> None:
    h.initialise()
    assert h.status == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    drv = h.drivers[0]
    head = drv.publish(writable=[32])
    (used,) = drv.used()
    assert used.id == head and used.len == 32 and used.written != bytes(32)
    assert h.interrupts() == 1
    assert h.ack_interrupt() == 1
    assert h.interrupt_status == 0


def test_unoffered_feature_refuses_features_ok(h: DeviceHarness) -> None:
    offered = h.device_features()
    assert not h.negotiate(offered | (1 << 31))
    assert not h.status & FEATURES_OK
    assert h.negotiate(offered)  # a fresh attempt after reset works


def test_legacy_driver_without_version_1_is_refused(h: DeviceHarness) -> None:
    assert not h.negotiate(h.device_features() & ~(1 << VIRTIO_F_VERSION_1))


def test_status_steps_must_come_in_order(h: DeviceHarness) -> None:
    h.write32(0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK)  # skipping steps
    assert h.status == 0
    h.write32(0x070, ACKNOWLEDGE)
    h.write32(0x070, ACKNOWLEDGE | DRIVER_OK)
    assert h.status == ACKNOWLEDGE


def test_failed_sticks_until_reset(h: DeviceHarness) -> None:
    h.write32(0x070, ACKNOWLEDGE)
    h.write32(0x070, ACKNOWLEDGE | FAILED)
    h.write32(0x070, ACKNOWLEDGE | DRIVER)
    assert h.status & FAILED and not h.status & DRIVER
    h.write32(0x070, 0)
    assert h.status == 0


def test_queue_registers_locked_while_ready(h: DeviceHarness) -> None:
    h.negotiate()
    h.setup_queue(0)
    q = h.device.queues[0]
    size, desc = q.size, q.desc_table_address
    h.write32(0x038, 8)
    h.write32(0x080, 0x123000)
    assert (q.size, q.desc_table_address) == (size, desc)


def test_queue_num_max_and_missing_queue(h: DeviceHarness) -> None:
    h.write32(0x030, 0)
    assert h.read32(0x034) == 256
    h.write32(0x030, 7)
    assert h.read32(0x034) == 0
    h.write32(0x044, 1)  # ignored: no such queue
    assert h.read32(0x044) == 0


def test_bad_queue_set_up_needs_reset(h: DeviceHarness) -> None:
    h.negotiate()
    h.write32(0x030, 0)
    h.write32(0x038, 3)  # not a power of two
    h.write32(0x044, 1)
    assert h.status & DEVICE_NEEDS_RESET
    assert h.read32(0x044) == 0


def test_queue_outside_memory_needs_reset(h: DeviceHarness) -> None:
    h.negotiate()
    h.write32(0x030, 0)
    h.write32(0x038, 16)
    h.write32(0x080, 0xFFFF_0000)
    h.write32(0x084, 0x7)
    h.write32(0x044, 1)
    assert h.status & DEVICE_NEEDS_RESET


def test_reset_clears_queues_and_interrupts(h: DeviceHarness) -> None:
    h.initialise()
    h.drivers[0].publish(writable=[8])
    assert h.interrupt_status
    h.write32(0x070, 0)
    assert h.status == 0 and h.interrupt_status == 0
    h.write32(0x030, 0)
    assert h.read32(0x044) == 0
    assert not h.device.is_activated


def test_reinitialise_after_reset_works(h: DeviceHarness) -> None:
    h.initialise()
    h.write32(0x070, 0)
    h.drivers[0] = type(h.drivers[0])(16, mem=h.memory, base=0, heap_size=1 << 20)
    h.drivers[0].on_kick = lambda: h.kick(0)
    h.initialise()
    head = h.drivers[0].publish(writable=[4])
    assert [u.id for u in h.drivers[0].used()] == [head]


def test_broken_avail_index_sets_needs_reset_and_config_interrupt(h: DeviceHarness) -> None:
    h.initialise()
    drv = h.drivers[0]
    drv.set_avail_idx(drv.size + 5)  # moved by more than the queue size
    h.kick(0)
    assert h.status & DEVICE_NEEDS_RESET
    assert h.interrupt_status & 2
    assert h.interrupts() >= 1


def test_bad_descriptor_is_survivable(h: DeviceHarness) -> None:
    h.initialise()
    drv = h.drivers[0]
    drv.push_head(drv.size + 3)  # descriptor index out of range
    h.kick(0)
    head = drv.publish(writable=[8])
    assert head in [u.id for u in drv.used()]


def test_event_idx_suppresses_interrupts() -> None:
    h = DeviceHarness(RngDevice(), event_idx=True)
    h.initialise(h.device_features())
    assert h.device.has_feature(VIRTIO_F_EVENT_IDX)
    drv = h.drivers[0]
    drv.publish(writable=[4])  # the first used buffer always interrupts (as vhost does)
    assert h.interrupts() == 1
    drv.set_used_event(5)  # then: interrupt me only once used idx passes 5
    for _ in range(4):
        drv.publish(writable=[4])
    assert h.interrupts() == 0
    drv.publish(writable=[4])
    assert h.interrupts() == 1
    h.close()


@pytest.mark.parametrize("size", [1, 2, 8])
def test_misaligned_or_narrow_register_access_is_ignored(h: DeviceHarness, size: int) -> None:
    buf = memoryview(bytearray(size))
    h.transport.read(0x001 if size == 1 else 0x000, buf)
    if size != 4:
        assert bytes(buf) == bytes(size)
    h.transport.write(0x070, memoryview(bytearray([ACKNOWLEDGE] * size)))
    assert h.status == 0


def test_config_reads_past_end_are_zero(h: DeviceHarness) -> None:
    assert h.read_config(0, 8) == bytes(8)


def test_driver_features_after_features_ok_ignored(h: DeviceHarness) -> None:
    assert h.negotiate(1 << VIRTIO_F_VERSION_1)
    h.write32(0x024, 0)
    h.write32(0x020, 1 << VIRTIO_F_EVENT_IDX)
    assert not h.device.has_feature(VIRTIO_F_EVENT_IDX)


def test_ring_layout_constants_named_once() -> None:
    assert ring.DESC_SIZE == 16 and ring.MAX_QUEUE_SIZE == 32768
