"""virtio-vsock through the virtio-mmio transport and fake drivers, with real Unix
sockets as the host programs (Firecracker's protocol: CONNECT/OK, PATH_PORT)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from minivmm.devices.vsock import (
    DEFAULT_BUF_ALLOC,
    VIRTIO_ID_VSOCK,
    VsockDevice,
)
from minivmm.devices.vsock_conn import HDR_SIZE, HOST_CID, MAX_PKT_PAYLOAD
from minivmm.devices.vsock_host import FIRST_LOCAL_PORT, LINE_MAX
from minivmm.errors import UsageError
from minivmm.transport.testing import DeviceHarness

from .vsockkit import CID, Pkt, Vsock, hdr, is_closed, recv_exactly

# §5.10.6 op values, written out: the wire format, not the implementation's names
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
GUEST_PORT = 1234  # the guest's listener
GPORT = 40000  # a guest socket's own port, for guest-initiated connections


def only(pkts: list[Pkt]) -> Pkt:
    assert len(pkts) == 1, pkts
    return pkts[0]


def connect_from_host(v: Vsock, port: int = GUEST_PORT,
                      extra: bytes = b"") -> tuple[socket.socket, int]:
    """A host program connects to the guest's ``port``; returns it and its host port."""
    s = v.host_connect(f"CONNECT {port}\n".encode() + extra)
    v.post_rx(4)
    v.pump(timeout=5)
    req = only(v.packets())
    assert req.op == REQUEST and req.dst_port == port and req.dst_cid == CID
    assert req.src_cid == HOST_CID and req.buf_alloc == DEFAULT_BUF_ALLOC
    v.send(hdr(RESPONSE, port, req.src_port))
    assert recv_exactly(s, len(f"OK {req.src_port}\n")) == f"OK {req.src_port}\n".encode()
    return s, req.src_port


def connect_from_guest(v: Vsock, port: int, rx: int = 4, **kw: int) -> socket.socket:
    """The guest connects to host ``port`` (a listener at PATH_port); returns the
    accepted socket."""
    lst = v.listen(port)
    v.post_rx(rx)
    v.send(hdr(REQUEST, GPORT, port, **kw))
    resp = only(v.packets())
    assert (resp.op, resp.src_port, resp.dst_port) == (RESPONSE, port, GPORT)
    conn, _ = lst.accept()
    lst.close()
    conn.settimeout(5)
    return conn


# -- the device, its configuration and its user errors ----------------------------------


def test_identity_config_and_features(v: Vsock) -> None:
    assert v.dev.device_type == VIRTIO_ID_VSOCK == 19
    assert len(v.dev.queues) == 3
    assert v.h.read_config(0, 8) == CID.to_bytes(8, "little")
    assert v.h.read_config(0, 4) + v.h.read_config(4, 4) == CID.to_bytes(8, "little")
    features = v.h.device_features()
    assert features & 1 and features >> 32 & 1  # VIRTIO_VSOCK_F_STREAM, VERSION_1
    assert not features & 2  # no SEQPACKET
    assert stat.S_ISSOCK(os.lstat(v.path).st_mode)


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF, 1 << 32, -1])
def test_bad_cid(tmp_path: Path, cid: int) -> None:
    with pytest.raises(UsageError, match=f"cid={cid}: a guest CID is 3 to 4294967294"):
        VsockDevice(cid, tmp_path / "v.sock")
    assert not (tmp_path / "v.sock").exists()


def test_bad_paths(tmp_path: Path) -> None:
    errors = []
    with pytest.raises(UsageError, match="does not exist") as e:
        VsockDevice(3, tmp_path / "nodir" / "v.sock")
    errors.append(e.value)
    with pytest.raises(UsageError, match="too long") as e:
        VsockDevice(3, tmp_path / ("x" * 100))
    errors.append(e.value)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UsageError, match="the path exists") as e:
        VsockDevice(3, tmp_path / "file")
    errors.append(e.value)
    assert (tmp_path / "file").read_text() == "mine"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live"))
    live.listen(1)
    with pytest.raises(UsageError, match="in use by another VM") as e:
        VsockDevice(3, tmp_path / "live")
    errors.append(e.value)
    live.close()
    assert all("\n" not in str(err) for err in errors)


