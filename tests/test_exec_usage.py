"""`minivmm exec` usage errors: one line, exit 2, before any VM is built (no KVM needed);
and how --check-driver's end of the run composes with the command's status (the VM
replaced by a stand-in outcome)."""

from __future__ import annotations

from pathlib import Path

import pytest
from guests import guest_artifact, run_minivmm

import minivmm.cli
import minivmm.exec
from minivmm.check import DriverChecker
from minivmm.cli import CHECK_DRIVER_STATUS, main
from minivmm.config import VmConfig, VsockConfig
from minivmm.exec import _Outcome


@pytest.mark.parametrize(("args", "message"), [
    (["--kernel", "k"], "no command: minivmm exec [options] -- CMD"),
    (["--kernel", "k", "--"], "no command: minivmm exec [options] -- CMD"),
    (["--kernel", "k", "--env", "NOEQUALS", "--", "true"], "--env 'NOEQUALS': expected NAME=VALUE"),
    (["--kernel", "k", "--env", "=v", "--", "true"], "--env '=v': expected NAME=VALUE"),
    (["--kernel", "k", "--timeout", "0", "--", "true"], "--timeout: give a number of seconds"),
    (["--kernel", "k", "--agent", "/no/such/agent", "--", "true"], "/no/such/agent: no such file"),
    (["--", "true"], "no kernel"),
    (["--kernel", "k", "--add", "/no/such/file", "--", "true"], "/no/such/file: no such"),
    (["--kernel", "k", "--add", "/etc:/a/../b", "--", "true"], "without . or .."),
    (["--kernel", "k", "--collect", "relative:x", "--", "true"], "expected /GUESTPATH:HOSTPATH"),
    (["--kernel", "k", "--collect", "/x:/no/such/dir/out", "--", "true"],
     "/no/such/dir: no such directory"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    r = run_minivmm("exec", *args)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("minivmm: error: ") and message in line, line


def test_help_names_the_exit_statuses() -> None:
    guest_artifact("minivmm-agent")  # `make guest` builds what exec needs
    r = run_minivmm("exec", "--help")
    assert r.returncode == 0
    assert "124" in r.stdout and "125" in r.stdout and "--timeout" in r.stdout
    assert f"{CHECK_DRIVER_STATUS}: --check-driver=strict" in " ".join(r.stdout.split())


def test_check_driver_is_a_usage_error_when_malformed() -> None:
    r = run_minivmm("exec", "--kernel", "k", "--check-driver=loud", "--", "true")
    assert r.returncode == 2 and "--check-driver" in r.stderr, r.stderr


def exec_with_outcome(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                      status: int, check: str, violations: int) -> tuple[int, list[str]]:
    """``minivmm exec --check-driver=CHECK -- true`` whose VM ends with ``status`` after
    its drivers broke a rule ``violations`` times (no VM: prepare and the run are
    stand-ins); the exit status and minivmm's lines on stderr."""
    checker = DriverChecker(strict=check == "strict")
    for _ in range(violations):
        checker.violation("vsock@0xd0000000", "register-width", "2-byte read of Status")

    def prepare(cfg: VmConfig, tmp: Path, *_: object, **__: object) -> tuple[VmConfig, None]:
        return cfg.replace(vsock=VsockConfig(3, tmp / "vsock")), None

    def run(*_: object) -> _Outcome:
        return _Outcome(status, check=checker, devices=1)

    monkeypatch.setattr(minivmm.exec, "prepare", prepare)
    monkeypatch.setattr(minivmm.exec, "_run", run)
    monkeypatch.setattr(minivmm.cli, "install_signal_handlers", lambda: None)  # pytest's stay
    capsys.readouterr()
    got = main(["exec", "--kernel", str(guest_artifact("vmlinux")), f"--check-driver={check}",
                "--", "true"])
    return got, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("status", [0, 7, 124, 125, 143])
def test_strict_check_driver_replaces_the_commands_status(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], status: int,
) -> None:
    got, lines = exec_with_outcome(monkeypatch, capsys, status, "strict", 2)
    assert got == CHECK_DRIVER_STATUS
    assert lines[-3:] == [
        "minivmm: check-driver: 2 violations of 1 rule",
        lines[-2],
        f"minivmm: check-driver=strict: exit status {CHECK_DRIVER_STATUS} (the run's own "
        f"was {status})",
    ]
    assert lines[-2].startswith("minivmm: check-driver: §4.2.2.2 register-width: 2 (first: "
                                "vsock@0xd0000000 at "), lines


@pytest.mark.parametrize(("check", "violations"), [("strict", 0), ("on", 0), ("on", 3)])
def test_check_driver_keeps_the_commands_status_otherwise(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], check: str,
        violations: int) -> None:
    got, lines = exec_with_outcome(monkeypatch, capsys, 7, check, violations)
    assert got == 7
    summary = [ln for ln in lines if ln.startswith("minivmm: check-driver")]
    if violations:
        assert summary[0] == f"minivmm: check-driver: {violations} violations of 1 rule"
    else:
        assert summary == ["minivmm: check-driver: no violations of the virtio 1.2 driver "
                           "rules (1 device watched)"]
    assert not any("exit status" in ln for ln in lines)
