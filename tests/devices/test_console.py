"""virtio-console through fake drivers: transmit, receive, back-pressure, emerg_wr."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minivmm.console import FdSink
from minivmm.devices.base import ActivationError
from minivmm.devices.console import ConsoleDevice

from . import Attached, attach

RX, TX = 0, 1


class ListSink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        pass


class Watcher:
    """Stands in for the event loop: which fds are watched, and with what callback."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, fd: int, callback: Callable[[], None] | None) -> None:
        self.calls.append((fd, callback is not None))
        if callback is None:
            self.watched.pop(fd, None)
        else:
            self.watched[fd] = callback

    def run(self, rounds: int = 100) -> int:
        """Call back every watched fd that is readable, like a level-triggered epoll,
        until none is; returns the number of callbacks (fails if it spins)."""
        import select

        n = 0
        for _ in range(rounds):
            ready, _, _ = select.select(list(self.watched), [], [], 0)
            if not ready:
                return n
            for fd in ready:
                self.watched[fd]()
                n += 1
        raise AssertionError("the event loop spins: a watched fd stays readable")


@pytest.fixture
def sock() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def start(dev: ConsoleDevice) -> tuple[Attached, Watcher]:
    w = Watcher()
    dev.fd_watch = w
    att = attach(dev)
    for fd, cb in dev.extra_fds():  # what the transport does after activation
        w(fd, cb)
    return att, w


def received(att: Attached) -> bytes:
    return b"".join(u.written for u in att.drivers[RX].used())


# -- transmit -----------------------------------------------------------------------------


def test_transmit_to_an_fd_with_writev() -> None:
    r, w = os.pipe()
    try:
        att = attach(ConsoleDevice(FdSink(w, owned=False)))
        drv = att.drivers[TX]
        drv.publish([b"hello, ", b"world", b"\n"], kick=False)
        drv.publish([b"second"], kick=False)
        att.device.kick(TX)
        assert os.read(r, 100) == b"hello, world\nsecond"
        assert [u.len for u in drv.used()] == [0, 0]
        assert att.irq.used == 1
    finally:
        os.close(r)
        os.close(w)


def test_transmit_to_any_sink_and_event_idx() -> None:
    sink = ListSink()
    att = attach(ConsoleDevice(sink), event_idx=True)
    drv = att.drivers[TX]
    drv.on_kick = lambda: att.device.kick(TX)
    for word in (b"one ", b"two ", b"three"):
        drv.publish([word])
        assert len(drv.used()) == 1, f"{word!r} was not kicked or not served"
    assert bytes(sink.data) == b"one two three"


# -- receive ------------------------------------------------------------------------------


def test_receive_from_a_socket(sock: tuple[socket.socket, socket.socket]) -> None:
    a, b = sock
    att, w = start(ConsoleDevice(ListSink(), a.fileno()))
    att.drivers[RX].publish(writable=[64])
    b.send(b"ls -l\n")
    assert w.run() == 1
    assert received(att) == b"ls -l\n"
    assert att.irq.used == 1


def test_no_rx_buffers_pauses_input_without_loss(
        sock: tuple[socket.socket, socket.socket]) -> None:
    a, b = sock
    dev = ConsoleDevice(ListSink(), a.fileno())
    att, w = start(dev)
    drv = att.drivers[RX]
    drv.on_kick = lambda: dev.kick(RX)
    b.send(b"0123456789")
    w.run()  # no buffers: the device must stop watching, not spin
    assert a.fileno() not in w.watched
    assert w.calls[-1] == (a.fileno(), False)
    drv.publish(writable=[4])  # the guest posts a buffer and kicks: watch again
    assert a.fileno() in w.watched
    w.run()
    assert received(att) == b"0123"
    assert a.fileno() not in w.watched  # still 6 bytes waiting, no buffer
    drv.publish(writable=[3, 1], kick=False)
    drv.publish(writable=[64])
    w.run()
    assert received(att) == b"456789"  # nothing lost, nothing duplicated
    assert a.fileno() in w.watched  # buffers left: keep watching


def test_end_of_input_stops_watching(sock: tuple[socket.socket, socket.socket]) -> None:
    a, b = sock
    att, w = start(ConsoleDevice(ListSink(), a.fileno()))
    att.drivers[RX].publish(writable=[16])
    att.drivers[RX].publish(writable=[16])
    b.send(b"bye")
    b.shutdown(socket.SHUT_WR)
    w.run()
    assert received(att) == b"bye"
    assert w.watched == {}
    assert att.drivers[RX].outstanding == 1  # the buffer is not used up by the EOF


def test_receive_from_a_regular_file(tmp_path: Path) -> None:
    p = tmp_path / "input.txt"
    p.write_bytes(b"file-input")
    fd = os.open(p, os.O_RDONLY)
    try:
        dev = ConsoleDevice(ListSink(), fd)
        assert dev.extra_fds() == []  # epoll can't watch regular files
        att = attach(dev)
        drv = att.drivers[RX]
        drv.on_kick = lambda: dev.kick(RX)
        drv.publish(writable=[4])
        assert received(att) == b"file"
        drv.publish(writable=[100])
        assert received(att) == b"-input"
        drv.publish(writable=[100])
        assert received(att) == b""
        assert dev.input_ended
    finally:
        os.close(fd)


def test_pollable_input_needs_fd_watch(sock: tuple[socket.socket, socket.socket]) -> None:
    dev = ConsoleDevice(ListSink(), sock[0].fileno())
    with pytest.raises(ActivationError, match="fd_watch"):
        attach(dev)


def test_reset_stops_watching(sock: tuple[socket.socket, socket.socket]) -> None:
    a, _ = sock
    dev = ConsoleDevice(ListSink(), a.fileno())
    _, w = start(dev)
    assert a.fileno() in w.watched
    dev.reset()
    assert w.watched == {}


# -- configuration --------------------------------------------------------------------------


def test_config_and_features() -> None:
    dev = ConsoleDevice(ListSink(), cols=80, rows=25)
    cfg = dev.config()
    assert struct.unpack("<HHII", cfg) == (80, 25, 1, 0)
    f = dev.avail_features
    assert f & 1 and f & 4 and not f & 2  # SIZE, EMERG_WRITE, no MULTIPORT
    assert not ConsoleDevice(ListSink()).avail_features & 1  # no size given


def test_emerg_wr_writes_a_character() -> None:
    sink = ListSink()
    dev = ConsoleDevice(sink)
    dev.write_config(8, memoryview(struct.pack("<I", ord("!"))))
    dev.write_config(8, memoryview(b"?"))
    dev.write_config(0, memoryview(bytes(4)))  # cols/rows: read-only, ignored
    assert bytes(sink.data) == b"!?"