def test_stale_socket_replaced_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "v.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a socket file nobody listens on
    dev = VsockDevice(3, path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))  # the device listens now
    s.close()
    dev.close()
    assert not path.exists()


# -- host -> guest (CONNECT / OK) -------------------------------------------------------


def test_host_connect_and_data_both_ways(v: Vsock) -> None:
    s, hport = connect_from_host(v, extra=b"early")
    assert hport == FIRST_LOCAL_PORT
    assert v.dev.counters.host_connects == 1 and len(v.dev.connections) == 1
    v.pump(timeout=5)
    pkt = only(v.packets())
    # the bytes after the CONNECT line are the stream's first bytes
    assert (pkt.op, pkt.payload, pkt.src_port, pkt.dst_port) == (RW, b"early", hport,
                                                                 GUEST_PORT)
    s.sendall(b"hello guest")
    v.pump(timeout=5)
    assert only(v.packets()).payload == b"hello guest"
    v.send(hdr(RW, GUEST_PORT, hport, length=11), b"hello host!")
    assert recv_exactly(s, 11) == b"hello host!"
    assert v.dev.counters.tx_bytes == 11 and v.dev.counters.rx_bytes == 16
    s.close()


def test_payload_split_across_descriptors_and_header_split(v: Vsock) -> None:
    s, hport = connect_from_host(v)
    h = hdr(RW, GUEST_PORT, hport, length=6)
    v.send(h[:10], h[10:30], h[30:] + b"ab", b"cd", b"ef")
    assert recv_exactly(s, 6) == b"abcdef"
    s.sendall(b"x" * 100)
    v.post_rx(1, size=HDR_SIZE + 100)
    v.pump(timeout=5)
    assert only(v.packets()).payload == b"x" * 100


def test_second_connection_gets_next_port_and_partial_line(v: Vsock) -> None:
    s1, p1 = connect_from_host(v)
    s2 = v.host_connect(b"CONN")
    v.pump(timeout=5)
    assert v.packets() == []
    s2.sendall(b"ECT 7\n")
    v.post_rx(2)
    v.pump(timeout=5)
    req = only(v.packets())
    assert (req.op, req.dst_port, req.src_port) == (REQUEST, 7, p1 + 1)
    v.send(hdr(RST, 7, req.src_port))  # the guest refuses: the program is closed
    assert is_closed(s2)
    assert len(v.dev.connections) == 1
    s1.close()


@pytest.mark.parametrize("line", [
    b"HELLO 5\n", b"CONNECT\n", b"CONNECT x\n", b"CONNECT 4294967296\n", b"connect 5\n",
    b"CONNECT  5\n", b"CONNECT 5 \n", b"X" * LINE_MAX, b"CONNECT 00000000000000005\n",
])
def test_bad_connect_line_closes(v: Vsock, line: bytes) -> None:
    s = v.host_connect(line)
    v.post_rx(2)
    v.pump(timeout=5)
    v.pump(timeout=0.05)
    assert is_closed(s)
    assert v.dev.counters.host_bad_connect == 1
    assert v.packets() == [] and not v.dev.connections and not v.failed


def test_host_closes_before_the_line(v: Vsock) -> None:
    s = v.host_connect(b"CONNECT 1")
    v.pump(timeout=5)
    s.close()
    v.pump(timeout=5)
    assert v.dev.counters.host_bad_connect == 1 and not v.dev.stats()["connections"]


def test_too_many_connections(tmp_path: Path) -> None:
    v = Vsock.make(tmp_path / "v.sock", max_connections=2)
    try:
        socks = [v.host_connect() for _ in range(3)]
        v.pump(timeout=5)
        assert v.dev.counters.host_refused == 1
        assert sum(is_closed(s) for s in socks[2:]) == 1
        v.post_rx(2)
        v.send(hdr(REQUEST, GPORT, 99))
        assert only(v.packets()).op == RST
        assert v.dev.counters.guest_refused == 1
    finally:
        v.close()


