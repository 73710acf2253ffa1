"""Device tests with no VM: a device's queues driven by FakeDrivers in one fake memory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minivmm.devices.base import VirtioDevice
from minivmm.virtio.testing import FakeDriver, FakeGuestMemory

_SPAN = 2 << 20  # guest memory for each queue's rings and heap


@dataclass
class FakeInterrupt:
    used: int = 0
    config: int = 0

    def signal_used_queue(self) -> None:
        self.used += 1

    def signal_config_change(self) -> None:
        self.config += 1

    @property
    def status(self) -> int:
        return 0


@dataclass
class Attached:
    device: VirtioDevice
    drivers: list[FakeDriver]
    irq: FakeInterrupt
    resets: list[str] = field(default_factory=list)


def attach(device: VirtioDevice, *, size: int = 16, event_idx: bool = False,
           activate: bool = True) -> Attached:
    """Program every queue as a driver would, ack all features, activate."""
    mem = FakeGuestMemory(((0, _SPAN * len(device.queues)),))
    drivers = [FakeDriver(size, mem=mem, base=i * _SPAN, heap_size=1 << 20,
                          event_idx=event_idx) for i in range(len(device.queues))]
    for drv, q in zip(drivers, device.queues, strict=True):
        drv.configure(q, activate=False)
    features = device.avail_features
    if not event_idx:
        features &= ~(1 << 29)
    device.set_acked_features(features)
    att = Attached(device, drivers, FakeInterrupt())
    device.on_needs_reset = att.resets.append
    if activate:
        device.activate(mem, att.irq)
    return att


def io_uring_missing() -> str | None:
    """Why this host cannot run blk's io_uring path (None: it must, so tests of it fail,
    never skip, here): cffi, a C compiler, liburing's header, a kernel that allows it."""
    if importlib.util.find_spec("cffi") is None:
        return "cffi is not installed"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return "no C compiler"
    if not Path("/usr/include/liburing.h").exists():
        return "liburing-dev is not installed"
    try:
        if Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() != "0":
            return "sysctl kernel.io_uring_disabled is set"
    except OSError:
        pass
    return None


def choose_io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """For a fixture parametrized over ["io_uring", "sync"]: the synchronous path forced
    with MINIVMM_IO_URING=off, or the io_uring path (skipped where the host cannot have
    it, see io_uring_missing)."""
    if request.param == "sync":
        monkeypatch.setenv("MINIVMM_IO_URING", "off")
    else:
        monkeypatch.delenv("MINIVMM_IO_URING", raising=False)
        monkeypatch.delenv("MINIVMM_ACCEL", raising=False)
        why = io_uring_missing()
        if why:
            pytest.skip(f"io_uring path: {why}")
    return str(request.param)


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "64k") mounted at ``where`` for the block, to fill up
    (ENOSPC); skips the test where mounting is not allowed."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for ENOSPC: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
