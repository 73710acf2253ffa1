"""The devices' snapshot hooks (VirtioDevice.quiesce, save_state, restore_state) through
the transport: quiesce and save one device, restore a fresh one over the same guest
memory, and check the guest's view carries on."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import uuid
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from minivmm.devices import blk
from minivmm.devices.base import VirtioDevice
from minivmm.devices.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlockDevice
from minivmm.devices.console import ConsoleDevice
from minivmm.devices.net import HDR_SIZE, NetDevice, default_mac
from minivmm.devices.vsock import VsockDevice
from minivmm.devices.vsock_conn import HDR_SIZE as VSOCK_HDR
from minivmm.devices.vsock_host import FIRST_LOCAL_PORT
from minivmm.errors import UsageError
from minivmm.transport.mmio import DEVICE_NEEDS_RESET, MmioTransport
from minivmm.transport.testing import DeviceHarness
from minivmm.virtio.testing import FakeDriver

from .test_net import ETH_TEST, frame, inside, ip
from .vsockkit import CID, Vsock, hdr

S = 512
SECTORS = 64


def saved_queues(dev: VirtioDevice) -> list[tuple[int, int]]:
    return [(q.next_avail, q.next_used) for q in dev.queues]


def restore(h: DeviceHarness, fresh: VirtioDevice, state: Mapping[str, object],
            queues: list[tuple[int, int]], features: int) -> None:
    """What restoring a snapshot does to one device, in the harness's guest memory: a
    fresh device behind a fresh transport, the driver's registers as they were, each
    queue's indices, then the device's own state (through JSON, as a manifest holds it).
    The harness's drivers (and what they published) carry on against ``fresh``."""
    h.device = fresh
    h.transport = MmioTransport(fresh, h.memory, h._irq_fd)
    h.initialise(features)
    for q, (next_avail, next_used) in zip(fresh.queues, queues, strict=True):
        q.next_avail, q.next_used = next_avail, next_used
    fresh.restore_state(json.loads(json.dumps(state)))


def snapshot(dev: VirtioDevice) -> tuple[dict[str, object], list[tuple[int, int]], int]:
    dev.quiesce()
    return dev.save_state(), saved_queues(dev), dev.acked_features


# -- blk ------------------------------------------------------------------------------


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 11 + seed) & 0xFF for i in range(n))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(SECTORS * S, 1))
    return p


def blk_io(h: DeviceHarness, kind: int, sector: int, data: bytes = b"",
           count: int = 1) -> bytes:
    drv = h.drivers[0]
    if kind == VIRTIO_BLK_T_OUT:
        drv.publish([struct.pack("<IIQ", kind, 0, sector), data], [1])
    else:
        drv.publish([struct.pack("<IIQ", kind, 0, sector)], [count * S, 1])
    (used,) = drv.used()
    assert used.written[-1] == VIRTIO_BLK_S_OK
    return used.written[:-1]


