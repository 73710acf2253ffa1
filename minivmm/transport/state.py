"""Saving and restoring a virtio-mmio transport with its device (snapshots).

What a transport holds is saved as a JSON-ready dict: the device's type and name (a
restore checks it gets the same kind of device in the same slot), Status, the acked
features, the selectors, InterruptStatus, ConfigGeneration, and per queue its registers
(size, ready, ring addresses) and the device's positions in the rings (next_avail,
next_used; virtio 1.2 §2.7: the device's own counters, not in guest memory). The device
adds its own state through its hooks (minivmm.devices.base: ``quiesce``,
``save_state``, ``restore_state``).

Restoring sets the registers as the driver left them, then, if the driver had set
DRIVER_OK (and not DEVICE_NEEDS_RESET), activates the device as DRIVER_OK would (the
queues are checked against guest memory again; each queue is looked at once, so a kick
the guest made just before the snapshot is not lost). A snapshot is untrusted input:
every value is checked, and anything wrong is a ValueError with one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .mmio import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    INIT_BITS,
    STATUS_TRANSITIONS,
    MmioTransport,
)

_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1


def save_transport(t: MmioTransport) -> dict[str, object]:
    """Call with the VM paused (no register access or device work in progress)."""
    dev = t.device
    with dev.lock, t.lock:
        dev.quiesce()
        return {
            "device_type": dev.device_type,
            "name": dev.name,
            "status": t.status,
            "ever_driver_ok": t.ever_driver_ok,
            "selectors": [t.device_features_sel, t.driver_features_sel, t.queue_sel,
                          t.shm_sel],
            "acked_features": dev.acked_features,
            "interrupt_status": t.interrupt.status,
            "config_generation": dev.config_generation,
            "queues": [{"size": q.size, "ready": q.is_ready(), "desc": q.desc_table_address,
                        "avail": q.avail_ring_address, "used": q.used_ring_address,
                        "next_avail": q.next_avail, "next_used": q.next_used}
                       for q in dev.queues],
            "device": dev.save_state(),
        }


def _int(state: Mapping[str, Any], key: str, limit: int) -> int:
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ValueError(f"{key} {str(value)[:40]!r} is not an integer in 0..{limit:#x}")
    return value


def restore_transport(t: MmioTransport, state: Mapping[str, Any]) -> None:
    """Put a freshly built transport (and its device) in the saved state. ValueError
    (one line, naming the device) for state that does not fit."""
    dev = t.device
    try:
        _restore(t, state)
    except ValueError as e:
        raise ValueError(f"virtio-{dev.name}: {e}") from None


def _restore(t: MmioTransport, state: Mapping[str, Any]) -> None:
    dev = t.device
    if not isinstance(state, Mapping):
        raise ValueError("saved transport state is not an object")
    if state.get("device_type") != dev.device_type or state.get("name") != dev.name:
        raise ValueError(f"the snapshot has device {state.get('name')!r} (type "
                         f"{state.get('device_type')!r}) in this slot")
    status = _int(state, "status", 0xFF)
    if (status & ~(INIT_BITS | DEVICE_NEEDS_RESET | FAILED)
            or status & INIT_BITS not in (*STATUS_TRANSITIONS, INIT_BITS)):
        raise ValueError(f"status 0x{status:x} is not one a driver can reach (§3.1.1)")
    acked = _int(state, "acked_features", _U64)
    if acked & ~dev.avail_features:
        raise ValueError(f"acked features 0x{acked:x} that this device does not offer "
                         f"(0x{dev.avail_features:x})")
    selectors = state.get("selectors")
    if not isinstance(selectors, list) or len(selectors) != 4:
        raise ValueError("selectors are not a list of 4")
    sels = [_int({"selector": v}, "selector", _U32) for v in selectors]
    isr = _int(state, "interrupt_status", 3)
    generation = _int(state, "config_generation", _U32)
    queues = state.get("queues")
    if not isinstance(queues, list) or len(queues) != len(dev.queues):
        raise ValueError(f"the snapshot has {len(queues) if isinstance(queues, list) else 0}"
                         f" queues, this device {len(dev.queues)}")
    device_state = state.get("device", {})
    if not isinstance(device_state, Mapping):
        raise ValueError("saved device state is not an object")
    with dev.lock, t.lock:
        dev.ack_features_by_page(0, acked & _U32)
        dev.ack_features_by_page(1, acked >> 32)
        dev.set_acked_features(acked)
        if status & FEATURES_OK and not dev.features_ok():
            raise ValueError(f"FEATURES_OK with features 0x{acked:x}, which the device "
                             "refuses (VERSION_1 is required)")
        for q, qs in zip(dev.queues, queues, strict=True):
            if not isinstance(qs, Mapping) or not isinstance(qs.get("ready"), bool):
                raise ValueError(f"queue {q.index}: not a saved queue")
            size = _int(qs, "size", q.max_size)
            q.set_size(size)
            q.set_desc_table_address(low=_int(qs, "desc", _U64) & _U32,
                                     high=qs["desc"] >> 32)
            q.set_avail_ring_address(low=_int(qs, "avail", _U64) & _U32,
                                     high=qs["avail"] >> 32)
            q.set_used_ring_address(low=_int(qs, "used", _U64) & _U32,
                                    high=qs["used"] >> 32)
            q.next_avail = _int(qs, "next_avail", 0xFFFF)
            q.next_used = _int(qs, "next_used", 0xFFFF)
            if (q.next_avail - q.next_used) & 0xFFFF > size:
                raise ValueError(f"queue {q.index}: {(q.next_avail - q.next_used) & 0xFFFF}"
                                 f" chains in flight in a queue of size {size}")
            q.set_ready(qs["ready"])
        (t.device_features_sel, t.driver_features_sel, t.queue_sel, t.shm_sel) = sels
        dev.config_generation = generation
        t.ever_driver_ok = bool(state.get("ever_driver_ok"))
        t.status = status
        if status & DRIVER_OK and not status & DEVICE_NEEDS_RESET:
            t.activate_restored()
        t.interrupt.clear()
        if isr:
            t.interrupt.restore_status(isr)
        dev.restore_state(device_state)
