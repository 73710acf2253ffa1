"""Shared by the hwvirt tests: the minivmm command, the QEMU microvm command, artifacts."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from guests import guest_artifact

QEMU = "qemu-system-x86_64"
MAC = "52:54:00:12:34:56"


def hwvirt_artifact(name: str) -> Path:
    """A file from `make hwvirt` (guest/out/hwvirt/); missing is an error, not a skip."""
    return guest_artifact(f"hwvirt/{name}")


def minivmm(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    """`python -m minivmm run ...` (this checkout's minivmm: PYTHONPATH is set)."""
    return [*prefix, sys.executable, "-m", "minivmm", "run", *args]


def qemu_microvm(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    """QEMU's microvm with KVM (REFERENCE.md §2 flags): the oracle next to minivmm."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (Debian package qemu-system-x86)")
    assert os.access("/dev/kvm", os.R_OK | os.W_OK), "no usable /dev/kvm"
    return [
        *prefix, QEMU,
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
        "-global", "virtio-mmio.force-legacy=false",
        "-accel", "kvm", "-cpu", "host", "-m", "256M",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        *args,
    ]  # fmt: skip
