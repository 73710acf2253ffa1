"""The minimal Linux guest gets an address on its virtio-net and pings the host.

guest/out/vmlinux with guest/out/initramfs.cpio (busybox: `ip`, `ping`) boots with a
virtio-net on a tap in a private network namespace (tests/netns.py; the host side is
10.0.2.1/24) and runs, through the minivmm_run= contract of guest/initramfs/init:

    ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0;
    for i in 1 2 3; do timeout 10 ping -c 1 10.0.2.1 || exit 1; done

Three one-shot pings, not `ping -c 3 -W 2`: the minimal kernel has no
CONFIG_POSIX_TIMERS, so busybox ping's alarm() (its 1 s send interval and -W
deadline) fails with ENOSYS and it hangs after the first reply; `-c 1` ends on the
reply, and `timeout` (nanosleep, which needs no POSIX timers) bounds a lost one.
The peer is the host's own network stack: it answers the guest's ARP request and its
three echo requests. Asserted: busybox's output (three replies from 10.0.2.1, each run
1 transmitted / 1 received), `minivmm-guest: exit 0`, and the frames the host counted
on the tap.

* test_linux_ping_qemu_tcg: QEMU's microvm under TCG (software emulation runs Linux at
  a useful speed on any host): the oracle for the test itself.
* test_linux_ping_minivmm: the same under minivmm, with --check-driver: Linux's
  virtio-net driver breaks no virtio 1.2 rule (the end-of-run summary says so). On hosts
  whose KVM emulates guest kernel code it boots guest/out/vmlinux-emulated (about a
  minute, pings included; README "Hosts without hardware virtualization"), elsewhere
  the ordinary vmlinux and bzImage.

Skipped only where qemu-system-x86_64 (for the QEMU test), `ip` or /dev/net/tun is
missing; a missing guest build fails.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator

import pytest
from guests import guest_artifact
from linuxguest import (
    HARD_TIMEOUT,
    PLAIN_CMDLINE,
    kvm_emulates_kernel,
    run_until,
    run_until_stopped,
)
from netns import NetNamespace, missing

if missing():
    pytest.skip(str(missing()), allow_module_level=True)

pytestmark = pytest.mark.slow

QEMU = "qemu-system-x86_64"
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"
MAC = "52:54:00:12:34:56"
RUN = (f"ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0; "
       f"for i in 1 2 3; do timeout 10 ping -c 1 {HOST_IP} || exit 1; done")
CMDLINE = f'{PLAIN_CMDLINE} minivmm_run="{RUN}"'
NO_VIOLATIONS = ("minivmm: check-driver: no violations of the virtio 1.2 driver rules "
                 "(1 device watched)")


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    with NetNamespace(host_cidr=f"{HOST_IP}/24") as n:
        yield n


def assert_pinged(console: str, ns: NetNamespace) -> None:
    lines = console.splitlines()
    assert f"minivmm-guest: run {RUN}" in lines, console
    replies = [ln for ln in lines if ln.startswith(f"64 bytes from {HOST_IP}: seq=0 ttl=64")]
    assert len(replies) == 3, console
    summaries = [ln for ln in lines if ln.endswith("packet loss")]
    assert summaries == ["1 packets transmitted, 1 packets received, 0% packet loss"] * 3, console
    assert "minivmm-guest: exit 0" in lines, console
    stats = ns.tap_stats()  # the host saw the ARP request and 3 echo requests at least
    assert stats["rx_packets"] >= 4 and stats["tx_packets"] >= 4, stats


def test_linux_ping_qemu_tcg(ns: NetNamespace) -> None:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (Debian package qemu-system-x86)")
    kernel = guest_artifact("vmlinux")
    initrd = guest_artifact("initramfs.cpio")
    cmd = [
        *ns.exec_prefix(), QEMU,
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
        "-global", "virtio-mmio.force-legacy=false",
        "-accel", "tcg", "-cpu", "max", "-m", "256M",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE,
        "-netdev", f"tap,id=n0,ifname={ns.tap},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-device,netdev=n0,mac={MAC}",
    ]  # fmt: skip
    console, seconds = run_until(cmd, "minivmm-guest: reboot", HARD_TIMEOUT)
    print(f"vmlinux under QEMU/tcg: pinged the host, reboot marker after {seconds:.1f} s")
    assert_pinged(console, ns)


def assert_no_violations(console: str, tail: str) -> None:
    """--check-driver logs a violation as it happens and sums up when the VM ends."""
    assert "check-driver:" not in console, console
    assert NO_VIOLATIONS in tail, tail


@pytest.mark.kvm
@pytest.mark.parametrize("kernel_name", ["vmlinux-emulated"] if kvm_emulates_kernel()
                         else ["vmlinux", "bzImage"])
def test_linux_ping_minivmm(ns: NetNamespace, kernel_name: str) -> None:
    kernel = guest_artifact(kernel_name)
    cmd = [*ns.exec_prefix(), sys.executable, "-m", "minivmm", "run",
           "--kernel", str(kernel), "--initrd", str(guest_artifact("initramfs.cpio")),
           "--mem", "256M", "--net", f"tap={ns.tap},mac={MAC}", "--cmdline", CMDLINE,
           "--check-driver"]
    console, tail, seconds = run_until_stopped(cmd, "minivmm-guest: reboot", HARD_TIMEOUT)
    print(f"{kernel_name} under minivmm: pinged the host, reboot marker after {seconds:.1f} s")
    assert_pinged(console, ns)
    assert_no_violations(console, tail)
