"""``--check-driver``: where the guest's virtio drivers break a rule of virtio 1.2.

:class:`DriverChecker` is an :class:`~minivmm.transport.observe.Observer` of every
virtio-mmio transport and, through it, of the queue engine. Each rule is in
:data:`RULES` once, with the spec section that states it. The checker judges register
accesses against the state they meet (Status, QueueReady, the selectors); chain rules are
the queue engine's own checks (each VirtQueueError class is one rule, :data:`ENGINE_RULES`),
so nothing is checked in two places. Each violation is logged (the first few per rule and
device; all are counted), traced when ``--trace`` is on, and summarised at the end
(:meth:`DriverChecker.summary`).

What can't be observed: a driver consuming a used element twice only reads guest memory
(the used ring) and moves its own private index, so no device sees it. What a device does
see is the usual consequence, a descriptor chain made available again while the device
still holds it (rule ``chain-reused``), which the checker reports.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from .devices.base import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit
from .transport.mmio import (
    CONFIG_SPACE_OFFSET,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    INIT_BITS,
    REGISTERS,
    STATUS_TRANSITIONS,
    features_writable,
)
from .transport.observe import ObservedTransport, Observer
from .virtio import errors as qe
from .virtio.chain import DescriptorChain
from .virtio.mem import view_of
from .virtio.observe import descriptors
from .virtio.queue import Queue
from .virtio.ring import RING_OFFSET, VIRTQ_DESC_F_INDIRECT

__all__ = ["RULES", "DriverChecker", "Rule"]

log = logging.getLogger("minivmm.check")

#: violations logged as they happen, per rule and device (all are counted)
LOGGED_PER_RULE: Final = 3


class Rule(NamedTuple):
    section: str
    text: str


#: Every rule the checker knows: key -> (virtio 1.2 section, what the driver must do).
RULES: Final[dict[str, Rule]] = {
    "status-order": Rule("§2.1.1, §3.1.1", "Status is set one initialisation step at a "
                         "time and no bit is cleared except by a reset"),
    "status-after-failed": Rule("§2.1.1", "after setting FAILED the driver resets the "
                                "device before initialising it again"),
    "feature-not-offered": Rule("§2.2.1", "the driver accepts no feature the device did not "
                                "offer"),
    "features-out-of-step": Rule("§3.1.1", "features are written after DRIVER and before "
                                 "FEATURES_OK, never after it"),
    "features-without-version-1": Rule("§6.1", "the driver accepts VERSION_1 when it is "
                                       "offered"),
    "features-ok-not-reread": Rule("§3.1.1", "the driver re-reads Status after setting "
                                   "FEATURES_OK, before going on"),
    "features-select": Rule("§4.2.2.2", "DeviceFeaturesSel (DriverFeaturesSel) is written "
                            "before DeviceFeatures is read (DriverFeatures written)"),
    "config-write-before-features-ok": Rule("§3.1.1", "device configuration is not written "
                                            "before FEATURES_OK"),
    "config-generation": Rule("§2.5.1", "configuration read in several accesses is read "
                              "again when ConfigGeneration changed meanwhile"),
    "unknown-register": Rule("§4.2.2.2", "only the registers of the MMIO table are "
                             "accessed"),
    "read-only-register": Rule("§4.2.2.2", "read-only registers are not written"),
    "write-only-register": Rule("§4.2.2.2", "write-only registers are not read"),
    "register-width": Rule("§4.2.2.2", "control registers are accessed 32 bits wide"),
    "queue-register-while-ready": Rule("§4.2.2.2", "QueueNum and the queue addresses are "
                                       "not written while QueueReady is 1"),
    "interrupt-ack-bits": Rule("§4.2.2.2", "InterruptACK sets no undefined bits"),
    "queue-size": Rule("§2.7, §4.2.2.2", "QueueNum is a power of two no larger than "
                       "QueueNumMax"),
    "ring-alignment": Rule("§2.7.1", "the descriptor table, driver and device areas are "
                           "aligned to 16, 2 and 4 bytes"),
    "ring-outside-ram": Rule("§2.7", "the rings lie in guest RAM"),
    "notify-before-driver-ok": Rule("§3.1.1", "no available-buffer notification before "
                                    "DRIVER_OK"),
    "avail-idx": Rule("§2.7.6.1, §2.7.13.3", "the available idx only moves forward, by at "
                      "most the queue size"),
    "descriptor-index": Rule("§2.7.5, §2.7.6", "heads and next fields index the descriptor "
                             "table"),
    "chain-loop": Rule("§2.7.5.2, §2.7.5.3.1", "a chain has no loop and no more descriptors "
                       "than the queue size"),
    "chain-bytes": Rule("§2.7.5.2", "a chain holds at most 2^32 bytes"),
    "writable-before-readable": Rule("§2.7.4.2", "device-writable descriptors come after "
                                     "the device-readable ones"),
    "indirect-not-negotiated": Rule("§2.7.5.3.1", "INDIRECT is used only when "
                                    "VIRTIO_F_INDIRECT_DESC was negotiated"),
    "indirect-nested": Rule("§2.7.5.3.1", "an indirect table holds no INDIRECT descriptor"),
    "indirect-with-next": Rule("§2.7.5.3.1", "INDIRECT and NEXT are not set together"),
    "indirect-length": Rule("§2.7.5.3", "an indirect table is a whole number (> 0) of "
                            "16-byte descriptors"),
    "buffer-outside-ram": Rule("§2.7.5, §6.1", "buffers are guest RAM (minivmm serves no "
                               "other memory; QEMU takes I/O memory there)"),
    "chain-reused": Rule("§2.7.13.1", "a chain is made available from free descriptors, "
                         "not again while the device holds it"),
}

#: The queue engine's errors: each is one rule (the engine checks it, once).
ENGINE_RULES: Final[dict[type[qe.VirtQueueError], str]] = {
    qe.InvalidQueueSize: "queue-size",
    qe.MisalignedRing: "ring-alignment",
    qe.RingOutsideMemory: "ring-outside-ram",
    qe.InvalidAvailRingIndex: "avail-idx",
    qe.InvalidDescriptorIndex: "descriptor-index",
    qe.InvalidNextIndex: "descriptor-index",
    qe.DescriptorChainTooLong: "chain-loop",
    qe.NestedIndirect: "indirect-nested",
    qe.InvalidIndirectLength: "indirect-length",
    qe.IndirectWithNext: "indirect-with-next",
    qe.ChainLengthOverflow: "chain-bytes",
    qe.DescriptorOutOfMemory: "buffer-outside-ram",
    qe.ReadableAfterWritable: "writable-before-readable",
}

_QUEUE_CONFIG: Final = frozenset(
    reg.name for reg in REGISTERS.values()
    if reg.name == "QueueNum" or reg.name.startswith(("QueueDesc", "QueueDriver",
                                                        "QueueDevice")))
_U16 = struct.Struct("<H")


@dataclass
class _Device:
    """What the checker remembers of one driver's conversation with one device."""

    device_sel: bool = False  # DeviceFeaturesSel written since reset
    driver_sel: bool = False
    features_ok_unread: bool = False  # FEATURES_OK set, Status not read since
    config_reads: int = 0  # config reads since the last ConfigGeneration read
    config_generation: int = 0  # the device's generation at the first of them
    config_torn: bool = False  # the generation changed between two of them
    #: queue index -> heads popped and not yet used
    held: dict[int, set[int]] = field(default_factory=dict)


