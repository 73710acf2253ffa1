"""Rows, goals, the table, the JSON file and the optional plot.

Every figure is kept as raw samples (one per repetition); the table shows the median and
the spread (half the min-max range, as a percentage of the median). Ratios are oriented
so that > 1 means minivmm is better: QEMU/minivmm for times and memory, minivmm/QEMU for
rates.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import vmms
from .vmms import QEMU


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    higher_better: bool
    goal: float | None = None  # the least oriented ratio the issue asks for
    goal_text: str = ""


# The goals are issue 15's (ratios, > 1 = minivmm better); the MMIO row's other goal, at
# most 1.2x the C floor, is printed with the floor (bench/run.py).
ROWS = [
    Row("startup_first_line", "start-up to first line", "ms", False, 0.5, ">= 0.5"),
    Row("startup_exit", "start-up to VM exit", "ms", False),
    Row("vm_rate", "VMs/s: in-process (QEMU: processes)", "1/s", True, 2.0, ">= 2.0"),
    Row("mmio_guest", "MMIO read round trip (guest rdtsc)", "us", False, 0.95, ">= 0.95"),
    Row("mmio_host", "MMIO read round trip (host wall/N)", "us", False),
    Row("rng", "virtio-rng 16 B requests", "req/s", True),
    Row("blk_rand4k_qd1", "blk 4 KiB random read QD1", "IOPS", True, 1.0, ">= 1.0"),
    Row("blk_rand4k_qd32", "blk 4 KiB random read QD32", "IOPS", True, 0.9, ">= 0.9"),
    Row("blk_seq1m_read", "blk 1 MiB sequential read", "MiB/s", True, 1.0, ">= 1.0"),
    Row("blk_seq1m_write", "blk 1 MiB sequential write", "MiB/s", True, 1.0, ">= 1.0"),
    Row("net_tx64", "net tx 64 B frames, probe -> tap", "pps", True, 0.8, ">= 0.8"),
    Row("net_tx1500", "net tx 1500 B frames, probe -> tap", "pps", True, 0.8, ">= 0.8"),
    Row("net_tx1500_mb", "net tx 1500 B frames, throughput", "MB/s", True),
    Row("net_rr", "net ICMP echo round trips (probe <-> host)", "rt/s", True, 0.9, ">= 0.9"),
    Row("mem_overhead", "VMM memory overhead (peak RSS - guest RAM)", "MiB", False, 1.0,
        ">= 1.0"),
    Row("mem_peak", "VMM peak RSS (incl. guest RAM touched)", "MiB", False),
]
#: the engine's goal: a 3-descriptor chain costs at most this fraction of one KVM exit
ENGINE_GOAL = 0.3
#: the MMIO row's second goal: at most this multiple of the C floor's round trip
FLOOR_GOAL = 1.2
BLK_ROWS = {"blk_rand4k_qd1", "blk_rand4k_qd32", "blk_seq1m_read", "blk_seq1m_write"}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread_pct(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = median(xs)
    return 50.0 * (max(xs) - min(xs)) / m if m else 0.0


def ratio(row: Row, mini: float, qemu: float) -> float:
    if not mini or not qemu or mini != mini or qemu != qemu:
        return float("nan")
    return mini / qemu if row.higher_better else qemu / mini


def fmt(x: float) -> str:
    if x != x:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def best_qemu(samples: dict[str, dict[str, list[float]]], row: Row) -> tuple[str, list[float]]:
    """QEMU's best mode for a row: the aio mode with the better median (blk rows)."""
    modes = [m for m in samples if m.startswith("qemu") and samples[m].get(row.key)]
    if not modes:
        return "qemu", []
    pick = (max if row.higher_better else min)(modes, key=lambda m: median(samples[m][row.key]))
    return pick, samples[pick][row.key]


def table(samples: dict[str, dict[str, list[float]]],
          failed: set[str]) -> tuple[str, dict[str, dict[str, object]]]:
    """The printed table and, per row, what it shows (for the JSON and the hints)."""
    head = f"{'workload':<44} {'unit':<6} {'minivmm':>16} {'QEMU':>16} {'ratio':>6}  goal"
    out = [head, "-" * len(head)]
    summary: dict[str, dict[str, object]] = {}
    for row in ROWS:
        mini = samples.get("minivmm", {}).get(row.key, [])
        mode, q = best_qemu(samples, row)
        mm, qm = median(mini), median(q)
        r = ratio(row, mm, qm)
        met = None if row.goal is None or r != r else r >= row.goal
        goal = "" if row.goal is None else f"{row.goal_text} {'met' if met else 'MISSED'}"
        if row.key in failed:
            goal = "FAIL (a run failed)"
        cell_m = f"{fmt(mm)} ±{spread_pct(mini):.0f}%" if mini else "-"
        cell_q = f"{fmt(qm)} ±{spread_pct(q):.0f}%" if q else "-"
        if "_" in mode and row.key in BLK_ROWS:
            label = f"{row.label} [{mode.split('_', 1)[1]}]"
        else:
            label = row.label
        out.append(f"{label:<44} {row.unit:<6} {cell_m:>16} {cell_q:>16} {fmt(r):>6}  {goal}")
        summary[row.key] = {"label": row.label, "unit": row.unit, "minivmm_median": mm,
                            "qemu_median": qm, "qemu_mode": mode, "ratio": r,
                            "goal": row.goal, "goal_met": met}
    return "\n".join(out), summary


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def host_facts(tsc_khz: float) -> dict[str, object]:
    """CPU, kernel, KVM module (minivmm.hostinfo of the minivmm under test), Python, QEMU."""
    sys.path.insert(0, str(vmms.MINIVMM_HOME))
    try:
        from minivmm import hostinfo
    finally:
        sys.path.pop(0)
    return {
        "cpu_model": hostinfo.cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "kvm_module": hostinfo.kvm_module(),
        "kvm_emulates_guest_kernel": hostinfo.kvm_emulates_guest_kernel(),
        "python": platform.python_version(),
        "qemu": _cmd([QEMU, "--version"]).splitlines()[0] if QEMU else None,
        "tsc_khz_host": tsc_khz,
        "tsc_khz_source": "KVM_GET_TSC_KHZ of a vCPU (bench/floor.c); guest and host share "
                          "the TSC (no TSC scaling: KVM_CAP_TSC_CONTROL absent)",
        "loadavg": os.getloadavg(),
    }


def write_json(path: Path, doc: dict[str, object]) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def plot(path: Path, summary: dict[str, dict[str, object]]) -> bool:
    """A bar chart of the ratios, only if matplotlib is installed (never a dependency)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    keys = [k for k, v in summary.items() if v["ratio"] == v["ratio"]]
    vals = [float(summary[k]["ratio"]) for k in keys]  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(keys, vals)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("minivmm vs QEMU (> 1: minivmm better)")
    fig.tight_layout()
    fig.savefig(path)
    return True
