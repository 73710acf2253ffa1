"""A Hypothesis state machine over virtio-vsock connections: host programs (real Unix
sockets) and a guest (fake driver) doing anything in any order, some of it wrong.

The guest model keeps, per connection, what the device may send it (its buf_alloc and
the fwd_cnt it reported) and checks every packet against it. Invariants: nothing escapes
as an exception, the device never asks for a reset (every chain here is well formed),
held guest data never exceeds the credit the device advertised, the RST backlog and the
number of sockets stay bounded, and the device's epoll never spins.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minivmm.devices.vsock_conn import HDR_SIZE

from .vsockkit import RX_BUF, Vsock, hdr

REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
BUF = 64 * 1024  # the device's buf_alloc
MAX_CONNS = 4
LISTENING = (100, 101)  # host ports with a listener; 102 has none
GUEST_LISTEN = 1234


@dataclass
class GConn:
    """A connection as the guest sees it."""

    buf_alloc: int  # what it told the device
    fwd: int = 0  # the fwd_cnt it told the device
    received: int = 0  # payload bytes the device sent it
    sent: int = 0  # payload bytes it sent the device
    dev_fwd: int = 0  # the device's fwd_cnt, from its last header
    open: bool = False


class VsockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
        self.v = Vsock.make(self.dir / "v", buf_alloc=BUF, max_connections=MAX_CONNS)
        self.listeners = {p: self.v.listen(p) for p in LISTENING}
        for lst in self.listeners.values():
            lst.setblocking(False)
        self.host: list[socket.socket] = []
        self.conns: dict[tuple[int, int], GConn] = {}  # (host port, guest port)
        self.requests: list[tuple[int, int]] = []  # REQUESTs from the device, unanswered
        self.next_gport = 50000
        self.spare_event = False  # an event buffer posted and not used

    def teardown(self) -> None:
        for s in [*self.host, *self.listeners.values()]:
            s.close()
        self.v.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what the guest receives ---------------------------------------------------------

    def collect(self) -> None:
        for p in self.v.packets():
            key = (p.src_port, p.dst_port)
            c = self.conns.get(key)
            if p.op == REQUEST:
                assert c is None and p.dst_port in (GUEST_LISTEN, 7)
                self.requests.append(key)
                continue
            if c is None:
                assert p.op == RST, f"op {p.op} for a connection the guest never had"
                continue
            if p.op == RST:
                del self.conns[key]
                continue
            c.dev_fwd = p.fwd_cnt
            assert p.buf_alloc == BUF
            if p.op == RW:
                assert c.open, "data before the connection was open"
                c.received += len(p.payload)
                assert c.received - c.fwd <= c.buf_alloc, "the guest's credit was exceeded"
            elif p.op == RESPONSE:
                c.open = True

    def send(self, packet: bytes, payload: bytes = b"") -> None:
        self.v.send(packet + payload)
        self.collect()

    def accept_all(self) -> None:
        for lst in self.listeners.values():
            try:
                while True:
                    s, _ = lst.accept()
                    s.setblocking(False)
                    self.host.append(s)
            except BlockingIOError:
                pass

    # -- rules: the host -------------------------------------------------------------------

    @precondition(lambda self: len(self.host) < 12)
    @rule(port=st.sampled_from([GUEST_LISTEN, 7]), split=st.booleans())
    def host_connect(self, port: int, split: bool) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.v.path))
        s.setblocking(False)
        line = f"CONNECT {port}\n".encode()
        self.host.append(s)
        try:
            s.send(line[:3] if split else line)
            if split:
                self.v.pump()
                self.collect()
                s.send(line[3:])
        except OSError:
            pass  # refused: too many connections

    @precondition(lambda self: len(self.host) < 12)
    @rule(line=st.binary(max_size=40))
    def host_garbage(self, line: bytes) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.v.path))
        s.setblocking(False)
        s.send(line)
        self.host.append(s)

    @precondition(lambda self: self.host)
    @rule(i=st.integers(0, 11), n=st.sampled_from([1, 100, 5000, 70000]))
    def host_send(self, i: int, n: int) -> None:
        try:
            self.host[i % len(self.host)].send(b"h" * n)
        except OSError:
            pass  # full, or closed by the device

    @precondition(lambda self: self.host)
    @rule(i=st.integers(0, 11))
    def host_recv(self, i: int) -> None:
        try:
            self.host[i % len(self.host)].recv(100_000)
        except OSError:
            pass

    @precondition(lambda self: self.host)
    @rule(i=st.integers(0, 11), how=st.sampled_from(["close", "shut_wr"]))
    def host_close(self, i: int, how: str) -> None:
        s = self.host[i % len(self.host)]
        if how == "close":
            self.host.remove(s)
            s.close()
        else:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    @rule()
    def pump(self) -> None:
        self.v.pump()
        self.collect()
        self.accept_all()

    # -- rules: the guest ------------------------------------------------------------------

    @rule(n=st.integers(1, 8), size=st.sampled_from([HDR_SIZE, HDR_SIZE + 100, RX_BUF]))
    def post_rx(self, n: int, size: int) -> None:
        rx = self.v.h.drivers[0]
        n = min(n, 64 - rx.outstanding)
        if n > 0:
            self.v.post_rx(n, size)
            self.collect()

    @precondition(lambda self: self.requests)
    @rule(accept=st.booleans(), buf=st.sampled_from([4096, 10000, 65536]))
    def answer_request(self, accept: bool, buf: int) -> None:
        hport, gport = self.requests.pop(0)
        if accept:
            self.conns[(hport, gport)] = GConn(buf, open=True)
            self.send(hdr(RESPONSE, gport, hport, buf_alloc=buf))
        else:
            self.send(hdr(RST, gport, hport))

    @rule(port=st.sampled_from([*LISTENING, 102]), buf=st.sampled_from([4096, 65536]))
    def guest_connect(self, port: int, buf: int) -> None:
        gport = self.next_gport
        self.next_gport += 1
        self.conns[(port, gport)] = GConn(buf)
        self.send(hdr(REQUEST, gport, port, buf_alloc=buf))
        self.accept_all()

    def pick(self, i: int) -> tuple[tuple[int, int], GConn] | None:
        if not self.conns:
            return None
        key = sorted(self.conns)[i % len(self.conns)]
        return key, self.conns[key]

    @rule(i=st.integers(0, 20), n=st.integers(0, 70000), overrun=st.booleans())
    def guest_data(self, i: int, n: int, overrun: bool) -> None:
        if (picked := self.pick(i)) is None:
            return
        (hport, gport), c = picked
        credit = BUF - (c.sent - c.dev_fwd)
        n = min(n, 65536) if overrun else max(0, min(n, credit))
        before = self.v.dev.counters.credit_violations
        c.sent += n
        self.send(hdr(RW, gport, hport, length=n, buf_alloc=c.buf_alloc, fwd_cnt=c.fwd),
                  b"g" * n)
        if c.open and n > credit:
            # Past the credit the guest last saw. The device may have forwarded more to the
            # host since (its real room is larger): then it takes the data; otherwise it
            # resets the connection. Either way it never holds more than it advertised.
            if self.v.dev.counters.credit_violations == before + 1:
                assert (hport, gport) not in self.v.dev.connections
            else:
                assert self.v.dev.buffered_bytes() <= len(self.v.dev.connections) * BUF

    @rule(i=st.integers(0, 20))
    def guest_reads(self, i: int) -> None:
        """The guest's application read everything: it tells the device."""
        if (picked := self.pick(i)) is None:
            return
        (hport, gport), c = picked
        c.fwd = c.received
        self.send(hdr(CREDIT_UPDATE, gport, hport, buf_alloc=c.buf_alloc, fwd_cnt=c.fwd))

    @rule(i=st.integers(0, 20), op=st.sampled_from([SHUTDOWN, RST, CREDIT_REQUEST]),
          flags=st.integers(0, 3))
    def guest_control(self, i: int, op: int, flags: int) -> None:
        if (picked := self.pick(i)) is None:
            return
        (hport, gport), c = picked
        if op == RST:
            del self.conns[(hport, gport)]
        self.send(hdr(op, gport, hport, flags=flags, buf_alloc=c.buf_alloc, fwd_cnt=c.fwd))

    @rule(raw=st.binary(min_size=0, max_size=60), cid=st.sampled_from([42, 43, 2]),
          op=st.integers(0, 9), typ=st.integers(0, 3), length=st.integers(0, 100))
    def guest_garbage(self, raw: bytes, cid: int, op: int, typ: int, length: int) -> None:
        """A header with any op, type, CID and length, for any ports; or random bytes."""
        if len(raw) % 2:
            self.v.send(raw)
        else:
            dport = sorted(self.conns)[0][0] if self.conns and op else 9
            self.v.send(hdr(op, 60000, dport, type=typ, src_cid=cid, length=length) + raw)
        # whatever it hit is gone or intact; forget what the guest can't know
        for p in self.v.packets():
            self.conns.pop((p.src_port, p.dst_port), None)

    @rule(handled=st.booleans())
    def transport_reset(self, handled: bool) -> None:
        """The driver handles the event at once (re-posts its buffer) or later: host
        programs' REQUESTs wait for that meanwhile."""
        self.collect()
        if not self.spare_event:
            self.v.post_event(1)
        self.spare_event = False
        self.v.dev.transport_reset()
        assert self.v.events() == [b"\0\0\0\0"]
        assert not self.v.dev.connections
        self.conns.clear()
        self.requests.clear()
        if handled:
            self.event_buffer_reposted()

    @precondition(lambda self: self.v.dev._hold_until)
    @rule()
    def event_buffer_reposted(self) -> None:
        self.v.post_event(1)
        self.spare_event = True
        assert not self.v.dev._hold_until and not self.v.dev._waiting

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def bounded(self) -> None:
        dev = self.v.dev
        assert not self.v.failed
        assert len(dev._by_fd) <= MAX_CONNS
        for conn in dev._by_fd.values():
            assert len(conn.pending) <= BUF
            assert len(conn.line) < 32
        assert len(dev._rsts) <= MAX_CONNS + 64
        assert len(dev._ready) <= MAX_CONNS


VsockMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVsockMachine = VsockMachine.TestCase
