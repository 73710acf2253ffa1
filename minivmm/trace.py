"""``--trace virtio[=FILE]``: one JSON line per thing a virtio-mmio device and its driver did.

Every line is an object with ``t`` (seconds on the host's monotonic clock), ``dev`` (the
device and its window, ``rng@0xd0000000``) and ``kind``; the other fields depend on the
kind (README "Watching a device: --trace"):

    read, write           reg, value, names (decoded bits), page (feature words), size
    config-read/-write    offset, size, value (the device-specific configuration space)
    status                from, to (bit names), written: the Status register changed
    reset                 the driver wrote Status 0
    features              offered, acked (names), accepted: at the driver's FEATURES_OK
    queue                 queue, size, desc, driver, device: a queue made ready
    notify                queue: an available-buffer notification (QueueNotify)
    chain                 queue, head, desc: [{addr, len, flags, next[, table]}]: popped
    chain-error           queue, error, message: a chain the engine rejected
    used                  queue, head, len: a used element published
    interrupt             bits, status: InterruptStatus bits raised and the irqfd signalled
    interrupt-ack         bits: the driver's InterruptACK
    needs-reset           reason: DEVICE_NEEDS_RESET set
    violation             rule, section, detail (with --check-driver)

The tracer is a :class:`~minivmm.transport.observe.Observer`; ``minivmm trace show``
(minivmm.trace_show) prints a trace for people.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, Any, Final

from .config import parse_trace_spec
from .devices.base import VirtioDevice
from .errors import UsageError
from .transport.mmio import CONFIG_SPACE_OFFSET, REGISTERS, features_writable
from .transport.observe import ObservedTransport, Observer
from .virtio.chain import DescriptorChain
from .virtio.errors import VirtQueueError
from .virtio.observe import descriptors
from .virtio.queue import Queue

__all__ = ["Tracer", "feature_names", "open_trace", "status_names"]

STATUS_BITS: Final = ((1, "ACKNOWLEDGE"), (2, "DRIVER"), (4, "DRIVER_OK"), (8, "FEATURES_OK"),
                      (64, "DEVICE_NEEDS_RESET"), (128, "FAILED"))
INTERRUPT_BITS: Final = ((1, "VRING"), (2, "CONFIG"))
DESC_FLAGS: Final = ((1, "NEXT"), (2, "WRITE"), (4, "INDIRECT"))
#: the device-independent feature bits (virtio 1.2 §6; 24 and 27 are legacy-only)
COMMON_FEATURES: Final = {
    24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "INDIRECT_DESC", 29: "EVENT_IDX",
    32: "VERSION_1", 33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER",
    36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET"}
_DEVICE_FEATURE = re.compile(r"^VIRTIO_[A-Z0-9]+_F_([A-Z0-9_]+)$")
_STATUS = 0x070
_feature_tables: dict[type[VirtioDevice], dict[int, str]] = {}


def _bits(value: int, table: Iterable[tuple[int, str]]) -> list[str]:
    names = [name for bit, name in table if value & bit]
    rest = value & ~sum(bit for bit, _ in table)
    return names + ([f"0x{rest:x}"] if rest else [])


def status_names(value: int) -> list[str]:
    """Device status bits by name (§2.1), e.g. ['ACKNOWLEDGE', 'DRIVER']."""
    return _bits(value, STATUS_BITS)


def feature_table(device: VirtioDevice) -> dict[int, str]:
    """Feature bit -> name for ``device``: the common bits of §6, plus the constants named
    ``VIRTIO_<DEV>_F_<NAME>`` (value: the bit number) in its class's module, e.g.
    VIRTIO_BLK_F_RO -> 'RO'. Device-specific bits are those below 24 and above 40."""
    cls = type(device)
    table = _feature_tables.get(cls)
    if table is None:
        table = dict(COMMON_FEATURES)
        module = sys.modules.get(cls.__module__)
        for name, value in vars(module).items() if module else ():
            m = _DEVICE_FEATURE.match(name)
            if m and isinstance(value, int) and not isinstance(value, bool) and (
                    0 <= value < 24 or 41 <= value < 64):
                table.setdefault(value, m.group(1))
        _feature_tables[cls] = table
    return table


def feature_names(device: VirtioDevice, value: int, first_bit: int = 0) -> list[str]:
    """The feature bits set in ``value`` (bit 0 of it being bit ``first_bit``) by name;
    an unnamed bit as 'bit N'."""
    table = feature_table(device)
    out = []
    bit = first_bit
    while value:
        if value & 1:
            out.append(table.get(bit, f"bit {bit}"))
        value >>= 1
        bit += 1
    return out


class Tracer(Observer):
    """Writes one JSON line per event to ``out`` (a text file; see the module docstring)."""

    def __init__(self, out: IO[str], *, close: bool = False) -> None:
        self.out = out
        self._close = close
        self._lock = threading.Lock()
        self._newline = "\r\n" if out.isatty() else "\n"  # a raw-mode terminal needs \r

    def emit(self, t: ObservedTransport | str, kind: str, **fields: Any) -> None:
        event = {"t": round(time.monotonic(), 6),
                 "dev": t if isinstance(t, str) else t.label, "kind": kind, **fields}
        line = json.dumps(event, separators=(",", ":")) + self._newline
        with self._lock:
            try:
                self.out.write(line)
            except (OSError, ValueError):
                pass  # a closed or broken trace file ends the trace, not the VM

    # -- registers -----------------------------------------------------------------------

    def _register(self, t: ObservedTransport, kind: str, offset: int, size: int,
                  value: int) -> None:
        reg = REGISTERS.get(offset)
        fields: dict[str, Any] = {"reg": reg.name if reg else f"0x{offset:03x}",
                                  "value": value}
        if size != 4:
            fields["size"] = size
        name = fields["reg"]
        if name == "Status":
            fields["names"] = status_names(value)
        elif name == "InterruptStatus":
            fields["names"] = _bits(value, INTERRUPT_BITS)
        elif name in ("DeviceFeatures", "DriverFeatures"):
            page = t.device_features_sel if name == "DeviceFeatures" else t.driver_features_sel
            fields["page"] = page
            if 0 <= page < 2:
                fields["names"] = feature_names(t.device, value, 32 * page)
        self.emit(t, kind, **fields)

    def read(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_SPACE_OFFSET:
            self.emit(t, "config-read", offset=offset - CONFIG_SPACE_OFFSET, size=size,
                      value=value)
        else:
            self._register(t, "read", offset, size, value)

    def write(self, t: ObservedTransport, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_SPACE_OFFSET:
            self.emit(t, "config-write", offset=offset - CONFIG_SPACE_OFFSET, size=size,
                      value=value)
        elif offset == 0x050 and size == 4:
            self.emit(t, "notify", queue=value)
        elif offset == 0x064 and size == 4:
            self.emit(t, "interrupt-ack", bits=_bits(value, INTERRUPT_BITS))
        elif offset == _STATUS and size == 4 and value == 0:
            self.emit(t, "reset")
        else:
            self._register(t, "write", offset, size, value)

    def written(self, t: ObservedTransport, offset: int, size: int, value: int,
                old_status: int) -> None:
        if size != 4:
            return
        if offset == _STATUS:
            new = t.status
            if value & 8 and features_writable(old_status):  # the FEATURES_OK step
                d = t.device
                self.emit(t, "features", offered=feature_names(d, d.avail_features),
                          acked=feature_names(d, d.acked_features),
                          accepted=bool(new & 8))
            if new != old_status:
                self.emit(t, "status", written=status_names(value),
                          **{"from": status_names(old_status), "to": status_names(new)})
        elif offset == 0x044 and value == 1:
            qs = t.device.queues
            if t.queue_sel < len(qs) and qs[t.queue_sel].is_ready():
                q = qs[t.queue_sel]
                self.emit(t, "queue", queue=q.index, size=q.size,
                          desc=f"0x{q.desc_table_address:x}",
                          driver=f"0x{q.avail_ring_address:x}",
                          device=f"0x{q.used_ring_address:x}")

    # -- device and queue events ---------------------------------------------------------

    def needs_reset(self, t: ObservedTransport, reason: str) -> None:
        self.emit(t, "needs-reset", reason=reason)

    def interrupt(self, t: ObservedTransport, bits: int) -> None:
        self.emit(t, "interrupt", bits=_bits(bits, INTERRUPT_BITS),
                  status=_bits(t.interrupt.status | bits, INTERRUPT_BITS))

    def chain_popped(self, t: ObservedTransport, queue: Queue, chain: DescriptorChain) -> None:
        desc = []
        for (addr, length, flags, nxt), inside in descriptors(queue, chain.head,
                                                               t.memory.translate):
            d: dict[str, Any] = {"addr": f"0x{addr:x}", "len": length,
                                 "flags": _bits(flags, DESC_FLAGS), "next": nxt}
            if inside:
                d["table"] = "indirect"
            desc.append(d)
        self.emit(t, "chain", queue=queue.index, head=chain.head, desc=desc)

    def chain_rejected(self, t: ObservedTransport, queue: Queue, error: VirtQueueError) -> None:
        self.emit(t, "chain-error", queue=queue.index, error=type(error).__name__,
                  message=str(error))

    def chain_used(self, t: ObservedTransport, queue: Queue, head: int, written: int) -> None:
        self.emit(t, "used", queue=queue.index, head=head, len=written)

    def violation(self, label: str, rule: str, section: str, detail: str) -> None:
        self.emit(label, "violation", rule=rule, section=section, detail=detail)

    def close(self) -> None:
        with self._lock:
            try:
                self.out.flush()
                if self._close:
                    self.out.close()
            except (OSError, ValueError):
                pass


def open_trace(spec: str) -> Tracer:
    """The tracer ``--trace SPEC`` asks for: JSON lines on stderr, or in FILE (replaced)."""
    path = parse_trace_spec(spec)
    if path is None:
        return Tracer(sys.stderr)
    try:
        out = open(path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by close)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the trace ({e.strerror})",
                         field="trace") from None
    return Tracer(out, close=True)
