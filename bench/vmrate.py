"""How fast VMs come and go: in-process VM creation, fresh processes, import time.

    python -m bench.vmrate [--seconds S] [--reps N] [--only rate,qemu,fresh,imports]
                           [--probe ELF] [--json]   (--json: --only rate as one JSON line)

  rate     in one process, for S seconds: Vm(VmConfig(kernel=probe.elf, cmdline=
           "probe.check=cpl3", console=file:<a pipe>)), start, read the pipe until the
           probe's first "probe:" line, stop, close -> VMs per second (and the median
           build / first line / tear-down times of one VM)
  qemu     for S seconds: start QEMU (bench/vmms.py's microvm flags) with the same probe,
           read its stdout until the first "probe:" line, SIGKILL, reap -> processes/s.
           Firecracker publishes 5 microVMs per host core per second (its SPECIFICATION).
  fresh    N fresh processes each of `python -m minivmm run` and of QEMU with the probe:
           process start -> first "probe:" line (min and median), as bench/run.py's "startup" row
           but without the disk and rng (probe.check=cpl3)
  imports  N runs of `python -X importtime -m minivmm run` with the probe: the import
           time of minivmm and what it brings, with -S (without the interpreter's site,
           whose .pth files belong to the environment) and the site's own cost (the .pth
           files: an editable-install finder, a certifi hook) beside it; min and median

minivmm is byte-compiled first and run with its .pyc files, as pip installs it (the
development machines set PYTHONDONTWRITEBYTECODE=1: without .pyc files every run compiles
minivmm from source, ~40 ms more here).

minivmm runs from the current directory's minivmm/ (run it from another checkout's root
with PYTHONPATH=. to measure that one). Numbers depend on the host: compare runs made
side by side, alternating, on the same machine.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import vmms

PROBE = Path("guest/out/probe.elf")
CMDLINE = "probe.check=cpl3"
FIRECRACKER_PER_CORE = 5.0  # microVMs per host core per second, Firecracker's published rate
FIRST_LINE_TIMEOUT = 30.0
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


def _read_first_line(fd: int, buf: bytearray, deadline: float) -> None:
    """Read fd into buf until it holds a complete line starting "probe:"."""
    while not any(line.startswith(b"probe:") for line in buf.split(b"\n")[:-1]):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("no probe: line from the guest")
        data = os.read(fd, 65536)
        if not data:
            raise EOFError("the console closed before the probe's first line")
        buf += data


def _drain(fd: int) -> None:
    while select.select([fd], [], [], 0)[0]:
        if not os.read(fd, 65536):
            return


def vm_rate(seconds: float, probe: Path = PROBE) -> dict[str, float]:
    """In-process VMs per second, each built, booted to its first line, stopped, closed."""
    import minivmm

    r, w = os.pipe2(os.O_CLOEXEC)
    cfg = minivmm.VmConfig(kernel=probe, cmdline=CMDLINE, console=f"file:/proc/self/fd/{w}")
    build, first, down = [], [], []
    n = 0
    t_start = time.monotonic()
    try:
        while time.monotonic() - t_start < seconds:
            t0 = time.monotonic()
            buf = bytearray()
            with minivmm.Vm(cfg) as vm:
                t1 = time.monotonic()
                vm.start()
                _read_first_line(r, buf, t1 + FIRST_LINE_TIMEOUT)
                t2 = time.monotonic()
                vm.stop()
            t3 = time.monotonic()
            _drain(r)
            build.append(t1 - t0)
            first.append(t2 - t0)
            down.append(t3 - t2)
            n += 1
        elapsed = time.monotonic() - t_start
    finally:
        os.close(r)
        os.close(w)
    return {"vms": n, "per_s": n / elapsed, "build_ms": 1000 * statistics.median(build),
            "first_line_ms": 1000 * statistics.median(first),
            "teardown_ms": 1000 * statistics.median(down)}


def qemu_rate(seconds: float, probe: Path = PROBE) -> dict[str, float]:
    """QEMU processes per second, each started, read to its first probe line, killed."""
    assert vmms.QEMU is not None, "qemu-system-x86_64 is not installed"
    argv = [vmms.QEMU, *vmms.QEMU_BASE, "-kernel", str(probe.resolve()), "-append", CMDLINE]
    first = []
    n = 0
    t_start = time.monotonic()
    while time.monotonic() - t_start < seconds:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        assert p.stdout is not None
        try:
            _read_first_line(p.stdout.fileno(), bytearray(), t0 + FIRST_LINE_TIMEOUT)
            first.append(time.monotonic() - t0)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
            p.stdout.close()
        n += 1
    elapsed = time.monotonic() - t_start
    return {"processes": n, "per_s": n / elapsed,
            "first_line_ms": 1000 * statistics.median(first)}


def fresh(reps: int) -> dict[str, float]:
    """Median process start -> first probe line, minivmm (python -m) and QEMU, alternating."""
    out: dict[str, list[float]] = {"minivmm": [], "qemu": []}
    names = ["minivmm", "qemu"] if vmms.QEMU else ["minivmm"]
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            argv = vmms.Vmm(name).argv(PROBE.resolve(), CMDLINE, None)
            r = vmms.run(argv, timeout=120)
            if r.first_line_s is None:
                raise SystemExit(f"{name}: no probe line: {r.tail(3)}")
            out[name].append(1000 * r.first_line_s)
    return _min_median(out, "_first_line_ms")


def _import_totals(stderr: str) -> tuple[float, float]:
    """(ms of top-level imports from the first minivmm one on, ms of the site's)."""
    ours = site = 0
    seen_minivmm = False
    for line in stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if not m or m.group(3):  # only top-level entries: their cumulative covers the rest
            continue
        name, cumulative = m.group(4), int(m.group(2))
        if name == "site":
            site = cumulative
        seen_minivmm = seen_minivmm or name.split(".")[0] == "minivmm"
        if seen_minivmm:
            ours += cumulative
    return ours / 1000, site / 1000


def imports(reps: int) -> dict[str, float]:
    argv = ["-m", "minivmm", "run", "--kernel", str(PROBE), "--cmdline", CMDLINE,
            "--console", "none"]
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its .pyc files
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *_site_dirs()])
    ours_s, ours_site, site = [], [], []
    for _ in range(reps):
        p = subprocess.run([sys.executable, "-S", "-X", "importtime", *argv], env=env,
                           capture_output=True, text=True)
        ours_s.append(_import_totals(p.stderr)[0])
        p = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env,
                           capture_output=True, text=True)
        o, s = _import_totals(p.stderr)
        ours_site.append(o)
        site.append(s)
    return _min_median({"minivmm_imports_no_site": ours_s,
                        "minivmm_imports_after_site": ours_site, "site": site}, "_ms")


