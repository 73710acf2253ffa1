"""virtio-mmio, version 2 (virtio 1.2 §4.2.2), for any VirtioDevice.

The register file is :data:`REGISTERS`, one table keyed by the spec's names. Register
accesses must be 32 bits wide and aligned; anything else is logged and ignored (reads
return zeros). The device-specific configuration space starts at 0x100 and takes 8-, 16-,
32- and 64-bit accesses.

Device status follows :data:`STATUS_TRANSITIONS`: the driver sets ACKNOWLEDGE, DRIVER,
FEATURES_OK and DRIVER_OK one step at a time (§3.1.1); FAILED may be set at any time and
sticks; writing 0 resets the device. FEATURES_OK is refused (reads back clear) when the
device cannot accept the acked features; DRIVER_OK activates the device; a failed
activation, or a queue the engine rejected later, sets DEVICE_NEEDS_RESET and raises a
configuration-change interrupt (§2.1.2).

Kicks (QueueNotify) arrive through KVM ioeventfds that the device thread watches, so a
kick never stops the vCPU; a write that matches no ioeventfd (an out-of-range queue
index) exits here and is logged. Interrupts go out through a KVM irqfd; InterruptStatus
bits are set before the interrupt and stay set until InterruptACK clears them.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Final, NamedTuple

from ..devices.base import (
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
)
from ..ratelimit import RateLimitedLog
from ..virtio.mem import GuestMemoryLike

log = logging.getLogger(__name__)

MAGIC_VALUE: Final = 0x74726976  # "virt"
VERSION: Final = 2
VENDOR_ID: Final = 0x4D564D4D  # "MMVM"
CONFIG_SPACE_OFFSET: Final = 0x100
NOTIFY_OFFSET: Final = 0x050

# Device status bits (virtio 1.2 §2.1)
ACKNOWLEDGE: Final = 1
DRIVER: Final = 2
DRIVER_OK: Final = 4
FEATURES_OK: Final = 8
DEVICE_NEEDS_RESET: Final = 64
FAILED: Final = 128
INIT_BITS: Final = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK

#: status -> the statuses a driver may write next (besides 0 = reset and | FAILED)
STATUS_TRANSITIONS: Final[dict[int, int]] = {
    0: ACKNOWLEDGE,
    ACKNOWLEDGE: ACKNOWLEDGE | DRIVER,
    ACKNOWLEDGE | DRIVER: ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ACKNOWLEDGE | DRIVER | FEATURES_OK: INIT_BITS,
}


def features_writable(status: int) -> bool:
    """DriverFeatures belongs to the DRIVER step of §3.1.1: after DRIVER, before FEATURES_OK."""
    return status & INIT_BITS == ACKNOWLEDGE | DRIVER


class Register(NamedTuple):
    name: str
    readable: bool
    writable: bool


R, W, RW = (True, False), (False, True), (True, True)

#: The register file (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
REGISTERS: Final[dict[int, Register]] = {
    offset: Register(name, *access)
    for offset, name, access in (
        (0x000, "MagicValue", R),
        (0x004, "Version", R),
        (0x008, "DeviceID", R),
        (0x00C, "VendorID", R),
        (0x010, "DeviceFeatures", R),
        (0x014, "DeviceFeaturesSel", W),
        (0x020, "DriverFeatures", W),
        (0x024, "DriverFeaturesSel", W),
        (0x030, "QueueSel", W),
        (0x034, "QueueNumMax", R),
        (0x038, "QueueNum", W),
        (0x044, "QueueReady", RW),
        (0x050, "QueueNotify", W),
        (0x060, "InterruptStatus", R),
        (0x064, "InterruptACK", W),
        (0x070, "Status", RW),
        (0x080, "QueueDescLow", W),
        (0x084, "QueueDescHigh", W),
        (0x090, "QueueDriverLow", W),
        (0x094, "QueueDriverHigh", W),
        (0x0A0, "QueueDeviceLow", W),
        (0x0A4, "QueueDeviceHigh", W),
        (0x0AC, "SHMSel", W),
        (0x0B0, "SHMLenLow", R),
        (0x0B4, "SHMLenHigh", R),
        (0x0B8, "SHMBaseLow", R),
        (0x0BC, "SHMBaseHigh", R),
        (0x0C0, "QueueReset", RW),
        (0x0FC, "ConfigGeneration", R),
    )
}

_U32 = struct.Struct("<I")
_CONFIG_SIZES: Final = (1, 2, 4, 8)
#: registers whose writes activate, reset or reconfigure the device: they wait for the
#: device's lock (its queue work). Lock order: device.lock, then the transport's.
LIFECYCLE_REGISTERS: Final = frozenset(
    offset for offset, reg in REGISTERS.items()
    if reg.name in ("Status", "QueueNum", "QueueReady", "QueueNotify", "QueueReset",
                    "DriverFeatures") or reg.name.startswith(("QueueDesc", "QueueDriver",
                                                              "QueueDevice")))


def _reraise(e: BaseException) -> None:
    raise e


class IrqfdInterrupt:
    """InterruptStatus plus an irqfd: set the bit, then signal the eventfd KVM watches."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._status = 0
        self._lock = threading.Lock()
        self.count = 0

    @property
    def status(self) -> int:
        return self._status

    def _raise(self, bits: int) -> None:
        with self._lock:
            self._status |= bits
            self.count += 1
        os.eventfd_write(self.fd, 1)

    def signal_used_queue(self) -> None:
        self._raise(VIRTIO_MMIO_INT_VRING)

    def signal_config_change(self) -> None:
        self._raise(VIRTIO_MMIO_INT_CONFIG)

    def ack(self, bits: int) -> None:
        with self._lock:
            self._status &= ~bits

    def clear(self) -> None:
        with self._lock:
            self._status = 0

    def restore_status(self, bits: int) -> None:
        """InterruptStatus from a snapshot (the interrupt itself was already delivered
        into the saved interrupt controllers)."""
        with self._lock:
            self._status = bits


