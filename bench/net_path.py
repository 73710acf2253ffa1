"""Device-side cost of one network frame: the Python path next to the C accelerator.

Run: python -m bench.net_path [--frames N] [--size BYTES] [--mrg] [--profile]

No VM and no tap: a NetDevice on a DeviceHarness (fake driver, fake guest memory), its
tap fd swapped for one end of a SOCK_SEQPACKET socketpair (one message = one frame, as
on a tap; it still needs /dev/net/tun and root to open a tap first, in a private network
namespace). tx: the driver publishes a ring of one-descriptor frames, one kick serves
them all; rx: the peer sends a ring's worth of frames, one tap wake-up delivers them;
rr: one frame out and its answer already waiting on the socketpair (as a host answers a
ping inside the writev), one kick: the device side of one round trip. --mrg: with
VIRTIO_NET_F_MRG_RXBUF and 1536-byte receive buffers, as Linux's mergeable buffers are
for MTU-sized traffic (each frame then looks ahead over 65562 bytes of buffers).
Prints microseconds per frame for each path (the best of several rounds) and, with
--profile, the top of a cProfile of the Python path's transmit (the kicks only).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import os
import pstats
import socket
import subprocess
import time

from minivmm.devices.net import HDR_SIZE, VIRTIO_NET_F_MRG_RXBUF, NetDevice
from minivmm.transport.testing import DeviceHarness

CLONE_NEWNET = 0x4000_0000
RING = 256


def device(accelerate: bool, mrg: bool = False
           ) -> tuple[NetDevice, DeviceHarness, socket.socket]:
    dev = NetDevice(f"mvb{os.getpid() % 100000}{int(accelerate)}", accelerate=accelerate)
    h = DeviceHarness(dev, event_idx=True)
    dev.fd_watch = lambda fd, cb: None
    features = h.device_features()
    h.initialise(features if mrg else features & ~(1 << VIRTIO_NET_F_MRG_RXBUF))
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (ours, peer):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    os.close(dev._tap)
    dev._tap = ours.detach()
    return dev, h, peer


def tx_round(h: DeviceHarness, peer: socket.socket, frame: bytes, n: int) -> float:
    drv = h.drivers[1]
    for _ in range(n):
        drv.publish([frame], kick=False)
    t0 = time.perf_counter()
    h.kick(1)
    t1 = time.perf_counter()
    drv.used()
    for _ in range(n):
        peer.recv(1 << 16)
    return (t1 - t0) / n


def rx_round(dev: NetDevice, h: DeviceHarness, peer: socket.socket, frame: bytes,
             n: int, buffer: int = 2048) -> float:
    drv = h.drivers[0]
    for _ in range(n):
        drv.publish(writable=[buffer], kick=False)
        peer.send(frame)
    t0 = time.perf_counter()
    h.kick(0)  # resumes watching the tap and receives
    t1 = time.perf_counter()
    assert len(drv.used()) == n, "frames were not all delivered"
    return (t1 - t0) / n


def rr_round(h: DeviceHarness, peer: socket.socket, frame: bytes, n: int) -> float:
    tx, rx = h.drivers[1], h.drivers[0]
    best = float("inf")
    for _ in range(n):
        rx.publish(writable=[256], kick=False)
        tx.publish([frame], kick=False)
        peer.send(frame)
        t0 = time.perf_counter()
        h.kick(1)
        best = min(best, time.perf_counter() - t0)
        assert len(rx.used()) == 1, "the answer was not delivered with the kick"
        tx.used()
        peer.recv(1 << 16)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=RING - 8, help="frames per round")
    p.add_argument("--size", type=int, default=64, help="frame size, Ethernet header on")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--profile", action="store_true", help="cProfile the Python tx path")
    p.add_argument("--mrg", action="store_true",
                   help="MRG_RXBUF on, 1536-byte receive buffers (as Linux's)")
    a = p.parse_args()
    ns = f"minivmm-netpath-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)
        frame = bytes(HDR_SIZE) + bytes(a.size)
        for accelerate in (False, True):
            dev, h, peer = device(accelerate, a.mrg)
            try:
                if accelerate and not dev.accelerated:
                    print("accelerator: off here (see the log line above)")
                    continue
                name = "C accelerator" if accelerate else "Python path  "
                tx = min(tx_round(h, peer, frame, a.frames) for _ in range(a.rounds)) * 1e6
                rx = min(rx_round(dev, h, peer, frame, a.frames, 1536 if a.mrg else 2048)
                         for _ in range(a.rounds)) * 1e6
                h.drivers[0].publish(writable=[256])  # a spare, and the kick that resumes rx
                rr = min(rr_round(h, peer, frame, 50) for _ in range(a.rounds)) * 1e6
                print(f"{name}: tx {tx:5.2f} us/frame, rx {rx:5.2f} us/frame "
                      f"({a.size}-byte frames, {a.frames} per wake-up), "
                      f"rr {rr:5.2f} us per round trip")
                if a.profile and not accelerate:
                    prof = cProfile.Profile()
                    for _ in range(20):
                        for _ in range(a.frames):
                            h.drivers[1].publish([frame], kick=False)
                        prof.runcall(h.kick, 1)  # the device's side only
                        h.drivers[1].used()
                        for _ in range(a.frames):
                            peer.recv(1 << 16)
                    pstats.Stats(prof).sort_stats("tottime").print_stats(8)
            finally:
                peer.close()
                h.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