@dataclass
class _Count:
    count: int
    first: str  # "<device> at +<s> s: <detail>"


class DriverChecker(Observer):
    """Checks every observed transport's driver (see the module docstring). ``strict``:
    the run is to fail when anything was found (the front end decides how)."""

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self.start = time.monotonic()
        self.found: dict[str, _Count] = {}
        self.devices: dict[int, _Device] = {}
        self._logged: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        #: also told of each violation (the tracer, when --trace is on)
        self.listeners: list[Observer] = []

    @property
    def total(self) -> int:
        return sum(c.count for c in self.found.values())

    def violation(self, label: str, rule: str, detail: str) -> None:
        section = RULES[rule].section
        with self._lock:
            seen = self.found.get(rule)
            if seen is None:
                at = time.monotonic() - self.start
                self.found[rule] = _Count(1, f"{label} at +{at:.3f} s: {detail}")
            else:
                seen.count += 1
            n = self._logged.get((rule, label), 0)
            self._logged[(rule, label)] = n + 1
        if n < LOGGED_PER_RULE:
            log.warning("check-driver: %s: %s (%s %s)%s", label, detail, section, rule,
                        "; further ones are counted" if n + 1 == LOGGED_PER_RULE else "")
        for o in self.listeners:
            violation = getattr(o, "violation", None)
            if violation is not None:
                violation(label, rule, section, detail)

    def _dev(self, t: ObservedTransport) -> _Device:
        d = self.devices.get(id(t))
        if d is None:
            d = self.devices[id(t)] = _Device()
        return d

    # -- register accesses ---------------------------------------------------------------

    def _register(self, t: ObservedTransport, offset: int, size: int, writing: bool) -> str:
        """The register's name if the access is a well-formed one, else '' (reported)."""
        reg = REGISTERS.get(offset)
        verb = "write" if writing else "read"
        if reg is None:
            self.violation(t.label, "unknown-register",
                           f"{size}-byte {verb} at offset 0x{offset:03x}, which is no register")
        elif size != 4:
            self.violation(t.label, "register-width", f"{size}-byte {verb} of {reg.name}")
        elif writing and not reg.writable:
            self.violation(t.label, "read-only-register", f"{reg.name} written")
        elif not writing and not reg.readable:
            self.violation(t.label, "write-only-register", f"{reg.name} read")
        else:
            return reg.name
        return ""

    def _config_done(self, t: ObservedTransport, d: _Device) -> None:
        """A register access other than ConfigGeneration ends a run of config reads."""
        if d.config_torn:
            self.violation(t.label, "config-generation",
                           f"{d.config_reads} configuration reads spanned a ConfigGeneration "
                           "change and the driver did not read ConfigGeneration again")
        d.config_reads = 0
        d.config_torn = False

    def read(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        d = self._dev(t)
        if offset >= CONFIG_SPACE_OFFSET:
            generation = t.device.config_generation
            if d.config_reads == 0:
                d.config_generation = generation
            elif generation != d.config_generation:
                d.config_torn = True
            d.config_reads += 1
            return
        name = self._register(t, offset, size, writing=False)
        if name == "ConfigGeneration":
            d.config_reads = 0
            d.config_torn = False
            return
        self._config_done(t, d)
        if name == "Status":
            d.features_ok_unread = False
        elif name == "DeviceFeatures" and not d.device_sel:
            self.violation(t.label, "features-select",
                           "DeviceFeatures read before DeviceFeaturesSel was written")

    def write(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        d = self._dev(t)
        status = t.status
        if offset >= CONFIG_SPACE_OFFSET:
            if not status & FEATURES_OK:
                self.violation(t.label, "config-write-before-features-ok",
                               f"{size} bytes written at configuration offset "
                               f"{offset - CONFIG_SPACE_OFFSET} in Status 0x{status:x}")
            return
        self._config_done(t, d)
        name = self._register(t, offset, size, writing=True)
        if name == "Status":
            self._status(t, d, status, value)
        elif name == "DeviceFeaturesSel":
            d.device_sel = True
        elif name == "DriverFeaturesSel":
            d.driver_sel = True
        elif name == "DriverFeatures":
            self._driver_features(t, d, status, value)
        elif name in _QUEUE_CONFIG or name == "QueueReady":
            self._queue_register(t, d, name, value)
        elif name == "QueueNotify" and not status & DRIVER_OK:
            self.violation(t.label, "notify-before-driver-ok",
                           f"queue {value} notified in Status 0x{status:x}")
        elif name == "InterruptACK" and value & ~3:
            self.violation(t.label, "interrupt-ack-bits",
                           f"InterruptACK 0x{value:x} (defined bits: 0x3)")

    def _status(self, t: ObservedTransport, d: _Device, old: int, value: int) -> None:
        if value == 0:  # a reset: the driver starts over
            self.devices[id(t)] = _Device()
            return
        if old & FAILED:
            if not value & FAILED:
                self.violation(t.label, "status-after-failed",
                               f"Status 0x{value:x} written while FAILED is set, without a "
                               "reset")
            return
        if value & FAILED:
            return  # the driver may give up at any time
        new, have = value & INIT_BITS, old & INIT_BITS
        if new != have and new != STATUS_TRANSITIONS.get(have):
            self.violation(t.label, "status-order",
                           f"Status 0x{value:x} written in Status 0x{old:x}")
            return
        step = new & ~have
        if step == FEATURES_OK:
            dev = t.device
            v1 = bit(VIRTIO_F_VERSION_1)
            if dev.avail_features & v1 and not dev.acked_features & v1:
                self.violation(t.label, "features-without-version-1",
                               f"FEATURES_OK with features 0x{dev.acked_features:x} "
                               f"(offered 0x{dev.avail_features:x})")
            d.features_ok_unread = True
        elif step == DRIVER_OK and d.features_ok_unread:
            self.violation(t.label, "features-ok-not-reread",
                           "DRIVER_OK set without reading Status after FEATURES_OK")

    def _driver_features(self, t: ObservedTransport, d: _Device, status: int,
                         value: int) -> None:
        if not d.driver_sel:
            self.violation(t.label, "features-select",
                           "DriverFeatures written before DriverFeaturesSel")
        if not features_writable(status):
            self.violation(t.label, "features-out-of-step",
                           f"DriverFeatures 0x{value:x} written in Status 0x{status:x}")
        page = t.driver_features_sel
        extra = value & ~t.device.avail_features_by_page(page)
        if extra:
            from .trace import feature_names

            names = ", ".join(feature_names(t.device, extra, 32 * page if page < 2 else 0))
            self.violation(t.label, "feature-not-offered",
                           f"acked 0x{extra:x} ({names}) in features page {page}, which "
                           "the device did not offer")

    def _queue_register(self, t: ObservedTransport, d: _Device, name: str, value: int) -> None:
        qs = t.device.queues
        if t.queue_sel >= len(qs):
            return  # the transport logs a queue that does not exist
        q = qs[t.queue_sel]
        if name == "QueueReady":
            if value == 0:
                d.held.pop(q.index, None)
            elif value == 1 and not q.is_ready():
                error = q.config_error(t.memory)
                if error is not None:
                    self._engine_error(t, error)
            return
        if q.is_ready():
            self.violation(t.label, "queue-register-while-ready",
                           f"{name} written for queue {q.index}, which is ready")

    # -- the queue engine ----------------------------------------------------------------

    def _engine_error(self, t: ObservedTransport, error: qe.VirtQueueError) -> None:
        rule = ENGINE_RULES.get(type(error))
        if rule is not None:  # QueueNotReady is the device's doing, not the driver's
            self.violation(t.label, rule, str(error))

    def chain_rejected(self, t: ObservedTransport, queue: Queue,
                       error: qe.VirtQueueError) -> None:
        self._engine_error(t, error)

    def chain_popped(self, t: ObservedTransport, queue: Queue, chain: DescriptorChain) -> None:
        d = self._dev(t)
        head = chain.head
        held = d.held.setdefault(queue.index, set())
        if head in held or head in self._pending_heads(t, queue):
            self.violation(t.label, "chain-reused",
                           f"queue {queue.index}: head {head} made available again while "
                           "the device holds it")
        held.add(head)
        if not t.device.has_feature(VIRTIO_F_INDIRECT_DESC) and any(
                flags & VIRTQ_DESC_F_INDIRECT
                for (_, _, flags, _), _ in descriptors(queue, head, t.memory.translate)):
            self.violation(t.label, "indirect-not-negotiated",
                           f"queue {queue.index}: chain {head} uses an indirect table")

    @staticmethod
    def _pending_heads(t: ObservedTransport, queue: Queue) -> list[int]:
        """The heads the driver has made available that the device has not popped yet."""
        size = queue.size
        ring = view_of(t.memory.translate, queue.avail_ring_address, RING_OFFSET + 2 * size)
        if ring is None or not queue.is_active():
            return []
        pending = (queue.avail_idx() - queue.next_avail) & 0xFFFF
        return [_U16.unpack_from(ring, RING_OFFSET + 2 * ((queue.next_avail + i) % size))[0]
                for i in range(min(pending, size))]

    def chain_used(self, t: ObservedTransport, queue: Queue, head: int, written: int) -> None:
        held = self._dev(t).held.get(queue.index)
        if held is not None:
            held.discard(head)

    # -- the end -------------------------------------------------------------------------

    def summary(self, devices: int) -> list[str]:
        """The end-of-run report: one line per rule broken, with its count and first
        occurrence, or one line saying nothing was found."""
        if not self.found:
            return [f"check-driver: no violations of the virtio 1.2 driver rules "
                    f"({devices} device{'s' if devices != 1 else ''} watched)"]
        lines = [f"check-driver: {self.total} violation{'s' if self.total != 1 else ''} of "
                 f"{len(self.found)} rule{'s' if len(self.found) != 1 else ''}"]
        for rule, c in sorted(self.found.items(), key=lambda kv: kv[0]):
            r = RULES[rule]
            lines.append(f"check-driver: {r.section} {rule}: {c.count} (first: {c.first}); "
                         f"rule: {r.text}")
        return lines
