"""The minimal Linux pings the host through virtio-net, under minivmm and under QEMU
microvm with KVM (the oracle), on a hardware-virtualization KVM.

Same guest, command and assertions as tests/test_linux_net.py (busybox initramfs,
minivmm_run= brings eth0 up and pings 10.0.2.1 three times, the host stack answers
through a tap in a private network namespace, tests/netns.py); minivmm runs with
--check-driver and the virtio-net drivers (the minimal kernel's and Debian's module)
break no rule.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from guests import guest_artifact
from linuxguest import HARD_TIMEOUT, run_until, run_until_stopped
from netns import NetNamespace
from test_linux_net import CMDLINE, HOST_IP, assert_no_violations, assert_pinged

from .common import MAC, hwvirt_artifact, minivmm, qemu_microvm

pytestmark = [pytest.mark.hwvirt, pytest.mark.kvm, pytest.mark.slow]
KERNELS = ["vmlinux", "bzImage"]


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    with NetNamespace(host_cidr=f"{HOST_IP}/24") as n:
        yield n


@pytest.mark.parametrize("kernel_name", KERNELS)
def test_minivmm_linux_pings_the_host(ns: NetNamespace, kernel_name: str) -> None:
    cmd = minivmm("--kernel", str(guest_artifact(kernel_name)),
                  "--initrd", str(guest_artifact("initramfs.cpio")), "--mem", "256M",
                  "--net", f"tap={ns.tap},mac={MAC}", "--cmdline", CMDLINE,
                  "--check-driver", prefix=ns.exec_prefix())
    console, tail, seconds = run_until_stopped(cmd, "minivmm-guest: reboot", HARD_TIMEOUT)
    print(f"{kernel_name} under minivmm: pinged the host, reboot marker after {seconds:.1f} s")
    assert_pinged(console, ns)
    assert_no_violations(console, tail)


@pytest.mark.qemu
@pytest.mark.parametrize("kernel_name", KERNELS)
def test_qemu_linux_pings_the_host(ns: NetNamespace, kernel_name: str) -> None:
    cmd = qemu_microvm(
        "-kernel", str(guest_artifact(kernel_name)),
        "-initrd", str(guest_artifact("initramfs.cpio")), "-append", CMDLINE,
        "-netdev", f"tap,id=n0,ifname={ns.tap},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-device,netdev=n0,mac={MAC}",
        prefix=ns.exec_prefix())  # fmt: skip
    console, seconds = run_until(cmd, "minivmm-guest: reboot", HARD_TIMEOUT)
    print(f"{kernel_name} under QEMU/kvm: pinged the host, reboot marker after {seconds:.1f} s")
    assert_pinged(console, ns)


def test_stock_kernel_pings_the_host(ns: NetNamespace) -> None:
    """Debian's stock kernel (virtio-net from ACPI, its own virtio_net module) pings the
    host through the tap; its check /init then powers off."""
    cmd = minivmm("--kernel", str(hwvirt_artifact("vmlinuz")),
                  "--initrd", str(hwvirt_artifact("initramfs-stock.cpio")), "--mem", "512M",
                  "--cpus", "2", "--net", f"tap={ns.tap},mac={MAC}",
                  "--cmdline", CMDLINE.replace("console=ttyS0", "console=ttyS0 quiet"),
                  "--check-driver", prefix=ns.exec_prefix())
    console, tail, seconds = run_until_stopped(cmd, "minivmm-check: end", HARD_TIMEOUT)
    print(f"stock kernel under minivmm: pinged the host, report after {seconds:.1f} s")
    assert_pinged(console, ns)
    assert_no_violations(console, tail)
