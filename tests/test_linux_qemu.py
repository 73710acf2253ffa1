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

Skipped only when qemu-system-x86_64 or the built guest is missing.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "guest" / "out"
QEMU = "qemu-system-x86_64"
HARD_TIMEOUT = 240.0  # seconds, whole boot

# REFERENCE.md §1: what a Linux needs on a host whose KVM emulates CPL0 code.
EMULATED_HOST_CMDLINE = (
    "console=ttyS0 reboot=t panic=-1 noxsave mitigations=off nokaslr "
    "clearcpuid=popcnt,smap,smep,umip,fsgsbase,pcid,invpcid,rdrand,rdseed,"
    "rdtscp,rdpid,cx16,pku,114 rodata=off tsc=reliable no_timer_check quiet"
)
PLAIN_CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"
HVC0_LINE = "minivmm-check: hello on hvc0"
DISK_SIZE = 1 << 20
VIRTIO_IDS = {2: "virtio_blk", 3: "virtio_console", 4: "virtio_rng"}

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


def kvm_emulates_kernel() -> bool:
    """True on kvm_pvm hosts (same test as `make guest`)."""
    script = REPO / "guest" / "kvm-emulates-kernel.sh"
    return subprocess.run([str(script)], check=False).returncode == 0


def require(path: Path, how: str) -> Path:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (Debian package qemu-system-x86)")
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO)} missing: build it with `{how}`")
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


def run_until(cmd: list[str], marker: str, timeout: float) -> tuple[str, float]:
    """Run QEMU, return (console output, seconds to marker); kill it once the
    marker line is out (the final reboot may end in an emulation failure)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    out = bytearray()
    elapsed = -1.0
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := start + timeout - time.monotonic()) > 0:
                if not sel.select(left):
                    continue
                chunk = proc.stdout.read()
                if not chunk:  # QEMU exited
                    break
                out += chunk
                if f"{marker}\n".encode() in out.replace(b"\r", b""):
                    elapsed = time.monotonic() - start
                    break
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    text = out.decode(errors="replace").replace("\r", "")
    if elapsed < 0:
        why = "QEMU exited" if time.monotonic() - start < timeout else f"{timeout:.0f} s passed"
        pytest.fail(f"no {marker!r} on the console ({why}); console:\n{text[-4000:]}")
    return text, elapsed


def check_lines(console: str) -> dict[str, list[str]]:
    """The check /init's report: key -> values, in order."""
    lines = [ln for ln in console.splitlines() if ln.startswith("minivmm-check: ")]
    assert lines and lines[0] == "minivmm-check: begin", console
    assert lines[-1] == "minivmm-check: end", console
    report: dict[str, list[str]] = {}
    for ln in lines[1:-1]:
        key, _, value = ln.removeprefix("minivmm-check: ").partition(" ")
        report.setdefault(key, []).append(value)
    return report


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

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes((i * 7 + i // 251) & 0xFF for i in range(DISK_SIZE)))
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
    report = check_lines(console)

    # The command line arrives intact; QEMU adds its virtio_mmio.device= entries.
    (got_cmdline,) = report["cmdline"]
    assert cmdline in got_cmdline
    assert len(re.findall(r"virtio_mmio\.device=\S+", got_cmdline)) == 3

    (mem,) = report["memtotal-kib"]
    assert 200 * 1024 < int(mem) <= 256 * 1024

    devices = {}
    for value in report["virtio"]:
        m = re.fullmatch(r"(virtio\d+) device-id (\d+) driver (\S+)", value)
        assert m, value
        devices[int(m[2])] = m[3]
    assert devices == VIRTIO_IDS  # every device found and bound to its driver
    assert report["virtio-count"] == ["3"]

    data = disk.read_bytes()
    assert report["vda-size"] == [str(len(data))]
    assert report["vda-crc32"] == [f"{zlib.crc32(data[:65536]):08x} bytes 65536"]

    (rng,) = report["hwrng"]
    assert re.fullmatch(r"[0-9a-f]{32}", rng), rng
    assert rng != "0" * 32

    assert report["hvc0"] == [f"wrote {len(HVC0_LINE) + 1} bytes"]
    assert hvc0.read_text() == HVC0_LINE + "\n"

    # Nothing else reported (a failed mount would print a "mount" line).
    assert set(report) == {
        "cmdline", "memtotal-kib", "virtio", "virtio-count",
        "vda-size", "vda-crc32", "hwrng", "hvc0",
    }  # fmt: skip


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
