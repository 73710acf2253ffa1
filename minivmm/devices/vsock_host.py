"""The host side of virtio-vsock: the user's options, the listening Unix socket, the
``CONNECT <port>`` line, and the device's counters (minivmm.devices.vsock)."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import UsageError
from .vsock_conn import U32_MASK, Connection

MIN_CID: Final = 3
MAX_CID: Final = U32_MASK - 1  # U32_MAX is VMADDR_CID_ANY
#: sun_path holds 108 bytes with its NUL; PATH_P adds "_" and up to 10 digits
SUN_PATH_MAX: Final = 107
PORT_SUFFIX_MAX: Final = len("_4294967295")
#: "CONNECT 4294967295\n" is 19 bytes
LINE_MAX: Final = 32
LISTEN_BACKLOG: Final = 64


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
    if not path.parent.is_dir():
        raise UsageError(f"vsock uds={path}: directory {path.parent} does not exist")
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
                     "it or choose another path")


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
        raise UsageError(f"vsock uds={path}: cannot listen there: {e.strerror}") from None
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
    transport_resets: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
