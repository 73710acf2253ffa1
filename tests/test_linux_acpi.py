"""A Linux with ACPI under minivmm (guest/out/vmlinux-acpi: the emulated kernel plus
guest/linux/acpi.config, which keeps VIRTIO_MMIO_CMDLINE_DEVICES): the kernel loads the
tables without an error, finds every virtio-mmio device twice -- in the DSDT and on the
command line -- binds the DSDT's and refuses the command line's ("can't request region"),
uses every device once, and `poweroff` (ACPI S5) ends the VM with status 0. With
--acpi off the same kernel finds the devices on the command line only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from guests import guest_artifact
from linuxguest import (
    HARD_TIMEOUT,
    REPO,
    assert_check_report,
    make_disk,
    run_until,
    split_consoles,
)

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

CMDLINE = "console=ttyS0 reboot=t panic=-1"  # not quiet: the ACPI and PNP lines are info
CFLAGS = ["-static", "-Os", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-fno-pie",
          "-no-pie", "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none", "-Wall",
          "-Wextra", "-Werror"]  # guest/build-initramfs.sh's


def poweroff_initramfs(directory: Path) -> Path:
    """initramfs-check.cpio, but its /init powers off at the end (-DCHECK_POWER_OFF)."""
    init = directory / "init"
    subprocess.run(["gcc", *CFLAGS, "-DCHECK_POWER_OFF", "-o", str(init),
                    str(REPO / "guest/initramfs/check-init.c")], check=True)
    spec = directory / "spec"
    spec.write_text("dir /dev 0755\nnod /dev/console 0600 c 5 1\ndir /proc 0555\n"
                    f"dir /sys 0555\ndir /tmp 1777\nfile /init 0755 {init}\n")
    cpio = directory / "poweroff.cpio"
    subprocess.run([sys.executable, str(REPO / "guest/mkcpio.py"), str(spec), str(cpio)],
                   check=True)
    return cpio


def minivmm(kernel: Path, initrd: Path, disk: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "minivmm", "run", "--kernel", str(kernel), "--initrd",
            str(initrd), "--mem", "256M", "--disk", str(disk), "--rng", "--console-device",
            "virtio", "--cmdline", CMDLINE, *extra]


def test_devices_from_acpi_and_poweroff(tmp_path: Path) -> None:
    kernel = guest_artifact("vmlinux-acpi")
    disk = make_disk(tmp_path / "disk.img")
    p = subprocess.run(minivmm(kernel, poweroff_initramfs(tmp_path), disk),
                       capture_output=True, text=True, errors="replace", timeout=HARD_TIMEOUT,
                       cwd=REPO, check=False)
    console = p.stdout.replace("\r", "")
    assert p.returncode == 0, p.stderr + console[-4000:]  # the VM ended by itself: S5
    assert_check_report(split_consoles(console), cmdline=CMDLINE, disk=disk,
                        hvc0_text=console)
    for bad in ("ACPI Error", "ACPI Warning", "ACPI BIOS Error", "ACPI Exception"):
        assert bad not in console, console
    assert "ACPI: 1 ACPI AML tables successfully acquired and loaded" in console
    assert "ACPI: PM: (supports S0 S5)" in console
    assert "pnp: PnP ACPI: found 3 devices" in console  # 8250, RTC, i8042
    # Each command-line device loses to its DSDT twin, and nothing else goes wrong.
    refused = re.findall(r"virtio-mmio virtio-mmio\.(\d): can't request region for "
                         r"resource \[mem (0x[0-9a-f]+)-", console)
    assert refused == [("0", "0xd0000000"), ("1", "0xd0001000"), ("2", "0xd0002000")]
    assert console.count("failed with error") == 3
    assert "ACPI: PM: Preparing to enter system sleep state S5" in console
    assert "reboot: Power down" in console


def test_acpi_off_devices_from_the_command_line(tmp_path: Path) -> None:
    kernel = guest_artifact("vmlinux-acpi")
    disk = make_disk(tmp_path / "disk.img")
    cmd = minivmm(kernel, guest_artifact("initramfs-check.cpio"), disk, "--acpi", "off")
    console, _ = run_until(cmd, "minivmm-check: end", HARD_TIMEOUT)
    assert_check_report(split_consoles(console), cmdline=CMDLINE, disk=disk,
                        hvc0_text=console)
    assert "can't request region" not in console
    assert "ACPI: PM: (supports S0 S5)" not in console
