"""virtio-net on a real tap, driven through the virtio-mmio transport by fake drivers.

Every tap lives in a network namespace made for this test session (``ip netns add``),
never in the host's own: the test thread enters it (setns) only to open the tap and its
packet socket, both of which then keep working from anywhere. The host side of the tap
is an AF_PACKET socket bound to it: what it sends arrives on the device's receive queue,
what the guest transmits arrives on it. Deleting the namespace at the end (also after a
failure) removes whatever is left.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import importlib.util
import os
import select
import shutil
import socket
import stat
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from guests import run_minivmm

from minivmm import accel
from minivmm.cli import parse_net
from minivmm.config import NetConfig
from minivmm.devices import net as netdev
from minivmm.devices.base import VIRTIO_F_EVENT_IDX, VIRTIO_MMIO_INT_CONFIG
from minivmm.devices.net import (
    HDR_SIZE,
    MAX_TX_FRAME,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    NetDevice,
)
from minivmm.errors import UsageError
from minivmm.transport.mmio import DEVICE_NEEDS_RESET
from minivmm.transport.testing import DeviceHarness, WatchdogError
from minivmm.virtio.testing import FakeDriver

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/net/tun"),
                                reason="this host has no /dev/net/tun (modprobe tun)")

CLONE_NEWNET = 0x4000_0000
CLONE_NEWNS = 0x0002_0000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
ETH_TEST = 0x88B5  # IEEE 802 local experimental EtherType: nothing else sends it
PACKET_OUTGOING = 4
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in network namespace ``ns``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def frame(size: int, seed: int = 0) -> bytes:
    """An Ethernet frame of ``size`` bytes with the test EtherType."""
    head = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + ETH_TEST.to_bytes(2)
    return head + bytes((i * 13 + seed) & 0xFF for i in range(size - len(head)))


@dataclass
class Net:
    ns: str
    h: DeviceHarness
    dev: NetDevice
    peer: socket.socket  # the host side of the tap
    accelerated: bool
    watch: list[tuple[int, bool]] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        self.peer.send(data)

    def wait_readable(self) -> None:
        r, _, _ = select.select([self.dev.tap_fd], [], [], 5)
        assert r, "the tap never became readable"

    def pump(self) -> None:
        """What the device thread does when the tap is readable."""
        self.wait_readable()
        self.dev.on_tap_readable()

    def received(self) -> bytes:
        """The next frame the guest sent, as the host's stack sees it on the tap."""
        while True:
            r, _, _ = select.select([self.peer], [], [], 5)
            assert r, "nothing arrived on the tap"
            data, addr = self.peer.recvfrom(1 << 17)
            if addr[2] != PACKET_OUTGOING and data[12:14] == ETH_TEST.to_bytes(2):
                return data

    def initialise(self, features: int | None = None) -> None:
        all_features = self.h.device_features()
        self.h.initialise(all_features if features is None else features)


def accel_missing() -> str | None:
    """Why the C accelerator cannot be built here (then its tests skip), or None."""
    if importlib.util.find_spec("cffi") is None:
        return "cffi is not installed: no C accelerator"
    if not shutil.which(os.environ.get("CC", "cc")):
        return "no C compiler: no C accelerator"
    if not accel.enabled():
        return f"{accel.ENV}=0 in the environment"
    return None


def all_but(h: DeviceHarness, *bits: int) -> int:
    f = h.device_features()
    for b in bits:
        f &= ~(1 << b)
    return f


