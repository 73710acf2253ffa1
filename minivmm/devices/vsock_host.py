"""The host side of virtio-vsock: the user's options, the listening Unix socket, the
``CONNECT <port>`` line, and the device's counters (minivmm.devices.vsock)."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import UsageError
from ..ratelimit import RateLimitedLog
from .vsock_conn import CTL_REQUEST, U32_MASK, Connection, State

MIN_CID: Final = 3
MAX_CID: Final = U32_MASK - 1  # U32_MAX is VMADDR_CID_ANY
#: sun_path holds 108 bytes with its NUL; PATH_P adds "_" and up to 10 digits
SUN_PATH_MAX: Final = 107
PORT_SUFFIX_MAX: Final = len("_4294967295")
#: "CONNECT 4294967295\n" is 19 bytes
LINE_MAX: Final = 32
LISTEN_BACKLOG: Final = 64
ACCEPT_BATCH: Final = 16
FIRST_LOCAL_PORT: Final = 1 << 30
#: how long a host program may take to send its CONNECT line, and the guest to answer
#: the REQUEST (Firecracker's connection-request timeout is also 2 s)
CONNECT_TIMEOUT: Final = 2.0
#: after a transport reset, how long host connections wait for the driver to show it
#: has handled the event (it re-posts the event buffer) before they go ahead anyway
RESET_HOLD: Final = 5.0
CLOCK_MONOTONIC: Final = 1
TFD_CLOEXEC: Final = 0o2000000
TFD_NONBLOCK: Final = 0o4000
TFD_TIMER_ABSTIME: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timer:
    """A CLOCK_MONOTONIC timerfd (``os.timerfd_create`` needs Python 3.13): readable
    once the time given to :meth:`at` (``time.monotonic()`` seconds) has come."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd: int = fd
        self.when = math.inf

    def at(self, when: float) -> None:
        """Fire at ``when``; ``math.inf`` disarms."""
        self.when = when
        spec = _Itimerspec()
        if when != math.inf:
            spec.it_value.tv_sec = int(when)
            spec.it_value.tv_nsec = max(1, int((when - int(when)) * 1e9))  # 0 disarms
        if _libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def clear(self) -> None:
        """Consume the expiry (the fd is level-triggered readable until then)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_cid(cid: int) -> int:
    if not MIN_CID <= cid <= MAX_CID:
        raise UsageError(f"vsock cid={cid}: a guest CID is {MIN_CID} to {MAX_CID} "
                         "(0-2 are reserved, 4294967295 means any)", field="vsock")
    return cid


def check_uds_path(path: Path) -> Path:
    raw = os.fsencode(path)
    if not raw:
        raise UsageError("vsock uds=: give the path of the Unix socket to create", field="vsock")
    if len(raw) + PORT_SUFFIX_MAX > SUN_PATH_MAX:
        raise UsageError(f"vsock uds={path}: {len(raw)} bytes is too long; a Unix socket "
                         f"path with its _PORT suffix must fit in {SUN_PATH_MAX} bytes, "
                         f"so use at most {SUN_PATH_MAX - PORT_SUFFIX_MAX}", field="vsock")
    if not path.parent.is_dir():
        raise UsageError(f"vsock uds={path}: directory {path.parent} does not exist", field="vsock")
    return path


def _remove_stale(path: Path) -> None:
    """A socket nobody listens on (left by a process that died) goes; anything else at
    ``path`` is the user's and stays (a usage error)."""
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
                     "it or choose another path", field="vsock")


