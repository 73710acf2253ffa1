"""Benchmark of the virtio-blk device alone: host time per request, io_uring against the
synchronous path.

Run: python -m bench.blk_device [--rounds N]

No VM: a FakeDriver in a real minivmm GuestMemory publishes the bench's requests (4 KiB
random reads one at a time and 32 at a time, 1 MiB sequential reads and writes, in one
buffer each as the probe sends them) and calls ``kick`` as the device thread would; the
timed part is the kick alone (queue walk, the I/O on a page-cached image, status, used
ring, interrupt decision; the fake driver asks for interrupts, so the batch path returns
at once instead of watching the ring for its next request). Each case alternates the two
paths (io_uring first, then ``io_uring=False``), and reports the best round of each (the
machines are shared: the best round is the cost without other tenants' preemptions). It
says which path a device actually took: on a host without the accelerator both columns
are the synchronous path.
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time
from pathlib import Path

from minivmm.devices.blk import BlockDevice
from minivmm.memory import GuestMemory
from minivmm.virtio.testing import FakeDriver

IMAGE = 256 << 20
SIZE = 256
CASES = (("4 KiB random read, QD1", 0, 4096, 1, 4000),
         ("4 KiB random read, QD32", 0, 4096, 32, 125),
         ("1 MiB sequential read", 0, 1 << 20, 1, 100),
         ("1 MiB sequential write", 1, 1 << 20, 1, 100))


class _Irq:
    status = 0

    def signal_used_queue(self) -> None:
        pass

    def signal_config_change(self) -> None:
        pass


def one_round(image: Path, accelerated: bool, kind: int, size: int, depth: int,
              batches: int) -> tuple[float, bool]:
    """Seconds per request of one round, and whether io_uring served it."""
    dev = BlockDevice(image, io_uring=accelerated)
    mem = GuestMemory(64 << 20, hugepages=False)
    drv = FakeDriver(SIZE, mem=mem, heap_size=40 << 20)
    drv.configure(dev.queues[0], activate=False)
    dev.set_acked_features(dev.avail_features & ~(1 << 29))
    dev.activate(mem, _Irq())
    payload = bytes(size) if kind else b""
    sectors = IMAGE // 512
    spent = 0.0
    for b in range(batches):
        for i in range(depth):
            n = b * depth + i
            sector = (n * size // 512) % sectors if size > 4096 else (n * 7919 * 8) % sectors
            hdr = struct.pack("<IIQ", kind, 0, sector)
            if kind:
                drv.publish([hdr, payload], [1], kick=False)
            else:
                drv.publish([hdr], [size, 1], kick=False)
        t0 = time.perf_counter()
        dev.kick(0)
        spent += time.perf_counter() - t0
        used = drv.used()
        assert len(used) == depth and all(u.written[-1] == 0 for u in used), used[:1]
    took = dev.io_uring and dev.stats().get("io_uring_requests", 0) > 0
    dev.close()
    mem.close()
    return spent / (batches * depth), took


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.blk_device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds per case and path")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        with image.open("wb") as f:
            for _ in range(IMAGE >> 20):
                f.write(os.urandom(1 << 20))
        print(f"{'case':28} {'io_uring':>12} {'synchronous':>12}  ratio")
        for name, kind, size, depth, batches in CASES:
            best = {True: float("inf"), False: float("inf")}
            took = False
            for _ in range(args.rounds):
                for acc in (True, False):
                    t, used = one_round(image, acc, kind, size, depth, batches)
                    best[acc] = min(best[acc], t)
                    took = took or used
            u, s = best[True] * 1e6, best[False] * 1e6
            print(f"{name:28} {u:9.2f} us {s:9.2f} us  {s / u:5.2f}x"
                  f"{'' if took else '  (io_uring unavailable: both synchronous)'}")


if __name__ == "__main__":
    main()
