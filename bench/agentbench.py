"""What the guest agent path costs: `minivmm exec -- true` and `Guest.run(["true"])`.

    python -m bench.agentbench [--reps N] [--runs M]

  exec  N fresh `python -m minivmm exec --kernel K --initrd guest/out/initramfs.cpio
        -- true` processes: process start -> exit, min and median (the boot, the agent
        appended as /init, one command, the VM's end)
  run   one minivmm.Guest booted with the same kernel, then M times `Guest.run(["true"])`:
        the round trip, min and median, and its parts from the host's side: the connect
        (CONNECT <port> through the vsock device until the agent's OK), the request until
        the agent says the command started (its fork and exec in the guest), and from
        there to its exit status

K is guest/out/vmlinux-emulated on a host whose KVM emulates guest kernel code (kvm_pvm:
there only that kernel boots, and guest kernel code runs ~1 us per instruction), else
guest/out/bzImage. There is no QEMU equivalent in this run (QEMU has no minivmm agent,
and no vsock agent of its own is set up here), so no ratio against QEMU is printed; the
published figures of other tools (virtme-ng, vmtest) are from other hosts and are shown
as such, not as ratios. `python -m bench --smoke` runs this with N=1 and M=2; `python -m
bench` with its --reps and 20 runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import vmms
from .vmms import REPO

PUBLISHED = {"virtme-ng `vng --exec 'uname -r'`": 0.9, "vmtest `vmtest 'echo test'`": 1.3}
NO_QEMU = ("QEMU: no equivalent measured (QEMU has no minivmm agent, and no vsock agent "
           "of its own is set up here): no ratio")
TIMEOUT = 600.0  # seconds for one boot and its commands

# Runs in a fresh interpreter in vmms.MINIVMM_HOME (the bench's copy of minivmm).
_CHILD = r"""
import json, sys, time
import minivmm
from minivmm.agent import Exec, Exited, Started, connect
kernel, initrd, agent, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.monotonic()
out = {"round_trip_s": [], "connect_s": [], "started_s": [], "exited_s": []}
with minivmm.Guest(minivmm.VmConfig(kernel=kernel, initrd=initrd, mem="256M"),
                   agent=agent) as g:
    out["boot_s"] = time.monotonic() - t0
    for _ in range(runs):
        t = time.monotonic()
        assert g.run(["true"], timeout=120).returncode == 0
        out["round_trip_s"].append(time.monotonic() - t)
    for _ in range(runs):
        t = time.monotonic()
        ex = Exec(connect(g.agent_socket))
        try:
            t1 = time.monotonic()
            ex.start(["true"])
            ev = ex.next_event(120)
            assert isinstance(ev, Started), ev
            t2 = time.monotonic()
            while not isinstance(ev, Exited):
                ev = ex.next_event(120)
                assert ev is not None
            t3 = time.monotonic()
        finally:
            ex.close()
        out["connect_s"].append(t1 - t)
        out["started_s"].append(t2 - t1)
        out["exited_s"].append(t3 - t2)
print(json.dumps(out))
"""


def kernel() -> Path:
    emulated = subprocess.run([str(REPO / "guest" / "kvm-emulates-kernel.sh")],
                              check=False).returncode == 0
    return REPO / "guest" / "out" / ("vmlinux-emulated" if emulated else "bzImage")


def _inputs() -> tuple[Path, Path, Path]:
    k, initrd, agent = (kernel(), REPO / "guest" / "out" / "initramfs.cpio",
                        REPO / "guest" / "out" / "minivmm-agent")
    for p in (k, initrd, agent):
        if not p.exists():
            raise SystemExit(f"{p} is missing: run `make guest` first")
    return k, initrd, agent


def exec_true(reps: int) -> dict[str, object]:
    """N times `minivmm exec -- true`, process start to exit."""
    k, initrd, agent = _inputs()
    argv = [sys.executable, "-m", "minivmm", "exec", "--kernel", str(k), "--initrd",
            str(initrd), "--agent", str(agent), "--", "true"]
    times = []
    for _ in range(reps):
        t0 = time.monotonic()
        p = subprocess.run(argv, cwd=vmms.MINIVMM_HOME, capture_output=True, text=True,
                           timeout=TIMEOUT)
        if p.returncode != 0:
            raise RuntimeError(f"minivmm exec -- true: exit status {p.returncode}: "
                               f"{p.stderr.strip()[-500:]}")
        times.append(time.monotonic() - t0)
    return {"kernel": k.name, "exec_true_s": times}


def guest_run(runs: int) -> dict[str, object]:
    """One Guest, then M round trips of run(["true"]) and M timed by their parts."""
    k, initrd, agent = _inputs()
    p = subprocess.run([sys.executable, "-c", _CHILD, str(k), str(initrd), str(agent),
                        str(runs)], cwd=vmms.MINIVMM_HOME, capture_output=True, text=True,
                       timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"Guest.run: exit status {p.returncode}: "
                           f"{p.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    result["kernel"] = k.name
    return result


def _ms(values: object) -> str:
    assert isinstance(values, list)
    return (f"min {1000 * min(values):.0f} ms, median {1000 * statistics.median(values):.0f}"
            f" ms (n={len(values)})")


def lines(exec_result: dict[str, object], run_result: dict[str, object]) -> list[str]:
    """The printed report."""
    out = [f"agent: `minivmm exec -- true` with {exec_result['kernel']}, process start to "
           f"exit: {_ms(exec_result['exec_true_s'])}",
           f"agent: Guest.run(['true']) once booted (boot {run_result['boot_s']:.1f} s): "
           f"round trip {_ms(run_result['round_trip_s'])}",
           f"agent: its parts: connect {_ms(run_result['connect_s'])}; request -> started "
           f"{_ms(run_result['started_s'])}; started -> exit status "
           f"{_ms(run_result['exited_s'])}",
           f"agent: {NO_QEMU}"]
    out.append("agent: published on other hosts (not ratios): " + ", ".join(
        f"{k} {v} s" for k, v in PUBLISHED.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.agentbench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="`minivmm exec -- true` runs")
    ap.add_argument("--runs", type=int, default=20, help="Guest.run round trips")
    args = ap.parse_args(argv)
    for line in lines(exec_true(args.reps), guest_run(args.runs)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
