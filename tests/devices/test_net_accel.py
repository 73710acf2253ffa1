"""The network device's C accelerator against its Python path (minivmm.devices.net_accel).

Two devices, one on each path, get the same rings from two identical fake drivers, the
same frames and the same hostile writes; each device's "tap" is one end of a
SOCK_SEQPACKET socketpair (one message is one frame, as on a tap). Hypothesis drives
them and, after every step, both must show the same used ring (ids, lengths and the
bytes written), the same frames on the wire, the same counters and the same failures
(DEVICE_NEEDS_RESET and the reason). tests/devices/test_net.py runs its whole suite on
both paths too, with real taps. ``NET_ACCEL_EXAMPLES=400`` runs a longer hunt (about a
minute here).
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm.devices.net import HDR_SIZE, VIRTIO_NET_F_MRG_RXBUF, NetDevice
from minivmm.transport.mmio import DEVICE_NEEDS_RESET
from minivmm.transport.testing import DeviceHarness
from minivmm.virtio import ring

from .test_net import accel_missing, inside, ip

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/net/tun"),
                                reason="this host has no /dev/net/tun (modprobe tun)")

RXQ, TXQ = 0, 1
QSIZE = 16
EXAMPLES = int(os.environ.get("NET_ACCEL_EXAMPLES", "60"))  # more for a longer hunt


@dataclass
class Side:
    """One device with its harness and the other end of its socketpair."""

    dev: NetDevice
    h: DeviceHarness
    wire: socket.socket
    tap: int  # the real tap's fd, put back before closing
    failures: list[str] = field(default_factory=list)

    def observe(self) -> tuple[Any, ...]:
        frames = []
        while True:
            try:
                data = self.wire.recv(1 << 17)
            except BlockingIOError:
                break
            if not data:  # end of file: the device's end was shut down (break_io)
                break
            frames.append(data)
        used = [tuple(u) for u in self.h.drivers[RXQ].used()]
        used += [tuple(u) for u in self.h.drivers[TXQ].used()]
        stats = self.dev.stats()
        del stats["accelerated"]  # the one thing meant to differ
        return (used, frames, stats, bool(self.h.status & DEVICE_NEEDS_RESET), self.failures)


def make_side(netns: str, accelerated: bool, features_off: tuple[int, ...],
              event_idx: bool) -> Side:
    name = f"mva{uuid.uuid4().hex[:8]}"
    with inside(netns):
        dev = NetDevice(name, accelerate=accelerated)
    assert (dev._accel is not None) == accelerated
    h = DeviceHarness(dev, queue_size=QSIZE, event_idx=event_idx)
    dev.fd_watch = lambda fd, cb: None
    features = h.device_features()
    for b in features_off:
        features &= ~(1 << b)
    if not event_idx:
        features &= ~(1 << 29)
    h.initialise(features)
    assert dev.accelerated == accelerated and dev.stats()["accelerated"] == accelerated
    ours, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    wire.setblocking(False)
    side = Side(dev, h, wire, dev._tap)
    dev._tap = ours.detach()
    inner = dev.on_needs_reset
    assert inner is not None

    def failed(reason: str) -> None:
        side.failures.append(reason)
        inner(reason)

    dev.on_needs_reset = failed
    return side


def close_side(s: Side) -> None:
    os.close(s.dev._tap)
    s.dev._tap = s.tap
    s.wire.close()
    s.h.close()


@pytest.fixture(scope="module")
def netns_name() -> Iterator[str]:
    if why := accel_missing():
        pytest.skip(why)
    name = f"minivmm-accel-{os.getpid()}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        ip("netns", "del", name)


# -- what the driver (and the host) do: the same to both sides ---------------------------

def frame(size: int, seed: int) -> bytes:
    return bytes(HDR_SIZE) + bytes(((i * 7 + seed) & 0xFF) for i in range(size))


Op = tuple[str, tuple[Any, ...]]

tx_chain = st.tuples(
    st.just("tx"),
    st.tuples(st.lists(st.integers(0, 80), min_size=1, max_size=4),  # readable sizes
              st.lists(st.integers(0, 16), max_size=1),  # writable sizes: dropped
              st.booleans(), st.integers(0, 255)))
rx_chain = st.tuples(
    st.just("rx"),
    st.tuples(st.one_of(st.just([]), st.just([]), st.just([]),  # readable: a bad chain
                        st.lists(st.integers(0, 8), min_size=1, max_size=1)),
              st.lists(st.integers(1, 400), min_size=1, max_size=3),
              st.booleans()))
send = st.tuples(st.just("send"), st.tuples(st.integers(0, 300), st.integers(0, 255)))
cheat = st.tuples(st.just("cheat"), st.tuples(
    st.sampled_from([RXQ, TXQ]), st.integers(0, QSIZE - 1),
    st.sampled_from(["addr", "len", "flags", "next", "avail_entry", "avail_jump"]),
    st.integers(0, (1 << 64) - 1)))
kick = st.tuples(st.just("kick"), st.tuples(st.sampled_from([RXQ, TXQ])))
readable = st.tuples(st.just("readable"), st.just(()))
break_io = st.tuples(st.just("break_io"), st.just(()))
# a receive buffer that fits, a frame, and the kick that resumes the tap: deliveries
exchange = st.tuples(st.just("exchange"), st.tuples(st.integers(12, 1500), st.integers(0, 255)))
OPS = st.lists(st.one_of(tx_chain, tx_chain, rx_chain, rx_chain, send, send, kick, kick,
                         readable, readable, cheat, break_io, exchange, exchange),
               max_size=30)


def apply(s: Side, op: Op) -> None:
    kind, args = op
    if kind == "tx":
        sizes, writable, indirect, seed = args
        data = frame(sum(sizes), seed)
        parts, at = [], 0
        for n in sizes:
            parts.append(data[at : at + n + (HDR_SIZE if at == 0 else 0)])
            at += len(parts[-1])
        publish(s, TXQ, parts, writable, indirect)
    elif kind == "rx":
        bad, writable, indirect = args
        publish(s, RXQ, [bytes(n) for n in bad], writable, indirect)
    elif kind == "send":
        size, seed = args
        try:
            s.wire.send(frame(size, seed)[HDR_SIZE:])  # what a tap reads: any bytes
        except (BlockingIOError, BrokenPipeError):
            pass  # full, or shut down by break_io: the same on both sides
    elif kind == "kick":
        s.h.kick(args[0])
    elif kind == "readable":
        s.dev.on_tap_readable()
    elif kind == "break_io":  # every later read sees end-of-file, every write EPIPE
        with socket.socket(fileno=os.dup(s.dev._tap)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    elif kind == "cheat":
        cheat_once(s, *args)
    elif kind == "exchange":
        size, seed = args
        publish(s, RXQ, [], [2048], False)
        apply(s, ("send", (size, seed)))
        s.h.kick(RXQ)


def cheat_once(s: Side, q: int, index: int, what: str, value: int) -> None:
    d = s.h.drivers[q]
    if what == "avail_entry":
        d.set_avail_entry(index, value % (QSIZE + 2))
    elif what == "avail_jump":
        d.set_avail_idx(d.avail_idx + QSIZE + 1 + value % 100)
    else:
        addr, length, flags, nxt = d.descriptor(index)
        if what == "addr":
            addr = value
        elif what == "len":
            length = value & 0xFFFF_FFFF if value & 1 else value % 200
        elif what == "flags":
            flags = value & 7
        else:
            nxt = value % (QSIZE + 2)
        d.set_descriptor(index, addr, length, flags, nxt)


def publish(s: Side, q: int, readable: list[bytes], writable: list[int],
            indirect: bool) -> None:
    try:
        s.h.drivers[q].publish(readable, writable, indirect=indirect, kick=False)
    except MemoryError:
        pass  # the fake driver is out of descriptors: the same on both sides


@pytest.mark.parametrize("mrg_rxbuf", [False, True])
@pytest.mark.parametrize("event_idx", [True, False])
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS)
def test_both_paths_do_the_same(netns_name: str, mrg_rxbuf: bool, event_idx: bool,
                                ops: list[Op]) -> None:
    off = () if mrg_rxbuf else (VIRTIO_NET_F_MRG_RXBUF,)
    sides = [make_side(netns_name, a, off, event_idx) for a in (False, True)]
    try:
        for op in ops:
            if op[0] == "cheat" and op[1][0] == RXQ and sides[0].dev.rx_held:
                # The Python path has popped (walked) receive chains ahead of frames, the
                # C path walks a chain when its frame comes: a guest rewriting a chain
                # it made available in between is seen by one only. Not a difference in
                # what either accepts: cheat on receive chains only when none is held.
                continue
            for s in sides:
                apply(s, op)
            python, fast = (s.observe() for s in sides)
            assert python == fast, op
    finally:
        for s in sides:
            close_side(s)


def test_index_wrap_at_2_16(netns_name: str) -> None:
    """Both queues' indices start just below 2^16 and pass it on the C path."""
    s = make_side(netns_name, True, (VIRTIO_NET_F_MRG_RXBUF,), True)
    try:
        for q in (RXQ, TXQ):
            drv, queue = s.h.drivers[q], s.dev.queues[q]
            drv.set_avail_idx(0xFFF8)
            drv._avail_idx = drv._last_used = drv._kick_checked = 0xFFF8
            drv.write(drv.used_addr + ring.IDX_OFFSET, struct.pack("<H", 0xFFF8))
            queue.next_avail = queue.next_used = 0xFFF8
        sent, got, txed = [], [], 0
        for i in range(40):
            s.h.drivers[TXQ].publish([frame(60, i)], kick=False)
            s.h.drivers[RXQ].publish(writable=[200], kick=False)
            s.wire.send(frame(50, i))
            sent.append(frame(50, i)[HDR_SIZE:])
            if i % 7 == 6:
                s.h.kick(TXQ)
                s.h.kick(RXQ)  # receives (the device stops watching the tap when idle)
                got += [u.written[HDR_SIZE:] for u in s.h.drivers[RXQ].used()]
                txed += len(s.h.drivers[TXQ].used())
        s.h.kick(TXQ)
        s.h.kick(RXQ)
        got += [u.written[HDR_SIZE:] for u in s.h.drivers[RXQ].used()]
        txed += len(s.h.drivers[TXQ].used())
        assert got == sent and txed == 40
        assert [s.wire.recv(200) for _ in range(40)] == [frame(60, i) for i in range(40)]
        assert s.dev.queues[TXQ].next_used == s.dev.queues[RXQ].next_used == (0xFFF8 + 40) % 65536
        assert s.dev.stats()["tx_packets"] == s.dev.stats()["rx_packets"] == 40
    finally:
        close_side(s)


