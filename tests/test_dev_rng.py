"""virtio-rng in a real VM: the probe guest is the driver (init, requests, interrupts)."""

from __future__ import annotations

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


def test_stats_count_mmio_exits() -> None:
    run = probe("rng", "--stats")
    run.assert_pass()
    assert "stats: exits mmio:" in run.err
