"""The example device (examples/ramdisk.py, defined outside minivmm) in a real VM: the probe's
virtio-blk driver reads, writes and asks for the ID of a RAM disk given with --device,
by MODULE:CLASS and by the name an installed distribution offers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from guests import ROOT, ProbeRun, guest_artifact, run_minivmm
from test_dev_blk import make_image
from test_plugins import make_distribution

from minivmm import DeviceConfig, Vm, VmConfig

pytestmark = pytest.mark.kvm
SECTORS = 2048  # 1 MiB


def probe(*args: str, cmdline: str) -> ProbeRun:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--stats", *args,
                    "--cmdline", f"probe.strict=1 probe.check=blk {cmdline}")
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def stat(run: ProbeRun, name: str) -> int:
    """One counter of the RAM disk's --stats lines."""
    found = re.findall(rf"^stats: virtio-ramdisk@0x[0-9a-f]+ {name}: (\d+)$", run.err, re.M)
    assert len(found) == 1, run.err
    return int(found[0])


def test_ramdisk_from_an_image_reads_writes_and_leaves_the_image_alone(tmp_path: Path) -> None:
    img = make_image(tmp_path / "seed.img", seed=9, sectors=SECTORS)
    before = img.read_bytes()
    run = probe("--device", f"examples.ramdisk:RamDisk,image={img},serial=scratch-1",
                cmdline=f"probe.blk_pattern=9 probe.blk_sectors={SECTORS} "
                        "probe.blk_serial=scratch-1")
    run.assert_pass()
    result = run.result("blk")
    assert f"capacity={SECTORS}" in result and "written=8" in result
    assert "id=scratch-1" in result and "ro=0" in result
    assert img.read_bytes() == before  # the guest's writes went to RAM
    assert stat(run, "writes") == 1 and stat(run, "reads") >= 6
    assert stat(run, "errors") == 2  # the two reads past the end the check makes


def test_ramdisk_read_only_and_sized(tmp_path: Path) -> None:
    run = probe("--device", "examples.ramdisk:RamDisk,size=64K,ro",
                cmdline="probe.blk_sectors=128 probe.blk_ro=1")
    run.assert_pass()
    assert "ro=1" in run.result("blk") and "id=-" in run.result("blk")
    assert stat(run, "writes") == 0
    assert "ramdisk: a write to a read-only disk; answered IOERR" in run.err


def test_ramdisk_through_an_entry_point(tmp_path: Path) -> None:
    """An installed distribution (a dist-info with entry_points.txt on PYTHONPATH) offers
    --device scratch; next to it the example as MODULE:CLASS, as a second disk."""
    site = make_distribution(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    p = subprocess.run(
        [sys.executable, "-m", "minivmm", "run", "--kernel", str(guest_artifact("probe.elf")),
         "--device", "scratch,size=64K,serial=from-entry-point",
         "--device", "examples.ramdisk:RamDisk,size=32K",
         "--cmdline", "probe.strict=1 probe.check=blk probe.blk=0 probe.blk_sectors=128 "
                      "probe.blk_serial=from-entry-point"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, errors="replace")
    run = ProbeRun(p.returncode, p.stdout, p.stderr)
    run.assert_pass()
    assert "id=from-entry-point" in run.result("blk")
    assert len([ln for ln in run.lines if ln.startswith("virtio dev ") and "device=2" in ln]) == 2


def test_a_plugin_device_names_its_kernel_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel_option class attribute of a device from outside minivmm is the hint a
    Linux guest that never initialised it gets (the VM is built, not run)."""
    monkeypatch.syspath_prepend(str(ROOT))
    cfg = VmConfig(kernel=guest_artifact("bzImage"), console="none", devices=[
        DeviceConfig("examples.ramdisk:RamDisk", {"size": "64K"})])
    with Vm(cfg) as vm:
        hints = vm.device_hints()
    assert hints == ["the guest never initialised virtio-ramdisk at 0xd0000000 (IRQ 5): is "
                     "its kernel built with CONFIG_VIRTIO_MMIO, "
                     "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and CONFIG_VIRTIO_BLK?"]
