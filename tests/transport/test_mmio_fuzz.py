"""A hostile driver on the register file of every device: random accesses of every width at
every offset, random status values, queue set-ups pointing anywhere, and kicks in
between. Nothing may escape the transport or the device (the VMM's vCPU and device
threads would die), and every register read must return as many bytes as were asked for."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm.console import NullSink
from minivmm.devices import net as netdev
from minivmm.devices import tap as taplib
from minivmm.devices.base import VirtioDevice
from minivmm.devices.blk import BlockDevice
from minivmm.devices.console import ConsoleDevice
from minivmm.devices.net import NetDevice
from minivmm.devices.rng import RngDevice
from minivmm.devices.vsock import VsockDevice
from minivmm.transport.testing import DeviceHarness

# Offsets worth hitting: every register, config space, and a few odd places.
OFFSETS = st.one_of(
    st.sampled_from([0x000, 0x004, 0x008, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038,
                     0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0,
                     0x0A4, 0x0AC, 0x0B0, 0x0C0, 0x0FC, 0x100, 0x108, 0x120]),
    st.integers(0, 0xFFF),
)
VALUES = st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 3, 0xB, 0xF, 0x40,
                                                                 0x80, 256, 0x1000]))
ACCESS = st.tuples(st.sampled_from(["read", "write", "kick", "init"]), OFFSETS,
                   st.sampled_from([1, 2, 4, 8]), VALUES)


def _blk(tmp: Path) -> VirtioDevice:
    img = tmp / "fuzz.img"
    if not img.exists():
        img.write_bytes(bytes(64 * 512))
    return BlockDevice(img, serial="fuzz")


#: fds the makers opened, closed after each example
_OPENED: list[int] = []


def _console_file(tmp: Path) -> VirtioDevice:
    """virtio-console whose input is a regular file (read at DRIVER_OK and on kicks)."""
    src = tmp / "input.txt"
    if not src.exists():
        src.write_bytes(b"typed input\n" * 100)
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    _OPENED.append(fd)
    return ConsoleDevice(output=NullSink(), input_fd=fd)


def _console_socket(tmp: Path) -> VirtioDevice:
    a, b = socket.socketpair()
    a.sendall(b"typed input\n" * 100)
    _OPENED.extend((a.detach(), b.fileno()))
    dev = ConsoleDevice(output=NullSink(), input_fd=b.detach())
    dev.fd_watch = lambda fd, cb: None
    return dev


def _net(tmp: Path) -> VirtioDevice:
    """virtio-net on a tap stand-in: a SOCK_SEQPACKET socketpair keeps frame boundaries
    as a tap does; the peer holds frames for the guest's receive queue."""
    dev = NetDevice("fuzz0")
    dev.fd_watch = lambda fd, cb: None
    return dev


def _vsock(tmp: Path) -> VirtioDevice:
    return VsockDevice(3, tmp / "v.sock")


MAKERS: dict[str, Callable[[Path], VirtioDevice]] = {
    "rng": lambda tmp: RngDevice(),
    "blk": _blk,
    "console": lambda tmp: ConsoleDevice(output=NullSink(), input_fd=None),
    "console-file": _console_file,
    "console-socket": _console_socket,
    "net": _net,
    "vsock": _vsock,
}


@pytest.fixture(autouse=True)
def tap_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """NetDevice's tap calls answered by a socketpair (no tap, no privileges needed)."""

    def open_tap(name: str) -> tuple[int, bool]:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        frame = bytes(12) + b"\xff" * 6 + bytes(6) + b"\x08\x06" + bytes(28)
        for _ in range(8):
            peer.send(frame)
        _OPENED.append(peer.detach())
        return ours.detach(), False

    monkeypatch.setattr(taplib, "open_tap", open_tap)
    monkeypatch.setattr(taplib, "supported_offloads", lambda fd: taplib.TUN_F_CSUM)
    monkeypatch.setattr(taplib, "set_offload", lambda fd, flags: None)
    monkeypatch.setattr(taplib, "is_attached", lambda fd: True)
    assert netdev.taplib is taplib  # type: ignore[attr-defined]
    yield


@pytest.mark.parametrize("kind", list(MAKERS))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=st.lists(ACCESS, min_size=1, max_size=60))
def test_random_register_traffic_never_escapes(kind: str, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture,
                                               accesses: list[tuple[str, int, int, int]]
                                               ) -> None:
    """Also: no device fails with an internal error (contained, but a bug all the same)."""
    caplog.clear()
    h = DeviceHarness(MAKERS[kind](tmp_path))
    try:
        for op, offset, size, value in accesses:
            if op == "read":
                buf = bytearray(size)
                h.transport.read(offset, memoryview(buf))
                assert len(buf) == size
            elif op == "write":
                h.transport.write(offset, memoryview(bytearray(
                    value.to_bytes(8, "little")[:size])))
            elif op == "kick":
                for q in range(len(h.device.queues)):
                    h.device.kick(q)
            else:  # a full, valid initialisation, then garbage continues on top of it
                try:
                    h.initialise()
                except AssertionError:
                    pass  # e.g. FEATURES_OK refused after earlier garbage: a valid outcome
                drv = h.drivers[0]
                drv.push_head(value & 0xFFFF)  # an arbitrary (often invalid) head
                h.device.kick(0)
            if kind.startswith(("console", "net")) and h.device.is_activated:
                for cb in [cb for _, cb in h.device.extra_fds()]:
                    h.device.contain(cb)  # input or frames arrive: the watched fd fires
    finally:
        h.close()
        while _OPENED:
            os.close(_OPENED.pop())
    assert "internal error" not in caplog.text, caplog.text