def _min_median(samples: dict[str, list[float]], unit: str) -> dict[str, float]:
    """min (a shared host's noise only adds) and median of each list of samples."""
    out: dict[str, float] = {}
    for k, v in samples.items():
        if v:
            out[f"{k}{unit}_min"] = min(v)
            out[f"{k}{unit}_median"] = statistics.median(v)
    return out


def _site_dirs() -> list[str]:
    import site

    return site.getsitepackages()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vmrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="rate,qemu,fresh,imports")
    ap.add_argument("--probe", type=Path, default=PROBE, help="the probe kernel (rate, qemu)")
    ap.add_argument("--json", action="store_true",
                    help="with --only rate: print the figures as one JSON line (bench/run.py)")
    args = ap.parse_args(argv)
    if not args.probe.exists():
        raise SystemExit(f"{args.probe} is missing: run `make guest` first")
    parts = set(args.only.split(","))
    if args.json:
        import json

        print(json.dumps(vm_rate(args.seconds, args.probe)))
        return 0
    # Measure minivmm as installed (pip byte-compiles it), not compiled afresh each run.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "minivmm"],
                   stdout=subprocess.DEVNULL, check=True)
    cores = os.cpu_count() or 1
    if "imports" in parts:
        print("imports:", _fmt(imports(args.reps)), flush=True)
    if "fresh" in parts:
        print("fresh process:", _fmt(fresh(args.reps)), flush=True)
    if "rate" in parts:
        r = vm_rate(args.seconds, args.probe)
        print("in-process:", _fmt(r), f"per_core_s={r['per_s'] / cores:.1f}", flush=True)
    if "qemu" in parts and vmms.QEMU:
        q = qemu_rate(args.seconds, args.probe)
        print("qemu processes:", _fmt(q), f"per_core_s={q['per_s'] / cores:.1f}", flush=True)
    print(f"firecracker (published): {FIRECRACKER_PER_CORE:.0f} per core per second "
          f"= {FIRECRACKER_PER_CORE * cores:.0f}/s on {cores} cores")
    return 0


def _fmt(d: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in d.items())


if __name__ == "__main__":
    sys.exit(main())
