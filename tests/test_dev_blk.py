"""virtio-blk in a real VM: the probe guest reads what the host wrote, writes what the
host then checks, flushes, asks for the serial, and gets I/O errors where it should;
on the io_uring path (where the host has it) and on the synchronous path alike."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from devices import choose_io_path
from guests import ProbeRun, guest_artifact, run_minivmm

pytestmark = pytest.mark.kvm
SECTOR = 512
GOLDEN = 0x9E3779B97F4A7C15
SECTORS = 2048  # a 1 MiB image


def pattern(seed: int, sector: int) -> bytes:
    """The probe's blk pattern: word w of sector s is seed*GOLDEN + s*64 + w (mod 2^64)."""
    base = (seed * GOLDEN + sector * 64) & (2**64 - 1)
    return struct.pack("<64Q", *(((base + w) & (2**64 - 1)) for w in range(64)))


def make_image(path: Path, seed: int, sectors: int = SECTORS) -> Path:
    path.write_bytes(b"".join(pattern(seed, s) for s in range(sectors)))
    return path


@pytest.fixture(params=["io_uring", "sync"], autouse=True)
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return choose_io_path(request, monkeypatch)


def probe(disk: str, cmdline: str) -> ProbeRun:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--disk", disk,
                    "--stats", "--cmdline", f"probe.strict=1 probe.check=blk {cmdline}")
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def blk_stats(err: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^stats: virtio-blk@\S+ (\w+): (\d+)$", err,
                                             re.M)}


def test_reads_writes_flush_and_serial(tmp_path: Path, io_path: str) -> None:
    img = make_image(tmp_path / "disk.img", seed=7)
    run = probe(f"{img},serial=minivmm-disk-1",
                f"probe.blk_pattern=7 probe.blk_sectors={SECTORS} probe.blk_serial=minivmm-disk-1")
    run.assert_pass()
    result = run.result("blk")
    assert "flush=yes" in result and "id=minivmm-disk-1" in result
    stats = blk_stats(run.err)
    assert stats["io_uring"] == (io_path == "io_uring"), run.err
    if io_path == "io_uring":  # every read and write of the check went through the ring
        assert stats["io_uring_requests"] > 0 and stats["io_uring_batches"] > 0
    data = img.read_bytes()
    for s in range(SECTORS):  # the last 8 sectors hold seed+1's pattern, the rest seed's
        want = pattern(8 if s >= SECTORS - 8 else 7, s)
        assert data[s * SECTOR : (s + 1) * SECTOR] == want, f"sector {s}"


def test_cow_disk_twice_from_one_image(tmp_path: Path) -> None:
    """Each run's writes go to its own overlay: the second run finds the image as the
    first did, and the image is never written."""
    img = make_image(tmp_path / "cow.img", seed=5)
    img.chmod(0o444)  # a cow disk opens its image read-only
    before = img.read_bytes()
    for _ in range(2):
        run = probe(f"{img},cow", f"probe.blk_pattern=5 probe.blk_sectors={SECTORS}")
        run.assert_pass()
        assert "flush=yes" in run.result("blk")
        assert img.read_bytes() == before


def test_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    img = make_image(tmp_path / "ro.img", seed=3)
    before = img.read_bytes()
    run = probe(f"{img},ro", "probe.blk_pattern=3 probe.blk_ro=1")
    run.assert_pass()
    assert "ro=1" in run.result("blk")
    assert img.read_bytes() == before


def test_reading_past_the_end_is_an_io_error_not_a_crash(tmp_path: Path) -> None:
    img = make_image(tmp_path / "small.img", seed=1, sectors=64)
    run = probe(str(img), "probe.blk_pattern=1 probe.blk_sectors=64")
    run.assert_pass()  # the check includes reads at and across the end (IOERR expected)
    assert "outside the disk" in run.err  # the rate-limited log line


def test_two_disks_and_rng_side_by_side(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", seed=11)
    b = make_image(tmp_path / "b.img", seed=12)
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--disk", str(a),
                    "--disk", f"{b},ro", "--rng", "--cmdline",
                    "probe.strict=1 probe.check=blk,rng,bad_chain probe.blk=1 "
                    "probe.blk_pattern=12 probe.blk_ro=1")
    run = ProbeRun(p.returncode, p.stdout, p.stderr)
    run.assert_pass()
    assert len([line for line in run.lines if line.startswith("virtio dev ")]) == 3


@pytest.mark.parametrize(("spec", "want"), [
    ("{missing}", "missing.img"),
    ("{dir}", "directory"),
    ("{img},bogus", "bogus"),
    ("{img},serial=" + "x" * 21, "serial"),
])
def test_bad_disk_options_are_usage_errors(tmp_path: Path, spec: str, want: str) -> None:
    img = make_image(tmp_path / "ok.img", seed=0, sectors=8)
    arg = spec.format(missing=tmp_path / "missing.img", dir=tmp_path, img=img)
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--disk", arg)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and want in p.stderr