class MmioTransport:
    """One virtio-mmio device window: registers, status machine, and the device."""

    def __init__(self, device: VirtioDevice, memory: GuestMemoryLike, irq_fd: int, *,
                 on_activate: Callable[[VirtioDevice], None] | None = None,
                 on_reset: Callable[[VirtioDevice], None] | None = None) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = IrqfdInterrupt(irq_fd)
        self._on_activate = on_activate
        self._on_reset = on_reset
        self.status = 0
        #: the driver reached DRIVER_OK at least once (for the "never initialised" hint)
        self.ever_driver_ok = False
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.log = RateLimitedLog(logging.getLogger(f"minivmm.transport.{device.name}"))
        #: the transport's own state; never held across device work (see write())
        self.lock = threading.RLock()
        device.on_needs_reset = self.set_needs_reset
        self._readers: dict[int, Callable[[], int]] = {}
        self._writers: dict[int, Callable[[int], None]] = {}
        for offset, reg in REGISTERS.items():
            attr = reg.name[0].lower() + reg.name[1:]
            if reg.readable:
                self._readers[offset] = getattr(self, f"_read_{attr}")
            if reg.writable:
                self._writers[offset] = getattr(self, f"_write_{attr}")

    # -- bus interface -------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        """A register or config-space read (a vCPU thread). Takes no lock that device
        work holds: a read never waits on a drain."""
        try:
            if offset >= CONFIG_SPACE_OFFSET:
                if len(data) in _CONFIG_SIZES:
                    self.device.read_config(offset - CONFIG_SPACE_OFFSET, data)
                    return
            else:
                reader = self._readers.get(offset)
                if reader is not None and len(data) == 4:
                    _U32.pack_into(data, 0, reader() & 0xFFFF_FFFF)
                    return
            self.log("%s: bad %d-byte read at register offset 0x%x; read as 0",
                     self.device.name, len(data), offset)
        except Exception as e:  # the device failed: contain it (see VirtioDevice.contain)
            self.device.contain(_reraise, e)
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        """A register or config-space write (a vCPU thread). Registers that change the
        device's life cycle (:data:`LIFECYCLE_REGISTERS`) wait for the device's lock;
        the others (selectors, InterruptACK, config space) take only the transport's."""
        try:
            if offset >= CONFIG_SPACE_OFFSET:
                if len(data) in _CONFIG_SIZES:
                    self.device.write_config(offset - CONFIG_SPACE_OFFSET, data)
                    return
            else:
                writer = self._writers.get(offset)
                if writer is not None and len(data) == 4:
                    (value,) = _U32.unpack_from(data)
                    if offset in LIFECYCLE_REGISTERS:
                        with self.device.lock, self.lock:
                            writer(value)
                    else:
                        with self.lock:
                            writer(value)
                    return
            self.log("%s: bad %d-byte write at register offset 0x%x; ignored",
                     self.device.name, len(data), offset)
        except Exception as e:  # the device failed: contain it (see VirtioDevice.contain)
            self.device.contain(_reraise, e)

    # -- identification and features --------------------------------------------------

    def _read_magicValue(self) -> int:
        return MAGIC_VALUE

    def _read_version(self) -> int:
        return VERSION

    def _read_deviceID(self) -> int:
        return self.device.device_type

    def _read_vendorID(self) -> int:
        return VENDOR_ID

    def _read_deviceFeatures(self) -> int:
        return self.device.avail_features_by_page(self.device_features_sel)

    def _write_deviceFeaturesSel(self, v: int) -> None:
        self.device_features_sel = v

    def _write_driverFeatures(self, v: int) -> None:
        if not features_writable(self.status):
            self.log("%s: DriverFeatures written in status 0x%x; ignored",
                     self.device.name, self.status)
            return
        self.device.ack_features_by_page(self.driver_features_sel, v)

    def _write_driverFeaturesSel(self, v: int) -> None:
        self.driver_features_sel = v

    # -- queues ------------------------------------------------------------------------

    def _write_queueSel(self, v: int) -> None:
        self.queue_sel = v

    def _read_queueNumMax(self) -> int:
        qs = self.device.queues
        return qs[self.queue_sel].max_size if self.queue_sel < len(qs) else 0

    def _queue_config(self, what: str, value: int, apply: Callable[[int], None]) -> None:
        """Queue registers: writable only while the driver sets up the device and the
        selected queue is not ready (§4.2.2.3)."""
        qs = self.device.queues
        if self.queue_sel >= len(qs):
            self.log("%s: %s written for queue %d, which does not exist", self.device.name,
                     what, self.queue_sel)
            return
        q = qs[self.queue_sel]
        if q.is_ready() or self.status & DRIVER_OK or self.status & FAILED:
            self.log("%s: %s written for queue %d while it is ready or live; ignored",
                     self.device.name, what, self.queue_sel)
            return
        apply(value)

    def _write_queueNum(self, v: int) -> None:
        # The size is checked when the queue becomes ready (engine: InvalidQueueSize).
        self._queue_config("QueueNum", v,
                           lambda x: self.device.queues[self.queue_sel].set_size(x))

    def _read_queueReady(self) -> int:
        qs = self.device.queues
        return int(qs[self.queue_sel].is_ready()) if self.queue_sel < len(qs) else 0

    def _write_queueReady(self, v: int) -> None:
        qs = self.device.queues
        if self.queue_sel >= len(qs):
            self.log("%s: QueueReady written for queue %d, which does not exist",
                     self.device.name, self.queue_sel)
            return
        q = qs[self.queue_sel]
        if self.status & DRIVER_OK:
            self.log("%s: QueueReady written after DRIVER_OK; ignored", self.device.name)
            return
        q.set_ready(v == 1)
        if v == 1 and not q.is_valid(self.memory):
            # A queue the engine rejects (size, alignment, rings outside RAM).
            q.set_ready(False)
            self.set_needs_reset(f"queue {q.index} set up with invalid size or addresses")

    def _write_queueNotify(self, v: int) -> None:
        # Valid indices are handled by ioeventfds and never reach here, except when the
        # VM was built without them (tests); then kick directly.
        if 0 <= v < len(self.device.queues):
            self.device.kick(v)
        else:
            self.log("%s: QueueNotify for queue %d, which does not exist", self.device.name, v)

    def _addr(self, name: str, v: int, high: bool) -> None:
        def apply(x: int) -> None:
            q = self.device.queues[self.queue_sel]
            setter = getattr(q, f"set_{name}_address")
            setter(high=x) if high else setter(low=x)
        self._queue_config(f"Queue{name}{'High' if high else 'Low'}", v, apply)

    def _write_queueDescLow(self, v: int) -> None:
        self._addr("desc_table", v, False)

    def _write_queueDescHigh(self, v: int) -> None:
        self._addr("desc_table", v, True)

    def _write_queueDriverLow(self, v: int) -> None:
        self._addr("avail_ring", v, False)

    def _write_queueDriverHigh(self, v: int) -> None:
        self._addr("avail_ring", v, True)

    def _write_queueDeviceLow(self, v: int) -> None:
        self._addr("used_ring", v, False)

    def _write_queueDeviceHigh(self, v: int) -> None:
        self._addr("used_ring", v, True)

    def _read_queueReset(self) -> int:
        return 0  # VIRTIO_F_RING_RESET is not offered

    def _write_queueReset(self, v: int) -> None:
        self.log("%s: QueueReset written, but VIRTIO_F_RING_RESET was not offered",
                 self.device.name)

    # -- interrupts, shared memory, generation -----------------------------------------

    def _read_interruptStatus(self) -> int:
        return self.interrupt.status

    def _write_interruptACK(self, v: int) -> None:
        self.interrupt.ack(v)

    def _write_sHMSel(self, v: int) -> None:
        self.shm_sel = v

    def _read_sHMLenLow(self) -> int:
        return 0xFFFF_FFFF  # no shared memory regions: length all ones

    _read_sHMLenHigh = _read_sHMLenLow
    _read_sHMBaseLow = _read_sHMLenLow
    _read_sHMBaseHigh = _read_sHMLenLow

    def _read_configGeneration(self) -> int:
        return self.device.config_generation

    # -- status ------------------------------------------------------------------------

    def _read_status(self) -> int:
        return self.status

    def _write_status(self, v: int) -> None:
        if v == 0:
            self.reset()
            return
        if self.status & FAILED:
            return  # FAILED sticks until reset
        if v & FAILED:
            self.status |= FAILED
            return
        allowed = STATUS_TRANSITIONS.get(self.status & INIT_BITS)
        new = v & INIT_BITS
        if allowed is None or new != allowed or v & ~INIT_BITS:
            self.log("%s: driver wrote status 0x%x in status 0x%x; not a valid step",
                     self.device.name, v, self.status)
            return
        step = new & ~self.status
        if step == FEATURES_OK:
            if not self.device.features_ok():
                self.log("%s: driver acked features 0x%x the device cannot accept "
                         "(offered 0x%x); FEATURES_OK refused", self.device.name,
                         self.device.acked_features, self.device.avail_features)
                return
            self.device.set_acked_features(self.device.acked_features)
        elif step == DRIVER_OK:
            self.status = new | (self.status & DEVICE_NEEDS_RESET)
            self.ever_driver_ok = True
            self._activate()
            return
        self.status = new | (self.status & DEVICE_NEEDS_RESET)

    def _activate(self) -> None:
        # A device that fails to start (ActivationError, a queue the driver broke, a bug)
        # gets DEVICE_NEEDS_RESET through contain(); the VM keeps running.
        self.device.contain(self.device.activate, self.memory, self.interrupt)
        if self.device.is_activated and self._on_activate is not None:
            self._on_activate(self.device)

    def activate_restored(self) -> None:
        """Activate the device of a restored transport (minivmm.transport.state): its
        registers say DRIVER_OK, the device has not started yet."""
        self._activate()

    def set_needs_reset(self, reason: str) -> None:
        """DEVICE_NEEDS_RESET (§2.1.2): with DRIVER_OK set, tell the driver at once."""
        with self.lock:
            self.log("%s: %s; DEVICE_NEEDS_RESET set", self.device.name, reason)
            self.status |= DEVICE_NEEDS_RESET
            if self.status & DRIVER_OK:
                self.interrupt.signal_config_change()

    def reset(self) -> None:
        was_active = self.device.is_activated
        if was_active and self._on_reset is not None:
            self._on_reset(self.device)
        with self.device.lock:
            self.device.contain(self.device.reset)
        self.status = 0
        self.interrupt.clear()
        self.device_features_sel = self.driver_features_sel = 0
        self.queue_sel = self.shm_sel = 0
