"""virtio-vsock (virtio 1.2 §5.10) with a Firecracker-compatible host side.

Queues: rx (0) carries packets to the guest, tx (1) packets from it, event (2) the
transport-reset event (§5.10.6.6). Configuration: the guest's CID (le64, §5.10.4).
Stream sockets only (VIRTIO_VSOCK_F_STREAM); the guest reaches the host as CID 2.

The host side maps vsock ports to Unix sockets, as Firecracker does:

* host -> guest: a host program connects to the Unix socket ``uds_path`` and writes
  ``CONNECT <port>\\n``; the device sends the guest a REQUEST for ``port`` from a host
  port of its own (counting up from 2^30), and when the guest answers RESPONSE, writes
  ``OK <host port>\\n`` to the program and bridges the two streams. A guest RST closes
  the program's socket. A malformed line (or more than :data:`LINE_MAX` bytes without a
  newline) closes it too; bytes after the newline already belong to the stream.
* guest -> host: a REQUEST for host port P connects to the Unix socket ``uds_path_P``;
  nothing listening there (or a full backlog) answers RST.

The listening socket is created (and a stale socket left by a dead process replaced) in
the constructor, so path errors are usage errors before the guest starts; host programs
that connect before the guest's driver is up wait in the backlog. :meth:`close` removes
it. A device reset closes every connection.

Every host socket is nonblocking and lives in the device's own epoll instance, whose fd
is the one :meth:`extra_fds` hands the device thread: connection sockets need write
readiness too (``fd_watch`` is readability only), and connections come and go without
touching the VMM's loop. A socket is watched only for what the device can act on:
readable while the guest has credit and receive buffers for it, writable while guest
data is waiting for it, not at all otherwise.

Flow control (minivmm.devices.vsock_conn): host data goes from the socket straight into
the guest's receive buffers (``readv``), never beyond the guest's credit; guest data goes
straight from its buffers to the socket (``sendmsg``), and what the socket refuses is
held, at most ``buf_alloc`` bytes a connection (the credit we advertise). So memory is
bounded by ``max_connections * buf_alloc`` whatever the guest or the host programs do.

A hostile guest: a transmit chain that is not a readable header (plus its payload) is
dropped; a packet with a wrong source CID is dropped; a wrong destination CID, a type
other than STREAM, an unknown op, a length beyond the chain or :data:`MAX_PKT_PAYLOAD`,
data beyond our credit or a packet that makes no sense in the connection's state get an
RST (and close the connection); so does any packet for a connection that does not exist
(but an RST). Receive chains with readable parts or less than a header of writable space
are returned unused. Each case counts (:meth:`stats`) and logs one rate-limited line.
RSTs not owed by a live connection wait in a queue of bounded length.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..errors import UsageError
from ..virtio.chain import DescriptorChain, Writer
from ..virtio.errors import VirtQueueError
from .base import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VirtioDevice, bit
from .vsock_conn import (
    CTL_CREDIT_REQUEST,
    CTL_CREDIT_UPDATE,
    CTL_OPS,
    CTL_REQUEST,
    CTL_RESPONSE,
    CTL_SHUTDOWN,
    HDR,
    HDR_SIZE,
    HOST_CID,
    IOV_MAX,
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
    parse_connect_line,
    split_views,
)

VIRTIO_ID_VSOCK: Final = 19
# Feature bits (§5.10.3)
VIRTIO_VSOCK_F_STREAM: Final = 0
#: struct virtio_vsock_config (§5.10.4)
VSOCK_CONFIG: Final = struct.Struct("<Q")
#: struct virtio_vsock_event (§5.10.6.6)
EVENT: Final = struct.Struct("<I")
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: Final = 0

RXQ: Final = 0
TXQ: Final = 1
EVQ: Final = 2
QUEUE_SIZE: Final = 256
EVENT_QUEUE_SIZE: Final = 16
DEFAULT_BUF_ALLOC: Final = 256 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 256
#: "CONNECT 4294967295\n" is 19 bytes
LINE_MAX: Final = 32
FIRST_LOCAL_PORT: Final = 1 << 30
#: sun_path holds 108 bytes with its NUL; PATH_P adds "_" and up to 10 digits
SUN_PATH_MAX: Final = 107
PORT_SUFFIX_MAX: Final = len("_4294967295")
ACCEPT_BATCH: Final = 16
RX_BATCH: Final = QUEUE_SIZE
MIN_CID: Final = 3
MAX_CID: Final = U32_MASK - 1  # U32_MAX is VMADDR_CID_ANY
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUP_ERR = select.EPOLLHUP | select.EPOLLERR

COUNTERS: Final = (
    "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "host_connects", "guest_connects",
    "host_refused", "host_bad_connect", "guest_refused", "rst_sent", "rst_received",
    "rst_dropped", "tx_bad_chains", "tx_bad_cid", "tx_bad_type", "tx_bad_op",
    "tx_bad_len", "tx_unknown_conn", "credit_violations", "protocol_errors",
    "host_errors", "rx_bad_chains", "rx_stalls", "transport_resets",
)


def check_cid(cid: int) -> int:
    if not MIN_CID <= cid <= MAX_CID:
        raise UsageError(f"vsock cid={cid}: a guest CID is {MIN_CID} to {MAX_CID} "
                         "(0-2 are reserved, 4294967295 means any)")
    return cid


def check_uds_path(path: Path) -> Path:
    raw = os.fsencode(path)
    if not raw:
        raise UsageError("vsock uds=: give the path of the Unix socket to create")
    if len(raw) + PORT_SUFFIX_MAX > SUN_PATH_MAX:
        raise UsageError(f"vsock uds={path}: {len(raw)} bytes is too long; a Unix socket "
                         f"path with its _PORT suffix must fit in {SUN_PATH_MAX} bytes, "
                         f"so use at most {SUN_PATH_MAX - PORT_SUFFIX_MAX}")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"vsock uds={path}: directory {parent} does not exist")
    return path


def _remove_stale(path: Path) -> None:
    """A socket nobody listens on (left by a process that died) goes; anything else
    at ``path`` is the user's and stays (a usage error)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(os.fsencode(path))
        except ConnectionRefusedError:
            path.unlink()
            return
        except OSError:
            pass
        finally:
            probe.close()
    raise UsageError(f"vsock uds={path}: the path exists (in use by another VM?); remove "
                     "it or choose another path")


