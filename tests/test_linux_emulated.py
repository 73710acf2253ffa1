"""A real Linux under minivmm, asserting on what the kernel found (the check /init).

On hosts whose KVM emulates guest kernel code this boots guest/out/vmlinux-emulated
(about a minute; README "Hosts without hardware virtualization"), with --host-quirks auto
adding the command-line options it needs there. On hosts with hardware virtualization it
boots the ordinary guest/out/vmlinux and bzImage, and the same assertions hold.
tests/test_linux_qemu.py holds QEMU to the same report: the oracle for this test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from guests import guest_artifact
from linuxguest import (
    HARD_TIMEOUT,
    HVC0_LINE,
    PLAIN_CMDLINE,
    assert_check_report,
    kvm_emulates_kernel,
    make_disk,
    run_until_stopped,
)

from minivmm.hostinfo import EMULATED_HOST_CMDLINE

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

KERNELS = ["vmlinux-emulated"] if kvm_emulates_kernel() else ["vmlinux", "bzImage"]


@pytest.mark.parametrize("kernel_name", KERNELS)
def test_linux_check_report(tmp_path: Path, kernel_name: str) -> None:
    kernel = guest_artifact(kernel_name)
    disk = make_disk(tmp_path / "disk.img")
    cmd = [sys.executable, "-m", "minivmm", "run", "--kernel", str(kernel),
           "--initrd", str(guest_artifact("initramfs-check.cpio")), "--mem", "256M",
           "--disk", str(disk), "--rng", "--console-device", "virtio",
           "--cmdline", PLAIN_CMDLINE, "--check-driver"]
    console, tail, seconds = run_until_stopped(cmd, "minivmm-check: end", HARD_TIMEOUT)
    print(f"{kernel_name} under minivmm: report complete after {seconds:.1f} s")
    # Both consoles print to stdout: the kernel's ttyS0 and the line /init wrote to hvc0.
    assert HVC0_LINE + "\n" in console
    ttys0 = console.replace(HVC0_LINE + "\n", "", 1)
    assert_check_report(ttys0, cmdline=PLAIN_CMDLINE, disk=disk, hvc0_text=console)
    # Linux's virtio-blk, -rng and -console drivers keep every rule --check-driver knows
    # (it reports a violation the moment it happens, and sums up when the VM ends).
    assert "check-driver:" not in console
    assert ("minivmm: check-driver: no violations of the virtio 1.2 driver rules "
            "(3 devices watched)") in tail, tail
    (reported,) = [ln for ln in console.splitlines() if ln.startswith("minivmm-check: cmdline")]
    for option in EMULATED_HOST_CMDLINE.split():  # --host-quirks auto: only where needed
        assert (option in reported.split()) == kvm_emulates_kernel(), option
