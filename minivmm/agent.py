"""The host side of the guest agent's protocol (guest/agent/README.md).

The agent (guest/agent/agent.c) listens on a vsock port in the guest; the host reaches it
through the vsock device's Unix socket with Firecracker's ``CONNECT <port>`` line
(:func:`connect`, :func:`wait_for_agent`). One connection carries one request: an
:class:`Exec` sends the command, then stdin, and reads the command's output and status
as :class:`Output`, :class:`Exited`, :class:`Signaled` or :class:`Failed` events.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: the agent's vsock port (guest/agent/agent.c DEFAULT_PORT)
AGENT_PORT = 52
HEADER = struct.Struct("<B3xI")  # type, 3 zero bytes, payload length
MAX_FRAME = 1 << 20  # the agent's limit for a request frame; also ours for its frames
STDIN_CHUNK = 65536

# host -> agent
T_ARG, T_ENV, T_CWD, T_EXEC, T_STDIN, T_KILL, T_PUT, T_GET = (ord(c) for c in "AEDXIKPQ")
# agent -> host
T_STARTED, T_STDOUT, T_STDERR, T_EXITED, T_SIGNALED, T_FAILED = (ord(c) for c in "SORWGF")
# protocol version 2: a tree (host -> agent), its entries and notes (agent -> host)
T_TREE, T_ENTRY, T_NOTE = (ord(c) for c in "TYN")
ENTRY = struct.Struct("<IQI")  # st_mode, size, path length; then the path, the target


class AgentError(Exception):
    """The agent could not be reached, or broke the protocol, or went away."""


@dataclass(frozen=True)
class Started:
    """The command runs (its pid in the guest)."""

    pid: int


@dataclass(frozen=True)
class Output:
    fd: int  # 1 (stdout) or 2 (stderr)
    data: bytes


@dataclass(frozen=True)
class Exited:
    code: int


@dataclass(frozen=True)
class Signaled:
    signal: int


@dataclass(frozen=True)
class Failed:
    """The agent refused or could not run the request; ``errno`` is 0 when none applies."""

    errno: int
    message: str


@dataclass(frozen=True)
class Entry:
    """One node of a TREE answer (protocol version 2): ``mode`` is its st_mode, ``size``
    the bytes of content that follow a regular file (a symlink: its target's length),
    ``path`` relative to the tree's root (empty for the root) and ``target`` a symlink's
    target. Nothing here is checked: minivmm.collect does that."""

    mode: int
    size: int
    path: bytes
    target: bytes = b""


@dataclass(frozen=True)
class Note:
    """Something the agent skipped while sending a tree (a person reads it)."""

    message: str


Event = Started | Output | Exited | Signaled | Failed | Entry | Note


def connect(uds_path: str | Path, port: int = AGENT_PORT,
            timeout: float = 5.0) -> socket.socket:
    """One attempt: connect to the vsock device's Unix socket and ask for ``port``.
    Raises OSError (nothing listens at ``uds_path``) or AgentError (the guest refused)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(uds_path))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            chunk = s.recv(1)  # byte by byte: nothing after the OK line is ours to take
            if not chunk:
                raise AgentError(f"vsock port {port}: refused (no listener yet?)")
            line += chunk
        if not line.startswith(b"OK "):
            raise AgentError(f"vsock port {port}: unexpected answer {line!r}")
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise


def wait_for_agent(uds_path: str | Path, deadline: float, alive: Callable[[], bool],
                   port: int = AGENT_PORT, interval: float = 0.2) -> socket.socket:
    """Retry :func:`connect` until the agent answers, ``alive()`` turns false or the
    monotonic ``deadline`` passes (AgentError)."""
    last = "nothing tried"
    while alive():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return connect(uds_path, port, timeout=min(5.0, max(left, 0.1)))
        except (OSError, AgentError) as e:
            last = str(e)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    raise AgentError(f"the agent never answered on vsock port {port} ({last})")


