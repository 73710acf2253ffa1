"""The probe guest's whole check list under minivmm on a hardware-virtualization KVM.

On kvm_pvm hosts the probe keeps its device work at CPL3 because CPL0 code is emulated;
here every instruction runs on (nested) AMD-V, so the same checks exercise the ordinary
path. One VM carries every device (rng, a disk, a virtio console, a virtio-net on a tap
in a private namespace) and runs every check in one boot (guest/probe/README.md has
what each one asserts); the host checks what the guest wrote to the disk, the tap's
counters and the rate-limited device log. The negative self-test `fault` ends a run, so
it gets its own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from guests import ProbeRun, guest_artifact
from netns import NetNamespace, missing
from test_dev_blk import SECTORS, make_image, pattern

from .common import MAC, minivmm

pytestmark = [pytest.mark.hwvirt, pytest.mark.kvm, pytest.mark.slow]
if (why := missing()) is not None:
    pytest.skip(why, allow_module_level=True)

CHECKS = ["cpl3", "virtio", "rng", "rng_irq", "blk", "console", "features_refused",
          "bad_chain", "reset", "net", "bench"]
SERIAL = "minivmm-hwvirt"


def test_every_probe_check_passes(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", seed=7)
    console = tmp_path / "console.txt"
    with NetNamespace() as ns:
        before = ns.tap_stats()
        cmdline = (f"probe.strict=1 probe.check={','.join(CHECKS)} probe.expect_mem=128M "
                   f"probe.blk_pattern=7 probe.blk_sectors={SECTORS} probe.blk_serial={SERIAL} "
                   f"probe.net_ip=10.0.2.15 probe.net_peer={ns.host_ip} probe.net_mac={MAC} "
                   f"probe.bench=mmio,rng probe.bench_n=50")
        cmd = minivmm("--kernel", str(guest_artifact("probe.elf")), "--mem", "128M", "--rng",
                      "--disk", f"{img},serial={SERIAL}", "--console-device", "virtio",
                      "--console", f"file:{console}", "--net", f"tap={ns.tap},mac={MAC}",
                      "--cmdline", cmdline, prefix=ns.exec_prefix())
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL, errors="replace")
        after = ns.tap_stats()
        peer_mac = ns.tap_mac()
    run = ProbeRun(p.returncode, console.read_text(errors="replace") + p.stdout, p.stderr)
    run.assert_pass()
    for name in [*CHECKS, "boot", "memmap", "bss", "options", "expect_mem"]:
        assert run.result(name).startswith("ok"), run.check(name)

    # What the host can check from outside.
    assert "flush=yes" in run.result("blk") and f"id={SERIAL}" in run.result("blk")
    data = img.read_bytes()
    for s in range(SECTORS):  # the last 8 sectors hold seed+1's pattern, the rest seed's
        assert data[s * 512 : (s + 1) * 512] == pattern(8 if s >= SECTORS - 8 else 7, s), s
    assert "probe: hello from virtio-console\n" in run.out
    assert run.result("console") == "ok bytes=33"
    for case in ("next_oob", "addr_oob", "loop"):
        assert f"{case}=needs_reset" in run.result("bad_chain")
    assert "DEVICE_NEEDS_RESET" in run.err  # the rate-limited log line
    assert "unoffered=refused" in run.result("features_refused")
    net = dict(kv.split("=", 1) for kv in run.result("net").split()[1:])
    assert net["mac"] == MAC and net["peer_mac"] == peer_mac
    assert int(net["num_buffers"]) > 1
    assert after["rx_packets"] - before["rx_packets"] >= 3  # ARP + two echo requests
    assert after["tx_packets"] - before["tx_packets"] >= 3
    assert "interrupts=1" in run.result("rng_irq")
    assert len([ln for ln in run.lines if ln.startswith("virtio dev ")]) == 4


def test_port_io_at_cpl3_is_a_general_protection_fault() -> None:
    """probe.check=fault: `out` at CPL3 with IOPL 0 must raise #GP (vector 13) in the
    guest, which the probe reports and ends with debug-exit 125."""
    p = subprocess.run(minivmm("--kernel", str(guest_artifact("probe.elf")),
                               "--cmdline", "probe.check=fault"),
                       capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                       errors="replace")
    run = ProbeRun(p.returncode, p.stdout, p.stderr)
    assert run.status == 125, run.raw
    fault = run.one("fault ")
    assert "vector=13" in fault and "cs=0x23" in fault, fault  # #GP, raised at CPL3
    assert "result fail fault" in run.lines
