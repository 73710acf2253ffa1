"""Profile hints for the goals minivmm misses, so the next change is aimed.

Sources: minivmm's own counters (`--stats`: exits by reason, counted on the vCPU thread;
QueueNotify writes go through ioeventfd and are not among them), its `--timeline`, the
C floor of the same run, and a bare interpreter started the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from . import vmms
from .vmms import Vmm

if TYPE_CHECKING:
    from .run import Bench

STATS_KEYS = ("mmio", "io")


def _exits(stderr: str) -> dict[str, int]:
    from .run import STATS
    return {k: int(v) for k, v in STATS.findall(stderr)}


def _stats_run(b: Bench, cmd: str) -> dict[str, int] | str:
    """Exit counters of one minivmm run (up to 3 attempts), or why the last one failed."""
    for _ in range(3):
        r = vmms.run(Vmm("minivmm").argv(b.probe, cmd, b.image, stats=True), timeout=300)
        if r.status == 0 and r.passed_probe:
            return _exits(r.stderr)
    return next((line for _, line in r.lines if "FAIL" in line), r.tail(2))


def _python_baseline() -> tuple[float, float, float]:
    """Wall ms of `python3 -c pass`, of importing minivmm's launch path, and that
    process's peak RSS in MiB (the least of 3: the host is shared, noise only adds)."""
    import os
    import subprocess
    bare: list[float] = []
    imp: list[float] = []
    rss: list[float] = []
    for _ in range(3):
        for code, acc in (("pass", bare), ("import minivmm.vm, minivmm.cli", imp)):
            t0 = time.monotonic()
            p = subprocess.Popen([vmms.MINIVMM_PYTHON, "-c", code], cwd=vmms.MINIVMM_HOME)
            _, _, ru = os.wait4(p.pid, 0)
            p.returncode = 0
            acc.append((time.monotonic() - t0) * 1000)
            if acc is imp:
                rss.append(ru.ru_maxrss / 1024)
    return min(bare), min(imp), min(rss)


def hints(b: Bench, summary: dict[str, dict[str, object]], floor: dict[str, float]) -> list[str]:
    out: list[str] = []
    missed = [k for k, v in summary.items() if v["goal_met"] is False]
    if not missed:
        return out
    n = min(b.sizes.n, 2000)
    mb = min(b.sizes.mb, 64)
    fl_read = floor.get("cpl3_mmio_read", float("nan")) / 1000
    fl_write = floor.get("cpl3_mmio", float("nan")) / 1000
    bare_ms, import_ms, import_rss = _python_baseline()

    def per_op(workload: str, seq: bool) -> str:
        """MMIO exits per operation: two runs, n and 2n operations, differenced (so the
        device initialisation and the console output cancel out)."""
        runs = []
        for k in (1, 2):
            runs.append(_stats_run(b, f"probe.check=virtio,bench probe.bench={workload} "
                                      f"probe.bench_n={k * n} probe.bench_mb={k * mb}"))
        if isinstance(runs[0], str) or isinstance(runs[1], str):
            return f"(--stats run failed: {runs[0] if isinstance(runs[0], str) else runs[1]})"
        d = (runs[1].get("mmio", 0) - runs[0].get("mmio", 0)) / (mb if seq else n)
        return f"{d:.2f} MMIO exits per {'MiB' if seq else 'op'} reach the vCPU thread (--stats)"

    def s(key: str, which: str) -> float:
        return float(summary[key][which])  # type: ignore[arg-type]

    for key in missed:
        m, q = s(key, "minivmm_median"), s(key, "qemu_median")
        if key == "startup_first_line":
            tl: dict[str, list[float]] = {}
            for t in b.timelines:
                for k, v in t.items():
                    tl.setdefault(k, []).append(v)
            phases = ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in tl.items())
            ready = statistics.median(tl.get("kvm ready", [float("nan")]))
            rest = (f"leaving ~{ready - import_ms:.0f} ms of 'kvm ready' for KVM VM, guest "
                    "memory and vCPU set-up" if ready > import_ms else
                    "i.e. 'kvm ready' is almost all interpreter start and imports")
            out.append(f"start-up: minivmm {m:.0f} ms vs QEMU {q:.0f} ms to the first line; "
                       f"minivmm --timeline (ms, median): {phases}. In the bench's venv `python -c "
                       f"pass` takes {bare_ms:.0f} ms and `python -c 'import minivmm.vm, "
                       f"minivmm.cli'` "
                       f"{import_ms:.0f} ms (best of 3): interpreter start {bare_ms:.0f} ms + "
                       f"imports {import_ms - bare_ms:.0f} ms, {rest}")
        elif key == "mmio_guest":
            mh, qh = s("mmio_host", "minivmm_median"), s("mmio_host", "qemu_median")
            out.append(f"mmio: host wall per read minivmm {mh:.1f} us, QEMU {qh:.1f} us, C floor "
                       f"{fl_read:.1f} us (CPL3 MMIO read, bare KVM_RUN): minivmm spends "
                       f"{mh - fl_read:.1f} us per exit in user space (KVM_RUN return, exit "
                       f"decode, bus lookup, register read, Python), QEMU {qh - fl_read:.1f} us; "
                       + per_op("mmio", False))
        elif key in ("blk_rand4k_qd1", "blk_rand4k_qd32", "blk_seq1m_read", "blk_seq1m_write",
                     "rng"):
            seq = key.startswith("blk_seq")
            us_m = 1e6 / m if m else float("nan")
            us_q = 1e6 / q if q else float("nan")
            what = "MiB" if seq else "request"
            out.append(f"{key}: {us_m:.0f} us per {what} in minivmm vs {us_q:.0f} us in QEMU "
                       f"({summary[key]['qemu_mode']}); {per_op(key, seq)}; the QueueNotify "
                       f"exit itself costs about {fl_write:.0f} us here (C floor, CPL3 MMIO "
                       f"write), the rest is the device path (ioeventfd wake-up; for blk, "
                       "one C call per batch: queue walk, io_uring reads or pwritev, used "
                       "ring; rng: the queue walk in Python)")
        elif key in ("net_tx64", "net_tx1500", "net_rr"):
            from .netbench import hint
            out.append(hint(b, key, summary))
        elif key == "mem_overhead":
            out.append(f"memory: minivmm overhead {m:.1f} MiB vs QEMU {q:.1f} MiB; "
                       f"`python3 -c 'import minivmm.vm'` alone peaks at {import_rss:.1f} "
                       f"MiB, so about {m - import_rss:.1f} MiB is what the running VMM adds "
                       "(threads' stacks, ctypes, buffers, device state)")
    return out
