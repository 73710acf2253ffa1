"""virtio-net (virtio 1.2 §5.1) backed by a Linux TAP interface (see minivmm.devices.tap).

One queue pair: receiveq1 (0) carries frames from the tap to the guest, transmitq1 (1)
frames from the guest to the tap. No control queue, so no multiqueue, filtering or
guest-set MAC. Every frame carries the 12-byte ``virtio_net_hdr_v1`` (§5.1.6), which the
tap reads and writes itself (IFF_VNET_HDR): the device never parses a packet.

Offered: VERSION_1, MAC, STATUS, MRG_RXBUF, CSUM/GUEST_CSUM, HOST_/GUEST_ TSO4, TSO6,
ECN and (when the kernel still accepts TUN_F_UFO) UFO, EVENT_IDX and INDIRECT_DESC. The
GUEST_* offloads the driver acks become the tap's TUNSETOFFLOAD at DRIVER_OK; the HOST_*
ones need nothing, the kernel finishes (segments, checksums) what the guest sends.

Receive, zero copy: ``os.readv`` from the tap straight into the guest's buffers. One read
returns one frame, whose size is unknown beforehand, so the device first holds enough
buffers for the largest frame: one chain without MRG_RXBUF; with it, chains until
:data:`MAX_RX_FRAME` bytes or the ring is empty, their views in one iovec. The frame
fills ``k`` of them (``num_buffers`` = k, §5.1.6.4); the others stay held (the "stash",
with their iovec) for the next frame: the ring has no way to give a chain back while
the driver runs. A reset drops the stash with the queue; a snapshot (:meth:`quiesce`)
gives it back by rewinding the queue's next_avail, so the restored device (and this one,
if it runs on) pops the same buffers again. A frame larger than the held buffers is dropped and
counted (``rx_dropped``). When the guest has no receive buffer the device stops watching
the tap (``fd_watch``, no reading and dropping, no spinning) and re-enables
notifications; the next kick of receiveq1 resumes it.

Transmit: each chain's readable views go to the tap with one ``os.writev``, header
included. A chain with a writable buffer, shorter than the header or longer than
:data:`MAX_TX_FRAME` is dropped (``tx_dropped``, a rate-limited log line); a frame the
kernel refuses (a bad header) is counted in ``tx_errors``. Both directions process
everything available, then interrupt once.

With the C accelerator (minivmm.devices.net_accel, built with cffi when it can be) the
per-frame loops of both directions run in C for whole batches; everything it does not
accept (a chain the engine would reject, one the device drops or logs) comes back to
the Python path above, which stays complete. Its receive path holds no stash.

The tap going away (its interface deleted: reads and writes fail with EBADFD) turns the
link down: STATUS reads 0 after a configuration-change interrupt, transmitted frames
are dropped, and the VM keeps running. So does a tap that can't be read any more:
:data:`RX_FAILURES_IN_A_ROW` reads that fail (another errno than EAGAIN) or return no
frame (0 bytes: a socket standing in for the tap whose peer closed), with no frame or
empty tap in between; each is counted (``rx_errors``). A tap that stays readable would
otherwise wake the device thread for ever.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from typing import Final

from ..config import check_mac
from ..virtio.chain import DescriptorChain
from ..virtio.errors import VirtQueueError
from ..virtio.queue import Queue
from . import net_accel
from . import tap as taplib
from .base import (
    IOV_MAX,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_ID_NET,
    ActivationError,
    VirtioDevice,
    bit,
)

# Feature bits (§5.1.3)
VIRTIO_NET_F_CSUM: Final = 0
VIRTIO_NET_F_GUEST_CSUM: Final = 1
VIRTIO_NET_F_MAC: Final = 5
VIRTIO_NET_F_GUEST_TSO4: Final = 7
VIRTIO_NET_F_GUEST_TSO6: Final = 8
VIRTIO_NET_F_GUEST_ECN: Final = 9
VIRTIO_NET_F_GUEST_UFO: Final = 10
VIRTIO_NET_F_HOST_TSO4: Final = 11
VIRTIO_NET_F_HOST_TSO6: Final = 12
VIRTIO_NET_F_HOST_ECN: Final = 13
VIRTIO_NET_F_HOST_UFO: Final = 14
VIRTIO_NET_F_MRG_RXBUF: Final = 15
VIRTIO_NET_F_STATUS: Final = 16

VIRTIO_NET_S_LINK_UP: Final = 1
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1

#: struct virtio_net_config (§5.1.4) up to max_virtqueue_pairs: mac, status, pairs
NET_CONFIG: Final = struct.Struct("<6sHH")
#: sizeof(struct virtio_net_hdr_v1) (§5.1.6): flags, gso_type, hdr_len, gso_size,
#: csum_start, csum_offset, num_buffers
HDR_SIZE: Final = 12
NUM_BUFFERS_OFFSET: Final = 10
_U16: Final = struct.Struct("<H")
#: the largest frame: 65535 bytes of IP packet, a 14-byte Ethernet header, plus the header
MAX_RX_FRAME: Final = 65550 + HDR_SIZE
MAX_TX_FRAME: Final = 65535 + HDR_SIZE
QUEUE_SIZE: Final = 256
#: frames moved per tap wake-up before the device thread serves the other devices
RX_BATCH: Final = QUEUE_SIZE
#: failed reads of the tap in a row that make the failure persistent: link down
RX_FAILURES_IN_A_ROW: Final = 32
RXQ: Final = 0
TXQ: Final = 1

#: feature a driver may ack -> what it needs first (§5.1.3.1)
_REQUIRES: Final = {
    VIRTIO_NET_F_GUEST_TSO4: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_TSO6: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_UFO: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_ECN: (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
    VIRTIO_NET_F_HOST_TSO4: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_TSO6: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_UFO: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_ECN: (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
}
#: guest receive feature -> TUNSETOFFLOAD bit
_TUN_OFFLOAD: Final = {
    VIRTIO_NET_F_GUEST_CSUM: taplib.TUN_F_CSUM,
    VIRTIO_NET_F_GUEST_TSO4: taplib.TUN_F_TSO4,
    VIRTIO_NET_F_GUEST_TSO6: taplib.TUN_F_TSO6,
    VIRTIO_NET_F_GUEST_ECN: taplib.TUN_F_TSO_ECN,
    VIRTIO_NET_F_GUEST_UFO: taplib.TUN_F_UFO,
}


def default_mac(tap: str) -> bytes:
    """A stable locally administered unicast address derived from the tap's name."""
    digest = hashlib.sha256(b"minivmm-net:" + tap.encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def _poke(views: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the bytes ``views`` cover (a header split across
    tiny descriptors: the slow path)."""
    for v in views:
        if offset < len(v):
            take = min(len(v) - offset, len(data))
            v[offset : offset + take] = data[:take]
            data = data[take:]
            offset = 0
            if not data:
                return
        else:
            offset -= len(v)


class NetDevice(VirtioDevice):
    device_type = VIRTIO_ID_NET
    name = "net"
    kernel_option = "CONFIG_VIRTIO_NET"

    def __init__(self, tap: str, *, mac: bytes | None = None, accelerate: bool = True) -> None:
        if mac is not None:
            check_mac(mac)
        self.tap_name = tap
        self.mac = default_mac(tap) if mac is None else bytes(mac)
        self._tap, self.tap_created = taplib.open_tap(tap)
        try:
            offloads = taplib.supported_offloads(self._tap)
        except BaseException:
            os.close(self._tap)
            raise
        features = bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC) | sum(
            bit(f) for f in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF))
        if offloads & taplib.TUN_F_CSUM:
            features |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM)
        if offloads & taplib.TUN_F_TSO4:
            features |= sum(bit(f) for f in (
                VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN))
        if offloads & taplib.TUN_F_UFO:
            features |= bit(VIRTIO_NET_F_GUEST_UFO) | bit(VIRTIO_NET_F_HOST_UFO)
        super().__init__(features, [QUEUE_SIZE, QUEUE_SIZE])
        self.link_up = True
        self._config = NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)
        self._watching = False
        self._rx_need = 1  # bytes of buffers to hold before a read (at DRIVER_OK)
        self._fix_flags = False  # clear the header's flags (GUEST_CSUM not acked)
        # held receive chains: (chain, number of views, bytes, its avail ring position),
        # and all their views
        self._stash: list[tuple[DescriptorChain, int, int, int]] = []
        # ... followed by one spare byte of our own: a read that reaches it was truncated
        self._spare = memoryview(bytearray(1))
        self._iov: list[memoryview] = [self._spare]
        self._stash_bytes = 0
        #: counters (for --stats and tests)
        self.rx_packets = self.rx_bytes = self.rx_dropped = self.rx_bad_chains = 0
        self.rx_pauses = self.rx_errors = 0
        self._rx_failed = 0  # reads that failed since the last frame or EAGAIN
        self.tx_packets = self.tx_bytes = self.tx_dropped = self.tx_errors = 0
        #: the C accelerator (minivmm.devices.net_accel), None for the Python path only
        self._accel = net_accel.load() if accelerate else None
        self._fast: list[net_accel.Rings | None] = [None, None]  # per queue, while active

    def stats(self) -> dict[str, int]:
        return {"rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                "rx_dropped": self.rx_dropped, "rx_bad_chains": self.rx_bad_chains,
                "rx_pauses": self.rx_pauses, "rx_errors": self.rx_errors,
                "tx_packets": self.tx_packets,
                "tx_bytes": self.tx_bytes, "tx_dropped": self.tx_dropped,
                "tx_errors": self.tx_errors, "accelerated": int(self.accelerated)}

    @property
    def tap_fd(self) -> int:
        return self._tap

    @property
    def rx_held(self) -> int:
        """Receive chains popped and held for the next frames (the stash)."""
        return len(self._stash)

    @property
    def accelerated(self) -> bool:
        """Whether the C accelerator serves the queues (from activation to reset)."""
        return self._fast[0] is not None

    def config(self) -> bytes:
        return self._config

    def features_ok(self) -> bool:
        if not super().features_ok():
            return False
        for feature, needs in _REQUIRES.items():
            if self.has_feature(feature) and not any(self.has_feature(n) for n in needs):
                self.log("net: driver acked feature %d without %s (§5.1.3.1)", feature,
                         " or ".join(map(str, needs)))
                return False
        return True

    # -- life cycle -------------------------------------------------------------------

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self._tap, self.on_tap_readable)] if self.link_up else []

    def on_activate(self) -> None:
        if self.fd_watch is None:
            raise ActivationError("net: fd_watch is unset (the VMM must provide it)")
        offload = 0
        for feature, flag in _TUN_OFFLOAD.items():
            if self.has_feature(feature):
                offload |= flag
        self._rx_need = MAX_RX_FRAME if self.has_feature(VIRTIO_NET_F_MRG_RXBUF) else 1
        self._fix_flags = not self.has_feature(VIRTIO_NET_F_GUEST_CSUM)
        if self.link_up:
            try:
                taplib.set_offload(self._tap, offload)
            except OSError as e:
                if e.errno != taplib.EBADFD:
                    raise ActivationError(f"net: TUNSETOFFLOAD 0x{offload:x}: {e}") from e
                self._link_lost(f"went away ({e.strerror})")
        self._watching = self.link_up  # the VMM registers extra_fds() now
        regions = getattr(self.memory, "regions", None)
        if self._accel is not None and regions and all(q.accelerable for q in self.queues):
            self._fast = [net_accel.Rings(self._accel, regions, IOV_MAX) for _ in range(2)]

    def on_reset(self) -> None:
        self._release_fast()
        self._set_watching(False)
        self._stash.clear()  # their queue is being reset: nothing to give back to
        del self._iov[:-1]
        self._stash_bytes = 0
        if self.link_up:
            try:
                taplib.set_offload(self._tap, 0)
            except OSError:
                pass

    # -- snapshots (see VirtioDevice.quiesce) -------------------------------------------

    def quiesce(self) -> None:
        """Give the held receive chains back to the avail ring: they were popped in ring
        order, so next_avail goes back to the first one's position. If the guest's
        unusable chains (returned at once) sit among them, rewinding would pop those a
        second time: then the held chains are returned used with no data instead (a
        driver drops an empty receive buffer, §5.1.6.4, and posts it again)."""
        with self.lock:
            stash = self._stash
            if not stash:
                return
            q = self.queues[RXQ]
            first = stash[0][3]
            if all(entry[3] == (first + i) & 0xFFFF for i, entry in enumerate(stash)) and (
                    (first + len(stash)) & 0xFFFF == q.next_avail):
                q.next_avail = first
            else:
                self.log("net: %d held receive chains are not the last popped; returned "
                         "empty for the snapshot", len(stash))
                for chain, *_ in stash:
                    chain.complete(0)
                self.signal_used(q)
            stash.clear()
            del self._iov[:-1]
            self._stash_bytes = 0

    def save_state(self) -> dict[str, object]:
        """The MAC the guest knows (a restore may use another tap, whose default MAC
        differs)."""
        return {"mac": self.mac.hex()}

    def restore_state(self, state: Mapping[str, object]) -> None:
        extra = set(state) - {"mac"}
        if extra:
            raise ValueError(f"net: unknown device state {', '.join(sorted(extra))}")
        mac = state.get("mac")
        if mac is None:
            return
        try:
            value = bytes.fromhex(mac) if isinstance(mac, str) else b""
        except ValueError:
            value = b""
        if len(value) != 6:
            raise ValueError(f"net: the snapshot's MAC {mac!r} is not 6 bytes of hex")
        self.mac = value
        self._config = NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP if self.link_up
                                       else 0, 1)

    def close(self) -> None:
        super().close()
        if self._tap >= 0:
            os.close(self._tap)
            self._tap = -1

    def _set_watching(self, on: bool) -> None:
        if on == self._watching:
            return
        self._watching = on
        if self.fd_watch is not None:
            self.fd_watch(self._tap, self.on_tap_readable if on else None)

    def _release_fast(self) -> None:
        for f in self._fast:
            if f is not None:
                f.release()
        self._fast = [None, None]

    def _link_lost(self, why: str) -> None:
        """The tap's interface is gone or unusable: link down (§5.1.4), the VM carries
        on. ``why``: what the tap did."""
        self.log("net: tap %s %s: link down", self.tap_name, why)
        self.link_up = False
        self._set_watching(False)
        self._config = NET_CONFIG.pack(self.mac, 0, 1)
        if self.is_activated:
            self.config_changed()

    # -- queues -----------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if index == TXQ:
            self._transmit()
            if self.link_up:
                self._receive_more()
        elif self.link_up:
            if not self._watching:
                self.queues[RXQ].disable_notification()
                self._set_watching(True)  # the driver posted buffers: resume
            self._receive()

    def on_tap_readable(self) -> None:
        """The tap has frames (called on the device thread)."""
        with self.lock:
            if not self.is_activated or not self._watching:
                return
            try:
                self._receive()
            except VirtQueueError as e:
                self._set_watching(False)  # the tap stays readable: don't spin on it
                self.fail(str(e))

    def _receive_more(self) -> None:
        """After a transmit batch, read what the tap has already (the host's answers to
        what was just sent: a ping's reply, TCP acks) rather than after another trip
        through epoll: one wake-up serves both directions. Only with receive buffers at
        hand: a frame that finds none is left to the usual path (the pause)."""
        q = self.queues[RXQ]
        if (self._watching and q.is_active() and q.broken is None
                and (self._stash or q.avail_idx() != q.next_avail)):
            self._receive()

    def _take_buffers(self) -> None:
        """Hold chains until they cover ``_rx_need`` bytes or the ring is empty."""
        q = self.queues[RXQ]
        stash = self._stash
        while self._stash_bytes < self._rx_need:
            position = q.next_avail
            chain = q.pop()
            if chain is None:
                # Kicks are only wanted once every held buffer is used (then the device
                # stops watching the tap); until then the next frame pops new buffers.
                if not stash and q.enable_notification():
                    continue  # buffers arrived meanwhile
                return
            w = chain.writer
            if chain.reader.total or w.total < HDR_SIZE:
                self.rx_bad_chains += 1
                self.log("net: receive chain %d: %d readable bytes and %d writable (needs "
                         "only writable, at least %d); returned unused", chain.head,
                         chain.reader.total, w.total, HDR_SIZE)
                chain.complete(0)
                continue
            views = w.views()
            self._iov[-1:-1] = views
            stash.append((chain, len(views), w.total, position))
            self._stash_bytes += w.total

    def _receive(self) -> None:
        q = self.queues[RXQ]
        if not q.is_active():  # the driver never set receiveq1 up
            self._set_watching(False)
            return
        tap = self._tap
        readv = os.readv
        stash = self._stash
        iov = self._iov
        fast = self._fast[RXQ]
        delivered = 0
        budget = RX_BATCH  # frames read, delivered or dropped
        try:
            while budget > 0:
                if fast is not None and not stash:
                    status, frames = self._fast_receive(fast, q, budget)
                    delivered += frames
                    budget -= frames
                    if status == net_accel.AGAIN:
                        self._rx_failed = 0
                        return
                    if status == net_accel.LIMIT:
                        return
                    if status == net_accel.IOERR or (status == net_accel.SHORT
                                                     and fast.out.bytes == 0):
                        budget -= 1
                        err = fast.out.err if status == net_accel.IOERR else 0
                        if not self._read_failed(err):
                            return
                        continue
                    if status == net_accel.SHORT:
                        budget -= 1
                        self._rx_too_big(fast.out.room)
                        continue
                    # EMPTY or DEFER: the Python step below, for one frame
                if self._stash_bytes < self._rx_need:
                    self._take_buffers()
                    if not stash:
                        self.rx_pauses += 1
                        self._set_watching(False)  # until the driver kicks receiveq1
                        if not taplib.is_attached(tap):  # an error woke us, not a frame
                            self._link_lost("went away")
                        return
                room = self._stash_bytes
                vec = iov
                if len(iov) > IOV_MAX:
                    vec = [*iov[: IOV_MAX - 1], self._spare]
                    room = sum(map(len, vec)) - 1
                try:
                    n = readv(tap, vec)
                except BlockingIOError:
                    self._rx_failed = 0
                    return
                except OSError as e:
                    n, err = 0, e.errno or 0
                else:
                    err = 0
                budget -= 1
                if n == 0:  # an error, or no frame at all
                    if not self._read_failed(err):
                        return
                    continue
                if n > room or n < HDR_SIZE:
                    self._rx_too_big(room)
                    continue
                self._deliver(n)
                delivered += 1
        finally:
            if delivered:
                self.signal_used(q)

    def _read_failed(self, err: int) -> bool:
        """A read of the tap failed with errno ``err`` (0: it returned no frame): False
        if the link went down with it (EBADFD, or a failure that persists)."""
        what = os.strerror(err) if err else "no frame (0 bytes)"
        if err == taplib.EBADFD:
            self._link_lost(f"went away ({what})")
            return False
        self.rx_errors += 1
        if err:
            self.rx_dropped += 1  # EFAULT: the frame did not fit and is gone
        self._rx_failed += 1
        if self._rx_failed >= RX_FAILURES_IN_A_ROW:
            self._link_lost(f"failed {self._rx_failed} reads in a row ({what})")
            return False
        self.log("net: reading tap %s failed: %s", self.tap_name, what)
        return True

    def _rx_too_big(self, room: int) -> None:
        self.rx_dropped += 1  # truncated: the buffers stay for the next one
        self.log("net: a frame from tap %s did not fit the %d bytes of receive "
                 "buffers; dropped", self.tap_name, room)

    def _fast_receive(self, fast: net_accel.Rings, q: Queue, budget: int) -> tuple[int, int]:
        """Frames from the tap into receive chains, in C: (status, frames delivered)."""
        status = fast.receive(q, self._tap, budget, self._fix_flags, self._rx_need)
        frames: int = fast.out.frames
        if frames:
            self._rx_failed = 0
        self.rx_packets += frames
        self.rx_bytes += fast.out.payload
        return status, frames

    def _deliver(self, n: int) -> None:
        """The frame of ``n`` bytes is in the first held chains: write the header's
        num_buffers (and clear flags without GUEST_CSUM), then return those chains."""
        stash = self._stash
        k = nviews = 0
        left = n
        while left > 0:
            _, cviews, cbytes, _ = stash[k]
            k += 1
            nviews += cviews
            left -= cbytes
        iov = self._iov
        head = iov[0]
        if len(head) >= HDR_SIZE:
            _U16.pack_into(head, NUM_BUFFERS_OFFSET, k)
            if self._fix_flags:
                head[0] = 0
        else:
            _poke(iov, NUM_BUFFERS_OFFSET, _U16.pack(k))
            if self._fix_flags:
                _poke(iov, 0, b"\0")
        left = n
        for i in range(k):
            chain, _, cbytes, _ = stash[i]
            chain.complete(cbytes if left > cbytes else left)
            left -= cbytes
            self._stash_bytes -= cbytes
        del stash[:k]
        del iov[:nviews]
        self._rx_failed = 0
        self.rx_packets += 1
        self.rx_bytes += n - HDR_SIZE

    def _transmit(self) -> None:
        q = self.queues[TXQ]
        fast = self._fast[TXQ]
        served = 0
        try:
            if fast is None:
                for chain in self.available(q):
                    served += 1
                    self._send(chain)
                return
            q.disable_notification()
            while True:
                if not self.link_up:
                    status = net_accel.DEFER  # the Python path drops what is left
                else:
                    status, frames = self._fast_transmit(fast, q)
                    served += frames
                if status == net_accel.DEFER:
                    deferred = q.pop()  # a bad chain raises here, as without the accelerator
                    if deferred is not None:
                        served += 1
                        self._send(deferred)
                        continue
                elif status == net_accel.IOERR:
                    served += 1
                    err = fast.out.err
                    self._send_failed(OSError(err, os.strerror(err)), fast.out.bytes)
                    continue
                elif status == net_accel.LIMIT:
                    continue
                if not q.enable_notification():
                    return
        finally:
            if served:
                self.signal_used(q)

    def _fast_transmit(self, fast: net_accel.Rings, q: Queue) -> tuple[int, int]:
        """Every available chain to the tap, in C: (status, frames sent)."""
        status = fast.transmit(q, self._tap, MAX_TX_FRAME)
        frames: int = fast.out.frames
        self.tx_packets += frames
        self.tx_bytes += fast.out.payload
        return status, frames

    def _send(self, chain: DescriptorChain) -> None:
        """One transmit chain to the tap (the Python path), returned to the used ring."""
        with chain:
            r = chain.reader
            size = r.total
            if chain.writer.total or not HDR_SIZE <= size <= MAX_TX_FRAME:
                self.tx_dropped += 1
                self.log("net: transmit chain %d: %d readable bytes (needs %d..%d) and "
                         "%d writable (needs 0); dropped", chain.head, size, HDR_SIZE,
                         MAX_TX_FRAME, chain.writer.total)
                return
            if not self.link_up:
                self.tx_dropped += 1
                return
            views = r.views()
            if len(views) > IOV_MAX:  # one writev is one frame: it can't be split
                self.tx_dropped += 1
                self.log("net: transmit chain %d has %d buffers, more than the %d one "
                         "write takes; dropped", chain.head, len(views), IOV_MAX)
                return
            try:
                os.writev(self._tap, views)
            except OSError as e:
                self._send_failed(e, size)
                return
            self.tx_packets += 1
            self.tx_bytes += size - HDR_SIZE

    def _send_failed(self, e: OSError, size: int) -> None:
        if e.errno == taplib.EBADFD:
            self._link_lost(f"went away ({e.strerror})")
            self.tx_dropped += 1
            return
        self.tx_errors += 1
        self.log("net: tap %s refused a %d-byte frame: %s", self.tap_name, size,
                 errno.errorcode.get(e.errno or 0, e.strerror))
