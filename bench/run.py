"""minivmm next to QEMU: the same probe guest, the same host, the same run.

    python -m bench [--reps N] [--smoke] [--no-io-uring] [--only blk|net] [--out DIR]
    python -m bench --hwvirt [--reps N]   Linux boot time on a hardware-virtualization KVM
                                          (bench/hwvirt.py; in L1 on kvm_pvm hosts;
                                          --exec: `minivmm exec -- true` instead)

Builds the probe (into bench/out/, from guest/probe) and the C floor (bench/floor.c,
gcc), copies minivmm/ to bench/out/snapshot/ and runs it from there (the workspace is
shared: an edit during the run must not mix versions; the JSON records the commit and
a hash of the copy), writes a raw image of non-zero data (1 GiB; read once so it sits
in the host page cache), then repeats, alternating which VMM goes first:

  floor    bench/out/floor: one-instruction guest loops with bare KVM_RUN (C)
  startup  the probe with `probe.check=virtio` (virtio-rng + virtio-blk attached):
           process start -> first "probe:" line, and -> the VMM process reaped
  memory   the probe running blk_rand4k_qd32 then mmio while the parent samples
           /proc/PID/{status,smaps}: overhead = peak RSS (wait4 rusage) - Rss of the
           guest-RAM mapping (the guest memory the guest, loader and devices touched)
  main     one guest running every probe benchmark (probe.bench=...): figures from the
           guest's rdtsc; the host's wall time between output lines cross-checks mmio
  main (QEMU aio=io_uring, when QEMU accepts it): the blk workloads again
  net      the probe's net_tx64, net_tx1500, net_rr with a virtio-net on a tap, each VMM
           in a fresh network namespace (bench/netbench.py; needs root, `ip`, /dev/net/tun)
  vm rate  VMs per second: in one process, build a minivmm.Vm, boot the probe to its first
           line, close it, for a few seconds (bench/vmrate.py, in the bench's venv); QEMU:
           processes started, read to their first line, killed
  engine   once, after the repetitions: bench/queue_engine.py (the virtqueue engine's cost
           per chain against one Python KVM exit; no QEMU equivalent)
  agent    once, after the repetitions: `minivmm exec -- true` process start to exit
           (--reps runs) and Guest.run(["true"]) round trips once booted (20), with the
           Linux kernel this host boots (bench/agentbench.py; no QEMU equivalent)

QEMU: microvm, virtio-mmio v2, -drive cache=writeback with aio=threads (and io_uring as
a second mode; each blk row compares with QEMU's better mode and names it). The table
gives medians and spreads; the JSON (bench/out/results-<date>.json) every sample.
Goals missed -> profile hints from extra minivmm runs with --stats / --timeline.
Exit status: 0, or 1 when a run failed (a VMM error, or the probe did not pass).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import agentbench, netbench, report, vmms, vmrate
from .vmms import MIB, REPO, RunOutput, Vmm

WORKLOADS = ["mmio", "rng", "blk_rand4k_qd1", "blk_rand4k_qd32", "blk_seq1m_read",
             "blk_seq1m_write"]
BLK = [w for w in WORKLOADS if w.startswith("blk")]
STATS = re.compile(r"^stats: vcpu0 exits (\w+): (\d+)$", re.M)
TIMELINE = re.compile(r"^timeline: (.+?)\s+([\d.]+) ms$", re.M)


@dataclass(frozen=True)
class Sizes:
    n: int  # mmio reads, rng requests, random blk requests per run
    mb: int  # MiB per sequential blk run
    image: int  # bytes
    floor_n: int
    mem_n: int
    net_pkts: int  # frames per net_tx* run
    net_rr: int  # round trips per net_rr run


FULL = Sizes(n=2500, mb=256, image=1 << 30, floor_n=5000, mem_n=1000, net_pkts=100000,
             net_rr=5000)
SMOKE = Sizes(n=20, mb=2, image=16 * MIB, floor_n=200, mem_n=20, net_pkts=200, net_rr=20)


def cmdline(workloads: list[str], n: int, mb: int) -> str:
    return (f"probe.check=virtio,bench probe.bench={','.join(workloads)} "
            f"probe.bench_n={n} probe.bench_mb={mb}")


def guest_figures(r: RunOutput, khz_host: float) -> dict[str, float]:
    """Guest rdtsc figures in the table's units; the host TSC rate when the guest has
    none (tsc_src=none: no CPUID leaf gives it here)."""
    out: dict[str, float] = {}
    for name, kv in r.bench.items():
        n, cycles = int(kv["n"]), int(kv["cycles"])
        khz = int(kv.get("tsc_khz", "0")) or khz_host
        secs = cycles / (khz * 1000.0)
        if name == "mmio":
            out["mmio_guest"] = secs / n * 1e6
            if name in r.bench_host_s:
                out["mmio_host"] = r.bench_host_s[name] / n * 1e6
        elif name in ("rng", "blk_rand4k_qd1", "blk_rand4k_qd32"):
            out[name] = n / secs
        elif name in ("blk_seq1m_read", "blk_seq1m_write"):
            out[name] = n / secs  # n is MiB
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = SMOKE if args.smoke else FULL
        self.out = Path(args.out)
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.floor: list[dict[str, float]] = []
        self.raw: list[dict[str, object]] = []
        self.failed: set[str] = set()
        self.failures: list[str] = []
        self.failed_runs: list[str] = []
        self.timelines: list[dict[str, float]] = []
        self.guest_tsc_src: set[str] = set()
        self.khz = 0.0
        self.net_skip = netbench.unavailable()
        self.tap_rx: dict[str, list[int]] = {}

    def add(self, vmm: str, key: str, value: float) -> None:
        self.samples.setdefault(vmm, {}).setdefault(key, []).append(value)

    def launch(self, vmm: Vmm, kind: str, cmd: str, rows: list[str], *,
               sample_memory: bool = False, timeline: bool = False,
               argv: list[str] | None = None) -> RunOutput | None:
        """One run; a failed run is recorded and (full mode only, --retries) repeated, so
        an intermittent VMM bug costs a sample, not the benchmark. Smoke mode: no retry.
        argv: the command, if not the usual one with the probe and the disk."""
        argv = argv or vmm.argv(self.probe, cmd, self.image, timeline=timeline)
        for attempt in range(1 + (0 if self.args.smoke else self.args.retries)):
            r = vmms.run(argv, sample_memory=sample_memory, timeout=300)
            ok = vmm.passed(r.status) and r.passed_probe
            self.raw.append({"vmm": vmm.label, "kind": kind, "argv": argv,
                             "status": r.status, "ok": ok, "attempt": attempt,
                             "first_line_s": r.first_line_s, "exit_s": r.exit_s,
                             "cpu_s": r.cpu_s, "maxrss_kib": r.maxrss_kib, "hwm_kib": r.hwm_kib,
                             "guest_rss_kib": r.guest_rss_kib, "bench": r.bench,
                             "bench_host_s": r.bench_host_s,
                             "tail": None if ok else r.tail()})
            if ok:
                return r
            self.failed_runs.append(f"{vmm.label} {kind}: exit status {r.status}: {r.tail(3)}")
        self.failed.update(rows)
        self.failures.append(f"{vmm.label} {kind}: failed {1 + attempt} time(s)")
        return None

    def agent(self) -> dict[str, object]:
        """`minivmm exec -- true` and Guest.run (bench/agentbench.py): printed; the
        samples for the JSON. A Linux boot each (~40 s on a kvm_pvm host)."""
        reps, runs = (1, 2) if self.args.smoke else (self.args.reps, 20)
        print(f"bench: the agent path ({reps} exec, {runs} Guest.run) ...", file=sys.stderr,
              flush=True)
        try:
            ex, run = agentbench.exec_true(reps), agentbench.guest_run(runs)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            self.failures.append(f"agent: {e}")
            return {}
        for line in agentbench.lines(ex, run):
            print(line)
        return {"exec": ex, "run": run}

    def vm_rate(self, vmm: Vmm) -> None:
        """VMs/s for the vm_rate row: minivmm in-process (bench/vmrate.py in the venv, on
        the copy of minivmm), QEMU as processes."""
        seconds = 0.5 if self.args.smoke else 3.0
        try:
            if vmm.name == "minivmm":
                p = subprocess.run(
                    [vmms.MINIVMM_PYTHON, "-m", "bench.vmrate", "--only", "rate", "--json",
                     "--seconds", str(seconds), "--probe", str(self.probe)],
                    cwd=vmms.MINIVMM_HOME, env={**os.environ, "PYTHONPATH": str(REPO)},
                    capture_output=True, text=True, timeout=120 + seconds)
                if p.returncode != 0:
                    raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip()
                                       else f"exit status {p.returncode}")
                rate = json.loads(p.stdout.strip().splitlines()[-1])["per_s"]
            else:
                rate = vmrate.qemu_rate(seconds, self.probe)["per_s"]
        except (RuntimeError, ValueError, KeyError, IndexError, OSError,
                subprocess.TimeoutExpired) as e:
            self.failed.add("vm_rate")
            self.failures.append(f"{vmm.label} vm rate: {e}")
            return
        self.add(vmm.label, "vm_rate", rate)

    def engine(self) -> dict[str, object]:
        """bench/queue_engine.py once (in the venv, on the copy of minivmm): printed with
        its goal; the figures for the JSON."""
        seconds = 0.4 if self.args.smoke else 6.0
        p = subprocess.run([vmms.MINIVMM_PYTHON, "-m", "bench.queue_engine", "--json",
                            "--seconds", str(seconds)], cwd=vmms.MINIVMM_HOME,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, timeout=300)
        try:
            fig: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
            us, exit_us = float(fig["3-desc_us"]), float(fig["exit_us"])  # type: ignore[arg-type]
        except (ValueError, KeyError, IndexError):
            self.failures.append(f"engine: {p.stderr.strip()[-300:] or 'no figures'}")
            return {}
        met = us / exit_us <= report.ENGINE_GOAL
        print(f"virtqueue engine (bench/queue_engine.py): 3-descriptor chain {us:.2f} us = "
              f"{us / exit_us:.2f} of one Python KVM exit ({exit_us:.2f} us, {fig['exit_source']});"
              f" 1-descriptor {float(fig['1-desc_us']):.2f} us; goal <= "  # type: ignore[arg-type]
              f"{report.ENGINE_GOAL} {'met' if met else 'MISSED'}")
        return fig

    def rep(self, i: int, mini: Vmm, qemus: list[Vmm]) -> None:
        s = self.sizes
        fl = vmms.run_floor(self.floor_bin, s.floor_n)
        self.floor.append(fl)
        if "error" in fl:
            self.failures.append(f"floor: exit status {fl['error']:.0f}")
        self.khz = self.khz or fl.get("tsc_khz", 0.0)
        order = [mini, *qemus[:1]] if i % 2 == 0 else [*qemus[:1], mini]
        if self.args.only == "net":
            self.rep_net(order)
            return
        if self.args.only == "blk":
            for vmm in order + qemus[1:]:
                r = self.launch(vmm, "main", cmdline(BLK, s.n, s.mb), BLK)
                if r:
                    for k, v in guest_figures(r, self.khz).items():
                        self.add(vmm.label if vmm in order else "qemu_" + vmm.qemu_aio, k, v)
            return
        for vmm in order:  # start-up
            r = self.launch(vmm, "startup", "probe.check=virtio",
                            ["startup_first_line", "startup_exit"], timeline=vmm is mini)
            if r and r.first_line_s is not None:
                self.add(vmm.label, "startup_first_line", r.first_line_s * 1000)
                self.add(vmm.label, "startup_exit", r.exit_s * 1000)
                if vmm is mini:
                    self.timelines.append({k: float(v) for k, v in TIMELINE.findall(r.stderr)})
        for vmm in order:
            self.vm_rate(vmm)
        for vmm in order:  # memory
            r = self.launch(vmm, "memory", cmdline(["blk_rand4k_qd32", "mmio"], s.mem_n, 1),
                            ["mem_overhead", "mem_peak"], sample_memory=True)
            if r:
                peak = max(r.maxrss_kib, r.hwm_kib)
                self.add(vmm.label, "mem_peak", peak / 1024)
                self.add(vmm.label, "mem_overhead", (peak - r.guest_rss_kib) / 1024)
        for vmm in order + qemus[1:]:  # main
            wl = WORKLOADS if vmm in order else BLK
            r = self.launch(vmm, "main", cmdline(wl, s.n, s.mb),
                            ["mmio_guest", "mmio_host", "rng", *BLK] if vmm in order else BLK)
            if r:
                self.guest_tsc_src.update(kv.get("tsc_src", "?") for kv in r.bench.values())
                for k, v in guest_figures(r, self.khz).items():
                    self.add(vmm.label if vmm in order else "qemu_" + vmm.qemu_aio, k, v)
        self.rep_net(order)

    def rep_net(self, order: list[Vmm]) -> None:
        s = self.sizes
        if self.net_skip:
            return
        for vmm in order:  # net
            r, rx = netbench.run_in_namespace(self, vmm, "net", netbench.WORKLOADS,
                                              s.net_pkts, s.net_rr, netbench.ROWS)
            if r:
                self.tap_rx.setdefault(vmm.name, []).append(rx)
                for k, v in netbench.figures(r, self.khz).items():
                    self.add(vmm.label, k, v)

    def paired_blk(self) -> str:
        """Per repetition, minivmm over QEMU io_uring of the same repetition (run back to
        back), the median of those ratios: steadier than a ratio of medians on a busy host."""
        mini = self.samples.get("minivmm", {})
        qemu = self.samples.get("qemu_io_uring", {})
        parts = []
        for k in BLK:
            pairs = [m / q for m, q in zip(mini.get(k, []), qemu.get(k, []), strict=False) if q]
            if pairs:
                parts.append(f"{k} {statistics.median(pairs):.2f} "
                             f"({min(pairs):.2f}-{max(pairs):.2f})")
        return ("paired ratios, minivmm / QEMU io_uring per repetition (median, range): "
                + ("; ".join(parts) or "none"))

    def kicks_per_op(self) -> dict[str, str]:
        """Median kicks per operation of each rng/blk workload, per VMM (main runs)."""
        acc: dict[str, dict[str, list[float]]] = {}
        for run in self.raw:
            if not run["ok"] or run["kind"] not in ("main", "net"):
                continue
            vmm = "minivmm" if str(run["vmm"]) == "minivmm" else "qemu"
            for w, kv in run["bench"].items():  # type: ignore[attr-defined]
                if "kicks" in kv:
                    acc.setdefault(w, {}).setdefault(vmm, []).append(
                        int(kv["kicks"]) / int(kv["n"]))
        return {w: " ".join(f"{v}={statistics.median(x):.2f}" for v, x in d.items())
                for w, d in acc.items()}

    def qemu_modes(self) -> list[Vmm]:
        if vmms.QEMU is None:
            return []
        modes = [Vmm("qemu", "threads")]
        if self.args.io_uring:
            probe = Vmm("qemu", "io_uring")
            r = vmms.run(probe.argv(self.probe, "probe.check=virtio", self.image), timeout=60)
            if probe.passed(r.status):
                modes.append(probe)
            else:
                self.notes.append(f"QEMU aio=io_uring unavailable here: {r.tail(2)}")
        return modes

    def main(self) -> int:
        t_start = time.monotonic()
        self.notes: list[str] = []
        self.probe, self.floor_bin = vmms.build(self.out)
        self.version = vmms.snapshot(self.out)
        self.image = self.out / ("disk-16m.img" if self.args.smoke else "disk-1g.img")
        vmms.make_image(self.image, self.sizes.image)
        mini = Vmm("minivmm")
        qemus = self.qemu_modes()
        if not qemus:
            self.notes.append("qemu-system-x86_64 is not installed: QEMU columns empty")
        reps = 1 if self.args.smoke else self.args.reps
        for i in range(reps):
            print(f"bench: repetition {i + 1}/{reps} ...", file=sys.stderr, flush=True)
            self.rep(i, mini, qemus)
        # QEMU's default mode (aio=threads) is sampled under its label; the table calls
        # the modes qemu_threads and qemu_io_uring.
        for label in list(self.samples):
            if label.startswith("qemu(aio=threads"):
                self.samples["qemu_threads"] = self.samples.pop(label)
        text, summary = report.table(self.samples, self.failed)
        print(text)
        engine = self.engine() if self.args.only is None else {}
        agent = self.agent()
        fl = {k: statistics.median([f[k] for f in self.floor if k in f])
              for k in ("cpl3_mmio", "cpl3_mmio_read", "cpl0_mmio", "cpl0_pio", "tsc_khz")
              if any(k in f for f in self.floor)}
        print("C floor (bench/floor.c, bare KVM_RUN, median): " + ", ".join(
            f"{k} {v / 1000:.1f} us" for k, v in fl.items() if k != "tsc_khz"))
        src = ",".join(sorted(self.guest_tsc_src)) or "-"
        print(f"TSC: guest tsc_src={src}; cycles converted with {self.khz:.0f} kHz "
              "(KVM_GET_TSC_KHZ, host and guest share the TSC)")
        for kind in ("mmio_guest", "mmio_host"):
            m = summary[kind]["minivmm_median"]
            q = summary[kind]["qemu_median"]
            f = fl.get("cpl3_mmio_read", float("nan")) / 1000
            print(f"  {kind}: minivmm {report.fmt(float(m))} us, QEMU {report.fmt(float(q))} us"  # type: ignore[arg-type]
                  f" = {float(m) / f:.2f}x / {float(q) / f:.2f}x the C floor ({f:.1f} us)"  # type: ignore[arg-type]
                  + (f"; goal <= {report.FLOOR_GOAL}x: "
                     f"{'met' if float(m) / f <= report.FLOOR_GOAL else 'MISSED'}"  # type: ignore[arg-type]
                     if kind == "mmio_guest" else ""))
        cpu: dict[str, list[float]] = {}
        for run in self.raw:
            if run["ok"] and run["kind"] == "main":
                cpu.setdefault(str(run["vmm"]), []).append(float(run["cpu_s"]))  # type: ignore[arg-type]
        print("VMM CPU time per main run (user+sys, median s): " + ", ".join(
            f"{k} {statistics.median(v):.2f}" for k, v in cpu.items()))
        if self.args.only in (None, "blk") and "qemu_io_uring" in self.samples:
            print(self.paired_blk())
        kicks = self.kicks_per_op()
        if kicks:
            print("QueueNotify writes per operation (guest count; the rest suppressed by "
                  "NO_NOTIFY): " + "; ".join(f"{w} {v}" for w, v in kicks.items()))
        if self.net_skip:
            self.notes.append(f"network rows not run: {self.net_skip}")
        elif self.tap_rx:
            self.notes.append(netbench.tap_check(
                self.tap_rx, netbench.expected_frames(self.sizes.net_pkts, self.sizes.net_rr)))
        for n in self.notes:
            print(f"note: {n}")
        from .hints import hints
        hint_lines = hints(self, summary, fl)
        for h in hint_lines:
            print(f"hint: {h}")
        for f_ in self.failed_runs:
            print(f"run failed{' (repeated)' if not self.args.smoke else ''}: {f_}")
        for f_ in self.failures:
            print(f"FAILED: {f_}")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.out / f"results-{stamp}{'-smoke' if self.args.smoke else ''}.json"
        report.write_json(path, {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": self.args.smoke,
            "reps": reps, "sizes": asdict(self.sizes), "minivmm": self.version,
            "host": report.host_facts(self.khz),
            "qemu_modes": [q.label for q in qemus], "summary": summary,
            "samples": self.samples, "floor": self.floor, "runs": self.raw,
            "minivmm_timelines": self.timelines, "hints": hint_lines, "notes": self.notes,
            "kicks_per_op": self.kicks_per_op(), "failures": self.failures,
            "failed_runs": self.failed_runs, "agent": agent, "engine": engine,
            "duration_s": time.monotonic() - t_start})
        print(f"results: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        png = path.with_suffix(".png")
        if not self.args.smoke and report.plot(png, summary):
            print(f"plot: {png}")
        missing = [r.key for r in report.ROWS
                   if not (self.net_skip and r.key in netbench.ROWS)
                   and (self.args.only != "net" or r.key in netbench.ROWS)
                   and (self.args.only != "blk" or r.key in BLK)
                   and (not self.samples.get("minivmm", {}).get(r.key)
                        or (qemus and not report.best_qemu(self.samples, r)[1]))]
        if missing:
            print(f"FAILED: no figure for {', '.join(missing)}")
        return 1 if self.failures or missing else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--hwvirt" in argv:
        from . import hwvirt

        return hwvirt.in_l1([a for a in argv if a != "--hwvirt"])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="repetitions per VMM (default 5)")
    p.add_argument("--smoke", action="store_true",
                   help="every workload once with tiny sizes; checks only that it completes")
    p.add_argument("--retries", type=int, default=2,
                   help="repeat a failed run up to N times (default 2; never with --smoke)")
    p.add_argument("--no-io-uring", dest="io_uring", action="store_false",
                   help="don't try QEMU with aio=io_uring")
    p.add_argument("--only", choices=["blk", "net"],
                   help="only these rows (blk: the four block workloads, one guest per VMM "
                        "and repetition; net: the three network workloads; both with the C "
                        "floor run for the TSC rate)")
    p.add_argument("--out", default=str(REPO / "bench" / "out"), help="build/output dir")
    p.add_argument("--hwvirt", action="store_true",
                   help="Linux boot time, minivmm vs QEMU, on a hardware-virtualization KVM "
                        "(bench/hwvirt.py; takes --reps and --exec)")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return Bench(args).main()
