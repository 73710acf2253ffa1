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

Failures of the host side (``h.faults``: an I/O error on the Nth request, a slow backend,
a tap that disappears) are :mod:`minivmm.transport.faults`'. With ``watchdog=SECONDS``
each kick runs on a thread of its own, as on the device thread, and the harness raises
:class:`WatchdogError` (an AssertionError: the test fails) once a kicked chain of a
watched queue has waited longer than that for its used entry, naming the queue and the
chain's head, with where the device is stuck if it still is.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence

from ..devices.base import VIRTIO_F_VERSION_1, VirtioDevice
from ..virtio.ring import RING_OFFSET, USED_ELEM_SIZE
from ..virtio.testing import FakeDriver, FakeGuestMemory
from .faults import FaultInjector
from .mmio import ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK, MmioTransport
from .observe import Observer, observe

_U32 = struct.Struct("<I")
_QUEUE_SPAN = 2 << 20  # guest memory each queue's rings and heap occupy


class WatchdogError(AssertionError):
    """A kicked chain stayed unanswered longer than the harness's watchdog allows."""


class DeviceHarness:
    """One device, its transport, and a fake driver per queue. ``watchdog`` (seconds)
    bounds how long a kicked chain of a ``watched`` queue (default: every queue; leave
    out the ones where the device holds buffers until something arrives, such as a
    receive queue) may wait for its used entry."""

    def __init__(self, device: VirtioDevice, *, queue_size: int | None = None,
                 event_idx: bool = False, observer: Observer | None = None,
                 watchdog: float | None = None,
                 watched: Iterable[int] | None = None) -> None:
        self.device = device
        self.watchdog = watchdog
        self.watched = set(range(len(device.queues)) if watched is None else watched)
        self._faults: FaultInjector | None = None
        # per queue: (head, kick time) of the chains kicked and not yet used, the avail
        # index recorded up to and the used index seen up to
        self._waiting: list[list[tuple[int, float]]] = [[] for _ in device.queues]
        self._avail_seen = [0] * len(device.queues)
        self._used_seen = [0] * len(device.queues)
        self._kicker: threading.Thread | None = None
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
        if offset == 0x070 and value == 0:  # a reset: the device forgets every chain
            self._forget()

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
        """QueueNotify, delivered as the device thread would: synchronously, or with a
        watchdog on a thread the harness waits for (WatchdogError past the bound)."""
        if self.watchdog is None:
            self.device.kick(index)
            return
        self.check()
        if index in self.watched and 0 <= index < len(self.drivers):
            self._note_kicked(index)
        if not self._join_kicker(self.watchdog):
            raise WatchdogError(f"{self.device.name}: queue {index} kicked while an earlier "
                                f"kick is still running after the watchdog's {self.watchdog:g} s")
        self._kicker = threading.Thread(target=self.device.kick, args=(index,), daemon=True,
                                        name=f"device-{self.device.name}-kick")
        self._kicker.start()
        self._join_kicker(self.watchdog)
        self.check()

    @property
    def faults(self) -> FaultInjector:
        """Host-side failures for this test (disarmed by :meth:`close`)."""
        if self._faults is None:
            self._faults = FaultInjector()
        return self._faults

    # -- the watchdog ------------------------------------------------------------------

    def _note_kicked(self, index: int) -> None:
        drv = self.drivers[index]
        now = time.monotonic()
        while self._avail_seen[index] != drv.avail_idx:
            slot = self._avail_seen[index] % drv.size
            head = int.from_bytes(drv.read(drv.avail_addr + RING_OFFSET + 2 * slot, 2),
                                  "little")
            self._waiting[index].append((head, now))
            self._avail_seen[index] = (self._avail_seen[index] + 1) & 0xFFFF

    def _note_used(self, index: int) -> None:
        drv = self.drivers[index]
        waiting = self._waiting[index]
        while self._used_seen[index] != drv.used_idx:
            slot = self._used_seen[index] % drv.size
            head = int.from_bytes(
                drv.read(drv.used_addr + RING_OFFSET + USED_ELEM_SIZE * slot, 4), "little")
            self._used_seen[index] = (self._used_seen[index] + 1) & 0xFFFF
            for i, (h, _) in enumerate(waiting):
                if h == head:
                    del waiting[i]
                    break

    def _forget(self) -> None:
        for i, drv in enumerate(self.drivers):
            self._waiting[i].clear()
            self._avail_seen[i] = drv.avail_idx
            self._used_seen[i] = drv.used_idx

    def _join_kicker(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the running kick, checking the watchdog meanwhile;
        whether none is running any more."""
        if self._kicker is None:
            return True
        deadline = time.monotonic() + timeout
        while self._kicker.is_alive() and time.monotonic() < deadline:
            self._kicker.join(min(0.01, max(deadline - time.monotonic(), 0)))
            self.check()
        if self._kicker.is_alive():
            return False
        self._kicker = None
        return True

    def check(self, *, wait: bool = False) -> None:
        """WatchdogError if a watched chain has waited past the bound; with ``wait``,
        first wait (up to the bound) for every kicked chain to be answered."""
        if self.watchdog is None:
            return
        if wait:
            deadline = time.monotonic() + self.watchdog
            while self._unanswered() and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.transport.status & DEVICE_NEEDS_RESET:  # (not a register read: no trace)
            return  # the device said it failed: its chains are abandoned, not late
        now = time.monotonic()
        for index in sorted(self.watched):
            self._note_used(index)
            for head, kicked in self._waiting[index]:
                if now - kicked > self.watchdog:
                    self._forget()  # report it once
                    raise WatchdogError(self._overdue(index, head, now - kicked))

    def _unanswered(self) -> bool:
        for index in self.watched:
            self._note_used(index)
        return any(self._waiting[i] for i in self.watched)

    def _overdue(self, index: int, head: int, waited: float) -> str:
        what = (f"{self.device.name}: queue {index}: the chain with head {head} was kicked "
                f"{waited:.2f} s ago and is unanswered (watchdog {self.watchdog:g} s)")
        kicker = self._kicker
        frame = sys._current_frames().get(kicker.ident or -1) if kicker else None
        if kicker is not None and kicker.is_alive() and frame is not None:
            stack = "".join(traceback.format_stack(frame)[-6:])
            what += f"; the device is still in its kick:\n{stack}"
        return what

    def close(self) -> None:
        """Check the watchdog (kicked chains are answered within the bound), disarm the
        faults, close the device. A kick still running after the watchdog fired gets
        ten times the bound (a slow backend finishes); a device hung longer is left
        open (its thread still uses it) and reported."""
        try:
            self.check(wait=True)
        finally:
            self._forget()
            if self._faults is not None:
                self._faults.clear()  # later calls run undelayed
            hung = self.watchdog is not None and not self._join_kicker(10 * self.watchdog)
            if not hung:
                self.device.close()
                os.close(self._irq_fd)
        if hung:
            raise WatchdogError(f"{self.device.name}: a kick still runs "
                                f"{10 * (self.watchdog or 0):g} s after the watchdog fired; "
                                "the device was not closed")
