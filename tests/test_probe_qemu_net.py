"""The probe's `net` check under QEMU's microvm, with the host's Linux stack as the peer.

The probe drives QEMU's virtio-net-device (virtio-mmio version 2, vhost off) at CPL3:
ARP for the host's address on the tap, an ICMP echo, and an MTU-sized echo whose reply
must arrive through several 512-byte rx buffers (MRG_RXBUF, num_buffers). QEMU runs
inside a private network namespace holding the tap (tests/netns.py), so the host's real
interfaces are never touched and the namespace goes away even when a test fails.

Skipped (with the reason) only where qemu-system-x86_64, `ip` or /dev/net/tun is
missing; everything else that goes wrong fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import NetNamespace, missing

if shutil.which("qemu-system-x86_64") is None:
    pytest.skip("qemu-system-x86_64 is not installed", allow_module_level=True)
if missing():
    pytest.skip(str(missing()), allow_module_level=True)

from guests import ProbeRun as Run
from guests import debug_exit_status, qemu_probe
from test_probe_qemu import (
    TIMEOUT,
    probe_elf,  # noqa: F401  (the session fixture that builds it)
)

pytestmark = pytest.mark.qemu

GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"
MAC = "52:54:00:12:34:56"
RX_BUF = 512  # the probe's rx buffer size (guest/probe/net.c)
HDR = 12  # struct virtio_net_hdr_v1
BASE = f"probe.check=net probe.net_ip={GUEST_IP} probe.net_peer={HOST_IP}"


@pytest.fixture
def elf(request: pytest.FixtureRequest) -> Path:
    """probe.elf, built once per session by test_probe_qemu's probe_elf fixture."""
    path: Path = request.getfixturevalue("probe_elf")
    return path


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    with NetNamespace(host_cidr=f"{HOST_IP}/24") as n:
        yield n


def qemu_net(
    ns: NetNamespace | None, elf: Path, append: str, *, mac: str = MAC, net: bool = True
) -> Run:
    """QEMU's microvm inside ns with a virtio-net-device on ns's tap (net=False: none)."""
    nic: list[str] = []
    if net:
        assert ns is not None
        nic = ["-netdev", f"tap,id=n0,ifname={ns.tap},script=no,downscript=no,vhost=off",
               "-device", f"virtio-net-device,netdev=n0,mac={mac}"]
    return qemu_probe(elf, append, extra=nic, prefix=ns.exec_prefix() if ns else (),
                      timeout=TIMEOUT)


def buffers_for(payload: int) -> int:
    """Rx buffers QEMU fills for an echo reply with this payload (it fills each fully)."""
    return -(-(HDR + 14 + 20 + 8 + payload) // RX_BUF)


def test_net_check_talks_to_the_host_stack(elf: Path, ns: NetNamespace) -> None:
    before = ns.tap_stats()
    r = qemu_net(ns, elf, f"{BASE} probe.net_mac={MAC}")
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check net ok ")
    assert f["mac"] == MAC
    assert f["peer_mac"] == ns.tap_mac()  # the host's side of the link answered
    assert int(f["rtt_cycles"]) > 0
    assert f["big"] == "1472"
    assert int(f["num_buffers"]) == buffers_for(1472) == 3
    features = int(f["features"], 16)
    for bit in (5, 15, 16, 32):  # MAC, MRG_RXBUF, STATUS, VERSION_1
        assert features >> bit & 1, f"feature bit {bit} not acked: {r.raw}"
    assert not features & ((1 << 0) | (1 << 1) | (1 << 7) | (1 << 11)), "offloads acked"
    assert f["event_idx"] == "1" and f["indirect"] == "1"  # QEMU offers both
    # The host's side counted the probe's frames and its answers. (Its neighbour entry
    # for the probe is flushed when QEMU closes the tap and the carrier goes down.)
    after = ns.tap_stats()
    assert after["rx_packets"] - before["rx_packets"] >= 3  # ARP, two echo requests
    assert after["tx_packets"] - before["tx_packets"] >= 3  # ARP reply, two echo replies
    assert r.lines[-1] == "result pass"


def test_net_check_without_big_ping(elf: Path, ns: NetNamespace) -> None:
    r = qemu_net(ns, elf, f"{BASE} probe.net_big=0")
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check net ok ")
    assert f["big"] == "0" and f["num_buffers"] == "0"


def test_net_check_big_reply_spans_many_buffers(elf: Path) -> None:
    with NetNamespace(host_cidr=f"{HOST_IP}/24", mtu=9000) as ns:
        r = qemu_net(ns, elf, f"{BASE} probe.net_big=4000")
    assert r.status == debug_exit_status(0), r.raw
    assert int(r.fields("check net ok ")["num_buffers"]) == buffers_for(4000) == 8


def test_net_check_fails_on_a_fragmented_reply(elf: Path, ns: NetNamespace) -> None:
    # 4000 bytes do not fit the tap's default MTU of 1500: the host fragments its reply.
    r = qemu_net(ns, elf, f"{BASE} probe.net_big=4000")
    assert r.status == debug_exit_status(1), r.raw
    assert r.check("net").startswith(
        "check net FAIL big ping (4000 bytes): echo reply is an IP fragment"
    ), r.raw


def test_net_check_fails_without_a_peer(elf: Path, ns: NetNamespace) -> None:
    r = qemu_net(ns, elf, f"probe.check=net probe.net_ip={GUEST_IP} probe.net_peer=10.0.2.99")
    assert r.status == debug_exit_status(1), r.raw
    assert r.check("net").startswith("check net FAIL arp: no ARP reply from 10.0.2.99"), r.raw


def test_net_check_fails_on_another_mac(elf: Path, ns: NetNamespace) -> None:
    r = qemu_net(ns, elf, f"{BASE} probe.net_mac=52:54:00:00:00:01")
    assert r.status == debug_exit_status(1), r.raw
    assert r.check("net") == (f"check net FAIL config mac {MAC}, expected 52:54:00:00:00:01")


def test_net_check_without_device_or_addresses(elf: Path, ns: NetNamespace) -> None:
    r = qemu_net(None, elf, BASE, net=False)
    assert r.status == debug_exit_status(1), r.raw
    assert (
        r.check("net") == "check net FAIL no virtio-net device (ID 1) among virtio_mmio.device="
    ), r.raw
    r = qemu_net(ns, elf, "probe.check=net")
    assert r.status == debug_exit_status(1), r.raw
    assert r.check("net") == "check net FAIL needs probe.net_ip= and probe.net_peer=", r.raw


@pytest.mark.parametrize(
    "bad",
    [
        "probe.net_ip=10.0.2",
        "probe.net_ip=10.0.2.256",
        "probe.net_ip=10.0.2.15x",
        "probe.net_peer=",
        "probe.net_peer",
        "probe.net_mac=52:54:00:12:34",
        "probe.net_mac=52-54-00-12-34-56",
        "probe.net_mac=52:54:00:12:34:5g",
        "probe.net_big=4001",
        "probe.net_big=x",
    ],
)
def test_net_option_values_are_checked(elf: Path, bad: str) -> None:
    r = qemu_net(None, elf, bad, net=False)
    assert r.status == debug_exit_status(1), r.raw
    key = bad.split("=")[0]
    assert r.check("options") == f"check options FAIL bad value: {key}", r.raw
