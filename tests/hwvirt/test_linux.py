"""Linux under minivmm on a hardware-virtualization KVM, judged by Linux's own drivers.

* test_minimal_kernel_check_report: the project's minimal kernel, as the PVH vmlinux and
  as the bzImage, with guest/out/initramfs-check.cpio, a disk, an rng and a virtio
  console: every line of the check /init's report (tests/linuxguest.py), the same
  report QEMU gives (test_qemu.py) and the one test_linux_emulated.py asks for.
* test_stock_kernel_finds_its_devices: Debian's stock kernel (the one L1 runs, from
  `make hwvirt`) with its virtio modules (guest/out/hwvirt/initramfs-stock.cpio loads
  them, then hands over to the same check /init), with 2 vCPUs. Debian builds
  VIRTIO_MMIO=m without VIRTIO_MMIO_CMDLINE_DEVICES, so it finds virtio-mmio devices
  only through ACPI (minivmm's DSDT), and its rtc_cmos needs the CMOS RTC. The check
  /init powers off at the end, which ends the VM with status 0 (ACPI S5).
"""

from __future__ import annotations

import re
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from guests import guest_artifact
from linuxguest import (
    HARD_TIMEOUT,
    HVC0_LINE,
    PLAIN_CMDLINE,
    VIRTIO_IDS,
    assert_check_report,
    check_lines,
    make_disk,
    run_until,
    split_consoles,
)

from .common import hwvirt_artifact, minivmm

pytestmark = [pytest.mark.hwvirt, pytest.mark.kvm, pytest.mark.slow]

STOCK_TIMEOUT = 150.0  # seconds; today's run ends (without devices) in about a minute
STOCK_CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"


@pytest.mark.parametrize(("kernel_name", "cpus"), [("vmlinux", 1), ("bzImage", 2)])
def test_minimal_kernel_check_report(tmp_path: Path, kernel_name: str, cpus: int) -> None:
    disk = make_disk(tmp_path / "disk.img")
    cmd = minivmm("--kernel", str(guest_artifact(kernel_name)),
                  "--initrd", str(guest_artifact("initramfs-check.cpio")), "--mem", "256M",
                  "--cpus", str(cpus), "--disk", str(disk), "--rng",
                  "--console-device", "virtio", "--cmdline", PLAIN_CMDLINE)
    console, seconds = run_until(cmd, "minivmm-check: end", HARD_TIMEOUT)
    print(f"{kernel_name} under minivmm: report complete after {seconds:.1f} s")
    # Both consoles print to stdout: the kernel's ttyS0 and the line /init wrote to hvc0.
    ttys0 = split_consoles(console)
    assert_check_report(ttys0, cmdline=PLAIN_CMDLINE, disk=disk, hvc0_text=console,
                        cpus=cpus)
    (reported,) = [ln for ln in console.splitlines() if ln.startswith("minivmm-check: cmdline")]
    assert "clearcpuid" not in reported  # no kvm_pvm quirks on this host


def test_stock_kernel_finds_its_devices(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.img")
    cmd = minivmm("--kernel", str(hwvirt_artifact("vmlinuz")),
                  "--initrd", str(hwvirt_artifact("initramfs-stock.cpio")), "--mem", "512M",
                  "--cpus", "2", "--disk", str(disk), "--rng", "--console-device", "virtio",
                  "--cmdline", STOCK_CMDLINE)
    started = time.time()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=STOCK_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        pytest.fail(f"no end after {STOCK_TIMEOUT:.0f} s; console:\n{out[-4000:]}")
    console = p.stdout.decode(errors="replace").replace("\r", "")
    why = f"status {p.returncode}; console:\n{console[-4000:]}\n{p.stderr.decode()[-2000:]}"
    assert "minivmm-stock: insmod" not in console, why  # every module loaded
    report = check_lines(split_consoles(console))
    devices = {}
    for value in report.get("virtio", []):
        m = re.fullmatch(r"(virtio\d+) device-id (\d+) driver (\S+)", value)
        assert m, value
        devices[int(m[2])] = m[3]
    assert devices == VIRTIO_IDS, why  # found (through ACPI) and bound to their drivers
    assert report.get("cpus-online") == ["0-1"], why
    (since_epoch,) = report.get("rtc0", ["none"])  # rtc_cmos bound to minivmm's RTC
    assert since_epoch.startswith("since-epoch "), why
    assert abs(int(since_epoch.split()[1]) - started) < 600, why  # the host's time
    data = disk.read_bytes()
    assert report.get("vda-size") == [str(len(data))], why
    assert report.get("vda-crc32") == [f"{zlib.crc32(data[:65536]):08x} bytes 65536"], why
    (rng,) = report.get("hwrng", ["none"])
    assert re.fullmatch(r"[0-9a-f]{32}", rng) and rng != "0" * 32, why
    assert report.get("hvc0") == [f"wrote {len(HVC0_LINE) + 1} bytes"], why
    assert HVC0_LINE in console, why
    assert "reboot: Power down" in console, why  # the check /init powers off: ACPI S5
    assert p.returncode == 0, why
