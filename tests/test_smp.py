"""Several vCPUs in a real VM: the probe's smp check (guest/probe/smp.c) as the guest.

The probe's BSP reads minivmm's MP table, starts every AP with INIT-SIPI-SIPI through the
in-kernel LAPIC (trampoline at 0x8000), and each AP reports its APIC ID from CPUID leaves
1 and 0Bh (minivmm's per-vCPU CPUID) and from its LAPIC ID register, runs at CPL3, adds to
a shared counter and reads the virtio-rng's ID registers (MMIO exits on its own vCPU
thread), then parks in `cli; hlt`. The same check passes under QEMU microvm with -smp 2
and 4 (tests/test_probe_qemu.py), which proves the probe right.
"""

from __future__ import annotations

import pytest
from guests import KV, ProbeRun, guest_artifact, run_minivmm

pytestmark = pytest.mark.kvm

AP_COUNTER_ADDS = 100000  # each AP's locked additions to the shared counter
ID_REGISTERS = 3  # MagicValue, Version, DeviceID of each virtio device, read by every AP


def probe(cmdline: str, *extra: str) -> ProbeRun:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), *extra,
                    "--cmdline", cmdline)
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def ap_lines(run: ProbeRun) -> list[dict[str, str]]:
    return [dict(KV.findall(line)) for line in run.lines if line.startswith("smp ap ")]


def assert_all_started(run: ProbeRun, cpus: int, devices: int) -> None:
    run.assert_pass()
    ids = ",".join(str(i) for i in range(cpus))
    assert run.one("smp cpus=") == f"smp cpus={cpus} ids={ids} source=mptable bsp=0"
    aps = ap_lines(run)
    assert sorted(int(a["apic_id"]) for a in aps) == list(range(1, cpus)), run.raw
    for a in aps:
        assert a["cpuid_id"] == a["apic_id"] and a["x2apic_id"] == a["apic_id"], run.raw
        assert a["cpl"] == "3"
        assert a["mmio_reads"] == str(ID_REGISTERS * devices)
    f = run.fields("check smp ok")
    assert f["cpus"] == str(cpus) and f["aps"] == str(cpus - 1)
    assert f["counter"] == str((cpus - 1) * AP_COUNTER_ADDS)
    assert f["mmio_devices"] == str(devices)


@pytest.mark.parametrize("extra", [(), ("--cpus", "1")])
def test_smp_check_one_cpu(extra: tuple[str, ...]) -> None:
    run = probe("probe.check=smp probe.cpus=1", "--rng", *extra)
    assert_all_started(run, 1, devices=1)
    assert not ap_lines(run)


@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_check_starts_every_vcpu(cpus: int) -> None:
    run = probe(f"probe.check=smp probe.cpus={cpus}", "--cpus", str(cpus), "--rng")
    assert_all_started(run, cpus, devices=1)


def test_smp_check_without_devices() -> None:
    # The "done when" command line, as it is.
    run = probe("probe.check=smp", "--cpus", "4")
    assert_all_started(run, 4, devices=0)


def test_smp_then_interrupts() -> None:
    # Parked APs must not disturb the BSP's later device and interrupt work.
    run = probe("probe.check=smp,rng,rng_irq probe.cpus=2", "--cpus", "2", "--rng")
    assert_all_started(run, 2, devices=1)
    for name in ("rng", "rng_irq"):
        assert run.result(name).startswith("ok"), run.raw
