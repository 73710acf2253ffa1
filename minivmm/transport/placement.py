"""Where virtio-mmio devices live in the guest and how they are wired to KVM.

Device i gets the 4 KiB window at ``VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`` and IRQ
``VIRTIO_IRQ_FIRST + i`` (minivmm.x86.layout documents both ranges), and the kernel
command line gets ``virtio_mmio.device=4K@0xADDR:IRQ`` for it, which Linux's virtio_mmio
driver parses (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). Each queue's QueueNotify writes are
caught by a KVM ioeventfd (datamatch on the queue index) that the device thread watches,
and interrupts go out through a KVM irqfd: neither stops the vCPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ..errors import UsageError
from ..x86 import layout

if TYPE_CHECKING:
    from ..bus import Bus
    from ..devices.base import VirtioDevice
    from ..eventloop import EventLoop
    from ..kvm import Vm
    from ..virtio.mem import GuestMemoryLike
    from .mmio import MmioTransport
    from .observe import Observer


class Slot(NamedTuple):
    base: int
    irq: int

    @property
    def cmdline(self) -> str:
        return f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE >> 10}K@0x{self.base:x}:{self.irq}"


class VirtioMmioDevices:
    """The virtio-mmio devices of one VM."""

    def __init__(self, vm: Vm, memory: GuestMemoryLike, mmio_bus: Bus, loop: EventLoop,
                 observer: Observer | None = None) -> None:
        self.vm = vm
        #: --trace / --check-driver (minivmm.transport.observe): every device reports to it
        self.observer = observer
        self.memory = memory
        self.bus = mmio_bus
        self.loop = loop
        self.transports: list[tuple[Slot, MmioTransport]] = []
        self._fds: list[int] = []

    def add(self, device: VirtioDevice) -> Slot:
        # The transport and the virtqueue engine are imported with the first device: a
        # VM without virtio devices (the probe's CPU checks) does without them.
        from .mmio import NOTIFY_OFFSET, MmioTransport

        i = len(self.transports)
        if i >= layout.VIRTIO_MMIO_MAX_DEVICES:
            raise UsageError(f"too many virtio devices: at most "
                             f"{layout.VIRTIO_MMIO_MAX_DEVICES} fit the IRQ range",
                             field="devices")
        slot = Slot(layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE,
                    layout.VIRTIO_IRQ_FIRST + i)
        irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(irq_fd)
        self.vm.irqfd(irq_fd, slot.irq)
        transport = MmioTransport(device, self.memory, irq_fd,
                                  on_activate=self._activated, on_reset=self._deactivated)
        if self.observer is not None:  # kicks then exit as QueueNotify writes (no ioeventfd)
            from .observe import observe

            observe(transport, self.observer, f"{device.name}@0x{slot.base:x}")
        self.bus.register(slot.base, layout.VIRTIO_MMIO_SIZE, transport)
        device.fd_watch = functools.partial(self._watch_fd, device)
        for qi, fd in enumerate(device.queue_events):
            if self.observer is None:
                self.vm.ioeventfd(fd, slot.base + NOTIFY_OFFSET, 4, datamatch=qi)
            self.loop.add_reader(fd, self._kicker(device, qi, fd))
        self.transports.append((slot, transport))
        return slot

    @staticmethod
    def _kicker(device: VirtioDevice, index: int, fd: int) -> Callable[[], None]:
        read = os.eventfd_read
        kick = device.kick

        def on_kick() -> None:
            try:
                read(fd)
            except BlockingIOError:
                return
            kick(index)

        return on_kick

    def _watch_fd(self, device: VirtioDevice, fd: int,
                  callback: Callable[[], None] | None) -> None:
        if callback is None:
            self.loop.remove_reader(fd)
        else:
            self.loop.add_reader(fd, functools.partial(device.contain, callback))

    def _activated(self, device: VirtioDevice) -> None:
        for fd, callback in device.extra_fds():
            self._watch_fd(device, fd, callback)
        # Kicks that arrived before DRIVER_OK were dropped by kick(); look at every
        # queue once so a driver that filled its rings early is served.
        for qi in range(len(device.queues)):
            self.loop.call_soon(functools.partial(device.kick, qi))

    def _deactivated(self, device: VirtioDevice) -> None:
        for fd, _ in device.extra_fds():
            self.loop.remove_reader(fd)

    def cmdline(self) -> str:
        return " ".join(slot.cmdline for slot, _ in self.transports)

    def never_initialised(self) -> list[tuple[Slot, VirtioDevice]]:
        """Devices the guest's driver never brought to DRIVER_OK."""
        if not self.transports:
            return []
        from .mmio import DRIVER_OK

        return [(slot, t.device) for slot, t in self.transports
                if not t.ever_driver_ok and not t.status & DRIVER_OK]

    def close(self) -> None:
        for _, t in self.transports:
            t.device.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
