"""The benchmark harness (bench/) still runs: `python -m bench --smoke` runs every
workload once with tiny sizes under minivmm (and QEMU where installed) and must print a
row for each and exit 0. Nothing here looks at the figures: benchmarks are not tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

ROWS = ["start-up to first line", "MMIO read round trip (guest rdtsc)",
        "virtio-rng 16 B requests", "blk 4 KiB random read QD1", "blk 4 KiB random read QD32",
        "blk 1 MiB sequential read", "blk 1 MiB sequential write", "VMM memory overhead",
        "net tx 64 B frames", "net tx 1500 B frames", "net ICMP echo round trips",
        "VMs/s: in-process", "virtqueue engine (bench/queue_engine.py)"]


def test_bench_smoke(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for row in ROWS:
        assert any(line.startswith(row) for line in p.stdout.splitlines()), (row, p.stdout)
    for agent in ("agent: `minivmm exec -- true`", "agent: Guest.run(['true'])",
                  "agent: QEMU: no equivalent measured"):
        assert any(line.startswith(agent) for line in p.stdout.splitlines()), (agent, p.stdout)
    assert list(tmp_path.glob("results-*-smoke.json")), "no JSON results written"