@pytest.fixture(params=["python", "accelerated"])
def net(netns: str, request: pytest.FixtureRequest) -> Iterator[Net]:
    """Every test runs on the Python path first, then on the C accelerator's."""
    if request.param == "accelerated" and (why := accel_missing()):
        pytest.skip(why)
    name = f"mvt{uuid.uuid4().hex[:8]}"
    with inside(netns):
        dev = NetDevice(name, accelerate=request.param == "accelerated")
        peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TEST))
    h = DeviceHarness(dev, event_idx=True)
    n = Net(netns, h, dev, peer, request.param == "accelerated")
    dev.fd_watch = lambda fd, cb: n.watch.append((fd, cb is not None))
    try:
        ip("-n", netns, "link", "set", name, "mtu", "9000", "up")
        peer.bind((name, ETH_TEST))
        yield n
        if request.param == "accelerated":
            assert dev._accel is not None, "cffi and a compiler are here, yet no accelerator"
    finally:
        peer.close()
        h.close()  # closes the tap: a tap the kernel created for us goes away with it


# -- opening, features, configuration -------------------------------------------------


def test_tap_created_with_default_mac_and_link_up(net: Net) -> None:
    dev = net.dev
    assert dev.tap_created
    assert dev.device_type == 1 and len(dev.queues) == 2
    features = net.h.device_features()
    for bit in (0, 1, 5, 7, 8, 9, 11, 12, 13, 15, 16, 28, 29, 32):
        assert features >> bit & 1, bit
    assert not features & ((1 << 17) | (1 << 22)), "no control queue, no MTU: not offered"
    mac = net.h.read_config(0, 4) + net.h.read_config(4, 2)  # 1, 2 or 4 bytes a read
    assert mac == netdev.default_mac(dev.tap_name) and mac[0] & 3 == 2
    assert net.h.read_config(6, 2) == b"\x01\x00"  # VIRTIO_NET_S_LINK_UP


def test_mac_option_and_existing_tap(netns: str) -> None:
    ip("-n", netns, "tuntap", "add", "dev", "mvtpre", "mode", "tap")
    try:
        with inside(netns):
            dev = NetDevice("mvtpre", mac=bytes.fromhex("525400123456"))
        try:
            assert not dev.tap_created
            assert dev.config()[:6] == bytes.fromhex("525400123456")
        finally:
            dev.close()
    finally:
        ip("-n", netns, "link", "del", "mvtpre")


def test_offloads_need_their_checksum_feature(net: Net) -> None:
    h = net.h
    assert not h.negotiate(all_but(h, VIRTIO_NET_F_GUEST_CSUM))  # TSO without csum
    assert h.negotiate(all_but(h, VIRTIO_NET_F_GUEST_CSUM, 7, 8, 9, 10))


@pytest.mark.parametrize(("name", "want"), [
    ("x" * 16, "1 to 15 bytes"), ("", "1 to 15 bytes"), ("a/b", "may not contain"),
    ("tap%d", "may not contain"), ("lo", "exists but is not a tap"),
])
def test_bad_tap_names(netns: str, name: str, want: str) -> None:
    with inside(netns), pytest.raises(UsageError, match=want):
        NetDevice(name)


@pytest.mark.parametrize(("text", "want"), [
    ("tap=t0,mac=01:00:5e:00:00:01", "multicast"), ("tap=t0,mac=52:54:00", "six hex"),
    ("tap=t0,mac=zz:54:00:12:34:56", "six hex"), ("tap=t0,mac=00:00:00:00:00:00", "non-zero"),
    ("mac=52:54:00:12:34:56", "name a tap"), ("tap=t0,queues=4", "unknown option"),
    ("tap=", "unknown option"),
])
def test_net_option_errors(text: str, want: str) -> None:
    with pytest.raises(UsageError, match=want) as info:
        parse_net(text)
    assert info.value.field == "network_interfaces"
    assert parse_net("tap=t0,mac=52:54:00:ab:cd:ef") == NetConfig(
        "t0", bytes.fromhex("525400abcdef"))