def open_listener(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """The nonblocking listening socket at ``path`` and its (st_dev, st_ino), which
    :func:`remove_listener` checks so it never unlinks someone else's file."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fsencode(path))
        sock.listen(LISTEN_BACKLOG)
        st = os.stat(path)
    except OSError as e:
        sock.close()
        raise UsageError(f"vsock uds={path}: cannot listen there: {e.strerror}",
                         field="vsock") from None
    return sock, (st.st_dev, st.st_ino)


def remove_listener(sock: socket.socket, path: Path, ident: tuple[int, int]) -> None:
    sock.close()
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


def read_connect_line(conn: Connection) -> int | str | None:
    """Read the host program's ``CONNECT <port>\\n``, never past its newline (what
    follows belongs to the stream): the port; None while the line is incomplete; or why
    the connection must be closed."""
    sock = conn.sock
    try:
        peek = sock.recv(LINE_MAX - len(conn.line), socket.MSG_PEEK)
        nl = peek.find(b"\n")
        take = nl + 1 if nl >= 0 else len(peek)
        if take:
            sock.recv(take)
    except BlockingIOError:
        return None
    except OSError as e:
        return f"failed: {e.strerror}"
    if not peek:
        return "closed before its CONNECT line"
    conn.line += peek[:take]
    if nl < 0:
        return f"sent {LINE_MAX} bytes without a newline" if len(conn.line) >= LINE_MAX else None
    line = bytes(conn.line[:-1])
    conn.line = bytearray()
    verb, sep, digits = line.partition(b" ")
    if verb == b"CONNECT" and sep and digits.isdigit() and len(digits) <= 10:
        port = int(digits)
        if port <= U32_MASK:
            return port
    return f"sent {line!r}, not CONNECT <port>"


@dataclass
class Counters:
    """What the device did and refused (``minivmm run --stats``, tests)."""

    rx_packets: int = 0  # packets given to the guest
    rx_bytes: int = 0  # payload bytes given to the guest
    tx_packets: int = 0  # data packets from the guest
    tx_bytes: int = 0  # payload bytes from the guest
    host_connects: int = 0  # CONNECT lines accepted
    guest_connects: int = 0  # guest REQUESTs connected to PATH_P
    host_refused: int = 0  # host connections closed at max_connections
    host_bad_connect: int = 0  # host connections closed for their CONNECT line
    guest_refused: int = 0  # guest REQUESTs refused (nothing at PATH_P, or full)
    rst_sent: int = 0
    rst_received: int = 0
    rst_dropped: int = 0  # RSTs not sent: too many waiting for receive buffers
    tx_bad_chains: int = 0  # not a readable header (+ payload), or writable parts
    tx_bad_cid: int = 0  # wrong source (dropped) or destination (RST) CID
    tx_bad_type: int = 0  # not STREAM
    tx_bad_op: int = 0  # unknown op
    tx_bad_len: int = 0  # length beyond the chain or MAX_PKT_PAYLOAD
    tx_unknown_conn: int = 0  # for no connection
    credit_violations: int = 0  # data beyond the credit we gave
    protocol_errors: int = 0  # an op that makes no sense in the connection's state
    host_errors: int = 0  # host sockets that failed (reset)
    rx_bad_chains: int = 0  # receive chains returned unused
    rx_stalls: int = 0  # times the guest had no receive buffer for what it was owed
    connect_timeouts: int = 0  # guests that did not answer a REQUEST in time (reset)
    transport_resets: int = 0
    held_connects: int = 0  # CONNECTs held until the driver handled a transport reset
    reset_hold_timeouts: int = 0  # drivers that did not re-post an event buffer in time

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class HostSide:
    """VsockDevice's dealings with host programs before their connection is established:
    accepting, the CONNECT line, host ports, and the deadlines of both.

    After a transport reset (:meth:`_hold`) a host program's REQUEST waits until the
    driver has handled the event, or :attr:`reset_hold` seconds have passed: Linux
    handles it later, in a work item that resets every *connected* socket, so a
    connection the guest accepted before would be reset too."""

    # VsockDevice provides these
    uds_path: Path
    buf_alloc: int
    max_connections: int
    connect_timeout: float
    reset_hold: float
    counters: Counters
    log: RateLimitedLog
    _listener: socket.socket
    _timer: Timer
    _conns: dict[tuple[int, int], Connection]
    _by_fd: dict[int, Connection]
    _next_port: int
    _hold_until: float  # 0.0: REQUESTs go out as they come
    _waiting: list[Connection]  # their REQUESTs wait for the end of the hold
    _rearm: Callable[[Connection], None]
    _close: Callable[[Connection], None]
    _reset: Callable[[Connection], None]

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
                self.counters.host_refused += 1
                self.log("vsock: %d connections open; a host connection was refused",
                         len(self._by_fd))
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(sock, State.HANDSHAKE, self.buf_alloc)
            self._by_fd[sock.fileno()] = conn
            self._set_deadline(conn)
            self._rearm(conn)

    def _read_connect_line(self, conn: Connection) -> None:
        port = read_connect_line(conn)
        if port is None:
            return
        if isinstance(port, str):
            self._bad_connect(conn, port)
            return
        conn.state = State.CONNECTING
        conn.peer_port = port
        conn.local_port = self._alloc_port(port)
        self._conns[conn.key] = conn
        self.counters.host_connects += 1
        if self._hold_until:
            self.counters.held_connects += 1
            conn.deadline = 0.0  # the hold has its own
            self._waiting.append(conn)  # (at most max_connections: each is in _by_fd)
            self._rearm(conn)
        else:
            self._request(conn)

    def _request(self, conn: Connection) -> None:
        conn.ctl |= CTL_REQUEST
        self._set_deadline(conn)
        self._rearm(conn)

    def _hold(self) -> None:
        """Hold new REQUESTs for at most :attr:`reset_hold` seconds from now."""
        self._hold_until = time.monotonic() + self.reset_hold
        if self._hold_until < self._timer.when:
            self._timer.at(self._hold_until)

    def _end_hold(self) -> None:
        """Send the held REQUESTs (the caller fills the receive queue)."""
        self._hold_until = 0.0
        for conn in self._waiting:
            if conn.state is State.CONNECTING:
                self._request(conn)
        self._waiting.clear()

    def _set_deadline(self, conn: Connection) -> None:
        conn.deadline = time.monotonic() + self.connect_timeout
        if conn.deadline < self._timer.when:
            self._timer.at(conn.deadline)

    def _expire(self) -> None:
        """Close host programs that sent no CONNECT line in time, and reset connections
        whose REQUEST the guest did not answer; then arm the timer for the next one."""
        self._timer.clear()
        now = time.monotonic()
        nearest = math.inf
        if self._hold_until > now:
            nearest = self._hold_until
        elif self._hold_until:
            self.counters.reset_hold_timeouts += 1
            self.log("vsock: the driver re-posted no event buffer in %s s after the "
                     "transport reset; %d held host connections go ahead",
                     self.reset_hold, len(self._waiting))
            self._end_hold()
        for conn in list(self._by_fd.values()):
            if not conn.deadline:
                continue
            if conn.deadline > now:
                nearest = min(nearest, conn.deadline)
            elif conn.state is State.HANDSHAKE:
                self._bad_connect(conn, f"sent no CONNECT line in {self.connect_timeout} s")
            else:
                self.counters.connect_timeouts += 1
                self.log("vsock: the guest did not answer a connection to its port %d in "
                         "%s s; reset", conn.peer_port, self.connect_timeout)
                self._reset(conn)
        self._timer.at(nearest)

    def _bad_connect(self, conn: Connection, why: str) -> None:
        self.counters.host_bad_connect += 1
        self.log("vsock: a host connection to %s %s; closed", self.uds_path, why)
        self._close(conn)

    def _alloc_port(self, peer_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < U32_MASK else FIRST_LOCAL_PORT
            if (port, peer_port) not in self._conns:
                return port