def test_connect_timeouts(tmp_path: Path) -> None:
    v = Vsock.make(tmp_path / "v.sock", connect_timeout=0.2)
    try:
        silent = v.host_connect(b"CONN")  # never finishes its line
        s = v.host_connect(b"CONNECT 99\n")  # the guest never answers the REQUEST
        v.post_rx(4)
        v.pump(timeout=5)
        assert only(v.packets()).op == REQUEST
        for _ in range(50):
            v.pump(timeout=0.1)
            if v.dev.counters.connect_timeouts:
                break
        assert is_closed(silent) and is_closed(s)
        assert v.dev.counters.host_bad_connect == 1 and v.dev.counters.connect_timeouts == 1
        rst = only(v.packets())
        assert (rst.op, rst.dst_port) == (RST, 99)
        assert not v.dev.connections and not v.dev.stats()["buffered_bytes"]
        # an answered connection has no deadline
        s, _ = connect_from_host(v)
        v.pump(timeout=0.5)
        assert len(v.dev.connections) == 1 and v.dev.counters.connect_timeouts == 1
        s.close()
    finally:
        v.close()


# -- guest -> host (PATH_PORT) ---------------------------------------------------------


def test_guest_connect_to_listening_host_port(v: Vsock) -> None:
    c = connect_from_guest(v, 5000)
    v.send(hdr(RW, GPORT, 5000, length=4), b"ping")
    assert recv_exactly(c, 4) == b"ping"
    c.sendall(b"pong")
    v.pump(timeout=5)
    pkt = only(v.packets())
    assert (pkt.op, pkt.src_port, pkt.dst_port, pkt.payload) == (RW, 5000, GPORT, b"pong")
    assert v.dev.counters.guest_connects == 1


def test_guest_connect_with_nothing_listening_gets_rst(v: Vsock) -> None:
    v.post_rx(1)
    v.send(hdr(REQUEST, GPORT, 5001))
    rst = only(v.packets())
    assert (rst.op, rst.src_port, rst.dst_port, rst.dst_cid) == (RST, 5001, GPORT, CID)
    assert v.dev.counters.guest_refused == 1 and not v.dev.connections


# -- shutdown and reset ------------------------------------------------------------------


def test_host_eof_then_guest_closes(v: Vsock) -> None:
    s, hport = connect_from_host(v)
    s.sendall(b"last words")
    s.shutdown(socket.SHUT_WR)
    v.pump(timeout=5)
    data, shut = v.packets()
    assert data.payload == b"last words"
    assert (shut.op, shut.flags) == (SHUTDOWN, 2)  # VIRTIO_VSOCK_SHUTDOWN_SEND
    # the guest still answers, then closes both ways (what Linux's close() sends)
    v.send(hdr(RW, GUEST_PORT, hport, length=3), b"bye")
    v.send(hdr(SHUTDOWN, GUEST_PORT, hport, flags=3))
    assert only(v.packets()).op == RST
    assert recv_exactly(s, 4) == b"bye"
    assert is_closed(s) and not v.dev.connections


def test_guest_shutdown_send_half_closes(v: Vsock) -> None:
    c = connect_from_guest(v, 5002)
    v.send(hdr(RW, GPORT, 5002, length=2), b"hi")
    v.send(hdr(SHUTDOWN, GPORT, 5002, flags=2))
    assert recv_exactly(c, 3) == b"hi"  # then EOF: the write side was shut
    c.sendall(b"reply")  # the other direction still works
    v.pump(timeout=5)
    assert only(v.packets()).payload == b"reply"
    c.close()  # the host's end too: both directions are over -> RST
    v.pump(timeout=5)
    assert only(v.packets()).op == RST
    assert not v.dev.connections
    # more data from the guest on the closed connection: RST
    v.send(hdr(RW, GPORT, 5002, length=1), b"x")
    assert only(v.packets()).op == RST


def test_guest_rst_closes_host_socket(v: Vsock) -> None:
    c = connect_from_guest(v, 5003)
    v.send(hdr(RST, GPORT, 5003))
    assert is_closed(c) and v.dev.counters.rst_received == 1
    assert v.packets() == []  # never answer an RST


def test_host_reset_sends_rst(v: Vsock) -> None:
    c = connect_from_guest(v, 5004)
    c.close()
    v.pump(timeout=5)
    pkt = only(v.packets())
    assert pkt.op == SHUTDOWN
    v.send(hdr(RW, GPORT, 5004, length=1), b"x")  # to a closed socket: EPIPE
    assert only(v.packets()).op == RST
    assert v.dev.counters.host_errors == 1 and not v.dev.connections


