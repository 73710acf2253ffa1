"""A virtio-vsock device behind DeviceHarness, with the guest's side as packets.

:class:`Vsock` plays the guest driver (rx buffers, tx packets, the event queue) and lets
a test stand in for the device thread (:meth:`Vsock.pump`); host programs are real Unix
sockets on the device's ``uds_path``.
"""

from __future__ import annotations

import select
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from minivmm.devices.base import VIRTIO_F_EVENT_IDX, bit
from minivmm.devices.vsock import VsockDevice
from minivmm.devices.vsock_conn import HDR, HDR_SIZE, HOST_CID, VIRTIO_VSOCK_TYPE_STREAM
from minivmm.devices.vsock_reset import EVQ, RXQ, TXQ
from minivmm.transport.mmio import DEVICE_NEEDS_RESET
from minivmm.transport.testing import DeviceHarness

CID = 42
RX_BUF = HDR_SIZE + 4096  # what Linux posts


class Pkt(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    payload: bytes


def hdr(op: int, src_port: int, dst_port: int, *, length: int = 0, flags: int = 0,
        buf_alloc: int = 256 * 1024, fwd_cnt: int = 0, src_cid: int = CID,
        dst_cid: int = HOST_CID, type: int = VIRTIO_VSOCK_TYPE_STREAM) -> bytes:
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, length, type, op, flags,
                    buf_alloc, fwd_cnt)


@dataclass
class Vsock:
    h: DeviceHarness
    dev: VsockDevice
    path: Path

    @classmethod
    def make(cls, path: Path, *, event_idx: bool = True, **kwargs: Any) -> Vsock:
        dev = VsockDevice(CID, path, **kwargs)
        h = DeviceHarness(dev, event_idx=event_idx)
        h.initialise(None if event_idx else h.device_features() & ~bit(VIRTIO_F_EVENT_IDX))
        return cls(h, dev, path)

    def close(self) -> None:
        self.h.close()

    @property
    def failed(self) -> bool:
        return bool(self.h.status & DEVICE_NEEDS_RESET)

    # -- the device thread --------------------------------------------------------------

    def pump(self, timeout: float = 0.0, rounds: int = 50) -> int:
        """Run the device's host-side callback while its epoll fd is readable, like a
        level-triggered loop; returns how many times (fails if it spins)."""
        fd = self.dev.extra_fds()[0][0]
        for i in range(rounds):
            r, _, _ = select.select([fd], [], [], timeout if i == 0 else 0)
            if not r:
                return i
            self.dev.on_host_events()
        raise AssertionError("the device's epoll stays readable: it would spin")

    def epoll_readable(self) -> bool:
        fd = self.dev.extra_fds()[0][0]
        return bool(select.select([fd], [], [], 0)[0])

    # -- the guest ----------------------------------------------------------------------

    def post_rx(self, n: int = 8, size: int = RX_BUF) -> None:
        drv = self.h.drivers[RXQ]
        for i in range(n):
            drv.publish(writable=[size], kick=i == n - 1)

    def packets(self) -> list[Pkt]:
        """What the device put in the receive buffers since the last call."""
        out = []
        for used in self.h.drivers[RXQ].used():
            data = used.written
            assert len(data) >= HDR_SIZE, f"a {len(data)}-byte packet"
            fields = HDR.unpack_from(data)
            assert fields[4] == len(data) - HDR_SIZE, (fields, len(data))
            out.append(Pkt._make((*fields, data[HDR_SIZE:])))
        return out

    def send(self, packet: bytes, *parts: bytes) -> None:
        """One transmit chain: ``packet`` (and more readable buffers), kicked."""
        self.h.drivers[TXQ].publish(readable=[packet, *parts])

    def tx_used(self) -> int:
        return len(self.h.drivers[TXQ].used())

    def post_event(self, n: int = 1, size: int = 4) -> None:
        drv = self.h.drivers[EVQ]
        for _ in range(n):
            drv.publish(writable=[size])

    def events(self) -> list[bytes]:
        return [u.written for u in self.h.drivers[EVQ].used()]

    # -- host programs --------------------------------------------------------------------

    def host_connect(self, line: bytes | None = None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(self.path))
        if line is not None:
            s.sendall(line)
        return s

    def listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.bind(f"{self.path}_{port}")
        s.listen(8)
        return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def is_closed(s: socket.socket) -> bool:
    """The device closed its end (EOF after whatever was in flight)."""
    s.settimeout(5)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True
