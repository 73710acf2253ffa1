"""virtio-rng in a real VM: the probe guest is the driver (init, requests, interrupts)."""

from __future__ import annotations

import re

import pytest
from guests import ProbeRun, guest_artifact, run_minivmm

pytestmark = pytest.mark.kvm


def probe(checks: str, *extra: str) -> ProbeRun:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--rng", *extra,
                    "--cmdline", f"probe.strict=1 probe.check={checks}")
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def test_rng_requests_polled() -> None:
    run = probe("rng")
    run.assert_pass()
    fields = dict(kv.split("=") for kv in run.result("rng").split()[1:])
    assert fields["requests"] == "4" and fields["bytes"] == "256"
    assert fields["indirect"] == "1" and fields["event_idx"] == "1"


def test_rng_interrupt_through_irqfd() -> None:
    run = probe("rng_irq")
    run.assert_pass()
    assert "isr=0x1" in run.result("rng_irq")
    assert "irq=5" in run.result("rng_irq")  # the first virtio IRQ of the layout


def test_rng_device_listed_on_the_command_line() -> None:
    run = probe("virtio")
    run.assert_pass()
    assert "virtio_mmio.device=4K@0xd0000000:5" in run.one("cmdline=")
    dev = run.fields("virtio dev ")
    assert dev["magic"] == "0x74726976" and dev["version"] == "2" and dev["device"] == "4"


STAT = re.compile(r"^stats: (.+): (\d+)$", re.M)
RNG = "virtio-rng@0xd0000000"  # the first virtio-mmio window of the layout
#: The probe reads MagicValue, Version, DeviceID and VendorID of each device it is given
#: (vdev_probe_all in guest/probe/virtio.c).
SCAN_ACCESSES = 4
#: vdrv_init's register accesses for a one-queue device (guest/probe/virtio.c): reset
#: (write, read), ACKNOWLEDGE and DRIVER (read-modify-write each), the device features
#: (select, read, twice), the driver features (select, write, twice), FEATURES_OK
#: (read-modify-write, read back), the queue (QueueSel, QueueReady, QueueNumMax, QueueNum,
#: six address halves, QueueReady write and read back), DRIVER_OK (read-modify-write,
#: read back).
INIT_ACCESSES = 2 + 2 + 2 + 4 + 4 + 2 + 1 + 12 + 2 + 1


def stats(run: ProbeRun) -> dict[str, int]:
    """The numeric ``stats: <name>: <n>`` lines of a --stats run."""
    return {name: int(n) for name, n in STAT.findall(run.err)}


def test_stats_count_mmio_exits() -> None:
    """Every virtio-mmio register access is one MMIO exit, counted on its vCPU; queue
    notifications go through an ioeventfd and never exit; the device counts its requests
    as the guest does."""
    scan = probe("virtio", "--stats")
    scan.assert_pass()
    rng = probe("rng", "--stats")
    rng.assert_pass()
    base, got = stats(scan), stats(rng)
    assert base["vcpu0 exits mmio"] == SCAN_ACCESSES, scan.err
    assert base[f"{RNG} requests"] == 0 and base[f"{RNG} bytes"] == 0, scan.err
    assert got["vcpu0 exits mmio"] == SCAN_ACCESSES + INIT_ACCESSES, rng.err
    guest = dict(kv.split("=") for kv in rng.result("rng").split()[1:])
    assert got[f"{RNG} requests"] == int(guest["requests"]) == 4, rng.err
    assert got[f"{RNG} bytes"] == int(guest["bytes"]) == 256, rng.err
    assert not [name for name in got if name.startswith("vcpu") and
                not name.startswith("vcpu0 ")], rng.err  # one vCPU
