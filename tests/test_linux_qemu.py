"""Boot the project's Linux guests under QEMU: the oracle for the Linux tests.

QEMU's microvm machine is the reference VMM (REFERENCE.md §2). What a guest
reports here is what minivmm's own Linux boot tests must reproduce:

* test_check_report: the kernel (guest/out/vmlinux-emulated on hosts whose KVM
  emulates guest kernel code, guest/out/vmlinux elsewhere) with
  guest/out/initramfs-check.cpio, a disk, an rng and a virtio console; every
  line the check /init prints is asserted on (guest/initramfs/check-init.c
  documents the format). On kvm_pvm hosts this takes about a minute.
* test_busybox_initramfs: guest/out/vmlinux with guest/out/initramfs.cpio under
  TCG, checking the minivmm_run= contract of guest/initramfs/init.

Skipped only when qemu-system-x86_64 is missing; a missing guest build fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from linuxguest import (
    EMULATED_HOST_CMDLINE,
    HARD_TIMEOUT,
    OUT,
    PLAIN_CMDLINE,
    REPO,
    assert_check_report,
    kvm_emulates_kernel,
    make_disk,
    run_until,
)

QEMU = "qemu-system-x86_64"

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


def require(path: Path, how: str) -> Path:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (Debian package qemu-system-x86)")
    if not path.exists():
        pytest.fail(f"{path.relative_to(REPO)} missing: build it with `{how}`")
    return path


def qemu_base(accel: str) -> list[str]:
    cpu = "host,-arch-capabilities" if accel == "kvm" else "max"
    return [
        QEMU,
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
        "-global", "virtio-mmio.force-legacy=false",
        "-accel", accel, "-cpu", cpu, "-m", "256M",
        "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio", "-no-reboot",
    ]  # fmt: skip


def test_check_report(tmp_path: Path) -> None:
    emulated = kvm_emulates_kernel()
    if emulated:
        kernel = require(OUT / "vmlinux-emulated", "make guest-emulated")
        cmdline = EMULATED_HOST_CMDLINE
    else:
        kernel = require(OUT / "vmlinux", "make guest")
        cmdline = PLAIN_CMDLINE
    initrd = require(OUT / "initramfs-check.cpio", "make guest")
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"

    disk = make_disk(tmp_path / "disk.img")
    hvc0 = tmp_path / "hvc0.txt"
    cmd = [
        *qemu_base(accel),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-device", "virtio-blk-device,drive=d0",
        "-drive", f"id=d0,file={disk},format=raw,if=none",
        "-device", "virtio-rng-device",
        "-device", "virtio-serial-device",
        "-device", "virtconsole,chardev=c0",
        "-chardev", f"file,id=c0,path={hvc0}",
    ]  # fmt: skip
    console, seconds = run_until(cmd, "minivmm-check: end", HARD_TIMEOUT)
    print(f"{kernel.name} under QEMU/{accel}: report complete after {seconds:.1f} s")
    assert_check_report(console, cmdline=cmdline, disk=disk, hvc0_text=hvc0.read_text())


def test_busybox_initramfs() -> None:
    kernel = require(OUT / "vmlinux", "make guest")
    initrd = require(OUT / "initramfs.cpio", "make guest")
    cmd = [
        *qemu_base("tcg"),
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f'{PLAIN_CMDLINE} minivmm_run="echo run-$((6*7)); exit 3"',
    ]  # fmt: skip
    console, seconds = run_until(cmd, "minivmm-guest: reboot", 120.0)
    print(f"busybox initramfs under QEMU/tcg: reboot marker after {seconds:.1f} s")
    lines = [ln for ln in console.splitlines() if ln.startswith(("minivmm-guest:", "run-"))]
    assert lines == [
        "minivmm-guest: init",
        "minivmm-guest: run echo run-$((6*7)); exit 3",
        "run-42",
        "minivmm-guest: exit 3",
        "minivmm-guest: reboot",
    ], console
