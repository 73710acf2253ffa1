"""Snapshots of Linux on a hardware-virtualization KVM: the minimal kernel boots with
the agent, is saved, and a clone restored from it runs commands, its clock going on and
its disk working (the check itself: tests/test_guest_snapshot.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_guest_snapshot import check_clone

pytestmark = [pytest.mark.hwvirt, pytest.mark.kvm, pytest.mark.slow]


def test_minimal_kernel_clone(tmp_path: Path) -> None:
    check_clone(tmp_path, "vmlinux")