class VsockDevice(VirtioDevice):
    device_type = VIRTIO_ID_VSOCK
    name = "vsock"

    def __init__(self, guest_cid: int, uds_path: Path, *,
                 buf_alloc: int = DEFAULT_BUF_ALLOC,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.guest_cid = check_cid(guest_cid)
        self.uds_path = check_uds_path(Path(uds_path))
        if not MAX_PKT_PAYLOAD <= buf_alloc <= U32_MASK >> 1:
            raise ValueError(f"buf_alloc={buf_alloc}: {MAX_PKT_PAYLOAD} to 2^31-1 bytes")
        self.buf_alloc = buf_alloc
        self.max_connections = max(1, max_connections)
        features = bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC) | bit(
            VIRTIO_VSOCK_F_STREAM)
        _remove_stale(self.uds_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        try:
            listener.bind(os.fsencode(self.uds_path))
            listener.listen(64)
        except OSError as e:
            listener.close()
            raise UsageError(f"vsock uds={self.uds_path}: cannot listen there: "
                             f"{e.strerror}") from None
        super().__init__(features, [QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE])
        st = os.stat(self.uds_path)
        self._listener_id = (st.st_dev, st.st_ino)
        self._listener = listener
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(listener.fileno(), _IN)
        self._epoll.register(self._wake, _IN)
        self._config = VSOCK_CONFIG.pack(self.guest_cid)
        self._conns: dict[tuple[int, int], Connection] = {}  # (local, peer) port
        self._by_fd: dict[int, Connection] = {}  # every open socket, handshakes too
        self._ready: deque[Connection] = deque()  # owe the guest a packet
        self._rsts: deque[bytes] = deque()  # RSTs no live connection owes
        self._rsts_max = self.max_connections + 64
        self._held: DescriptorChain | None = None  # a receive chain popped, not used
        self._next_port = FIRST_LOCAL_PORT
        self._event_pending = False
        self._rx_returned = False
        for name in COUNTERS:
            setattr(self, name, 0)

    # counters (:data:`COUNTERS`), for --stats and tests
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    host_connects: int
    guest_connects: int
    host_refused: int
    host_bad_connect: int
    guest_refused: int
    rst_sent: int
    rst_received: int
    rst_dropped: int
    tx_bad_chains: int
    tx_bad_cid: int
    tx_bad_type: int
    tx_bad_op: int
    tx_bad_len: int
    tx_unknown_conn: int
    credit_violations: int
    protocol_errors: int
    host_errors: int
    rx_bad_chains: int
    rx_stalls: int
    transport_resets: int

    def stats(self) -> dict[str, int]:
        s = {name: int(getattr(self, name)) for name in COUNTERS}
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

    def close(self) -> None:
        super().close()
        if self._wake < 0:
            return
        self._epoll.close()
        os.close(self._wake)
        self._wake = -1
        self._listener.close()
        try:
            st = os.stat(self.uds_path)
            if (st.st_dev, st.st_ino) == self._listener_id:
                os.unlink(self.uds_path)
        except OSError:
            pass

    def transport_reset(self) -> None:
        """Close every connection and tell the driver with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        (§5.10.6.6), e.g. after the VM was restored: the guest then drops its sockets and
        re-reads guest_cid. Sent when the driver has an event buffer (now or at its next
        event-queue kick)."""
        with self.lock:
            self._drop_all()
            self.transport_resets += 1
            if self.is_activated:
                self._event_pending = True
                try:
                    self._send_event()
                except VirtQueueError as e:
                    self.fail(f"queue {EVQ}: {e}")

    def _drop_all(self) -> None:
        for conn in list(self._by_fd.values()):
            self._close(conn)
        self._ready.clear()
        self._rsts.clear()

    # -- queues -----------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if index == TXQ:
            self._transmit()
            self._fill_rx()  # answers, credit updates
        elif index == RXQ:
            self._fill_rx()
        elif self._event_pending:
            self._send_event()

    def _send_event(self) -> None:
        q = self.queues[EVQ]
        if not q.is_active():
            return
        while (chain := q.pop()) is not None:
            with chain:
                if chain.writer.total < EVENT.size:
                    self.log("vsock: event chain %d has %d writable bytes (needs %d)",
                             chain.head, chain.writer.total, EVENT.size)
                    continue
                chain.writer.write(EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                self._event_pending = False
                break
        else:
            q.enable_notification()
        self.signal_used(q)

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
                    elif (conn := self._by_fd.get(fd)) is not None:
                        self._on_socket(conn, events)
                self._fill_rx()
            except VirtQueueError as e:
                self.fail(f"queue {RXQ}: {e}")

    # -- host side --------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.log("vsock: accept on %s failed: %s", self.uds_path, e.strerror)
                return
            if len(self._by_fd) >= self.max_connections:
                self.host_refused += 1
                self.log("vsock: %d connections open; a host connection was refused",
                         len(self._by_fd))
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(sock, State.HANDSHAKE, self.buf_alloc)
            self._by_fd[sock.fileno()] = conn
            self._rearm(conn)

    def _read_connect_line(self, conn: Connection) -> None:
        """Read up to the newline of ``CONNECT <port>``, never past it."""
        sock = conn.sock
        try:
            peek = sock.recv(LINE_MAX - len(conn.line), socket.MSG_PEEK)
            nl = peek.find(b"\n")
            take = nl + 1 if nl >= 0 else len(peek)
            if take:
                sock.recv(take)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        if not peek:
            self._bad_connect(conn, "closed before its CONNECT line")
            return
        conn.line += peek[:take]
        if nl < 0:
            if len(conn.line) >= LINE_MAX:
                self._bad_connect(conn, f"sent {LINE_MAX} bytes without a newline")
            return
        port = parse_connect_line(bytes(conn.line[:-1]))
        if port is None:
            self._bad_connect(conn, f"sent {bytes(conn.line)!r}, not CONNECT <port>")
            return
        conn.line = bytearray()
        conn.state = State.CONNECTING
        conn.peer_port = port
        conn.local_port = self._alloc_port(port)
        self._conns[conn.key] = conn
        conn.ctl |= CTL_REQUEST
        self.host_connects += 1
        self._rearm(conn)

    def _bad_connect(self, conn: Connection, why: str) -> None:
        self.host_bad_connect += 1
        self.log("vsock: a host connection to %s %s; closed", self.uds_path, why)
        self._close(conn)

    def _alloc_port(self, peer_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < U32_MASK else FIRST_LOCAL_PORT
            if (port, peer_port) not in self._conns:
                return port

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
            self.rst_dropped += 1
            return
        self._rsts.append(packet)
        self.rst_sent += 1

    def _host_error(self, conn: Connection, why: str) -> None:
        self.host_errors += 1
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
            self.tx_bad_chains += 1
            self.log("vsock: transmit chain %d: %d readable bytes and %d writable (needs "
                     "a %d-byte header, nothing writable); dropped", chain.head, r.total,
                     chain.writer.total, HDR_SIZE)
            return
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = r.read_struct(HDR)
        if src_cid != self.guest_cid:
            self.tx_bad_cid += 1
            self.log("vsock: packet from CID %d (the guest is %d); dropped", src_cid,
                     self.guest_cid)
            return
        conn = self._conns.get((dst_port, src_port))
        problem = None
        if dst_cid != HOST_CID:
            self.tx_bad_cid += 1
            problem = f"for CID {dst_cid} (only the host, {HOST_CID}, is reachable)"
        elif typ != VIRTIO_VSOCK_TYPE_STREAM:
            self.tx_bad_type += 1
            problem = f"of type {typ} (only STREAM, 1)"
        elif not VIRTIO_VSOCK_OP_REQUEST <= op <= VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self.tx_bad_op += 1
            problem = f"with unknown op {op}"
        elif length > r.remaining or length > MAX_PKT_PAYLOAD:
            self.tx_bad_len += 1
            problem = (f"claiming {length} payload bytes ({r.remaining} in the chain, at "
                       f"most {MAX_PKT_PAYLOAD})")
        elif conn is None and op not in (VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RST):
            self.tx_unknown_conn += 1
            problem = "for no connection"
        if problem is not None:
            self.log("vsock: packet %d->%d %s; reset", src_port, dst_port, problem)
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
            self.rst_received += 1
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
        self.protocol_errors += 1
        self.log("vsock: connection %d<->%d: guest sent %s; reset", conn.local_port,
                 conn.peer_port, what)
        self._reset(conn)

    def _rst_to(self, guest_port: int, host_port: int) -> None:
        self._queue_rst(HDR.pack(HOST_CID, self.guest_cid, host_port, guest_port, 0,
                                 VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RST, 0, 0, 0))

    def _guest_connect(self, guest_port: int, host_port: int, buf_alloc: int,
                       fwd_cnt: int) -> None:
        if len(self._by_fd) >= self.max_connections:
            self.guest_refused += 1
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
            self.guest_refused += 1
            self._rst_to(guest_port, host_port)
            return
        conn = Connection(sock, State.ESTABLISHED, self.buf_alloc, host_port, guest_port)
        conn.update_peer(buf_alloc, fwd_cnt)
        conn.ctl |= CTL_RESPONSE
        self._conns[conn.key] = conn
        self._by_fd[sock.fileno()] = conn
        self.guest_connects += 1
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

    def _guest_data(self, conn: Connection, chain: DescriptorChain, length: int) -> None:
        if conn.state is not State.ESTABLISHED or conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
            self._protocol_error(conn, f"data in state {conn.state.value} "
                                       f"(shutdown flags {conn.guest_shut})")
            return
        if length > conn.our_free():
            self.credit_violations += 1
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
        self.tx_packets += 1
        self.tx_bytes += length
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
                self.rx_bad_chains += 1
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
                    self.rx_stalls += 1
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
                self.rx_packets += used
                self.signal_used(q)

    def _emit(self, conn: Connection, chain: DescriptorChain) -> bool:
        """Write one packet for ``conn`` into ``chain``; False if it had none after all."""
        w = chain.writer
        cid = self.guest_cid
        if conn.ctl & (CTL_REQUEST | CTL_RESPONSE):
            ctl, op = ((CTL_REQUEST, VIRTIO_VSOCK_OP_REQUEST) if conn.ctl & CTL_REQUEST
                       else (CTL_RESPONSE, VIRTIO_VSOCK_OP_RESPONSE))
            conn.ctl &= ~ctl
            w.write(conn.header(op, cid))
            return True
        if conn.data_ready and conn.can_send_data() and (credit := conn.peer_credit()):
            room = min(w.total - HDR_SIZE, credit, MAX_PKT_PAYLOAD)
            if room > 0:
                n = self._read_host(conn, w, room)
                if n > 0:
                    return True
                if conn.state is State.CLOSED:
                    return False  # a socket error: its RST goes next
                if n == 0:  # the host program's end of stream
                    conn.host_eof = True
                    conn.data_ready = False
                    if self._finished(conn):
                        w.write(conn.header(VIRTIO_VSOCK_OP_RST, cid))
                        self.rst_sent += 1
                        self._close(conn)
                        return True
                    conn.ctl |= CTL_SHUTDOWN
        for ctl, op in CTL_OPS[2:]:
            if conn.ctl & ctl:
                conn.ctl &= ~ctl
                flags = VIRTIO_VSOCK_SHUTDOWN_SEND if ctl == CTL_SHUTDOWN else 0
                w.write(conn.header(op, cid, 0, flags))
                return True
        if conn.data_ready and conn.can_send_data() and conn.peer_credit():
            # only a header's room: tell the guest our credit instead of data
            w.write(conn.header(VIRTIO_VSOCK_OP_CREDIT_UPDATE, cid))
            return True
        return False

    def _read_host(self, conn: Connection, w: Writer, room: int) -> int:
        """Read up to ``room`` bytes from the socket after the header's place in the
        chain and write the RW header: bytes read, 0 at the end of stream, -1 if the
        socket was empty (or failed: the connection is then reset)."""
        views = w.views(HDR_SIZE + room)
        head, body = split_views(views, HDR_SIZE)
        try:
            n = os.readv(conn.sock.fileno(), body if len(body) <= IOV_MAX else body[:IOV_MAX])
        except BlockingIOError:
            conn.data_ready = False
            return -1
        except OSError as e:
            self._host_error(conn, f"read: {e.strerror}")
            return -1
        if n == 0:
            return 0
        if len(head) == 1:
            conn.pack_header_into(head[0], VIRTIO_VSOCK_OP_RW, self.guest_cid, n)
            w.advance(HDR_SIZE + n)
        else:
            w.write(conn.header(VIRTIO_VSOCK_OP_RW, self.guest_cid, n))
            w.advance(n)
        conn.tx_cnt = (conn.tx_cnt + n) & U32_MASK
        conn.ctl &= ~CTL_CREDIT_UPDATE  # the header carries fwd_cnt
        if n < room:
            conn.data_ready = False  # drained: wait for the next readable event
        self.rx_bytes += n
        return n
