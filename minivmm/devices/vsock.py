"""virtio-vsock (virtio 1.2 §5.10) with Firecracker's host side.

Queues: rx (0) to the guest, tx (1) from it, event (2) for the transport-reset event
(§5.10.6.6). Configuration: the guest's CID (le64, §5.10.4). Stream sockets only
(VIRTIO_VSOCK_F_STREAM); the guest reaches the host as CID 2. Ports map to Unix sockets:

* host -> guest: a host program connects to ``uds_path`` and writes ``CONNECT <port>\\n``
  (never read past its newline: what follows is the stream); the device sends the guest a
  REQUEST from a host port of its own (counting up from 2^30) and, on RESPONSE, writes
  ``OK <host port>\\n`` and bridges. A guest RST, or a malformed line, closes the socket.
* guest -> host: a REQUEST for host port P connects to ``uds_path_P``; RST if nothing
  listens there.

A host program has ``connect_timeout`` (2 s) to send its line, and the guest as long to
answer the REQUEST (a timerfd in the device's epoll); then the socket is closed (and the
guest gets an RST).

The listening socket is made in the constructor (path errors are usage errors before the
guest starts; early host programs wait in the backlog) and removed by :meth:`close`. A
device reset closes every connection; :meth:`transport_reset` does too and tells the guest,
as a restored snapshot does (:meth:`restore_state`; the host sockets stayed behind), and
host programs' REQUESTs then wait until the driver has handled it
(minivmm.devices.vsock_reset).

Every host socket is nonblocking and lives in the device's own epoll, whose fd is what
:meth:`extra_fds` gives the device thread: connection sockets need write readiness too
(``fd_watch`` is readability only), and connections come and go without touching the
VMM's loop. A socket is watched only for what the device can act on: readable while the
guest has credit and receive buffers for it, writable while guest data waits for it.
Flow control and zero-copy data paths: minivmm.devices.vsock_conn. Memory is bounded by
``max_connections * buf_alloc`` whatever the guest or the host programs do.

A hostile guest: a transmit chain that is not a readable header (plus payload) is dropped,
and so is a packet with a wrong source CID; a wrong destination CID, another type than
STREAM, an unknown op, a length beyond the chain or :data:`MAX_PKT_PAYLOAD`, data beyond
its credit, an op that makes no sense in the connection's state, or a packet for no
connection get an RST (closing the connection). Receive chains with readable parts or
less room than a header are returned unused. Each case counts (:meth:`stats`) and logs a
rate-limited line; RSTs waiting for receive buffers are bounded in number.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final, Self

from ..virtio.chain import DescriptorChain
from ..virtio.errors import VirtQueueError
from .base import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VirtioDevice, bit
from .vsock_conn import (
    CTL_CREDIT_REQUEST,
    CTL_CREDIT_UPDATE,
    CTL_REQUEST,
    CTL_RESPONSE,
    HDR,
    HDR_SIZE,
    HOST_CID,
    MAX_PKT_PAYLOAD,
    SHUTDOWN_BOTH,
    U32_MASK,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    Connection,
    State,
    WriteError,
    packet_problem,
)
from .vsock_host import (
    CONNECT_TIMEOUT,
    FIRST_LOCAL_PORT,
    RESET_HOLD,
    Counters,
    HostSide,
    Timer,
    check_cid,
    check_uds_path,
    open_listener,
    remove_listener,
)
from .vsock_reset import RXQ, TXQ, ResetSide

#: packets that race a close (see _packet): debug level, not the device's warning log
_late = logging.getLogger(__name__)

VIRTIO_ID_VSOCK: Final = 19
# Feature bits (§5.10.3)
VIRTIO_VSOCK_F_STREAM: Final = 0
#: struct virtio_vsock_config (§5.10.4)
VSOCK_CONFIG: Final = struct.Struct("<Q")
QUEUE_SIZE: Final = 256
EVENT_QUEUE_SIZE: Final = 16
DEFAULT_BUF_ALLOC: Final = 256 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 256
RX_BATCH: Final = QUEUE_SIZE
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUP_ERR = select.EPOLLHUP | select.EPOLLERR


class VsockDevice(ResetSide, HostSide, VirtioDevice):
    device_type = VIRTIO_ID_VSOCK
    name = "vsock"
    kernel_option = "CONFIG_VIRTIO_VSOCKETS"

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Self:
        """``cid=N,uds=PATH`` (short for ``guest_cid``, ``uds_path``), as --vsock."""
        opts = dict(options)
        for short, full in (("cid", "guest_cid"), ("uds", "uds_path")):
            if short in opts:
                opts[full] = opts.pop(short)
        return super().from_options(opts)

    def __init__(self, guest_cid: int, uds_path: Path, *,
                 buf_alloc: int = DEFAULT_BUF_ALLOC,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 reset_hold: float = RESET_HOLD) -> None:
        self.guest_cid = check_cid(guest_cid)
        self.uds_path = check_uds_path(Path(uds_path))
        if not MAX_PKT_PAYLOAD <= buf_alloc <= U32_MASK >> 1:
            raise ValueError(f"buf_alloc={buf_alloc}: {MAX_PKT_PAYLOAD} to 2^31-1 bytes")
        self.buf_alloc = buf_alloc
        self.max_connections = max(1, max_connections)
        self.connect_timeout = connect_timeout
        self.reset_hold = reset_hold
        features = bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC) | bit(
            VIRTIO_VSOCK_F_STREAM)
        listener, self._listener_id = open_listener(self.uds_path)
        super().__init__(features, [QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE])
        self._listener = listener
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(listener.fileno(), _IN)
        self._epoll.register(self._wake, _IN)
        self._timer = Timer()
        self._epoll.register(self._timer.fd, _IN)
        self._config = VSOCK_CONFIG.pack(self.guest_cid)
        self._conns: dict[tuple[int, int], Connection] = {}  # (local, peer) port
        self._by_fd: dict[int, Connection] = {}  # every open socket, handshakes too
        self._ready: deque[Connection] = deque()  # owe the guest a packet
        self._rsts: deque[bytes] = deque()  # RSTs no live connection owes
        self._rsts_max = self.max_connections + 64
        self._held: DescriptorChain | None = None  # a receive chain popped, not used
        self._next_port = FIRST_LOCAL_PORT
        self._event_pending = False
        self._hold_until = 0.0
        self._waiting: list[Connection] = []
        self._reset_mark: int | None = None  # the event queue's avail idx at the event
        self._rx_returned = False
        self.counters = Counters()

    def stats(self) -> dict[str, int]:
        """The counters, open connections and guest data held, for --stats."""
        s = self.counters.as_dict()
        s["connections"] = len(self._conns)
        s["buffered_bytes"] = self.buffered_bytes()
        return s

    def buffered_bytes(self) -> int:
        """Guest data held for host sockets that have not taken it yet."""
        return sum(len(c.pending) for c in self._by_fd.values())

    @property
    def connections(self) -> dict[tuple[int, int], Connection]:
        """Live connections by (host port, guest port) (read-only use)."""
        return self._conns

    def config(self) -> bytes:
        return self._config

    # -- life cycle -------------------------------------------------------------------

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self._epoll.fileno(), self.on_host_events)] if self._wake >= 0 else []

    def on_reset(self) -> None:
        self._drop_all()
        self._held = None  # its queue is being reset
        self._event_pending = False
        self._hold_until = 0.0  # a new driver knows nothing of the old connections
        self._reset_mark = None

    def close(self) -> None:
        super().close()
        if self._wake < 0:
            return
        self._epoll.close()
        os.close(self._wake)
        self._wake = -1
        self._timer.close()
        remove_listener(self._listener, self.uds_path, self._listener_id)

    def _drop_all(self) -> None:
        for conn in list(self._by_fd.values()):
            self._close(conn)
        self._ready.clear()
        self._rsts.clear()
        self._waiting.clear()

    # -- queues -----------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if index == TXQ:
            self._transmit()
            self._fill_rx()  # answers, credit updates
        elif index == RXQ:
            self._fill_rx()
        else:
            if self._event_pending:
                self._send_event()
            if self._check_hold():
                self._fill_rx()

    def on_host_events(self) -> None:
        """The device's epoll is readable (device thread): accept, read CONNECT lines,
        flush held guest data, note readable sockets, then fill receive buffers."""
        with self.lock:
            if not self.is_activated or self._wake < 0:
                return
            listener = self._listener.fileno()
            try:
                for fd, events in self._epoll.poll(0, 64):
                    if fd == listener:
                        self._accept()
                    elif fd == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                    elif fd == self._timer.fd:
                        self._expire()
                    elif (conn := self._by_fd.get(fd)) is not None:
                        self._on_socket(conn, events)
                self._fill_rx()
            except VirtQueueError as e:
                self.fail(f"queue {RXQ}: {e}")

    # -- host side --------------------------------------------------------------------

    def _on_socket(self, conn: Connection, events: int) -> None:
        if conn.state is State.HANDSHAKE:
            self._read_connect_line(conn)
            return
        if conn.pending and events & (_OUT | _HUP_ERR):
            try:
                conn.flush()
            except WriteError as e:
                self._host_error(conn, f"write: {e}")
                return
            self._after_forward(conn)
            if conn.state is State.CLOSED:
                return
        if conn.mask & _IN and events & (_IN | _HUP_ERR):
            conn.data_ready = True
        self._rearm(conn)

    def _rearm(self, conn: Connection) -> None:
        """Watch the socket for what the device can act on; queue what the guest is owed."""
        mask = 0
        if conn.state is State.HANDSHAKE:
            mask = _IN
        elif conn.state is State.ESTABLISHED:
            if conn.can_send_data():
                if not conn.peer_credit():
                    if not conn.credit_asked:  # once each time the credit runs out
                        conn.credit_asked = True
                        conn.ctl |= CTL_CREDIT_REQUEST
                elif not conn.data_ready:
                    mask = _IN
            if conn.pending:
                mask |= _OUT
        if mask != conn.mask:
            fd = conn.sock.fileno()
            if not conn.mask:
                self._epoll.register(fd, mask)
            elif not mask:
                self._epoll.unregister(fd)
            else:
                self._epoll.modify(fd, mask)
            conn.mask = mask
        if not conn.queued and conn.has_work():
            conn.queued = True
            self._ready.append(conn)

    def _close(self, conn: Connection) -> None:
        if conn.state is State.CLOSED:
            return
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        fd = conn.sock.fileno()
        self._by_fd.pop(fd, None)
        if conn.mask:
            self._epoll.unregister(fd)
            conn.mask = 0
        if conn.queued:  # (at most max_connections entries)
            self._ready.remove(conn)
            conn.queued = False
        conn.sock.close()
        conn.state = State.CLOSED
        conn.pending = bytearray()

    def _reset(self, conn: Connection) -> None:
        """Close the connection and send the guest an RST for it."""
        if conn.state in (State.CONNECTING, State.ESTABLISHED):
            self._queue_rst(conn.header(VIRTIO_VSOCK_OP_RST, self.guest_cid))
        self._close(conn)

    def _queue_rst(self, packet: bytes) -> None:
        if len(self._rsts) >= self._rsts_max:
            self.counters.rst_dropped += 1
            return
        self._rsts.append(packet)
        self.counters.rst_sent += 1

    def _host_error(self, conn: Connection, why: str) -> None:
        self.counters.host_errors += 1
        self.log("vsock: connection %d<->%d: host socket %s; reset", conn.local_port,
                 conn.peer_port, why)
        self._reset(conn)

    # -- guest -> host ----------------------------------------------------------------

    def _transmit(self) -> None:
        q = self.queues[TXQ]
        served = False
        for chain in self.available(q):
            served = True
            with chain:
                self._packet(chain)
        if served:
            self.signal_used(q)

    def _packet(self, chain: DescriptorChain) -> None:
        r = chain.reader
        if chain.writer.total or r.total < HDR_SIZE:
            self.counters.tx_bad_chains += 1
            self.log("vsock: transmit chain %d: %d readable bytes and %d writable (needs "
                     "a %d-byte header, nothing writable); dropped", chain.head, r.total,
                     chain.writer.total, HDR_SIZE)
            return
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = r.read_struct(HDR)
        if src_cid != self.guest_cid:
            self.counters.tx_bad_cid += 1
            self.log("vsock: packet from CID %d (the guest is %d); dropped", src_cid,
                     self.guest_cid)
            return
        conn = self._conns.get((dst_port, src_port))
        bad = packet_problem(dst_cid, typ, op, length, r.remaining, conn is not None)
        if bad is not None:
            counter, problem = bad
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            # A packet for a connection just closed is a race with our RST or close, not
            # a broken driver: counted, answered, logged at debug level only.
            log = _late.debug if counter == "tx_unknown_conn" else self.log
            log("vsock: packet %d->%d %s; reset", src_port, dst_port, problem)
            if conn is not None:
                self._reset(conn)
            elif op != VIRTIO_VSOCK_OP_RST:
                self._rst_to(src_port, dst_port)
            return
        if conn is None:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(src_port, dst_port, buf_alloc, fwd_cnt)
            return  # an RST for nothing: nothing to do
        conn.update_peer(buf_alloc, fwd_cnt)
        if op == VIRTIO_VSOCK_OP_RW:
            self._guest_data(conn, chain, length)
        elif op == VIRTIO_VSOCK_OP_RST:
            self.counters.rst_received += 1
            self._close(conn)
        elif op == VIRTIO_VSOCK_OP_RESPONSE and conn.state is State.CONNECTING:
            self._established(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN and conn.state is State.ESTABLISHED:
            conn.guest_shut |= flags & SHUTDOWN_BOTH
            self._maybe_finish(conn)
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.ctl |= CTL_CREDIT_UPDATE
        elif op != VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            self._protocol_error(conn, f"op {op} in state {conn.state.value}")
        if conn.state is not State.CLOSED:
            if conn.peer_credit() > 0:
                conn.credit_asked = False
            self._rearm(conn)

    def _protocol_error(self, conn: Connection, what: str) -> None:
        self.counters.protocol_errors += 1
        self.log("vsock: connection %d<->%d: guest sent %s; reset", conn.local_port,
                 conn.peer_port, what)
        self._reset(conn)

    def _rst_to(self, guest_port: int, host_port: int) -> None:
        self._queue_rst(HDR.pack(HOST_CID, self.guest_cid, host_port, guest_port, 0,
                                 VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RST, 0, 0, 0))

    def _guest_connect(self, guest_port: int, host_port: int, buf_alloc: int,
                       fwd_cnt: int) -> None:
        if len(self._by_fd) >= self.max_connections:
            self.counters.guest_refused += 1
            self.log("vsock: %d connections open; guest connection to port %d refused",
                     len(self._by_fd), host_port)
            self._rst_to(guest_port, host_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fsencode(f"{self.uds_path}_{host_port}"))
        except OSError:  # nothing listens there (or its backlog is full)
            sock.close()
            self.counters.guest_refused += 1
            self._rst_to(guest_port, host_port)
            return
        conn = Connection(sock, State.ESTABLISHED, self.buf_alloc, host_port, guest_port)
        conn.update_peer(buf_alloc, fwd_cnt)
        conn.ctl |= CTL_RESPONSE
        self._conns[conn.key] = conn
        self._by_fd[sock.fileno()] = conn
        self.counters.guest_connects += 1
        self._rearm(conn)

    def _established(self, conn: Connection) -> None:
        """The guest accepted a host program's connection: tell the program."""
        line = f"OK {conn.local_port}\n".encode()
        try:
            # The socket's buffer is empty: nothing was written to it before.
            if conn.sock.send(line, socket.MSG_NOSIGNAL) != len(line):
                raise OSError(0, "short write")
        except OSError as e:
            self._host_error(conn, f"write: {e.strerror}")
            return
        conn.state = State.ESTABLISHED
        conn.deadline = 0.0

    def _guest_data(self, conn: Connection, chain: DescriptorChain, length: int) -> None:
        if conn.state is not State.ESTABLISHED or conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
            self._protocol_error(conn, f"data in state {conn.state.value} "
                                       f"(shutdown flags {conn.guest_shut})")
            return
        if length > conn.our_free():
            self.counters.credit_violations += 1
            self.log("vsock: connection %d<->%d: guest sent %d bytes with %d of credit; "
                     "reset", conn.local_port, conn.peer_port, length, conn.our_free())
            self._reset(conn)
            return
        if not length:
            return
        try:
            conn.forward(chain.reader.views(length), length)
        except WriteError as e:
            self._host_error(conn, f"write: {e}")
            return
        self.counters.tx_packets += 1
        self.counters.tx_bytes += length
        self._after_forward(conn)

    def _after_forward(self, conn: Connection) -> None:
        if conn.wants_credit_update():
            conn.ctl |= CTL_CREDIT_UPDATE
        self._maybe_finish(conn)

    def _finished(self, conn: Connection) -> bool:
        """Both directions are over (guest: SEND and RCV, or SEND after the host's end)
        and every guest byte reached the socket."""
        if conn.pending or not conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
            return False
        return conn.guest_shut == SHUTDOWN_BOTH or conn.host_eof

    def _maybe_finish(self, conn: Connection) -> None:
        if conn.pending or conn.state is not State.ESTABLISHED:
            return
        if conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND and not conn.shut_wr:
            conn.shut_wr = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self._finished(conn):
            self._reset(conn)  # RST ends it on the guest's side too (§5.10.6.4)

    # -- host -> guest ----------------------------------------------------------------

    def _rx_chain(self) -> DescriptorChain | None:
        chain = self._held
        if chain is not None:
            self._held = None
            return chain
        q = self.queues[RXQ]
        while True:
            chain = q.pop()
            if chain is None:
                if q.enable_notification():
                    continue  # buffers arrived meanwhile
                return None
            w = chain.writer
            if chain.reader.total or w.total < HDR_SIZE:
                self.counters.rx_bad_chains += 1
                self.log("vsock: receive chain %d: %d readable bytes and %d writable (needs "
                         "only writable, at least %d); returned unused", chain.head,
                         chain.reader.total, w.total, HDR_SIZE)
                chain.complete(0)
                self._rx_returned = True
                continue
            return chain

    def _fill_rx(self) -> None:
        """Send what the guest is owed while it has receive buffers: RSTs first, then a
        packet per ready connection, round robin."""
        q = self.queues[RXQ]
        if not q.is_active():
            return
        used = 0
        rsts = self._rsts
        ready = self._ready
        try:
            while used < RX_BATCH and (rsts or ready):
                chain = self._rx_chain()
                if chain is None:
                    self.counters.rx_stalls += 1
                    return  # the driver kicks when it adds buffers
                if rsts:
                    chain.writer.write(rsts.popleft())
                    chain.complete()
                    used += 1
                    continue
                conn = ready.popleft()
                conn.queued = False
                if conn.state is not State.CLOSED and self._emit(conn, chain):
                    chain.complete()
                    used += 1
                else:
                    self._held = chain
                if conn.state is not State.CLOSED:
                    self._rearm(conn)
            if rsts or ready:
                os.eventfd_write(self._wake, 1)  # more next time round the loop
        finally:
            if used or self._rx_returned:
                self._rx_returned = False
                self.counters.rx_packets += used
                self.signal_used(q)

    def _emit(self, conn: Connection, chain: DescriptorChain) -> bool:
        """Write one packet for ``conn`` into ``chain``; False if it had none after all."""
        w = chain.writer
        cid = self.guest_cid
        if conn.ctl & (CTL_REQUEST | CTL_RESPONSE):
            w.write(conn.next_control(cid))
            return True
        if conn.data_ready and conn.can_send_data() and (credit := conn.peer_credit()):
            room = min(w.total - HDR_SIZE, credit, MAX_PKT_PAYLOAD)
            if room <= 0:  # only a header's room: our credit instead of data
                w.write(conn.header(VIRTIO_VSOCK_OP_CREDIT_UPDATE, cid))
                return True
            try:
                n = conn.read_into(w, cid, room)
            except OSError as e:
                self._host_error(conn, f"read: {e.strerror}")
                return False  # its RST goes next
            if n > 0:
                self.counters.rx_bytes += n
                return True
            if n == 0 and self._finished(conn):  # the end of both directions
                w.write(conn.header(VIRTIO_VSOCK_OP_RST, cid))
                self.counters.rst_sent += 1
                self._close(conn)
                return True
        if conn.ctl:
            w.write(conn.next_control(cid))
            return True
        return False