class ReadyListener:
    """Where the agent says it listens: after its listen() it connects once to the host's
    vsock port :data:`AGENT_PORT`, which the vsock device hands to the Unix socket
    ``<uds_path>_<port>``. Waiting for that connection spares polling the guest with
    CONNECTs it must refuse while it boots."""

    def __init__(self, uds_path: str | Path, port: int = AGENT_PORT) -> None:
        self.path = Path(f"{uds_path}_{port}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(str(self.path))
            self.sock.listen(4)
        except BaseException:
            self.sock.close()
            raise

    def wait(self, deadline: float, alive: Callable[[], bool]) -> bool:
        """True once the agent said it listens; False when ``alive()`` turns false or
        the monotonic ``deadline`` passes."""
        while alive() and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.25))
            if ready:
                conn, _ = self.sock.accept()
                conn.close()
                return True
        return False

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Exec:
    """One command run by the agent over ``sock`` (which this object owns)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self.pid: int | None = None

    def _send(self, type_: int, data: bytes = b"") -> None:
        with self._send_lock:
            self.sock.sendall(HEADER.pack(type_, len(data)) + data)

    def start(self, argv: Sequence[str], env: Mapping[str, str] | Sequence[str] = (),
              cwd: str | None = None) -> None:
        """Send the request. ``env`` entries (``K=V`` strings or a mapping) are added to
        the agent's defaults (PATH, HOME, TERM) and override them."""
        if not argv:
            raise ValueError("an empty command")
        items = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
        frames = [HEADER.pack(T_ARG, len(a)) + a for a in (s.encode() for s in argv)]
        frames += [HEADER.pack(T_ENV, len(e)) + e for e in (s.encode() for s in items)]
        if cwd is not None:
            frames.append(HEADER.pack(T_CWD, len(cwd.encode())) + cwd.encode())
        frames.append(HEADER.pack(T_EXEC, 0))
        with self._send_lock:
            self.sock.sendall(b"".join(frames))

    def send_stdin(self, data: bytes) -> None:
        """Forward ``data`` to the command's stdin (OSError if the agent went away)."""
        for i in range(0, len(data), STDIN_CHUNK):
            self._send(T_STDIN, data[i:i + STDIN_CHUNK])

    def close_stdin(self) -> None:
        self._send(T_STDIN)

    def kill(self, signum: int) -> None:
        """Send ``signum`` to the command's process group."""
        self._send(T_KILL, struct.pack("<I", signum))

    def put(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 60.0) -> None:
        """Write ``data`` to the guest file ``path`` (created with ``mode`` & 0o7777, or
        truncated). OSError with the guest's errno when it cannot; AgentError when the
        agent breaks the protocol or goes away."""
        self._send(T_PUT, struct.pack("<I", mode & 0o7777) + path.encode())
        try:
            self.send_stdin(data)
            self.close_stdin()
        except OSError:
            pass  # the agent stopped reading: its FAILED frame says why
        self._file_result(path, timeout, [])

    def send_tree(self, path: str) -> None:
        """Ask for the file or directory tree at ``path`` (protocol version 2): Entry,
        Output and Note events follow, then Exited(0) or Failed. minivmm.collect reads
        them."""
        self._send(T_TREE, path.encode())

    def get(self, path: str, timeout: float = 60.0) -> bytes:
        """The content of the guest file ``path`` (OSError/AgentError as :meth:`put`)."""
        self._send(T_GET, path.encode())
        chunks: list[bytes] = []
        self._file_result(path, timeout, chunks)
        return b"".join(chunks)

    def _file_result(self, path: str, timeout: float, chunks: list[bytes]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event is None:
                raise AgentError(f"{path}: no answer from the agent in {timeout:g} s")
            if isinstance(event, Output) and event.fd == 1:
                chunks.append(event.data)
            elif isinstance(event, Failed):
                raise OSError(event.errno, event.message)
            elif event == Exited(0):
                return
            else:
                raise AgentError(f"{path}: unexpected answer from the agent: {event}")

    def next_event(self, timeout: float | None) -> Event | None:
        """The next event, or None when ``timeout`` seconds pass first. AgentError when
        the connection ends without a status or the agent breaks the protocol."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                type_, payload = frame
                return self._event(type_, payload)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            try:
                chunk = self.sock.recv(65536)
            except OSError as e:
                raise AgentError(f"the agent's connection failed: {e}") from None
            if not chunk:
                raise AgentError("the agent's connection ended without an exit status")
            self._buf += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        if len(self._buf) < HEADER.size:
            return None
        type_, length = HEADER.unpack_from(self._buf)
        if self._buf[1:4] != b"\0\0\0" or length > MAX_FRAME:
            raise AgentError(f"bad frame header from the agent: {bytes(self._buf[:8]).hex()}")
        if len(self._buf) < HEADER.size + length:
            return None
        payload = bytes(self._buf[HEADER.size:HEADER.size + length])
        del self._buf[:HEADER.size + length]
        return type_, payload

    def _event(self, type_: int, payload: bytes) -> Event:
        if type_ in (T_STDOUT, T_STDERR):
            return Output(1 if type_ == T_STDOUT else 2, payload)
        if type_ in (T_STARTED, T_EXITED, T_SIGNALED) and len(payload) == 4:
            (value,) = struct.unpack("<I", payload)
            if type_ == T_STARTED:
                self.pid = value
                return Started(value)
            return Exited(value) if type_ == T_EXITED else Signaled(value)
        if type_ == T_FAILED and len(payload) >= 4:
            (err,) = struct.unpack_from("<I", payload)
            return Failed(err, payload[4:].decode(errors="replace"))
        if type_ == T_ENTRY and len(payload) >= ENTRY.size:
            mode, size, length = ENTRY.unpack_from(payload)
            if length <= len(payload) - ENTRY.size:
                end = ENTRY.size + length
                return Entry(mode, size, payload[ENTRY.size:end], payload[end:])
        if type_ == T_NOTE:
            return Note(payload.decode(errors="replace"))
        raise AgentError(f"unexpected frame from the agent: type {type_:#x}, "
                         f"{len(payload)} bytes")

    def close(self) -> None:
        self.sock.close()


def failed_status(f: Failed) -> int:
    """The exit status for a command the agent could not start, as shells and
    ``docker run`` have it: 127 not found, 126 not executable, 125 anything else."""
    if f.message.startswith("cd "):
        return 125
    if f.errno == errno.ENOENT:
        return 127
    if f.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM, errno.EISDIR):
        return 126
    return 125
