"""virtio-vsock after a transport reset (§5.10.6.6), as a restored snapshot sends it:
host programs' REQUESTs wait until the driver shows it has handled the event (Linux
re-adds the event buffer and kicks once it has reset its connected sockets), or a bound
has passed; guest-initiated connections go on as usual."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from minivmm.devices.vsock_host import FIRST_LOCAL_PORT
from minivmm.devices.vsock_reset import EVQ
from minivmm.transport.testing import DeviceHarness

from .test_vsock import GUEST_PORT, REQUEST, RESPONSE, connect_from_guest, only
from .vsockkit import CID, Vsock, hdr, recv_exactly

RESET_EVENT = b"\0\0\0\0"  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET


def held_connect(v: Vsock) -> socket.socket:
    """A host program's CONNECT during the hold: accepted, no REQUEST yet."""
    s = v.host_connect(f"CONNECT {GUEST_PORT}\n".encode())
    v.post_rx(4)
    v.pump(timeout=5)
    while v.dev.counters.held_connects == 0:  # the line may come in a second read
        v.pump(timeout=5)
    assert v.packets() == []
    assert len(v.dev.connections) == 1
    return s


def answer(v: Vsock, s: socket.socket, port: int) -> None:
    """The REQUEST arrived from host ``port``; the guest accepts; the program gets OK."""
    req = only(v.packets())
    assert (req.op, req.dst_port, req.src_port, req.dst_cid) == (REQUEST, GUEST_PORT,
                                                                 port, CID)
    v.send(hdr(RESPONSE, GUEST_PORT, port))
    assert recv_exactly(s, len(f"OK {port}\n")) == f"OK {port}\n".encode()


@pytest.mark.parametrize("event_idx", [True, False])
def test_host_connect_waits_for_the_event_buffer_again(tmp_path: Path,
                                                       event_idx: bool) -> None:
    v = Vsock.make(tmp_path / "v.sock", event_idx=event_idx)
    try:
        v.post_event(8)  # as Linux does at probe time
        v.dev.transport_reset()
        assert v.events() == [RESET_EVENT]
        s = held_connect(v)
        # the guest connects to the host meanwhile: as usual
        c = connect_from_guest(v, 8000)
        # the driver handled the event: it adds the buffer back, and must kick for it
        # (with EVENT_IDX only if the device asked, at avail_event)
        kicks = v.h.drivers[EVQ].kicks
        v.post_event(1)
        assert v.h.drivers[EVQ].kicks == kicks + 1
        answer(v, s, FIRST_LOCAL_PORT)
        # the hold is over: the next program's REQUEST goes at once
        s2 = v.host_connect(f"CONNECT {GUEST_PORT}\n".encode())
        v.pump(timeout=5)
        answer(v, s2, FIRST_LOCAL_PORT + 1)
        assert v.dev.counters.held_connects == 1 and not v.failed
        assert len(v.dev.connections) == 3
        for sock in (s, s2, c):
            sock.close()
    finally:
        v.close()


def test_event_sent_later_then_the_buffer_again(v: Vsock) -> None:
    """No event buffer at the reset: the event goes in the next one; the hold lasts
    until the driver adds another after it."""
    v.dev.transport_reset()
    s = held_connect(v)
    v.post_event(1)
    assert v.events() == [RESET_EVENT]
    v.pump(timeout=0.1)
    assert v.packets() == []
    v.post_event(1)
    answer(v, s, FIRST_LOCAL_PORT)
    s.close()


def test_the_hold_is_bounded(tmp_path: Path) -> None:
    """A driver that never adds an event buffer back: held REQUESTs go after
    ``reset_hold`` seconds (counted from the event's delivery), once."""
    v = Vsock.make(tmp_path / "v.sock", reset_hold=0.3)
    try:
        v.post_event(1)
        v.dev.transport_reset()
        assert v.events() == [RESET_EVENT]
        s = held_connect(v)
        for _ in range(100):
            v.pump(timeout=0.1)
            if v.dev.counters.reset_hold_timeouts:
                break
        assert v.dev.counters.reset_hold_timeouts == 1
        answer(v, s, FIRST_LOCAL_PORT)
        s2 = v.host_connect(f"CONNECT {GUEST_PORT}\n".encode())
        v.pump(timeout=5)
        answer(v, s2, FIRST_LOCAL_PORT + 1)
        assert v.dev.counters.held_connects == 1
        s.close()
        s2.close()
    finally:
        v.close()


def test_a_program_that_leaves_while_held(v: Vsock) -> None:
    v.post_event(2)
    v.dev.transport_reset()
    s = held_connect(v)
    s.close()
    v.post_event(1)  # its REQUEST goes; the end of its socket then resets it
    req = only(v.packets())
    v.send(hdr(RESPONSE, GUEST_PORT, req.src_port))
    for _ in range(20):
        v.pump(timeout=0.1)
        if not v.dev.connections:
            break
    assert not v.dev.connections and not v.failed


def test_device_reset_ends_the_hold(v: Vsock) -> None:
    v.post_event(1)
    v.dev.transport_reset()
    s = held_connect(v)
    v.h.write32(0x070, 0)  # Status = 0: a new driver knows no old connections
    assert not v.dev.connections
    s.close()
    os.close(v.h._irq_fd)
    v.h = DeviceHarness(v.dev, event_idx=True)
    v.h.initialise()
    s2 = v.host_connect(f"CONNECT {GUEST_PORT}\n".encode())
    v.post_rx(4)
    v.pump(timeout=5)
    answer(v, s2, FIRST_LOCAL_PORT + 1)
    s2.close()