def test_write_after_guest_shutdown_send_is_reset(v: Vsock) -> None:
    c = connect_from_guest(v, 5005)
    v.send(hdr(SHUTDOWN, GPORT, 5005, flags=2))
    v.send(hdr(RW, GPORT, 5005, length=1), b"x")
    assert only(v.packets()).op == RST and v.dev.counters.protocol_errors == 1
    assert is_closed(c)


# -- flow control -----------------------------------------------------------------------


def test_never_more_than_the_guests_credit(v: Vsock) -> None:
    c = connect_from_guest(v, 6000, buf_alloc=10000)
    c.sendall(b"z" * 30000)
    v.post_rx(16)
    v.pump(timeout=5)
    pkts = v.packets()
    data = [p for p in pkts if p.op == RW]
    assert sum(len(p.payload) for p in data) == 10000
    assert pkts[-1].op == CREDIT_REQUEST  # out of credit: ask once
    v.pump(timeout=0.05)
    assert v.packets() == [] and not v.epoll_readable()  # no spinning while stalled
    # the guest read 4000 bytes and says so
    v.send(hdr(CREDIT_UPDATE, GPORT, 6000, buf_alloc=10000, fwd_cnt=4000))
    v.pump()
    pkts = v.packets()
    assert sum(len(p.payload) for p in pkts if p.op == RW) == 4000
    assert pkts[-1].op == CREDIT_REQUEST
    # a guest that shrinks its buffer below what is in flight gets nothing, not an error
    v.send(hdr(CREDIT_UPDATE, GPORT, 6000, buf_alloc=100, fwd_cnt=4000))
    v.pump(timeout=0.05)
    assert v.packets() == []
    assert not v.failed


def test_credit_request_gets_credit_update(v: Vsock) -> None:
    c = connect_from_guest(v, 6001)
    v.send(hdr(CREDIT_REQUEST, GPORT, 6001))
    pkt = only(v.packets())
    assert (pkt.op, pkt.buf_alloc, pkt.fwd_cnt) == (CREDIT_UPDATE, DEFAULT_BUF_ALLOC, 0)
    c.close()


def test_guest_without_rx_buffers_stops_reading_host(v: Vsock) -> None:
    c = connect_from_guest(v, 6002)
    c.setblocking(False)
    sent = 0
    try:
        while True:
            sent += c.send(b"q" * 65536)
    except BlockingIOError:
        pass
    v.pump(timeout=5)
    pkts = v.packets()  # the 3 buffers left from connect_from_guest
    got = sum(len(p.payload) for p in pkts)
    assert len(pkts) == 3 and got == 3 * 4096
    assert v.dev.counters.rx_stalls >= 1
    assert not v.epoll_readable()  # the socket is no longer watched: no spinning
    # the host program is held back by its own socket buffer, nothing is dropped
    rx = v.h.drivers[0]
    for _ in range(1000):
        if got == sent:
            break
        if rx.outstanding < 32:
            v.post_rx(32)
        v.pump(timeout=1)
        got += sum(len(p.payload) for p in v.packets() if p.op == RW)
        v.send(hdr(CREDIT_UPDATE, GPORT, 6002, fwd_cnt=got))  # the guest read it all
    assert got == sent and v.dev.counters.rx_stalls >= 1


def test_host_that_does_not_read_bounds_the_guest(tmp_path: Path) -> None:
    buf = 128 * 1024
    v = Vsock.make(tmp_path / "v.sock", buf_alloc=buf)
    try:
        c = connect_from_guest(v, 6003)
        conn = next(iter(v.dev.connections.values()))
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        chunk = b"w" * 16384
        fwd_told = 0
        while sent + len(chunk) <= buf:
            v.send(hdr(RW, GPORT, 6003, length=len(chunk)), chunk)
            sent += len(chunk)
            for p in v.packets():
                assert p.op == CREDIT_UPDATE
                fwd_told = p.fwd_cnt
        assert v.dev.buffered_bytes() > 0  # the socket took only part
        assert v.dev.buffered_bytes() + fwd_told <= buf + 16384
        assert v.dev.buffered_bytes() <= buf
        # one byte more than the credit: a credit violation resets the connection
        over = buf - v.dev.buffered_bytes() + 1
        v.send(hdr(RW, GPORT, 6003, length=over), b"v" * over)
        assert only(v.packets()).op == RST
        assert v.dev.counters.credit_violations == 1 and v.dev.buffered_bytes() == 0
        c.close()
    finally:
        v.close()


