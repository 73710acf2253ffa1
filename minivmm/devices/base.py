"""VirtioDevice: the one interface between a virtio transport and a device.

A device is a small class that knows nothing about MMIO: it says what it is
(``device_type``), what it offers (``avail_features``), how many queues it has and how
large they may be, what its configuration space holds, and what to do when a queue is
kicked. The transport (minivmm.transport.mmio) drives everything else: feature
negotiation, queue set-up from the driver's register writes, activation at DRIVER_OK,
interrupts and reset.

Threads: the transport calls in from vCPU threads (register accesses), kicks arrive on
the device thread (minivmm.eventloop). ``lock`` serialises the device's life-cycle changes
(activation, reset) with its queue work: a kick holds it while it drains a queue,
including any host I/O that takes. Register accesses that change no device state
(InterruptACK, the selectors, every read, config space) never take it, so a vCPU never
waits on a disk or a network behind a drain.

One failure boundary: whatever a device raises while serving the guest (from a kick, a
watched fd, activation or reset) is caught by :meth:`VirtioDevice.contain`. A broken
queue (the engine's VirtQueueError: the guest's fault) and a bug in the device alike
mark the device DEVICE_NEEDS_RESET, with one rate-limited log line saying which it was;
the VM and the other devices keep running.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Final, Protocol, Self

from ..ratelimit import RateLimitedLog
from ..virtio.chain import DescriptorChain
from ..virtio.errors import VirtQueueError
from ..virtio.mem import GuestMemoryLike
from ..virtio.queue import Queue

log = logging.getLogger(__name__)

# Feature bits common to every device (virtio 1.2 §6)
VIRTIO_F_INDIRECT_DESC: Final = 28
VIRTIO_F_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34

# Device IDs (virtio 1.2 §5)
VIRTIO_ID_NET: Final = 1
VIRTIO_ID_BLOCK: Final = 2
VIRTIO_ID_CONSOLE: Final = 3
VIRTIO_ID_RNG: Final = 4

# InterruptStatus bits (virtio 1.2 §4.2.2, "InterruptStatus")
VIRTIO_MMIO_INT_VRING: Final = 1 << 0
VIRTIO_MMIO_INT_CONFIG: Final = 1 << 1

#: the most buffers one readv/writev/preadv/pwritev takes (more fail with EINVAL)
IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class ActivationError(Exception):
    """The device could not start (the transport then sets DEVICE_NEEDS_RESET)."""


class Interrupt(Protocol):
    """How a device tells its driver something happened (the transport implements it)."""

    def signal_used_queue(self) -> None:
        """Set InterruptStatus bit 0 and interrupt the guest (used buffers)."""

    def signal_config_change(self) -> None:
        """Set InterruptStatus bit 1 and interrupt the guest (configuration changed)."""

    @property
    def status(self) -> int:
        """The InterruptStatus bits not yet acknowledged."""


FdWatch = Callable[[int, Callable[[], None] | None], None]
"""``fd_watch(fd, callback)`` watches fd for readability on the device thread;
``fd_watch(fd, None)`` stops watching it."""


def bit(n: int) -> int:
    return 1 << n


class VirtioDevice(ABC):
    """Base class of every virtio device. Subclasses set ``device_type`` and implement
    ``config``, ``process_queue`` and (optionally) ``on_activate``/``on_reset``."""

    device_type: ClassVar[int]
    #: a name for logs and --stats (the built-ins' names are also their --device names)
    name: ClassVar[str] = "virtio"
    #: the guest kernel option its driver needs, e.g. "CONFIG_VIRTIO_BLK": when a Linux
    #: guest never initialises the device, minivmm names it (Vm.device_hints)
    kernel_option: ClassVar[str] = "the driver for it"

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Self:
        """Build the device from ``--device NAME,key=value...`` options (the config
        file's ``devices`` list gives the same). The default passes each option as the
        ``__init__`` keyword argument of the same name, converted by its annotation
        (minivmm.devices.plugins lists the types); override it for options that need
        more. Raise UsageError (one line) for a bad option."""
        from .plugins import options_to_kwargs

        return cls(**options_to_kwargs(cls, options))

    def __init__(self, avail_features: int, queue_sizes: Sequence[int]) -> None:
        self._avail_features = avail_features | bit(VIRTIO_F_VERSION_1)
        self._acked_features = 0
        self.queues = [Queue(size, i) for i, size in enumerate(queue_sizes)]
        self.queue_events = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                             for _ in queue_sizes]
        self.lock = threading.RLock()
        self.memory: GuestMemoryLike | None = None
        self.interrupt: Interrupt | None = None
        self.config_generation = 0
        #: set by the transport: called with a reason when the device must be reset
        self.on_needs_reset: Callable[[str], None] | None = None
        self.log = RateLimitedLog(logging.getLogger(f"minivmm.devices.{self.name}"))
        #: set by the VMM (or a test): lets a device stop and resume watching one of its
        #: ``extra_fds`` while active, e.g. a tap when the guest has no receive buffers
        self.fd_watch: FdWatch | None = None

    # -- features (virtio 1.2 §2.2) ---------------------------------------------------

    @property
    def avail_features(self) -> int:
        return self._avail_features

    @property
    def acked_features(self) -> int:
        return self._acked_features

    def set_acked_features(self, value: int) -> None:
        """Record the driver's features; bits the device never offered are dropped."""
        unknown = value & ~self._avail_features
        if unknown:
            self.log("%s: driver acked features 0x%x the device never offered; dropped",
                     self.name, unknown)
        self._acked_features = value & self._avail_features
        event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        for q in self.queues:
            q.set_event_idx(event_idx)  # the queues are not ready yet (FEATURES_OK)

    def avail_features_by_page(self, page: int) -> int:
        return (self._avail_features >> (32 * page)) & 0xFFFF_FFFF if 0 <= page < 2 else 0

    def ack_features_by_page(self, page: int, value: int) -> None:
        """DriverFeatures: replace 32 bits of what the driver acked (not yet filtered)."""
        if not 0 <= page < 2:
            self.log("%s: driver wrote features page %d (only 0 and 1 exist)", self.name, page)
            return
        shift = 32 * page
        self._acked_features = (self._acked_features & ~(0xFFFF_FFFF << shift)) | (
            (value & 0xFFFF_FFFF) << shift)

    def has_feature(self, n: int) -> bool:
        return bool(self._acked_features & bit(n))

    def features_ok(self) -> bool:
        """Whether the acked set is acceptable (FEATURES_OK). Every bit must have been
        offered, and VERSION_1 is required: minivmm has no legacy interface."""
        if self._acked_features & ~self._avail_features:
            return False
        return self.has_feature(VIRTIO_F_VERSION_1)

    # -- configuration space (virtio 1.2 §2.5) ----------------------------------------

    @abstractmethod
    def config(self) -> bytes:
        """The device-specific configuration space, as the driver reads it."""

    def read_config(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from offset; bytes past the end read as zeros."""
        cfg = self.config()
        chunk = cfg[offset : offset + len(data)] if 0 <= offset < len(cfg) else b""
        data[: len(chunk)] = chunk
        data[len(chunk) :] = bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: memoryview) -> None:
        """Most devices have a read-only configuration: writes are logged and dropped."""
        self.log("%s: driver wrote %d bytes at config offset %d (read-only); ignored",
                 self.name, len(data), offset)

    def config_changed(self) -> None:
        """Call when the configuration changed: bumps ConfigGeneration and interrupts."""
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        if self.interrupt is not None:
            self.interrupt.signal_config_change()

    # -- life cycle -------------------------------------------------------------------

    @property
    def is_activated(self) -> bool:
        return self.memory is not None

    def activate(self, memory: GuestMemoryLike, interrupt: Interrupt) -> None:
        """Start the device (DRIVER_OK). Raises ActivationError."""
        for q in self.queues:
            if not q.is_ready():
                continue
            try:
                q.activate(memory)
            except VirtQueueError as e:
                raise ActivationError(f"queue {q.index}: {e}") from e
        self.memory = memory
        self.interrupt = interrupt
        try:
            self.on_activate()
        except BaseException:
            self.memory = self.interrupt = None
            raise

    def reset(self) -> None:
        """Back to the state before the driver found the device (Status = 0)."""
        try:
            if self.is_activated:
                self.on_reset()
        finally:  # the device is reset even if its hook failed
            self.memory = None
            self.interrupt = None
            self._acked_features = 0
            for q, fd in zip(self.queues, self.queue_events, strict=True):
                q.reset()
                try:
                    os.eventfd_read(fd)  # drop a kick that arrived before the reset
                except BlockingIOError:
                    pass

    def on_activate(self) -> None:
        """Hook: take what the device needs to run (files, fds). Raise ActivationError."""

    def on_reset(self) -> None:
        """Hook: release what on_activate took."""

    # -- snapshots (minivmm.snapshot) -------------------------------------------------
    #
    # Saving: the VM is paused (every vCPU out of KVM_RUN, the device thread idle, so no
    # kick or watched fd runs), then each device's quiesce() and save_state() are called.
    # The transport saves the rest itself: status, features, queue registers,
    # InterruptStatus, ConfigGeneration and each queue's next_avail/next_used.
    # Restoring: the transport puts those back and, if the driver had set DRIVER_OK,
    # activates the device (on_activate runs as at boot), then restore_state() is called
    # with what save_state() returned, activated or not.

    def quiesce(self) -> None:
        """Hook, called while the VM is paused, before :meth:`save_state`: give back to
        the guest's rings whatever the device holds that a snapshot cannot carry (e.g.
        receive chains a device popped and kept: rewind the queue's ``next_avail`` so the
        restored device pops them again). In-flight I/O must be finished here. The
        default does nothing (a device that completes every chain inside its kick holds
        nothing)."""

    def save_state(self) -> dict[str, object]:
        """Hook: the device's own state beyond the transport's, as a JSON-serialisable
        dict (called paused, after :meth:`quiesce`). Default: none."""
        return {}

    def restore_state(self, state: Mapping[str, object]) -> None:
        """Hook: take back what :meth:`save_state` returned (called after the transport
        restored and, if it was running, activated the device). Treat ``state`` as
        untrusted input (a snapshot file can be corrupt): raise ValueError with one line
        naming what does not fit (the snapshot loader reports it as a usage error naming
        the device), e.g. a backing file whose size changed. The default accepts only
        an empty state."""
        if state:
            raise ValueError(f"{self.name}: the snapshot has device state "
                             f"({', '.join(sorted(state))}) this device does not take")

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        """File descriptors (besides queue events) the device thread should watch while
        the device is active, with the callback to run when each is readable."""
        return []

    # -- work -------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        """The driver notified queue ``index``: process it (on the device thread)."""
        with self.lock:
            if not self.is_activated or not 0 <= index < len(self.queues):
                return
            if not self.queues[index].is_active():
                return
            self.contain(self.process_queue, index)

    def contain(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` inside the failure boundary (see the module docstring)."""
        try:
            fn(*args)
        except VirtQueueError as e:
            self.fail(str(e))
        except ActivationError as e:
            self.fail(f"activation failed: {e}")
        except Exception as e:
            self.log("%s: internal error (a bug in minivmm, please report it): %s: %s",
                     self.name, type(e).__name__, e)
            logging.getLogger(__name__).debug("%s failed", self.name, exc_info=True)
            self.fail(f"internal error: {type(e).__name__}: {e}", logged=True)

    @abstractmethod
    def process_queue(self, index: int) -> None:
        """Handle every available chain of queue ``index``; raise VirtQueueError if the
        guest broke the queue (the device is then marked DEVICE_NEEDS_RESET)."""

    def fail(self, reason: str, *, logged: bool = False) -> None:
        """The device cannot go on (the guest broke a queue, or the device failed): tell
        the transport, which sets DEVICE_NEEDS_RESET and interrupts the driver."""
        if not logged:
            self.log("%s: %s; device needs reset", self.name, reason)
        if self.on_needs_reset is not None:
            self.on_needs_reset(reason)

    @staticmethod
    def available(queue: Queue) -> Iterator[DescriptorChain]:
        """Every available chain, until the ring is empty *and* stays empty once
        notifications are re-enabled (with EVENT_IDX that writes avail_event, which is
        what makes the driver kick again; a chain that raced in is served too). Kicks are
        suppressed while the device is draining the ring (a hint to the driver)."""
        queue.disable_notification()
        while True:
            while (chain := queue.pop()) is not None:
                yield chain
            if not queue.enable_notification():
                return

    def drain(self, queue: Queue, serve: Callable[[DescriptorChain], object]) -> int:
        """The device's loop, written once: serve every available chain of ``queue``
        (each returned to the used ring by its ``with`` block), then interrupt the driver
        once if anything was served: also when a bad chain stops the loop half way
        (the VirtQueueError then goes on to :meth:`contain`). Returns the count served."""
        served = 0
        try:
            for chain in self.available(queue):
                with chain:
                    serve(chain)
                served += 1
        finally:
            if served:
                self.signal_used(queue)
        return served

    def stats(self) -> dict[str, int]:
        """Counters for ``--stats`` (name -> value); none by default."""
        return {}

    def signal_used(self, queue: Queue) -> None:
        """Interrupt the driver for ``queue`` unless it suppressed notifications."""
        if self.interrupt is not None and queue.needs_notification():
            self.interrupt.signal_used_queue()

    def close(self) -> None:
        """Release everything (when the VM ends)."""
        with self.lock:
            if self.is_activated:
                self.on_reset()
            self.memory = None
        for fd in self.queue_events:
            os.close(fd)
        self.queue_events = []
