"""The virtio-mmio transport from inside a real guest: negotiation the device must refuse,
malformed chains that must put the device in DEVICE_NEEDS_RESET without hurting the VMM
or the other devices, and reset + re-initialisation (probe checks, strict mode)."""

from __future__ import annotations

import pytest
from guests import ProbeRun, guest_artifact, run_minivmm

pytestmark = pytest.mark.kvm


def probe(checks: str) -> ProbeRun:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--rng",
                    "--cmdline", f"probe.strict=1 probe.check={checks}")
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def test_unoffered_features_and_missing_version_1_are_refused() -> None:
    run = probe("features_refused")
    run.assert_pass()
    assert "unoffered=refused" in run.result("features_refused")
    assert "no_version_1=refused" in run.result("features_refused")


def test_malformed_chains_set_needs_reset_and_the_vm_survives() -> None:
    run = probe("bad_chain,rng")
    run.assert_pass()
    result = run.result("bad_chain")
    for case in ("next_oob", "addr_oob", "loop"):
        assert f"{case}=needs_reset" in result
    assert "after=ok" in result
    assert "DEVICE_NEEDS_RESET" in run.err  # the rate-limited log line on the host


def test_reset_and_reinitialise() -> None:
    run = probe("reset,rng")
    run.assert_pass()
    assert run.result("reset").startswith("ok")
