"""Running the probe under minivmm and under QEMU, and reading what it printed.

A run is one VMM process started from here: wall times are taken in this (the parent)
process with time.monotonic() from just before the spawn, so they include interpreter or
binary start-up; each stdout chunk is time-stamped as it arrives, which gives the host
side of every guest figure (the probe flushes its output before each workload, so the
gap between two lines brackets one workload plus the serial output of one line). Peak
RSS comes from os.wait4()'s rusage; with ``sample_memory`` the parent also reads
/proc/PID/status (VmHWM) and /proc/PID/smaps (Rss of the guest-RAM mapping) while the
guest runs.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GUEST_MEM = 128 * MIB
BENCH_LINE = re.compile(r"^probe: bench (\S+) (.*)$")
KV = re.compile(r"(\w+)=(\S+)")
QEMU = shutil.which("qemu-system-x86_64")
#: where minivmm runs from: a copy of the package taken at the start of a benchmark
#: (snapshot()), so edits to the working tree during a run don't mix versions
MINIVMM_HOME = REPO
#: the interpreter minivmm runs under: a venv made by snapshot() that sees minivmm and its
#: dependencies and nothing else, as `pip install minivmm` in a venv gives a user
MINIVMM_PYTHON = sys.executable

QEMU_BASE = [
    "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
    "-global", "virtio-mmio.force-legacy=false", "-accel", "kvm",
    "-cpu", "host,-arch-capabilities", "-m", "128M", "-nodefaults", "-no-user-config",
    "-nographic", "-serial", "stdio", "-no-reboot",
    "-device", "isa-debug-exit,iobase=0x501,iosize=1",
]


@dataclass(frozen=True)
class Vmm:
    """How to start one VMM with the probe, an optional disk and virtio-rng."""

    name: str  # "minivmm" or "qemu"
    qemu_aio: str = "threads"
    qemu_cache: str = "writeback"

    def argv(self, probe: Path, cmdline: str, disk: Path | None, *,
             stats: bool = False, timeline: bool = False,
             net: tuple[str, str] | None = None) -> list[str]:
        """net: (tap, mac) of a virtio-net on an existing tap (run it in the tap's
        namespace: see bench/netbench.py)."""
        if self.name == "minivmm":
            a = [MINIVMM_PYTHON, "-m", "minivmm", "run", "--kernel", str(probe),
                 "--mem", "128M", "--console", "stdio", "--rng"]
            if disk is not None:
                a += ["--disk", str(disk)]
            if net is not None:
                a += ["--net", f"tap={net[0]},mac={net[1]}"]
            if stats:
                a.append("--stats")
            if timeline:
                a.append("--timeline")
            return [*a, "--cmdline", cmdline]
        assert QEMU is not None
        a = [QEMU, *QEMU_BASE, "-kernel", str(probe), "-append", cmdline]
        if disk is not None:
            a += ["-device", "virtio-blk-device,drive=d0", "-drive",
                  f"id=d0,file={disk},format=raw,if=none,cache={self.qemu_cache},"
                  f"aio={self.qemu_aio}"]
        if net is not None:
            a += ["-netdev", f"tap,id=n0,ifname={net[0]},script=no,downscript=no,vhost=off",
                  "-device", f"virtio-net-device,netdev=n0,mac={net[1]}"]
        return [*a, "-device", "virtio-rng-device"]

    @property
    def label(self) -> str:
        if self.name == "minivmm":
            return "minivmm"
        return f"qemu(aio={self.qemu_aio},cache={self.qemu_cache})"

    def passed(self, status: int) -> bool:
        """The probe's debug exit with 0 failed checks: minivmm exits 0, QEMU (0<<1)|1."""
        return status == (0 if self.name == "minivmm" else 1)


