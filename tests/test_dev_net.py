"""virtio-net in a real VM: the probe guest ARPs and pings the host's own network stack
through a tap in a private network namespace (a real peer, written by nobody here)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from guests import ROOT, ProbeRun, guest_artifact
from netns import NetNamespace, missing

pytestmark = [pytest.mark.kvm]
if (why := missing()) is not None:
    pytest.skip(why, allow_module_level=True)

MAC = "52:54:00:12:34:56"


def probe_in(ns: NetNamespace, cmdline: str, *net: str) -> ProbeRun:
    cmd = [*ns.exec_prefix(), sys.executable, "-m", "minivmm", "run", "--kernel",
           str(guest_artifact("probe.elf")), *net, "--cmdline", cmdline]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def test_arp_and_ping_through_the_tap_with_mergeable_rx_buffers() -> None:
    with NetNamespace() as ns:
        before = ns.tap_stats()
        run = probe_in(ns, f"probe.strict=1 probe.check=net probe.net_ip=10.0.2.15 "
                           f"probe.net_peer={ns.host_ip} probe.net_mac={MAC}",
                       "--net", f"tap={ns.tap},mac={MAC}")
        after = ns.tap_stats()
        peer_mac = ns.tap_mac()
    run.assert_pass()
    result = dict(kv.split("=", 1) for kv in run.result("net").split()[1:])
    assert result["mac"] == MAC
    assert result["peer_mac"] == peer_mac  # the host's kernel answered the ARP request
    assert int(result["num_buffers"]) > 1  # a 1500-byte reply spread over 512-byte buffers
    assert after["rx_packets"] - before["rx_packets"] >= 3  # ARP + two echo requests
    assert after["tx_packets"] - before["tx_packets"] >= 3


def test_generated_mac_is_stable_and_locally_administered() -> None:
    with NetNamespace() as ns:
        runs = [probe_in(ns, f"probe.check=net probe.net_ip=10.0.2.15 "
                             f"probe.net_peer={ns.host_ip} probe.net_big=0",
                         "--net", f"tap={ns.tap}") for _ in range(2)]
    for run in runs:
        run.assert_pass()
    macs = {dict(kv.split("=", 1) for kv in run.result("net").split()[1:])["mac"]
            for run in runs}
    assert len(macs) == 1
    first_octet = int(macs.pop().split(":")[0], 16)
    assert first_octet & 2 and not first_octet & 1

