"""A sandbox for device authors: a VirtioDevice behind the real virtio-mmio transport,
driven by a fake driver, with no VM.

:class:`DeviceHarness` speaks the transport's registers exactly as a guest driver does
(virtio 1.2 §3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue set-up,
DRIVER_OK), with one :class:`~minivmm.virtio.testing.FakeDriver` per queue in one shared
fake guest memory, then lets a test publish chains, kick, and read back used entries and
interrupts::

    h = DeviceHarness(RngDevice())
    h.initialise()
    drv = h.drivers[0]
    head = drv.publish(writable=[16])
    h.kick(0)
    (used,) = drv.used()
    assert used.id == head and used.len == 16
    assert h.interrupt_status & 1
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from ..devices.base import VIRTIO_F_VERSION_1, VirtioDevice
from ..virtio.testing import FakeDriver, FakeGuestMemory
from .mmio import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, MmioTransport
from .observe import Observer, observe

_U32 = struct.Struct("<I")
_QUEUE_SPAN = 2 << 20  # guest memory each queue's rings and heap occupy


class DeviceHarness:
    """One device, its transport, and a fake driver per queue."""

    def __init__(self, device: VirtioDevice, *, queue_size: int | None = None,
                 event_idx: bool = False, observer: Observer | None = None) -> None:
        self.device = device
        nq = len(device.queues)
        self.memory = FakeGuestMemory(((0, _QUEUE_SPAN * max(nq, 1)),))
        self._irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.transport = MmioTransport(device, self.memory, self._irq_fd)
        if observer is not None:  # a Tracer, a DriverChecker (minivmm.transport.observe)
            observe(self.transport, observer)
        self.drivers = [
            FakeDriver(queue_size or min(q.max_size, 256), mem=self.memory,
                       base=i * _QUEUE_SPAN, heap_size=_QUEUE_SPAN - (256 << 10),
                       event_idx=event_idx)
            for i, q in enumerate(device.queues)
        ]
        for i, drv in enumerate(self.drivers):
            drv.on_kick = lambda i=i: self.kick(i)

    # -- registers ---------------------------------------------------------------------

    def read32(self, offset: int) -> int:
        buf = bytearray(4)
        self.transport.read(offset, memoryview(buf))
        return int(_U32.unpack(buf)[0])

    def write32(self, offset: int, value: int) -> None:
        self.transport.write(offset, memoryview(bytearray(_U32.pack(value & 0xFFFF_FFFF))))

    def read_config(self, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        self.transport.read(0x100 + offset, memoryview(buf))
        return bytes(buf)

    @property
    def status(self) -> int:
        return self.read32(0x070)

    @property
    def interrupt_status(self) -> int:
        return self.read32(0x060)

    def ack_interrupt(self) -> int:
        bits = self.interrupt_status
        self.write32(0x064, bits)
        return bits

    def interrupts(self) -> int:
        """How many times the device signalled the irqfd since the last call."""
        try:
            return os.eventfd_read(self._irq_fd)
        except BlockingIOError:
            return 0

    # -- the driver's initialisation sequence (§3.1.1) ---------------------------------------

    def device_features(self) -> int:
        self.write32(0x014, 0)
        low = self.read32(0x010)
        self.write32(0x014, 1)
        return low | (self.read32(0x010) << 32)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write ``features`` (default: all offered), set
        FEATURES_OK; returns whether the device accepted (FEATURES_OK reads back)."""
        self.write32(0x070, 0)
        self.write32(0x070, ACKNOWLEDGE)
        self.write32(0x070, ACKNOWLEDGE | DRIVER)
        if features is None:
            features = self.device_features()
        for page in (0, 1):
            self.write32(0x024, page)
            self.write32(0x020, (features >> (32 * page)) & 0xFFFF_FFFF)
        self.write32(0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return bool(self.status & FEATURES_OK)

    def setup_queue(self, index: int) -> None:
        drv = self.drivers[index]
        self.write32(0x030, index)
        assert self.read32(0x044) == 0, "queue already ready"
        self.write32(0x038, drv.size)
        for reg, addr in ((0x080, drv.desc_addr), (0x090, drv.avail_addr),
                          (0x0A0, drv.used_addr)):
            self.write32(reg, addr & 0xFFFF_FFFF)
            self.write32(reg + 4, addr >> 32)
        self.write32(0x044, 1)

    def initialise(self, features: int | None = None,
                   queues: Sequence[int] | None = None) -> None:
        """The whole sequence, ending at DRIVER_OK; AssertionError if the device refuses."""
        if features is None:
            features = self.device_features()
        assert features & (1 << VIRTIO_F_VERSION_1)
        assert self.negotiate(features), f"FEATURES_OK refused for 0x{features:x}"
        for i in range(len(self.drivers)) if queues is None else queues:
            self.setup_queue(i)
        self.write32(0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        assert self.status & DRIVER_OK, f"DRIVER_OK not accepted, status 0x{self.status:x}"

    # -- work --------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        """QueueNotify, delivered as the device thread would (synchronously here)."""
        self.device.kick(index)

    def close(self) -> None:
        self.device.close()
        os.close(self._irq_fd)
