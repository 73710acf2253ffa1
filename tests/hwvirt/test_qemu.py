"""QEMU's microvm with KVM running the minimal Linux to the check report: the oracle
for test_linux.py on the same (nested) KVM. A failure QEMU shares with minivmm is the
harness's or the host's, not minivmm's."""

from __future__ import annotations

from pathlib import Path

import pytest
from guests import guest_artifact
from linuxguest import HARD_TIMEOUT, PLAIN_CMDLINE, assert_check_report, make_disk, run_until

from .common import qemu_microvm

pytestmark = [pytest.mark.hwvirt, pytest.mark.kvm, pytest.mark.qemu, pytest.mark.slow]


@pytest.mark.parametrize("kernel_name", ["vmlinux", "bzImage"])
def test_qemu_check_report(tmp_path: Path, kernel_name: str) -> None:
    disk = make_disk(tmp_path / "disk.img")
    hvc0 = tmp_path / "hvc0.txt"
    cmd = qemu_microvm(
        "-kernel", str(guest_artifact(kernel_name)),
        "-initrd", str(guest_artifact("initramfs-check.cpio")), "-append", PLAIN_CMDLINE,
        "-device", "virtio-blk-device,drive=d0",
        "-drive", f"id=d0,file={disk},format=raw,if=none",
        "-device", "virtio-rng-device",
        "-device", "virtio-serial-device", "-device", "virtconsole,chardev=c0",
        "-chardev", f"file,id=c0,path={hvc0}",
    )  # fmt: skip
    console, seconds = run_until(cmd, "minivmm-check: end", HARD_TIMEOUT)
    print(f"{kernel_name} under QEMU/kvm: report complete after {seconds:.1f} s")
    assert_check_report(console, cmdline=PLAIN_CMDLINE, disk=disk, hvc0_text=hvc0.read_text())