@pytest.mark.parametrize(("opt", "want"), [
    ("tap=t0,mac=01:02:03:04:05:06", "multicast"), ("tap=" + "x" * 20, "1 to 15 bytes"),
])
def test_cli_net_errors_are_one_line(opt: str, want: str) -> None:
    p = run_minivmm("run", "--kernel", "/etc/hostname", "--net", opt, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and want in lines[0] and "Traceback" not in p.stderr


def _private_tun_node() -> None:
    """In this (child) process only: a mount namespace whose /dev/net/tun is mode 0666,
    as distributions ship it (some hosts, like CI containers, have 0600)."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if _libc.mount(b"tmpfs", b"/dev/net", b"tmpfs", 0, b"mode=755") != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs on /dev/net")
    os.mknod("/dev/net/tun", 0o666 | stat.S_IFCHR, os.makedev(10, 200))
    os.chmod("/dev/net/tun", 0o666)


def _as_nobody(netns: str, fn: Callable[[], str]) -> str:
    """Run fn in a forked child, inside netns, as uid/gid 65534; its result or error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            _setns(os.open(f"/run/netns/{netns}", os.O_RDONLY))
            _private_tun_node()
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                out = fn()
            except UsageError as e:
                out = f"UsageError: {e}"
            except Exception as e:
                out = f"child failed: {e!r}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_unprivileged_user_needs_a_tap_made_for_it(netns: str) -> None:
    def try_open(name: str) -> Callable[[], str]:
        def fn() -> str:
            dev = NetDevice(name)
            created = dev.tap_created
            dev.close()
            return f"opened created={created}"
        return fn

    out = _as_nobody(netns, try_open("mvtnone"))
    assert out.startswith("UsageError") and "needs root or CAP_NET_ADMIN" in out, out
    assert "ip tuntap add dev mvtnone mode tap user" in out
    ip("-n", netns, "tuntap", "add", "dev", "mvtuser", "mode", "tap", "user", "65534")
    try:
        assert _as_nobody(netns, try_open("mvtuser")) == "opened created=False"
    finally:
        ip("-n", netns, "link", "del", "mvtuser")


# -- receive ------------------------------------------------------------------------


def test_rx_one_buffer_per_frame(net: Net) -> None:
    net.initialise(all_but(net.h, VIRTIO_NET_F_MRG_RXBUF))
    rx = net.h.drivers[0]
    heads = [rx.publish(writable=[2048]) for _ in range(3)]
    frames = [frame(60, 1), frame(1514, 2)]
    for f in frames:
        net.send(f)
    net.h.interrupts()
    net.pump()
    used = rx.used()
    assert [u.id for u in used] == heads[:2]
    for u, f in zip(used, frames, strict=True):
        assert u.len == HDR_SIZE + len(f)
        flags, gso, _, _, _, _, num_buffers = struct.unpack_from("<BBHHHHH", u.written)
        assert (flags, gso, num_buffers) == (0, 0, 1)
        assert u.written[HDR_SIZE:] == f
    assert net.h.interrupts() == 1, "one interrupt for the batch"
    assert net.dev.rx_packets == 2 and net.dev.rx_bytes == sum(map(len, frames))


@pytest.mark.parametrize("guest_csum", [True, False])
def test_rx_checksum_offload_follows_guest_csum(net: Net, guest_csum: bool) -> None:
    """With GUEST_CSUM the tap hands over the host's UDP datagram with its checksum
    left to do (NEEDS_CSUM, csum_start/offset: TUNSETOFFLOAD took effect); without it,
    the kernel completes the checksum and the header's flags are zero."""
    off = () if guest_csum else (VIRTIO_NET_F_GUEST_CSUM, 7, 8, 9, 10)
    net.initialise(all_but(net.h, *off))
    rx = net.h.drivers[0]
    rx.publish(writable=[2048])
    mac = ":".join(f"{b:02x}" for b in net.dev.mac)
    name = net.dev.tap_name
    ip("-n", net.ns, "addr", "add", "10.9.0.1/24", "dev", name)
    ip("-n", net.ns, "neigh", "add", "10.9.0.2", "lladdr", mac, "dev", name)
    with inside(net.ns):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        udp.sendto(b"ping" * 25, ("10.9.0.2", 9))
    net.pump()
    (u,) = rx.used()
    flags, _, _, _, csum_start, csum_offset, _ = struct.unpack_from("<BBHHHHH", u.written)
    eth = u.written[HDR_SIZE:]
    assert eth[:6] == net.dev.mac and eth[12:14] == b"\x08\x00"
    assert eth[14 + 9] == socket.IPPROTO_UDP and eth[-100:] == b"ping" * 25
    if guest_csum:
        assert flags & netdev.VIRTIO_NET_HDR_F_NEEDS_CSUM
        assert (csum_start, csum_offset) == (14 + 20, 6)
    else:
        assert flags == 0
        assert eth[14 + 20 + 6 : 14 + 20 + 8] != b"\0\0"  # the UDP checksum is filled


@pytest.mark.parametrize("guest_csum", [True, False])
def test_rx_header_flags_kept_only_with_guest_csum(net: Net, guest_csum: bool) -> None:
    """§5.1.6.4.1: without GUEST_CSUM the flags read 0, even DATA_VALID (which a tap sets
    for frames the host's NIC validated; a socketpair stands in for the tap here)."""
    off = () if guest_csum else (VIRTIO_NET_F_GUEST_CSUM, 7, 8, 9, 10)
    net.initialise(all_but(net.h, *off))
    rx = net.h.drivers[0]
    rx.publish(writable=[2048])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap, net.dev._tap = net.dev._tap, ours.fileno()
    try:
        theirs.send(struct.pack("<BBHHHHH", 2, 0, 0, 0, 0, 0, 0x7777) + frame(100))
        net.pump()
    finally:
        net.dev._tap = tap
        ours.close()
        theirs.close()
    (u,) = rx.used()
    flags, _, _, _, _, _, num_buffers = struct.unpack_from("<BBHHHHH", u.written)
    assert (flags, num_buffers) == (2 if guest_csum else 0, 1)


def test_rx_frame_larger_than_the_buffer_is_dropped_and_counted(net: Net) -> None:
    net.initialise(all_but(net.h, VIRTIO_NET_F_MRG_RXBUF))
    rx = net.h.drivers[0]
    head = rx.publish(writable=[1000])
    net.send(frame(3000))
    net.pump()
    assert rx.used() == [] and net.dev.rx_dropped == 1
    net.send(frame(500, 3))
    net.pump()
    (u,) = rx.used()
    assert u.id == head and u.written[HDR_SIZE:] == frame(500, 3)


def test_mrg_rxbuf_spreads_a_frame_over_several_buffers(net: Net) -> None:
    net.initialise()
    assert net.dev.has_feature(VIRTIO_NET_F_MRG_RXBUF)
    rx = net.h.drivers[0]
    heads = [rx.publish(writable=[1500]) for _ in range(5)]
    big = frame(4000, 5)
    net.send(big)
    net.pump()
    used = rx.used()
    assert [u.id for u in used] == heads[:3]
    assert [u.len for u in used] == [1500, 1500, HDR_SIZE + 4000 - 3000]
    assert struct.unpack_from("<H", used[0].written, 10)[0] == 3  # num_buffers
    assert b"".join(u.written for u in used)[HDR_SIZE:] == big
    # while the device holds buffers it asks for no kicks: the tap wakes it
    rx.publish(writable=[1500], kick=False)
    assert not rx.kick_needed()
    # the two buffers held back serve the next frame, in ring order
    net.send(frame(100, 6))
    net.pump()
    (u,) = rx.used()
    assert u.id == heads[3] and u.written[HDR_SIZE:] == frame(100, 6)
    assert struct.unpack_from("<H", u.written, 10)[0] == 1


def test_mrg_rxbuf_header_split_across_descriptors(net: Net) -> None:
    net.initialise()
    rx = net.h.drivers[0]
    heads = [rx.publish(writable=[4, 8, 500], indirect=True) for _ in range(3)]
    f = frame(1000, 7)
    net.send(f)
    net.pump()
    used = rx.used()
    assert [u.id for u in used] == heads[:2]
    assert struct.unpack_from("<H", used[0].written, 10)[0] == 2
    assert b"".join(u.written for u in used)[HDR_SIZE:] == f


def test_no_rx_buffers_stops_watching_the_tap_until_a_kick(net: Net) -> None:
    net.initialise()
    net.send(frame(200, 8))
    net.pump()  # readable, but the guest has posted nothing
    assert net.watch == [(net.dev.tap_fd, False)] and net.dev.rx_pauses == 1
    net.dev.on_tap_readable()  # a stale wake-up does nothing
    assert net.dev.rx_pauses == 1
    rx = net.h.drivers[0]
    heads = [rx.publish(writable=[2048], kick=False) for _ in range(2)]
    assert rx.kick_needed()  # notifications were re-enabled when the ring ran dry
    rx.kick()  # resume and deliver; the second buffer is held for the next frame
    assert net.watch == [(net.dev.tap_fd, False), (net.dev.tap_fd, True)]
    (u,) = rx.used()
    assert u.id == heads[0] and u.written[HDR_SIZE:] == frame(200, 8)
    assert net.dev.rx_dropped == 0 and net.dev.rx_pauses == 1


def test_rx_queue_never_set_up_stops_watching_the_tap(net: Net) -> None:
    net.h.initialise(queues=[1])  # a driver that only transmits
    net.send(frame(60))
    net.pump()
    assert net.watch == [(net.dev.tap_fd, False)]
    assert not net.h.status & DEVICE_NEEDS_RESET


def test_reset_drops_held_buffers_and_the_device_starts_again(net: Net) -> None:
    net.initialise()
    rx = net.h.drivers[0]
    for _ in range(4):
        rx.publish(writable=[1500])
    net.send(frame(100))
    net.pump()
    # the Python path holds the other three (its stash); the C path leaves them in the ring
    assert len(rx.used()) == 1 and net.dev.rx_held == (0 if net.accelerated else 3)
    net.h.write32(0x070, 0)  # reset
    assert net.dev.rx_held == 0
    net.h.drivers = [FakeDriver(d.size, mem=d.mem, base=d.desc_addr, heap_size=1 << 20,
                                event_idx=True) for d in net.h.drivers]
    for i, d in enumerate(net.h.drivers):
        d.on_kick = functools.partial(net.h.kick, i)
    rx = net.h.drivers[0]
    net.initialise()
    head = rx.publish(writable=[1500])
    net.send(frame(90, 9))
    net.pump()
    (u,) = rx.used()
    assert u.id == head and u.written[HDR_SIZE:] == frame(90, 9)


def test_rx_without_event_idx(net: Net) -> None:
    net.h.drivers[0].event_idx = net.h.drivers[1].event_idx = False
    net.initialise(all_but(net.h, VIRTIO_F_EVENT_IDX))
    rx = net.h.drivers[0]
    head = rx.publish(writable=[2048])
    net.send(frame(64))
    net.pump()
    assert [u.id for u in rx.used()] == [head]


# -- transmit -----------------------------------------------------------------------


def test_tx_writes_each_chain_to_the_tap(net: Net) -> None:
    net.initialise()
    tx = net.h.drivers[1]
    f1, f2 = frame(60, 10), frame(3000, 11)
    hdr = bytes(HDR_SIZE)
    h1 = tx.publish(readable=[hdr + f1])
    assert net.received() == f1
    h2 = tx.publish(readable=[hdr[:5], hdr[5:] + f2[:100], f2[100:]], indirect=True)
    assert net.received() == f2
    assert [(u.id, u.len) for u in tx.used()] == [(h1, 0), (h2, 0)]
    assert net.dev.tx_packets == 2 and net.dev.tx_bytes == len(f1) + len(f2)


def test_tx_batch_is_one_interrupt(net: Net) -> None:
    net.initialise()
    tx = net.h.drivers[1]
    for i in range(5):
        tx.publish(readable=[bytes(HDR_SIZE) + frame(80, i)], kick=False)
    net.h.interrupts()
    net.h.kick(1)
    assert len(tx.used()) == 5 and net.h.interrupts() == 1
    assert [net.received() for _ in range(5)] == [frame(80, i) for i in range(5)]


def test_bad_tx_chains_are_dropped_and_counted(net: Net) -> None:
    net.initialise()
    tx = net.h.drivers[1]
    hdr = bytes(HDR_SIZE)
    tx.publish(readable=[b"short"])
    tx.publish(readable=[hdr + frame(60)], writable=[16])
    tx.publish(readable=[hdr, bytes(MAX_TX_FRAME - HDR_SIZE + 1)])
    bad_gso = struct.pack("<BBHHHHH", 0, 0x7F, 0, 0, 0, 0, 0)
    tx.publish(readable=[bad_gso + frame(60)])
    good = frame(70, 12)
    tx.publish(readable=[hdr + good])
    assert net.received() == good
    assert len(tx.used()) == 5
    assert net.dev.tx_dropped == 3 and net.dev.tx_errors == 1 and net.dev.tx_packets == 1
    assert not net.h.status & DEVICE_NEEDS_RESET


@pytest.mark.parametrize(("feature", "gso_type", "proto"), [
    (netdev.VIRTIO_NET_F_HOST_TSO4, 1, socket.IPPROTO_TCP),  # VIRTIO_NET_HDR_GSO_TCPV4
    (netdev.VIRTIO_NET_F_HOST_UFO, 3, socket.IPPROTO_UDP),  # VIRTIO_NET_HDR_GSO_UDP
])
def test_tx_segmentation_offload_reaches_the_host(net: Net, feature: int, gso_type: int,
                                                  proto: int) -> None:
    """A 3000-byte TSO/UFO frame with a partial checksum: the kernel takes it whole."""
    if not net.dev.avail_features >> feature & 1:
        pytest.skip(f"this kernel's tap does not accept feature {feature}")
    net.initialise()
    l4 = 20 if proto == socket.IPPROTO_TCP else 8
    payload = bytes(range(256)) * 12
    total = 20 + l4 + len(payload)
    iph = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                      bytes([10, 9, 0, 2]), bytes([10, 9, 0, 1]))
    if proto == socket.IPPROTO_TCP:
        l4h = struct.pack(">HHIIBBHHH", 1000, 9, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
        csum_offset = 16
    else:
        l4h = struct.pack(">HHHH", 1000, 9, 8 + len(payload), 0)
        csum_offset = 6
    eth = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
    hdr = struct.pack("<BBHHHHH", netdev.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type,
                      14 + 20 + l4, 1000, 14 + 20, csum_offset, 0)
    with inside(net.ns):
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    with sniff:
        sniff.bind((net.dev.tap_name, 0x0800))
        net.h.drivers[1].publish(readable=[hdr + eth + iph + l4h, payload])
        assert net.dev.tx_errors == 0 and net.dev.tx_packets == 1
        r, _, _ = select.select([sniff], [], [], 5)
        assert r, "the host saw nothing"
        data = sniff.recv(1 << 17)
    assert data[14:] == iph + l4h + payload  # one frame, as the guest sent it


# -- the tap going away ---------------------------------------------------------------


def test_tap_deleted_link_down_vm_carries_on(net: Net) -> None:
    net.initialise()
    ip("-n", net.ns, "link", "del", net.dev.tap_name)
    net.h.ack_interrupt()
    net.pump()  # the fd reports an error: the read fails with EBADFD
    assert not net.dev.link_up
    assert net.watch == [(net.dev.tap_fd, False)]
    assert net.h.read_config(6, 2) == b"\x00\x00"
    assert net.h.interrupt_status & VIRTIO_MMIO_INT_CONFIG
    assert net.h.read32(0x0FC) == 1  # ConfigGeneration moved
    tx = net.h.drivers[1]
    tx.publish(readable=[bytes(HDR_SIZE) + frame(60)])
    assert len(tx.used()) == 1 and net.dev.tx_dropped == 1
    rx = net.h.drivers[0]
    rx.publish(writable=[2048])
    assert rx.used() == [] and not net.h.status & DEVICE_NEEDS_RESET
    assert net.dev.extra_fds() == []


def test_tap_deleted_noticed_on_transmit(net: Net) -> None:
    net.initialise(all_but(net.h, VIRTIO_NET_F_GUEST_TSO4, 8, 9, 10))
    ip("-n", net.ns, "link", "del", net.dev.tap_name)
    tx = net.h.drivers[1]
    tx.publish(readable=[bytes(HDR_SIZE) + frame(60)])
    assert not net.dev.link_up and net.dev.tx_dropped == 1
    assert net.h.read_config(6, 2) == b"\x00\x00"


# -- host-side faults through DeviceHarness.faults (minivmm.transport.faults) --------


def test_tap_gone_under_receive_is_link_down(net: Net) -> None:
    net.h.watchdog, net.h.watched = 5.0, {1}  # receive buffers are held: only transmit
    net.initialise()
    rx = net.h.drivers[0]
    rx.publish(writable=[2048])
    net.h.ack_interrupt()
    net.h.faults.detach_tap(net.dev.tap_fd)
    net.pump()  # the fd reports an error: the read fails with EBADFD
    assert not net.dev.link_up and net.h.read_config(6, 2) == b"\x00\x00"
    assert net.h.interrupt_status & VIRTIO_MMIO_INT_CONFIG
    assert not net.h.status & DEVICE_NEEDS_RESET
    tx = net.h.drivers[1]
    tx.publish(readable=[bytes(HDR_SIZE) + frame(60)])
    assert len(tx.used()) == 1 and net.dev.tx_dropped == 1 and net.dev.tx_packets == 0
    assert rx.used() == []


def test_tap_gone_under_transmit_drops_and_counts(net: Net) -> None:
    net.h.watchdog, net.h.watched = 5.0, {1}
    net.initialise(all_but(net.h, VIRTIO_NET_F_GUEST_TSO4, 8, 9, 10))
    tx = net.h.drivers[1]
    tx.publish(readable=[bytes(HDR_SIZE) + frame(60)])
    assert net.received()[:60] == frame(60)  # the link works
    net.h.faults.detach_tap(net.dev.tap_fd)
    for _ in range(3):
        tx.publish(readable=[bytes(HDR_SIZE) + frame(60)])
    assert len(tx.used()) == 4
    assert (net.dev.tx_packets, net.dev.tx_dropped, net.dev.link_up) == (1, 3, False)
    assert net.h.read_config(6, 2) == b"\x00\x00"
    assert not net.h.status & DEVICE_NEEDS_RESET


# The fault injector wraps Python's os calls: the C path's writev does not pass through it.
@pytest.mark.parametrize("net", ["python"], indirect=True)
def test_tap_write_errors_are_counted_and_slow_writes_trip_the_watchdog(net: Net) -> None:
    net.h.watchdog, net.h.watched = 0.3, {1}
    net.initialise(all_but(net.h, VIRTIO_NET_F_GUEST_TSO4, 8, 9, 10))
    tx = net.h.drivers[1]
    refused = net.h.faults.io_error(net.dev.tap_fd, ops=["write"], errno=errno.EINVAL)
    tx.publish(readable=[bytes(HDR_SIZE) + frame(60)])
    tx.publish(readable=[bytes(HDR_SIZE) + frame(60, seed=1)])
    assert len(tx.used()) == 2 and refused.hits == 1
    assert (net.dev.tx_errors, net.dev.tx_packets, net.dev.link_up) == (1, 1, True)
    assert net.received()[:60] == frame(60, seed=1)
    net.h.faults.delay(net.dev.tap_fd, 2.0, ops=["write"])
    with pytest.raises(WatchdogError, match=r"^net: queue 1: the chain with head \d+ was "
                       r"kicked 0\.3\d s ago and is unanswered"):
        tx.publish(readable=[bytes(HDR_SIZE) + frame(60, seed=2)])


def assert_link_down(net: Net) -> None:
    """Link down as the device's rules have it: STATUS 0 after a configuration-change
    interrupt, the tap no longer watched (no wake-ups), no DEVICE_NEEDS_RESET."""
    assert not net.dev.link_up and net.h.read_config(6, 2) == b"\x00\x00"
    assert net.h.interrupt_status & VIRTIO_MMIO_INT_CONFIG
    assert net.watch[-1] == (net.dev.tap_fd, False)
    assert not net.h.status & DEVICE_NEEDS_RESET


# The fault injector wraps Python's readv: the C path's does not pass through it.
@pytest.mark.parametrize("net", ["python"], indirect=True)
def test_a_read_error_that_persists_is_link_down(net: Net) -> None:
    """A tap whose reads keep failing stays readable: without a bound the device
    thread would be woken for ever, reading nothing."""
    net.h.watchdog, net.h.watched = 5.0, {1}
    net.initialise()
    rx = net.h.drivers[0]
    rx.publish(writable=[2048])
    net.h.ack_interrupt()
    failing = net.h.faults.io_error(net.dev.tap_fd, ops=["read"], errno=errno.EIO, count=0)
    net.send(frame(60))
    net.pump()
    assert failing.hits == netdev.RX_FAILURES_IN_A_ROW
    assert net.dev.rx_errors == netdev.RX_FAILURES_IN_A_ROW and net.dev.stats()["rx_errors"]
    assert_link_down(net)
    assert rx.used() == []


@pytest.mark.parametrize("net", ["python"], indirect=True)
def test_read_errors_with_frames_between_are_counted_and_the_link_stays_up(net: Net) -> None:
    net.initialise()
    rx = net.h.drivers[0]
    burst = netdev.RX_FAILURES_IN_A_ROW - 1
    for seed in range(2):  # two bursts, each one short of the bound, a frame after each
        rx.publish(writable=[2048])
        failing = net.h.faults.io_error(net.dev.tap_fd, ops=["read"], errno=errno.EIO,
                                        count=burst)
        net.send(frame(60, seed))
        net.pump()
        assert failing.hits == burst
        (u,) = rx.used()
        assert u.written[HDR_SIZE:] == frame(60, seed)
    assert net.dev.link_up and net.dev.rx_errors == 2 * burst
    assert net.dev.rx_packets == 2 and not net.h.status & DEVICE_NEEDS_RESET


def test_a_stand_in_tap_whose_peer_closed_is_link_down(net: Net) -> None:
    """A socket standing in for the tap (a SEQPACKET socketpair) reads 0 bytes for ever
    once its peer closed: on the Python and the C path that is a read without a frame,
    and the bound turns the link down."""
    net.initialise()
    rx = net.h.drivers[0]
    rx.publish(writable=[2048])
    net.h.ack_interrupt()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap, net.dev._tap = net.dev._tap, ours.fileno()
    try:
        theirs.close()
        net.pump()
        assert net.dev.rx_errors == netdev.RX_FAILURES_IN_A_ROW
        assert net.dev.rx_dropped == 0  # no frame was lost
        assert_link_down(net)
    finally:
        net.dev._tap = tap
        ours.close()
    assert rx.used() == []
