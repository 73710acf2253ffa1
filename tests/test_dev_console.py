"""virtio-console in a real VM: the probe guest prints through the transmit queue."""

from __future__ import annotations

from pathlib import Path

import pytest
from guests import ProbeRun, guest_artifact, run_minivmm

pytestmark = pytest.mark.kvm


def test_console_transmit_reaches_the_console_sink(tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--console-device",
                    "virtio", "--console", f"file:{out}", "--cmdline",
                    "probe.strict=1 probe.check=console")
    text = out.read_text()
    run = ProbeRun(p.returncode, text, p.stderr)
    run.assert_pass()
    assert "probe: hello from virtio-console\n" in text
    assert run.result("console") == "ok bytes=33"


def test_virtio_console_default_cmdline_uses_hvc0(tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--console-device",
                    "virtio", "--console", f"file:{out}")
    run = ProbeRun(p.returncode, out.read_text(), p.stderr)
    run.assert_pass()
    options = run.one("cmdline=").removeprefix("cmdline=").split()
    assert "console=hvc0" in options and "console=ttyS0" not in options
