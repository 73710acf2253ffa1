"""minivmm.Guest snapshots with a real Linux: boot once, clone, run commands in the clone.

The guest's clock goes on in the clone from where the snapshot left it, its disk
works, and what a clone writes is its own. One boot: about 40 s on a host whose KVM
emulates guest kernel code (guest/out/vmlinux-emulated there), minutes under load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guests import guest_artifact
from linuxguest import kvm_emulates_kernel
from test_dev_blk import make_image, pattern

import minivmm

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

KERNEL = "vmlinux-emulated" if kvm_emulates_kernel() else "vmlinux"


def uptime(g: minivmm.Guest) -> float:
    r = g.run(["cat", "/proc/uptime"], timeout=120, check=True)
    return float(r.stdout.split()[0])


def test_clone_runs_commands_with_its_clock_going_on_and_its_own_files(tmp_path: Path) -> None:
    check_clone(tmp_path, KERNEL)


def check_clone(tmp_path: Path, kernel: str) -> None:
    """Boot ``kernel`` (guest/out/) with the agent, snapshot it, restore a clone: the
    clock went on, the disk reads, the guest's files are as they were and the clone's
    writes are its own. tests/hwvirt/test_snapshot.py runs it on the minimal kernel."""
    guest_artifact("minivmm-agent")
    img = make_image(tmp_path / "disk.img", seed=9, sectors=2048)
    cfg = minivmm.VmConfig(kernel=guest_artifact(kernel), initrd=guest_artifact("initramfs.cpio"),
                           mem="256M", drives=[minivmm.DriveConfig(img, read_only=True)])
    with minivmm.Guest(cfg) as g:
        g.run(["sh", "-c", "echo before > /tmp/mark"], timeout=120, check=True)
        before = uptime(g)
        snap = g.snapshot(tmp_path / "snap")
        with minivmm.Guest.restore(snap) as c:
            assert uptime(c) > before  # kvm-clock went on from the snapshot's time
            r = c.run(["sh", "-c", "cat /tmp/mark; echo clone > /tmp/mark; "
                       "dd if=/dev/vda bs=512 skip=5 count=1 2>/dev/null | od -An -tx1 | "
                       "head -1"], timeout=120, check=True)
            lines = r.stdout.decode().splitlines()
            assert lines[0] == "before"  # the guest's files as they were
            want = " ".join(f"{b:02x}" for b in pattern(9, 5)[:16])
            assert lines[1].strip() == want  # the disk, read through the restored device
        r = g.run(["cat", "/tmp/mark"], timeout=120, check=True)
        assert r.stdout == b"before\n"  # the clone's write is the clone's alone
