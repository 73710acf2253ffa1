"""virtio-vsock's transport reset (virtio 1.2 §5.10.6.6) and snapshot hooks
(minivmm.devices.vsock).

A restored VM's connections have no host sockets: the device closes them all and sends
the driver VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, as Firecracker does. Linux handles the
event later, in a work item (virtio_transport_event_work): it re-reads guest_cid, resets
every *connected* socket, then re-adds the event buffer and kicks the event queue. A
host program's connection accepted before that would be reset with the old ones, so
host programs' REQUESTs wait (:class:`minivmm.devices.vsock_host.HostSide`) until the
driver has added an event buffer past the used event, or ``reset_hold`` seconds have
passed (a driver that never re-posts). Host ports continue from the saved device's, so a
new connection never takes the (host port, guest port) of one the guest still has from
before the snapshot (a closing socket waits for the host's RST there).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Mapping
from typing import Final, TypeGuard

from ..ratelimit import RateLimitedLog
from ..virtio.errors import VirtQueueError
from ..virtio.queue import Queue
from .vsock_conn import U32_MASK
from .vsock_host import FIRST_LOCAL_PORT, Counters

#: struct virtio_vsock_event (§5.10.6.6)
EVENT: Final = struct.Struct("<I")
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: Final = 0
RXQ: Final = 0
TXQ: Final = 1
EVQ: Final = 2


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class ResetSide:
    """VsockDevice's transport reset, the hold on REQUESTs after it, and its state."""

    # VsockDevice (and VirtioDevice, HostSide) provide these
    guest_cid: int
    lock: threading.RLock
    queues: list[Queue]
    counters: Counters
    log: RateLimitedLog
    is_activated: bool
    _event_pending: bool
    _reset_mark: int | None  # the event queue's avail idx when the event was used
    _hold_until: float
    _next_port: int
    _held: object
    fail: Callable[..., None]  # (reason)
    signal_used: Callable[[Queue], None]
    _drop_all: Callable[[], None]
    _hold: Callable[[], None]
    _end_hold: Callable[[], None]

    def transport_reset(self) -> None:
        """Close every connection and tell the driver with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        (§5.10.6.6), e.g. after the VM was restored: the guest then drops its sockets and
        re-reads guest_cid. Sent when the driver has an event buffer (now or at its next
        event-queue kick). Host programs' REQUESTs then wait until the driver adds an
        event buffer after the used event (what Linux does once it has reset its
        connected sockets), or ``reset_hold`` seconds after the event was used (or after
        this call, while the driver has no buffer for it)."""
        with self.lock:
            self._drop_all()
            self.counters.transport_resets += 1
            if self.is_activated:
                self._event_pending = True
                self._reset_mark = None
                self._hold()
                try:
                    self._send_event()
                    self._check_hold()
                except VirtQueueError as e:
                    self.fail(f"queue {EVQ}: {e}")

    def quiesce(self) -> None:
        """Snapshot: the held receive chain, always the last popped, goes back."""
        with self.lock:
            if self._held is not None:
                self.queues[RXQ].next_avail -= 1
                self._held = None

    def save_state(self) -> dict[str, object]:
        # guest_cid is informative: the reset makes the guest re-read it
        return {"guest_cid": self.guest_cid, "next_port": self._next_port}

    def restore_state(self, state: Mapping[str, object]) -> None:
        """The guest drops its connections and re-reads guest_cid (Firecracker's way);
        host ports continue from the saved device's."""
        cid = state.get("guest_cid")
        port = state.get("next_port", FIRST_LOCAL_PORT)  # (absent: an older snapshot)
        if (set(state) - {"guest_cid", "next_port"} or not _is_int(cid)
                or not _is_int(port) or not FIRST_LOCAL_PORT <= port <= U32_MASK):
            raise ValueError(f"vsock: bad device state {dict(state)!r:.80}")
        self._next_port = port
        self.transport_reset()

    def _send_event(self) -> None:
        q = self.queues[EVQ]
        if not q.is_active():
            return
        used = False
        while self._event_pending and (chain := q.pop()) is not None:
            used = True
            with chain:
                if chain.writer.total < EVENT.size:
                    self.log("vsock: event chain %d has %d writable bytes (needs %d)",
                             chain.head, chain.writer.total, EVENT.size)
                    continue
                chain.writer.write(EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                self._event_pending = False
                # read before the driver can see the event: once it has handled it, it
                # adds a buffer past this index (and is asked to kick for that)
                self._reset_mark = q.avail_idx()
        if self._event_pending and q.enable_notification():
            self._send_event()  # a buffer arrived meanwhile
        elif used:
            if self._reset_mark is not None and self._hold_until:
                self._hold()  # the bound counts from when the driver was told
            self.signal_used(q)

    def _check_hold(self) -> bool:
        """End the hold on REQUESTs if the driver has added an event buffer since the
        reset event was used (else ask it to kick when it does); True if it ended."""
        mark = self._reset_mark
        if not self._hold_until or mark is None:
            return False
        if not self.queues[EVQ].kick_past(mark):
            return False
        self._reset_mark = None
        self._end_hold()
        return True