def test_slow_host_reader_gets_everything_in_order(tmp_path: Path) -> None:
    v = Vsock.make(tmp_path / "v.sock", buf_alloc=64 * 1024)
    try:
        c = connect_from_guest(v, 6004)
        conn = next(iter(v.dev.connections.values()))
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(i * 7 & 0xFF for i in range(300_000))
        fwd = 0
        pos = 0
        received = bytearray()
        c.setblocking(False)
        for _ in range(10_000):
            if pos == len(data) and len(received) == len(data):
                break
            credit = 64 * 1024 - (pos - fwd)
            n = min(credit, 20_000, len(data) - pos)
            if n > 0:
                v.send(hdr(RW, GPORT, 6004, length=n), data[pos:pos + n])
                pos += n
            try:
                received += c.recv(8192)
            except BlockingIOError:
                pass
            v.pump()
            if v.h.drivers[0].outstanding < 4:
                v.post_rx(8)
            for p in v.packets():
                assert p.op == CREDIT_UPDATE
                fwd = p.fwd_cnt
            assert v.dev.buffered_bytes() <= 64 * 1024
        assert bytes(received) == data
        assert v.dev.counters.credit_violations == 0
    finally:
        v.close()


# -- a hostile guest ---------------------------------------------------------------------


HOSTILE = [
    ("short header", hdr(RW, GPORT, 7000)[:43], "tx_bad_chains", None),
    ("wrong source cid", hdr(REQUEST, GPORT, 7000, src_cid=CID + 1), "tx_bad_cid", None),
    ("wrong destination cid", hdr(REQUEST, GPORT, 7000, dst_cid=1), "tx_bad_cid", RST),
    ("seqpacket", hdr(REQUEST, GPORT, 7000, type=2), "tx_bad_type", RST),
    ("op 0", hdr(0, GPORT, 7000), "tx_bad_op", RST),
    ("op 99", hdr(99, GPORT, 7000), "tx_bad_op", RST),
    ("unknown connection", hdr(RW, GPORT, 7000, length=1) + b"x", "tx_unknown_conn", RST),
    ("length beyond the chain", hdr(RW, GPORT, 7000, length=5) + b"x", "tx_bad_len", RST),
    ("oversized", hdr(RW, GPORT, 7000, length=MAX_PKT_PAYLOAD + 1)
     + bytes(MAX_PKT_PAYLOAD + 1), "tx_bad_len", RST),
    ("rst for nothing", hdr(RST, GPORT, 7000), None, None),
    ("response for nothing", hdr(RESPONSE, GPORT, 7000), "tx_unknown_conn", RST),
]


@pytest.mark.parametrize(("name", "packet", "counter", "answer"), HOSTILE,
                         ids=[case[0] for case in HOSTILE])
def test_hostile_packets(v: Vsock, name: str, packet: bytes, counter: str | None,
                         answer: int | None) -> None:
    v.post_rx(2)
    before = v.dev.stats()
    v.send(packet)
    assert v.tx_used() == 1  # the chain is returned, always
    pkts = v.packets()
    assert [p.op for p in pkts] == ([] if answer is None else [answer]), name
    if answer is not None:
        assert (pkts[0].src_port, pkts[0].dst_port) == (7000, GPORT)
    after = v.dev.stats()
    changed = {k for k in after if after[k] != before[k]} - {"rst_sent", "rx_packets"}
    assert changed == (set() if counter is None else {counter}), name
    assert not v.failed and not v.dev.connections


def test_transmit_chain_with_writable_part_dropped(v: Vsock) -> None:
    v.post_rx(1)
    v.h.drivers[1].publish(readable=[hdr(REQUEST, GPORT, 7001)], writable=[16])
    assert v.dev.counters.tx_bad_chains == 1 and v.packets() == []


@pytest.mark.parametrize("bad", ["rw before response", "second request", "response",
                                 "credit violation", "bad type"])
