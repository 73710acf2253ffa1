"""The "Writing a device" example from the README, kept working."""

from __future__ import annotations

import pytest

from minivmm.virtio import Queue
from minivmm.virtio.errors import DescriptorError
from minivmm.virtio.testing import FakeDriver
from minivmm.virtio.util import BufferedNotify


class UpperDevice:
    """Answers each request with its readable bytes, upper-cased."""

    def __init__(self, queue: Queue, interrupt: BufferedNotify) -> None:
        self.queue = queue
        self.notify = interrupt

    def on_kick(self) -> None:  # QueueNotify / the kick eventfd
        with self.notify:  # one interrupt for the whole batch, if the driver wants it
            for chain in self.queue.iter():
                with chain:  # back to the used ring with writer.written bytes
                    chain.writer.write(chain.reader.read().upper())


def test_upper_device() -> None:
    drv = FakeDriver(size=16)
    q = drv.make_queue()
    irqs: list[int] = []
    dev = UpperDevice(q, BufferedNotify(q, lambda: irqs.append(1)))
    a = drv.publish([b"hello"], [16])
    b = drv.publish([b"wor", b"ld"], [2, 2], indirect=True)
    dev.on_kick()
    assert drv.used() == [(a, 5, b"HELLO"), (b, 4, b"WORL")]
    assert irqs == [1]


def test_upper_device_with_a_hostile_driver() -> None:
    drv = FakeDriver(size=16)
    q = drv.make_queue()
    dev = UpperDevice(q, BufferedNotify(q, lambda: None))
    head = drv.publish([b"x", b"y"], [4])
    drv.patch_descriptor(head, next=99)  # beyond the queue size
    with pytest.raises(DescriptorError, match="has next=99"):
        dev.on_kick()
