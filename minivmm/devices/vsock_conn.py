"""virtio-vsock packets and one stream connection's state (virtio 1.2 §5.10.6).

Every packet starts with the 44-byte ``struct virtio_vsock_hdr`` (:data:`HDR`). A
connection joins a guest port to a host Unix socket; :class:`Connection` keeps its state
and the credit accounting of §5.10.6.3 in both directions:

* guest -> host: the guest may have at most :attr:`Connection.buf_alloc` bytes that the
  host socket has not taken yet (``rx_cnt - fwd_cnt``). A packet is first written
  straight from guest memory to the socket (``sendmsg`` of the chain's views); what the
  socket refuses is copied into ``pending``, which therefore never exceeds ``buf_alloc``:
  a packet that would overrun it is a credit violation (the device resets the
  connection). ``fwd_cnt`` counts what reached the socket and goes back to the guest in
  every header, so a host peer that does not read stops the guest within ``buf_alloc``.
* host -> guest: the device reads the socket straight into the guest's receive buffers,
  never more than :meth:`Connection.peer_credit` (``peer_buf_alloc - (tx_cnt -
  peer_fwd_cnt)``, from the guest's last header); nothing is buffered on this side.

This module knows nothing about queues; minivmm.devices.vsock drives it.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from typing import Final

from ..virtio.chain import Writer

#: struct virtio_vsock_hdr (§5.10.6): src_cid, dst_cid, src_port, dst_port, len, type,
#: op, flags, buf_alloc, fwd_cnt
HDR: Final = struct.Struct("<QQIIIHHIII")
HDR_SIZE: Final = HDR.size  # 44
#: the host's CID, as the guest addresses it (VMADDR_CID_HOST)
HOST_CID: Final = 2

# §5.10.6: type
VIRTIO_VSOCK_TYPE_STREAM: Final = 1
VIRTIO_VSOCK_TYPE_SEQPACKET: Final = 2
# §5.10.6: op
VIRTIO_VSOCK_OP_INVALID: Final = 0
VIRTIO_VSOCK_OP_REQUEST: Final = 1
VIRTIO_VSOCK_OP_RESPONSE: Final = 2
VIRTIO_VSOCK_OP_RST: Final = 3
VIRTIO_VSOCK_OP_SHUTDOWN: Final = 4
VIRTIO_VSOCK_OP_RW: Final = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE: Final = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST: Final = 7
# §5.10.6.4: SHUTDOWN flags
VIRTIO_VSOCK_SHUTDOWN_RCV: Final = 1
VIRTIO_VSOCK_SHUTDOWN_SEND: Final = 2
SHUTDOWN_BOTH: Final = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND

#: the largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PKT_PAYLOAD: Final = 64 * 1024
U32_MASK: Final = 0xFFFF_FFFF
IOV_MAX: Final = 1024

# Control packets a connection owes the guest (bits of Connection.ctl), in sending order.
CTL_REQUEST: Final = 1
CTL_RESPONSE: Final = 2
CTL_SHUTDOWN: Final = 4
CTL_CREDIT_UPDATE: Final = 8
CTL_CREDIT_REQUEST: Final = 16
CTL_OPS: Final = (
    (CTL_REQUEST, VIRTIO_VSOCK_OP_REQUEST),
    (CTL_RESPONSE, VIRTIO_VSOCK_OP_RESPONSE),
    (CTL_SHUTDOWN, VIRTIO_VSOCK_OP_SHUTDOWN),
    (CTL_CREDIT_UPDATE, VIRTIO_VSOCK_OP_CREDIT_UPDATE),
    (CTL_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_REQUEST),
)


class State(enum.Enum):
    #: a host program connected to the listening socket; its ``CONNECT <port>`` line is
    #: being read
    HANDSHAKE = "handshake"
    #: the REQUEST for the guest's port is sent or due; waiting for RESPONSE or RST
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLOSED = "closed"


class WriteError(Exception):
    """The host socket refused data for good (its peer went away)."""


class Connection:
    """One stream: (local_port on the host side, peer_port on the guest's) and a socket."""

    __slots__ = (
        "buf_alloc", "credit_asked", "ctl", "data_ready", "deadline", "fwd_cnt", "fwd_cnt_sent",
        "guest_shut",
        "host_eof", "line", "local_port", "mask", "peer_buf_alloc", "peer_fwd_cnt",
        "peer_port", "pending", "queued", "rx_cnt", "shut_wr", "sock", "state", "tx_cnt",
    )

    def __init__(self, sock: socket.socket, state: State, buf_alloc: int,
                 local_port: int = 0, peer_port: int = 0) -> None:
        self.sock = sock
        self.state = state
        self.local_port = local_port
        self.peer_port = peer_port
        self.buf_alloc = buf_alloc
        #: the CONNECT line read so far (HANDSHAKE only; bounded by the device)
        self.line = bytearray()
        # guest -> host (§5.10.6.3: our receive side)
        self.rx_cnt = 0  # payload bytes the guest sent us
        self.fwd_cnt = 0  # ... of which the host socket took
        self.fwd_cnt_sent = 0  # fwd_cnt in the last header we sent the guest
        self.pending = bytearray()  # taken from the guest, not yet by the socket
        # host -> guest
        self.tx_cnt = 0  # payload bytes we sent the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        #: SHUTDOWN flags the guest sent (RCV: it reads no more; SEND: it sends no more)
        self.guest_shut = 0
        self.host_eof = False  # the host socket reached its end (we owe/sent SHUTDOWN)
        self.shut_wr = False  # we shut the socket's write side (the guest sent SEND)
        #: control packets owed to the guest (CTL_* bits)
        self.ctl = 0
        #: the socket was readable and no read has since found it empty
        self.data_ready = False
        self.queued = False  # in the device's ready list
        self.credit_asked = False  # a CREDIT_REQUEST went out since credit ran out
        self.mask = 0  # the events the device's epoll watches for this socket
        #: time.monotonic() by which the CONNECT line or the guest's answer is due (0: none)
        self.deadline = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # -- credit (§5.10.6.3) ---------------------------------------------------------

    def peer_credit(self) -> int:
        """Payload bytes the guest can take now (0 if its header claims the impossible)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    def our_free(self) -> int:
        """Payload bytes the guest may still send before it overruns ``buf_alloc``."""
        return self.buf_alloc - len(self.pending)

    def guest_view_free(self) -> int:
        """What the guest believes it may send: our buf_alloc minus what it sent since
        the fwd_cnt it last heard from us."""
        return self.buf_alloc - ((self.rx_cnt - self.fwd_cnt_sent) & U32_MASK)

    def wants_credit_update(self) -> bool:
        """Tell the guest about freed space once it believes less than half is left."""
        return (self.fwd_cnt != self.fwd_cnt_sent
                and self.guest_view_free() < self.buf_alloc // 2)

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def can_send_data(self) -> bool:
        return (self.state is State.ESTABLISHED and not self.host_eof
                and not self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV)

    def has_work(self) -> bool:
        """Something to send the guest (the device queues the connection for it)."""
        return bool(self.ctl) or (self.data_ready and self.can_send_data()
                                  and self.peer_credit() > 0)

    def header(self, op: int, guest_cid: int, length: int = 0, flags: int = 0) -> bytes:
        """A packet from the host side of this connection (records fwd_cnt as told)."""
        self.fwd_cnt_sent = self.fwd_cnt
        return HDR.pack(HOST_CID, guest_cid, self.local_port, self.peer_port, length,
                        VIRTIO_VSOCK_TYPE_STREAM, op, flags, self.buf_alloc, self.fwd_cnt)

    def next_control(self, guest_cid: int) -> bytes:
        """The first control packet owed (``ctl`` is not 0), in CTL_OPS order."""
        for ctl, op in CTL_OPS:
            if self.ctl & ctl:
                self.ctl &= ~ctl
                flags = VIRTIO_VSOCK_SHUTDOWN_SEND if ctl == CTL_SHUTDOWN else 0
                return self.header(op, guest_cid, 0, flags)
        raise ValueError("no control packet is owed")

    # -- host -> guest data -----------------------------------------------------------

    def read_into(self, w: Writer, guest_cid: int, room: int) -> int:
        """One RW packet into the receive chain ``w``: up to ``room`` bytes read from the
        socket straight into the guest's buffers after the header's place, then the
        header. Returns the bytes read; 0 at the socket's end of stream (``host_eof``,
        SHUTDOWN owed) or when it was empty (``data_ready`` cleared). Raises OSError if
        the socket failed."""
        head, body = split_views(w.views(HDR_SIZE + room), HDR_SIZE)
        try:
            n = os.readv(self.sock.fileno(), body[:IOV_MAX])
        except BlockingIOError:
            self.data_ready = False
            return 0
        if n == 0:
            self.host_eof = True
            self.data_ready = False
            self.ctl |= CTL_SHUTDOWN
            return 0
        if len(head) == 1:  # the usual case: the header in one buffer, packed in place
            self.fwd_cnt_sent = self.fwd_cnt
            HDR.pack_into(head[0], 0, HOST_CID, guest_cid, self.local_port, self.peer_port,
                          n, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 0, self.buf_alloc,
                          self.fwd_cnt)
            w.advance(HDR_SIZE + n)
        else:
            w.write(self.header(VIRTIO_VSOCK_OP_RW, guest_cid, n))
            w.advance(n)
        self.tx_cnt = (self.tx_cnt + n) & U32_MASK
        self.ctl &= ~CTL_CREDIT_UPDATE  # the header carried fwd_cnt
        if n < room:
            self.data_ready = False  # drained: wait for the next readable event
        return n

    # -- guest -> host data -----------------------------------------------------------

    def forward(self, views: list[memoryview], n: int) -> None:
        """The guest sent ``n`` payload bytes (in ``views``): write what the socket
        takes now, keep the rest. The caller checked ``n <= our_free()``. Raises
        WriteError if the socket's peer is gone."""
        self.rx_cnt = (self.rx_cnt + n) & U32_MASK
        if not self.pending:
            sent = 0
            try:
                while views:
                    k = self.sock.sendmsg(views[:IOV_MAX], (), socket.MSG_NOSIGNAL)
                    sent += k
                    views = _skip(views, k)  # what the socket did not take
            except BlockingIOError:
                pass
            except OSError as e:
                raise WriteError(e.strerror or str(e)) from e
            finally:
                self.fwd_cnt = (self.fwd_cnt + sent) & U32_MASK
        for v in views:
            self.pending += v

    def flush(self) -> None:
        """Write ``pending`` to the socket as far as it goes. Raises WriteError."""
        pending = self.pending
        while pending:
            try:
                k = self.sock.send(pending, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return
            except OSError as e:
                raise WriteError(e.strerror or str(e)) from e
            del pending[:k]
            self.fwd_cnt = (self.fwd_cnt + k) & U32_MASK

    def __repr__(self) -> str:
        return (f"<Connection {self.local_port}<->{self.peer_port} {self.state.value} "
                f"pending={len(self.pending)} credit={self.peer_credit()}>")


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    out = views[i:]
    if out and n:
        out[0] = out[0][n:]
    return out


def split_views(views: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """(the first ``n`` bytes of ``views``, the rest)."""
    head: list[memoryview] = []
    i = 0
    while i < len(views) and n > 0:
        v = views[i]
        if len(v) <= n:
            head.append(v)
            n -= len(v)
            i += 1
        else:
            head.append(v[:n])
            return head, [v[n:], *views[i + 1:]]
    return head, views[i:]


def packet_problem(dst_cid: int, typ: int, op: int, length: int, remaining: int,
                   known: bool) -> tuple[str, str] | None:
    """What is wrong with a guest packet's header, if anything: (the device's counter,
    what the guest did). ``remaining``: payload bytes in the chain; ``known``: for a
    live connection."""
    if dst_cid != HOST_CID:
        return "tx_bad_cid", f"for CID {dst_cid} (only the host, {HOST_CID}, is reachable)"
    if typ != VIRTIO_VSOCK_TYPE_STREAM:
        return "tx_bad_type", f"of type {typ} (only STREAM, 1)"
    if not VIRTIO_VSOCK_OP_REQUEST <= op <= VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        return "tx_bad_op", f"with unknown op {op}"
    if length > remaining or length > MAX_PKT_PAYLOAD:
        return "tx_bad_len", (f"claiming {length} payload bytes ({remaining} in the chain, "
                              f"at most {MAX_PKT_PAYLOAD})")
    if not known and op not in (VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RST):
        return "tx_unknown_conn", "for no connection"
    return None