def test_protocol_errors_reset_the_connection(v: Vsock, bad: str) -> None:
    if bad == "rw before response":
        s = v.host_connect(b"CONNECT 80\n")
        v.post_rx(4)
        v.pump(timeout=5)
        req = only(v.packets())
        v.send(hdr(RW, 80, req.src_port, length=1), b"x")
        assert only(v.packets()).op == RST
    else:
        s = connect_from_guest(v, 7002, buf_alloc=4096)
        packet = {
            "second request": hdr(REQUEST, GPORT, 7002),
            "response": hdr(RESPONSE, GPORT, 7002),
            "credit violation": hdr(RW, GPORT, 7002, length=DEFAULT_BUF_ALLOC + 1)
            + bytes(DEFAULT_BUF_ALLOC + 1),
            "bad type": hdr(RW, GPORT, 7002, type=3),
        }[bad]
        v.send(packet)
        assert only(v.packets()).op == RST
    assert is_closed(s) and not v.dev.connections and not v.failed


def test_bad_receive_chains_returned_unused(v: Vsock) -> None:
    rx = v.h.drivers[0]
    rx.publish(writable=[HDR_SIZE - 1])
    rx.publish(readable=[b"r"], writable=[4096])
    v.send(hdr(REQUEST, GPORT, 7003))  # owes the guest an RST
    used = rx.used()
    assert [u.len for u in used] == [0, 0]
    assert v.dev.counters.rx_bad_chains == 2 and v.dev.counters.rx_stalls >= 1
    v.post_rx(1, size=HDR_SIZE)  # exactly a header: enough for control packets
    assert only(v.packets()).op == RST


def test_header_only_receive_buffers_carry_credit_not_data(v: Vsock) -> None:
    c = connect_from_guest(v, 7004, rx=1)
    c.sendall(b"data")
    v.post_rx(1, size=HDR_SIZE)
    v.pump(timeout=5)
    assert only(v.packets()).op == CREDIT_UPDATE
    v.post_rx(1)  # served as soon as it is kicked
    assert only(v.packets()).payload == b"data"


def test_rst_backlog_is_bounded(tmp_path: Path) -> None:
    v = Vsock.make(tmp_path / "v.sock", max_connections=4)
    try:
        for i in range(200):  # no receive buffers: every RST waits
            v.send(hdr(RW, GPORT + i, 7005, length=0))
        assert v.dev.counters.rst_dropped == 200 - (4 + 64)
        assert len(v.dev._rsts) == 4 + 64
        v.post_rx(100)
        assert len(v.packets()) == 68
    finally:
        v.close()


# -- resets ---------------------------------------------------------------------------------


def test_transport_reset_event(v: Vsock) -> None:
    s, _ = connect_from_host(v)
    c = connect_from_guest(v, 8000)
    v.post_event(1)
    v.dev.transport_reset()
    assert v.events() == [b"\0\0\0\0"]  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert is_closed(s) and is_closed(c) and not v.dev.connections
    assert v.dev.counters.transport_resets == 1
    # no event buffer: the event waits for the next one
    v.dev.transport_reset()
    assert v.events() == []
    v.post_event(1)
    assert v.events() == [b"\0\0\0\0"]


def test_device_reset_closes_connections(v: Vsock) -> None:
    s, _ = connect_from_host(v)
    v.h.write32(0x070, 0)  # Status = 0
    assert is_closed(s) and not v.dev.connections
    # a new driver (fresh rings) brings it up again; the listener still works
    os.close(v.h._irq_fd)
    v.h = DeviceHarness(v.dev, event_idx=True)
    v.h.initialise()
    s2, port = connect_from_host(v)
    assert port == FIRST_LOCAL_PORT + 1
    s2.close()


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(("opt", "want"), [
    ("cid=2,uds={d}/v.sock", "cid=2: a guest CID is 3 to 4294967294"),
    ("cid=3", "give both"),
    ("cid=x,uds={d}/v.sock", "bad option 'cid=x'"),
    ("cid=3,uds={d}/none/v.sock", "does not exist"),
    ("cid=3,uds={d}/v.sock,port=5", "bad option 'port=5'"),
])
def test_cli_usage_errors(tmp_path: Path, opt: str, want: str) -> None:
    from guests import guest_artifact, run_minivmm

    r = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--vsock",
                    opt.format(d=tmp_path), timeout=60)
    assert r.returncode == 2, r.stderr
    assert want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
