"""Bad user input: one line naming the problem, exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from guests import guest_artifact, run_minivmm


def _one_line_error(args: list[str], want: str) -> None:
    p = run_minivmm(*args, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert want in lines[0], lines[0]


@pytest.mark.parametrize(("args", "want"), [
    (["run", "--kernel", "/etc/hostname"], "/etc/hostname"),
    (["run", "--kernel", "/nonexistent/vmlinux"], "/nonexistent/vmlinux"),
    (["run", "--kernel", "/etc"], "/etc"),
    (["run"], "--kernel"),
    ([], "no command"),
    (["fly"], "fly"),
    (["run", "--kernel", "/etc/hostname", "--mem", "lots"], "--mem"),
    (["run", "--kernel", "/etc/hostname", "--mem", "1M"], "--mem"),
    (["run", "--kernel", "/etc/hostname", "--console", "file:"], "console"),
    (["run", "--kernel", "/etc/hostname", "--console", "tty9"], "console"),
    (["run", "--kernel", "/etc/hostname", "--bogus"], "--bogus"),
    (["run", "--kernel", "/etc/hostname", "--acpi", "maybe"], "--acpi"),
])
def test_usage_errors(args: list[str], want: str) -> None:
    _one_line_error(args, want)


def test_initrd_missing(tmp_path: Path) -> None:
    _one_line_error(["run", "--kernel", str(guest_artifact("probe.elf")), "--initrd",
                     str(tmp_path / "nope.cpio")], "nope.cpio")


def test_version() -> None:
    p = run_minivmm("--version")
    assert p.returncode == 0 and p.stdout.startswith("minivmm ")


def test_debug_shows_traceback() -> None:
    p = run_minivmm("run", "--kernel", "/etc/hostname", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr
