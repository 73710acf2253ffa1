"""A minivmm.Guest without a VM: a fake agent behind a Firecracker-style vsock socket.

``fake_guest(tmp_path, answer)`` yields a Guest whose ``vm`` is a :class:`FakeVm` (a stop
controller and a crash detector on a NullSink) and whose agent socket, for each
connection, answers ``CONNECT`` with ``OK``, reads the request's first bytes and sends
``answer`` (or ``answer(request)``), then keeps the connection open until the test ends.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from minivmm.console import NullSink
from minivmm.crashwatch import CrashWatch, Finding
from minivmm.guest import Guest
from minivmm.stop import StopController


class FakeVm:
    """What Guest needs of a Vm: a stop controller and a crash detector."""

    def __init__(self) -> None:
        self.stopper = StopController()
        self.crash_watch = CrashWatch(NullSink())

    @property
    def crash(self) -> Finding | None:
        return self.crash_watch.first

    def close(self) -> None:
        pass


@contextmanager
def fake_guest(tmp_path: Path, answer: bytes | Callable[[bytes], bytes]
               ) -> Iterator[tuple[Guest, FakeVm]]:
    uds = tmp_path / "vsock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(uds))
    server.listen(4)
    conns: list[socket.socket] = []

    def agent() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # the test ended
            conns.append(conn)
            while not conn.recv(4096).endswith(b"\n"):
                pass
            conn.sendall(b"OK 1\n")
            request = conn.recv(4096)
            try:
                conn.sendall(answer if isinstance(answer, bytes) else answer(request))
            except OSError:
                pass

    threading.Thread(target=agent, daemon=True).start()
    vm = FakeVm()
    g = Guest.__new__(Guest)
    g.vm = vm  # type: ignore[assignment]
    g._uds = uds
    g._tmp = tempfile.TemporaryDirectory()
    try:
        yield g, vm
    finally:
        g.close()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        for c in conns:
            c.close()
