"""The network workloads: the probe's net_tx64, net_tx1500 and net_rr (guest/probe/
netbench.c) under each VMM, each run inside a private network namespace of its own
(tests/netns.py: one tap, the host's address 10.0.2.1/24 on it, deleted afterwards).

Both VMMs get the same tap set-up: minivmm `--net tap=TAP,mac=MAC`, QEMU
`-netdev tap,...,vhost=off -device virtio-net-device,netdev=n0,mac=MAC`. The namespace
holds a permanent neighbour entry for the probe (10.0.2.15 -> MAC), so the host's echo
replies need no ARP. The sink for the tx workloads is the tap itself: the host's stack
counts every frame (rx_packets, read after the run as a cross-check of the guest's
count) and drops it (EtherType 0x88b5, a MAC no host has).
"""

from __future__ import annotations

import importlib
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

from . import vmms
from .vmms import REPO, RunOutput, Vmm

if TYPE_CHECKING:
    from .run import Bench

WORKLOADS = ["net_tx64", "net_tx1500", "net_rr"]
ROWS = ["net_tx64", "net_tx1500", "net_tx1500_mb", "net_rr"]
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"
MAC = "52:54:00:12:34:56"
FRAME = {"net_tx64": 64, "net_tx1500": 1500}


def _netns() -> ModuleType:
    """tests/netns.py (the tests' namespace helper; tests/ is not a package)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        return importlib.import_module("netns")
    finally:
        sys.path.pop(0)


def unavailable() -> str | None:
    """Why the network rows cannot run here (no `ip`, /dev/net/tun, or root), or None."""
    import os
    why: str | None = _netns().missing()
    if why is None and os.geteuid() != 0:
        why = "network namespaces need root"
    return why


@contextmanager
def namespace() -> Iterator[object]:
    with _netns().NetNamespace(host_cidr=f"{HOST_IP}/24") as ns:
        ns.ip("neigh", "replace", GUEST_IP, "lladdr", MAC, "dev", ns.tap, "nud", "permanent")
        yield ns


def cmdline(workloads: list[str], pkts: int, rr: int, peer_mac: str) -> str:
    return (f"probe.check=virtio,bench probe.bench={','.join(workloads)} probe.bench_n={rr} "
            f"probe.bench_pkts={pkts} probe.bench_ip={GUEST_IP} probe.bench_peer={HOST_IP} "
            f"probe.bench_peer_mac={peer_mac}")


def run_in_namespace(b: Bench, vmm: Vmm, kind: str, workloads: list[str], pkts: int,
                     rr: int, rows: list[str], *, stats: bool = False,
                     retry: bool = True) -> tuple[RunOutput | None, int]:
    """One VMM run with the probe's network workloads in a fresh namespace: the run
    (None if it failed) and the tap's rx_packets afterwards."""
    with namespace() as ns:
        tap, prefix = ns.tap, ns.exec_prefix()  # type: ignore[attr-defined]
        cmd = cmdline(workloads, pkts, rr, ns.tap_mac())  # type: ignore[attr-defined]
        argv = [*prefix, *vmm.argv(b.probe, cmd, None, net=(tap, MAC), stats=stats)]
        if retry:
            r = b.launch(vmm, kind, cmd, rows, argv=argv)
        else:
            r = vmms.run(argv, timeout=300)
            if not (vmm.passed(r.status) and r.passed_probe):
                r = None
        rx = int(ns.tap_stats()["rx_packets"])  # type: ignore[attr-defined]
    return r, rx


def figures(r: RunOutput, khz_host: float) -> dict[str, float]:
    """Frames (or round trips) per second, and MB/s (10^6 bytes) of net_tx1500."""
    out: dict[str, float] = {}
    for name, kv in r.bench.items():
        if name not in WORKLOADS:
            continue
        n, cycles = int(kv["n"]), int(kv["cycles"])
        secs = cycles / ((int(kv.get("tsc_khz", "0")) or khz_host) * 1000.0)
        out[name] = n / secs
        if name == "net_tx1500":
            out["net_tx1500_mb"] = n * FRAME[name] / secs / 1e6
    return out


def expected_frames(pkts: int, rr: int) -> int:
    """Frames the guest hands the tap in one run of all three workloads."""
    return 2 * pkts + rr


def hint(b: Bench, key: str, summary: dict[str, dict[str, object]]) -> str:
    """Per-packet VMM CPU time (user+sys of all its threads, mostly the device thread:
    two runs of n and 2n packets, differenced, so boot and set-up cancel out) and
    kicks per packet, for both VMMs."""
    unit = "round trip" if key == "net_rr" else "packet"
    n = 2000 if key == "net_rr" else min(b.sizes.net_pkts, 50000)
    per: list[str] = []
    for vmm in [Vmm("minivmm"), *([Vmm("qemu")] if vmms.QEMU else [])]:
        cpu: list[float] = []
        kicks = ""
        for k in (1, 2):
            r, _ = run_in_namespace(b, vmm, "hint", [key], k * n, k * n, [], retry=False)
            if r is None:
                break
            cpu.append(r.cpu_s)
            kv = r.bench.get(key, {})
            if "kicks" in kv:
                kicks = f", {int(kv['kicks']) / int(kv['n']):.3f} kicks/{unit}"
            elif "tx_kicks" in kv:
                kicks = (f", {int(kv['tx_kicks']) / int(kv['n']):.2f} tx + "
                         f"{int(kv['rx_kicks']) / int(kv['n']):.3f} rx kicks/{unit}")
        per.append(f"{vmm.name} " + (f"{(cpu[1] - cpu[0]) / n * 1e6:.1f} us CPU/{unit}{kicks}"
                                     if len(cpu) == 2 else "(run failed)"))
    m = float(summary[key]["minivmm_median"])  # type: ignore[arg-type]
    q = float(summary[key]["qemu_median"])  # type: ignore[arg-type]
    return (f"{key}: {1e6 / m:.2f} us per {unit} in minivmm vs {1e6 / q:.2f} us in QEMU "
            f"(guest rdtsc); VMM CPU time per {unit} (rusage, n vs 2n runs differenced): "
            + "; ".join(per))


def tap_check(counts: dict[str, list[int]], expected: int) -> str:
    """The tap's rx_packets per run next to what the guest sent."""
    parts = [f"{v} median {statistics.median(c):.0f}" for v, c in counts.items() if c]
    bad = [v for v, c in counts.items() if any(x < expected for x in c)]
    return (f"tap rx_packets per net run (host count): {', '.join(parts)}; the guest sent "
            f"{expected} frames" + (f"; FEWER on {', '.join(bad)}" if bad else " (all arrived)"))