def _last(d: Any, head: int) -> int:
    """The last descriptor of the direct chain at ``head``."""
    index = head
    while d.descriptor(index)[2] & ring.VIRTQ_DESC_F_NEXT:
        index = d.descriptor(index)[3]
    return index


def _guard(d: Any, head: int, guard: str) -> None:
    """Break the chain at ``head`` (the queue's last published one) as ``guard`` says."""
    nxt, wr, ind = ring.VIRTQ_DESC_F_NEXT, ring.VIRTQ_DESC_F_WRITE, ring.VIRTQ_DESC_F_INDIRECT
    addr, length, flags, _ = d.descriptor(head)
    if guard == "head beyond the queue":
        d.set_avail_entry((d.avail_idx - 1) % QSIZE, QSIZE + 3)
    elif guard == "next beyond the queue":
        d.patch_descriptor(_last(d, head), flags=nxt, next=QSIZE)
    elif guard == "a loop":
        d.make_loop(head)
    elif guard == "readable after writable":
        d.patch_descriptor(head, flags=wr | nxt)
        d.patch_descriptor(_last(d, head), flags=0)
    elif guard == "buffer outside memory":
        d.patch_descriptor(_last(d, head), addr=1 << 40)
    elif guard == "buffer across the end of memory":
        d.patch_descriptor(_last(d, head), addr=len(d.mem.regions[-1].view) - 8, len=64)
    elif guard == "address wraps 2^64":
        d.patch_descriptor(_last(d, head), addr=(1 << 64) - 8, len=64)
    elif guard in ("nested indirect", "indirect table length", "indirect with next",
                   "indirect table outside memory", "next beyond the indirect table"):
        assert flags & ind, "the case needs an indirect chain"
        if guard == "nested indirect":
            d.set_descriptor(0, addr, 16, ind, 0, table=addr)
        elif guard == "indirect table length":
            d.patch_descriptor(head, len=length + 8)
        elif guard == "indirect with next":
            d.patch_descriptor(head, flags=ind | nxt, next=(head + 1) % QSIZE)
        elif guard == "indirect table outside memory":
            d.patch_descriptor(head, addr=1 << 40)
        else:
            last = length // 16 - 1
            a, n, f, _ = d.descriptor(last, table=addr)
            d.set_descriptor(last, a, n, f | nxt, length // 16, table=addr)
    elif guard == "available index jump":
        d.set_avail_idx(d.avail_idx + QSIZE + 1)
    else:
        raise AssertionError(guard)


GUARDS = ["head beyond the queue", "next beyond the queue", "a loop", "readable after writable",
          "buffer outside memory", "buffer across the end of memory", "address wraps 2^64",
          "nested indirect", "indirect table length", "indirect with next",
          "indirect table outside memory", "next beyond the indirect table",
          "available index jump"]


@pytest.mark.parametrize("mrg_rxbuf", [False, True])
@pytest.mark.parametrize("queue", [TXQ, RXQ])
@pytest.mark.parametrize("guard", GUARDS)
def test_every_guard_of_the_engine_holds_on_both_paths(netns_name: str, guard: str,
                                                      queue: int, mrg_rxbuf: bool) -> None:
    """A good chain, a broken one, a good one: the same used ring, frames, counters and
    failure (the engine's error, raised by the Python pop the C walk defers to)."""
    indirect = "indirect" in guard
    off = () if mrg_rxbuf else (VIRTIO_NET_F_MRG_RXBUF,)
    sides = [make_side(netns_name, a, off, True) for a in (False, True)]
    try:
        for s in sides:
            d = s.h.drivers[queue]
            for i in range(3):
                if queue == TXQ:
                    parts = [frame(40, i)[:20], frame(40, i)[20:]]
                    head = d.publish(parts, indirect=indirect or i != 1, kick=False)
                else:
                    head = d.publish(writable=[30, 100], indirect=indirect or i != 1,
                                     kick=False)
                    s.wire.send(frame(60, i))
                if i == 1:
                    _guard(d, head, guard)
            s.h.kick(queue)
        python, fast = (s.observe() for s in sides)
        assert python == fast
        assert python[3] and python[4], f"{guard}: the device did not fail"
        # (an index jump stops the queue at once; with MRG_RXBUF the device takes every
        # buffer before reading a frame, and fails at the broken one)
        if guard != "available index jump" and not (queue == RXQ and mrg_rxbuf):
            assert python[0][0][0] == 0, "the good chain before the broken one was served"
    finally:
        for s in sides:
            close_side(s)


@pytest.mark.parametrize("mrg_rxbuf", [False, True])
def test_a_receive_batch_keeps_its_walked_window(netns_name: str, mrg_rxbuf: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Many frames in one receive call: the C path walks the look-ahead once and tops it
    up per frame, moving the window's buffers to the start of its iovec array when they
    reach its end (a small IOV_MAX here makes that happen every few frames). The used
    ring, the bytes and the counters are the Python path's."""
    import minivmm.devices.net as net

    monkeypatch.setattr(net, "IOV_MAX", 9)
    off = () if mrg_rxbuf else (VIRTIO_NET_F_MRG_RXBUF,)
    sides = [make_side(netns_name, a, off, True) for a in (False, True)]
    try:
        for s in sides:
            # Two buffers each, the header's and the data's; with MRG_RXBUF, two chains
            # make the window (65562 bytes), so one stays walked past each frame.
            data = 33_000 if mrg_rxbuf else 90
            for i in range(QSIZE // 2 - 1):
                s.h.drivers[RXQ].publish(writable=[HDR_SIZE, data + i], kick=False)
            for i in range(6):
                s.wire.send(frame(40 + 7 * i, i)[HDR_SIZE:])
            s.h.kick(RXQ)
        python, fast = (s.observe() for s in sides)
        assert python == fast
        assert sides[1].dev.stats()["rx_packets"] == 6
    finally:
        for s in sides:
            close_side(s)