@dataclass
class RunOutput:
    argv: list[str]
    status: int
    first_line_s: float | None  # process start -> first "probe:" line
    exit_s: float  # process start -> process exit (reaped)
    lines: list[tuple[float, str]]  # (seconds since start, line)
    stderr: str
    maxrss_kib: int  # getrusage of the child (peak RSS)
    hwm_kib: int = 0  # last VmHWM sample (sample_memory)
    guest_rss_kib: int = 0  # largest Rss of the guest-RAM mapping seen (sample_memory)
    cpu_s: float = 0.0  # user + system CPU time of the VMM process (rusage)
    bench: dict[str, dict[str, str]] = field(default_factory=dict)
    bench_host_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed_probe(self) -> bool:
        return any(line == "probe: result pass" for _, line in self.lines)

    def tail(self, n: int = 6) -> str:
        out = [line for _, line in self.lines[-n:]]
        err = self.stderr.strip().splitlines()[-n:]
        return " | ".join(out + err)


def _guest_ram_rss_kib(pid: int, mem: int) -> int:
    """Rss of the largest mapping sized like guest RAM (mem .. mem + 8 MiB), in KiB."""
    best = 0
    size = rss = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line.startswith("Size:"):
                    size = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
                    if mem <= size <= mem + 8 * MIB:
                        best = max(best, rss)
    except (OSError, ValueError):
        pass
    return best


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run(argv: list[str], *, timeout: float = 120.0, sample_memory: bool = False,
        sample_every: float = 0.05) -> RunOutput:
    """Start argv, time-stamp its output lines, reap it with wait4."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=MINIVMM_HOME)
    assert p.stdout is not None and p.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, "out")
    sel.register(p.stderr, selectors.EVENT_READ, "err")
    lines: list[tuple[float, str]] = []
    partial = b""
    err = bytearray()
    first: float | None = None
    hwm = guest = 0
    next_sample = t0
    open_fds = 2
    killed = False
    while open_fds:
        now = time.monotonic()
        if now - t0 > timeout and not killed:
            os.kill(p.pid, signal.SIGKILL)
            killed = True
        if sample_memory and now >= next_sample and first is not None:
            hwm = max(hwm, _vm_hwm_kib(p.pid))
            guest = max(guest, _guest_ram_rss_kib(p.pid, GUEST_MEM))
            next_sample = now + sample_every
        for key, _ in sel.select(timeout=sample_every if sample_memory else 1.0):
            data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            t = time.monotonic() - t0
            if not data:
                sel.unregister(key.fileobj)
                open_fds -= 1
                continue
            if key.data == "err":
                err += data
                continue
            partial += data
            *done, partial = partial.split(b"\n")
            for raw in done:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if first is None and line.startswith("probe:"):
                    first = t
                lines.append((t, line))
    if partial:
        lines.append((time.monotonic() - t0, partial.decode("utf-8", "replace")))
    _, wstatus, ru = os.wait4(p.pid, 0)
    t_exit = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(wstatus)
    p.stdout.close()
    p.stderr.close()
    r = RunOutput(argv, p.returncode, first, t_exit, lines, err.decode("utf-8", "replace"),
                  ru.ru_maxrss, hwm, guest, ru.ru_utime + ru.ru_stime)
    _parse_bench(r)
    return r


def _parse_bench(r: RunOutput) -> None:
    """The probe's "bench" lines, and the host-side time each one took."""
    prev: float | None = None
    for t, line in r.lines:
        m = BENCH_LINE.match(line)
        if m:
            r.bench[m.group(1)] = dict(KV.findall(m.group(2)))
            if prev is not None:
                r.bench_host_s[m.group(1)] = t - prev
        if line.startswith("probe:"):
            prev = t


