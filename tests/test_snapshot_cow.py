"""Snapshots of a VM whose disk is copy-on-write: the overlay goes with the snapshot,
every restore (cow by default) starts its own copy of it, the image is never written."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from guests import guest_artifact
from test_dev_blk import make_image
from test_snapshot import check_line, steps_of, wait_for

import minivmm

pytestmark = pytest.mark.kvm


def test_cow_disk_snapshot_restores_into_independent_clones(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", seed=5)
    img.chmod(0o444)
    before = img.read_bytes()
    log = tmp_path / "orig.log"
    cfg = minivmm.VmConfig(
        kernel=guest_artifact("probe.elf"), console=f"file:{log}",
        drives=[minivmm.DriveConfig(img, cow=True)],
        cmdline="console=ttyS0 probe.check=snapshot,blk probe.snap_steps=12 "
                "probe.blk_pattern=5 probe.strict=1")
    with minivmm.Vm(cfg) as vm:
        vm.start()
        wait_for(log, b"step 3/", vm)  # the probe wrote sector 16 (its overlay) and flushed
        vm.snapshot(tmp_path / "snap")
        at_snapshot = len(log.read_bytes())
        result = vm.wait(120)
    assert result is not None and result.status == 0, log.read_bytes()[-1500:]
    after = log.read_bytes()[at_snapshot:]
    results: dict[int, tuple[int, bytes]] = {}

    def clone(i: int) -> None:
        clog = tmp_path / f"clone{i}.log"
        with minivmm.Vm.restore(tmp_path / "snap", console=f"file:{clog}") as c:
            results[i] = (c.run().status, clog.read_bytes())

    threads = [threading.Thread(target=clone, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == [0, 1, 2]
    for status, out in results.values():
        assert status == 0, out[-1500:]
        assert steps_of(out) == steps_of(after)
        assert "blk=ok" in check_line(out, "snapshot")  # sector 16 came with the snapshot
        assert check_line(out, "blk").startswith("ok"), out[-1500:]
    assert img.read_bytes() == before  # no VM wrote the image