def test_blk_saves_the_image_and_refuses_a_changed_one(image: Path) -> None:
    h = DeviceHarness(BlockDevice(image))
    h.initialise()
    blk_io(h, VIRTIO_BLK_T_OUT, 3, pattern(S, 9))  # a raw disk writes its image
    state, queues, features = snapshot(h.device)
    st = image.stat()
    assert state == {"path": str(image), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    old = h.device
    restore(h, BlockDevice(image, cow=True), state, queues, features)  # a clone's disk
    assert blk_io(h, VIRTIO_BLK_T_IN, 3) == pattern(S, 9)
    h.close()
    old.close()
    # the image changes (its time, then its size): one line naming it
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert "modified after the snapshot" in refusal(image, state)
    # a copy (a restore told to use another file) is taken at its word, if its size fits
    copy = image.with_name("copy.img")
    shutil.copy(image, copy)
    dev = BlockDevice(copy)
    dev.restore_state(state)
    dev.close()
    copy.write_bytes(bytes(S))
    assert f"{S} bytes, the snapshot's was {st.st_size}" in refusal(copy, state)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    with image.open("ab") as f:
        f.write(bytes(S))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f"{st.st_size + S} bytes, the snapshot's was {st.st_size}" in refusal(image, state)


def refusal(image: Path, state: Mapping[str, object], read_only: bool = False) -> str:
    dev = BlockDevice(image, read_only=read_only)
    try:
        with pytest.raises(ValueError) as info:
            dev.restore_state(state)
    finally:
        dev.close()
    msg = str(info.value)
    assert "\n" not in msg and str(image) in msg
    return msg


def test_blk_cow_overlay_goes_with_the_snapshot(image: Path) -> None:
    """The guest's writes to a cow disk are in its page cache already: a restore (cow
    by default) starts its own overlay from them; a restore told not to use cow writes
    them into the image."""
    original = image.read_bytes()
    h = DeviceHarness(BlockDevice(image, cow=True))
    h.initialise()
    blk_io(h, VIRTIO_BLK_T_OUT, 2, pattern(3 * S, 5))
    blk_io(h, VIRTIO_BLK_T_OUT, 40, bytes(S))  # zeros compress: still restored
    state, _, _ = snapshot(h.device)
    assert state["overlay"] == {"ranges": [[2, 5], [40, 41]], "zlib": state["overlay"][
        "zlib"]}  # type: ignore[index]
    source = h.device
    clones = []
    for i in range(2):  # two clones of one snapshot: each its own overlay
        c = DeviceHarness(BlockDevice(image, cow=True))
        c.initialise()
        c.device.restore_state(json.loads(json.dumps(state)))
        assert blk_io(c, VIRTIO_BLK_T_IN, 1, count=5) == (
            original[S : 2 * S] + pattern(3 * S, 5) + original[5 * S : 6 * S])
        assert blk_io(c, VIRTIO_BLK_T_IN, 40) == bytes(S)
        blk_io(c, VIRTIO_BLK_T_OUT, 2, pattern(S, 20 + i))
        clones.append(c)
    for i, c in enumerate(clones):
        assert blk_io(c, VIRTIO_BLK_T_IN, 2) == pattern(S, 20 + i)
        c.close()
    assert blk_io(h, VIRTIO_BLK_T_IN, 2) == pattern(3 * S, 5)[:S]  # the source carries on
    h.close()
    assert image.read_bytes() == original
    # not cow: the writes go into the image itself
    raw = BlockDevice(image)
    raw.restore_state(state)
    raw.close()
    source.close()
    got = image.read_bytes()
    assert got[2 * S : 5 * S] == pattern(3 * S, 5) and got[40 * S : 41 * S] == bytes(S)
    assert got[: 2 * S] == original[: 2 * S] and got[5 * S : 40 * S] == original[5 * S : 40 * S]


def test_blk_overlay_too_large_for_a_snapshot(image: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blk, "OVERLAY_STATE_MAX", 100)
    h = DeviceHarness(BlockDevice(image, cow=True))
    h.initialise()
    blk_io(h, VIRTIO_BLK_T_OUT, 0, os.urandom(4 * S))  # does not compress
    with pytest.raises(UsageError, match="more than a snapshot carries") as info:
        snapshot(h.device)
    assert info.value.field == "snapshot" and "\n" not in str(info.value)
    h.close()


def test_blk_overlay_larger_than_a_snapshot_carries_is_refused(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What no save makes (its compressed text over OVERLAY_STATE_MAX) is not inflated."""
    h = DeviceHarness(BlockDevice(image, cow=True))
    h.initialise()
    blk_io(h, VIRTIO_BLK_T_OUT, 0, os.urandom(4 * S))
    state, _, _ = snapshot(h.device)
    h.close()
    monkeypatch.setattr(blk, "OVERLAY_STATE_MAX", 100)
    assert "larger than a snapshot carries" in refusal(image, state)


def test_blk_read_only_restore_of_a_written_cow_disk_is_refused(image: Path) -> None:
    h = DeviceHarness(BlockDevice(image, cow=True))
    h.initialise()
    blk_io(h, VIRTIO_BLK_T_OUT, 0, pattern(S, 3))
    state, _, _ = snapshot(h.device)
    h.close()
    assert "not read-only" in refusal(image, state, read_only=True)


@pytest.mark.parametrize("overlay", [
    "junk", {"ranges": [[0, 1]]}, {"ranges": [[1, 0]], "zlib": ""},
    {"ranges": [[0, SECTORS + 1]], "zlib": ""}, {"ranges": [[4, 6], [5, 8]], "zlib": ""},
    {"ranges": [[0, 1]], "zlib": "!!"},
    {"ranges": [[0, 1]], "zlib": base64.b64encode(zlib.compress(bytes(S - 1))).decode()},
    {"ranges": [[0, 1]], "zlib": base64.b64encode(zlib.compress(bytes(S + 1))).decode()},
    {"ranges": [[0, 1]], "zlib": base64.b64encode(zlib.compress(bytes(S))[:-3]).decode()},
    {"ranges": [[True, 2]], "zlib": ""},
])
def test_blk_malformed_state_is_one_line(image: Path, overlay: object) -> None:
    st = image.stat()
    good = {"path": str(image), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    dev = BlockDevice(image, cow=True)
    try:
        for state in ({**good, "overlay": overlay}, {**good, "size": "1"}, {"path": 1}):
            with pytest.raises(ValueError, match=r"^[^\n]*malformed[^\n]*$"):
                dev.restore_state(state)
        assert dev.image.map.ranges() == []  # type: ignore[attr-defined]
    finally:
        dev.close()


# -- net ------------------------------------------------------------------------------


class Tap:
    """A NetDevice on a fresh tap in the test namespace, and the tap's host side."""

    def __init__(self, ns: str) -> None:
        self.name = f"mvs{uuid.uuid4().hex[:8]}"
        with inside(ns):
            self.dev = NetDevice(self.name, accelerate=False)
            self.peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                      socket.htons(ETH_TEST))
        self.dev.fd_watch = lambda fd, cb: None
        ip("-n", ns, "link", "set", self.name, "up")
        self.peer.bind((self.name, ETH_TEST))

    def running(self, buffers: int) -> tuple[DeviceHarness, FakeDriver, list[int]]:
        """The device initialised, with ``buffers`` receive buffers posted: the harness,
        the receive queue's driver and the buffers' heads."""
        h = DeviceHarness(self.dev, event_idx=True)
        h.initialise()
        rx = h.drivers[0]
        return h, rx, [rx.publish(writable=[1500]) for _ in range(buffers)]

    def deliver(self, data: bytes) -> None:
        """The host sends a frame; the device thread reads it."""
        import select

        self.peer.send(data)
        assert select.select([self.dev.tap_fd], [], [], 5)[0], "the frame never arrived"
        self.dev.on_tap_readable()

    def close(self) -> None:
        self.peer.close()
        self.dev.close()


@pytest.fixture
def taps(netns: str) -> Iterator[tuple[Tap, Tap]]:
    a = Tap(netns)
    b = Tap(netns)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_net_held_receive_buffers_go_back_to_the_ring(taps: tuple[Tap, Tap]) -> None:
    """With MRG_RXBUF the device holds every posted buffer for the next frame; quiesce
    gives back those not yet used, and the restored device (on another tap, with the MAC
    the guest knows) fills the same buffers, in ring order."""
    a, b = taps
    h, rx, heads = a.running(4)
    a.deliver(frame(100, 1))
    assert [u.id for u in rx.used()] == heads[:1] and a.dev.rx_held == 3
    state, queues, features = snapshot(a.dev)
    assert a.dev.rx_held == 0 and queues[0] == (1, 1)
    assert state == {"mac": a.dev.mac.hex()}
    restore(h, b.dev, state, queues, features)
    assert b.dev.config()[:6] == a.dev.mac != default_mac(b.name)  # the guest's MAC
    b.deliver(frame(200, 2))
    b.deliver(frame(300, 3))
    used = rx.used()
    assert [u.id for u in used] == heads[1:3]
    assert [u.written[HDR_SIZE:] for u in used] == [frame(200, 2), frame(300, 3)]
    assert not h.status & DEVICE_NEEDS_RESET


def test_net_source_device_carries_on_after_quiesce(taps: tuple[Tap, Tap]) -> None:
    a, _ = taps
    _, rx, heads = a.running(3)
    a.deliver(frame(100, 1))
    a.dev.quiesce()
    a.deliver(frame(120, 2))
    assert [u.id for u in rx.used()] == heads[:2]
    assert a.dev.rx_held == 1


def test_net_held_buffers_around_a_bad_chain_return_empty(taps: tuple[Tap, Tap]) -> None:
    """A chain the device could not use (returned at once) among the held ones: a rewind
    would pop it twice, so the held chains are returned empty instead."""
    a, _ = taps
    _, rx, (good0, good1) = a.running(2)
    bad = rx.publish(readable=[b"x"], writable=[1500])
    good3 = rx.publish(writable=[1500])
    a.deliver(frame(100, 1))
    assert [u.id for u in rx.used()] == [bad, good0]  # the bad one returned as popped
    a.dev.quiesce()
    used = rx.used()
    assert [(u.id, u.len) for u in used] == [(good1, 0), (good3, 0)]
    assert a.dev.rx_held == 0 and a.dev.queues[0].next_avail == 4


def test_net_bad_state(taps: tuple[Tap, Tap]) -> None:
    a, _ = taps
    for state in ({"mac": "zz"}, {"mac": "0011"}, {"mac": 5}, {"other": 1}):
        with pytest.raises(ValueError, match=r"^net: "):
            a.dev.restore_state(state)


# -- vsock ----------------------------------------------------------------------------


def test_vsock_restore_resets_the_transport(v: Vsock, tmp_path: Path) -> None:
    """The guest's connections have no host sockets in the restored VM: the guest gets
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.6) and re-reads its CID; the source VM's
    connections carry on. Host ports go on from the source's, and a host program's
    REQUEST waits until the driver has handled the event (it re-posts the buffer)."""
    s = v.host_connect(b"CONNECT 1234\n")
    v.post_rx(4)
    v.pump(timeout=5)
    (req,) = v.packets()
    assert req.src_port == FIRST_LOCAL_PORT
    v.send(hdr(2, 1234, req.src_port))  # RESPONSE
    assert s.recv(64).startswith(b"OK ")
    v.post_event(2)
    state, queues, features = snapshot(v.dev)
    assert state == {"guest_cid": CID, "next_port": FIRST_LOCAL_PORT + 1}
    source = v.dev
    fresh = VsockDevice(CID + 1, tmp_path / "clone.sock")  # another CID and socket
    restore(v.h, fresh, state, queues, features)
    assert v.events() == [b"\0\0\0\0"]  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert fresh.counters.transport_resets == 1 and not fresh.connections
    assert int.from_bytes(v.h.read_config(0, 8), "little") == CID + 1
    assert len(source.connections) == 1  # the source's host program still has its guest
    s.setblocking(False)
    with pytest.raises(BlockingIOError):  # not closed: nothing to read, no end of file
        s.recv(64)
    v.dev = fresh
    v.path = tmp_path / "clone.sock"
    c = v.host_connect(b"CONNECT 1234\n")
    v.post_rx(2)
    for _ in range(10):
        if fresh.counters.host_connects:
            break
        v.pump(timeout=1)
    assert v.packets() == [] and fresh.counters.held_connects == 1
    v.post_event(1)  # the driver handled the event
    (req,) = v.packets()
    assert (req.op, req.src_port, req.dst_cid) == (1, FIRST_LOCAL_PORT + 1, CID + 1)
    c.close()
    fresh.close()
    v.h.device = v.dev = source  # for the fixture's close
    s.close()


def test_vsock_held_receive_chain_goes_back(v: Vsock) -> None:
    v.post_rx(3)
    rx = v.h.drivers[0]
    with v.dev.lock:
        v.dev._held = v.dev._rx_chain()  # a chain a packet turned out not to need
    assert v.dev.queues[0].next_avail == 1
    v.dev.quiesce()
    assert v.dev.queues[0].next_avail == 0 and v.dev._held is None
    v.send(hdr(1, 40000, 7000))  # REQUEST to a port nothing listens on: an RST back
    (used,) = rx.used()
    assert used.id == 0 and len(used.written) == VSOCK_HDR


def test_vsock_bad_state(v: Vsock) -> None:
    for state in ({}, {"guest_cid": "3"}, {"guest_cid": True}, {"guest_cid": 3, "x": 1},
                  {"guest_cid": 3, "next_port": 5}, {"guest_cid": 3, "next_port": True},
                  {"guest_cid": 3, "next_port": "1073741824"},
                  {"guest_cid": 3, "next_port": 1 << 32}):
        with pytest.raises(ValueError, match=r"^vsock: "):
            v.dev.restore_state(state)
    assert v.dev.counters.transport_resets == 0


# -- console --------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def test_console_holds_nothing_across_a_snapshot() -> None:
    """virtio-console reads input only into buffers the guest posted and writes output
    as it is sent: it holds no chain and no bytes, so it saves no state, and a restored
    one (with new input and output) serves the buffers the guest posted before."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    out1, out2 = Sink(), Sink()
    first = ConsoleDevice(out1, r1)
    first.fd_watch = lambda fd, cb: None
    h = DeviceHarness(first, event_idx=True)
    h.initialise()
    rx, tx = h.drivers
    tx.publish([b"before"])
    heads = [rx.publish(writable=[64]) for _ in range(2)]
    state, queues, features = snapshot(first)
    assert state == {} and queues[0] == (0, 0) and out1.data == b"before"
    second = ConsoleDevice(out2, r2)
    second.fd_watch = lambda fd, cb: None
    restore(h, second, state, queues, features)
    os.write(w2, b"typed")
    second.on_input()
    (used,) = rx.used()
    assert used.id == heads[0] and used.written == b"typed"
    tx.publish([b"after"])
    assert out2.data == b"after" and out1.data == b"before"
    h.close()
    first.close()
    for fd in (r1, w1, r2, w2):
        os.close(fd)