def snapshot(out: Path, tries: int = 12) -> dict[str, str]:
    """Copy minivmm/ to out/snapshot/ and run minivmm from there (MINIVMM_HOME). The
    copy must import; a tree caught mid-edit (it doesn't) is copied again, up to
    `tries` times 5 s apart. Returns the git commit and a hash of the copied sources."""
    global MINIVMM_HOME
    import hashlib
    dest = out / "snapshot"
    err = ""
    for _ in range(tries):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(REPO / "minivmm", dest / "minivmm",
                        ignore=shutil.ignore_patterns("__pycache__"))
        p = subprocess.run([sys.executable, "-c", "import minivmm.cli, minivmm.vm"],
                           cwd=dest, capture_output=True, text=True)
        if p.returncode == 0:
            break
        err = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "import failed"
        time.sleep(5)
    else:
        raise SystemExit(f"bench: minivmm/ does not import ({err}); fix it and run again")
    # Byte-compiled, as pip installs it: without this (and PYTHONDONTWRITEBYTECODE=1 set
    # on the development machines) every run compiled minivmm from source first.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "minivmm")],
                   stdout=subprocess.DEVNULL, check=True)
    MINIVMM_HOME = dest
    _make_venv(out / "venv", dest)
    h = hashlib.sha256()
    for f in sorted((dest / "minivmm").rglob("*.py")):
        h.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "minivmm"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"git_head": head, "minivmm_tree_modified": str(bool(dirty)),
            "minivmm_sources_sha256": h.hexdigest()[:16], "path": str(dest),
            "python": MINIVMM_PYTHON}


def _make_venv(venv: Path, home: Path) -> None:
    """A venv (no pip) whose one .pth file puts the copy of minivmm and the directories
    of its dependencies on sys.path: the interpreter a user's `pip install minivmm` in a
    venv starts. Not this machine's own site-packages, whose .pth hooks (an editable
    install's finder, a CA-bundle hook here) run at every interpreter start and are no
    part of minivmm: `python -c pass` takes ~38 ms here with them, ~10 ms in the venv."""
    global MINIVMM_PYTHON
    import importlib.util
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)],
                   check=True)
    paths = [str(home)]
    for dep in ("elftools", "cffi", "_cffi_backend", "pycparser"):
        spec = importlib.util.find_spec(dep)
        if spec is not None and spec.origin is not None:
            where = Path(spec.origin).parent
            where = where.parent if spec.submodule_search_locations else where
            if str(where) not in paths:
                paths.append(str(where))
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "minivmm-bench.pth").write_text("\n".join(paths) + "\n")
    MINIVMM_PYTHON = str(python)


def build(out: Path) -> tuple[Path, Path]:
    """The probe (guest/probe, built into out/) and the C floor (out/floor)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["make", "-s", "-C", str(REPO / "guest" / "probe"), f"OUT={out}"],
                   check=True)
    floor = out / "floor"
    src = REPO / "bench" / "floor.c"
    if not floor.exists() or floor.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(floor), str(src)], check=True)
    return out / "probe.elf", floor


def make_image(path: Path, size: int) -> None:
    """A raw image of non-zero data (holes would read without touching the page cache),
    written and then read once so it sits in the host page cache."""
    if not (path.exists() and path.stat().st_size == size):
        chunk = (bytes(range(256)) * (MIB // 256))
        with open(path, "wb") as f:
            for i in range(size // MIB):
                f.write(i.to_bytes(8, "little") + chunk[8:])
            f.flush()
            os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.readinto(buf := bytearray(4 * MIB)):
            pass
        del buf


def run_floor(floor: Path, n: int) -> dict[str, float]:
    """The C floor: ns per exit of each case, and tsc_khz from KVM_GET_TSC_KHZ."""
    p = subprocess.run([str(floor), str(n)], capture_output=True, text=True, timeout=300)
    res: dict[str, float] = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "floor":
            kv = dict(KV.findall(line))
            if "tsc_khz" in kv and parts[1].startswith("tsc_khz"):
                res["tsc_khz"] = float(kv["tsc_khz"])
            elif "ns_per_exit" in kv:
                res[parts[1]] = float(kv["ns_per_exit"])
    if p.returncode != 0:
        res["error"] = float(p.returncode)
        sys.stderr.write(p.stderr)
    return res
