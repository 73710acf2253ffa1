"""Shared fixtures and the rules for tests that need the host's KVM or QEMU.

Where /dev/kvm exists, tests marked ``kvm`` run and fail on error: CI must really
exercise KVM. Only where /dev/kvm is absent are they skipped, with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_OUT = ROOT / "guest" / "out"
HAVE_KVM = os.path.exists("/dev/kvm")
QEMU = shutil.which("qemu-system-x86_64")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            item.add_marker(pytest.mark.skip(reason="this host has no /dev/kvm"))


def guest_artifact(name: str) -> Path:
    """A file from `make guest`; building it is part of the test set-up, so a missing
    artifact is an error (run `make guest`), not a skip."""
    path = GUEST_OUT / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make guest` first")
    return path


def run_minivmm(*args: str, timeout: float = 120, input: bytes | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """`python -m minivmm ...` as a user would run it; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "minivmm", *args], capture_output=True, text=True,
        timeout=timeout, input=input.decode() if input is not None else None,
        cwd=ROOT, errors="replace",
    )
