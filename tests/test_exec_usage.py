"""`minivmm exec` usage errors: one line, exit 2, before any VM is built (no KVM needed)."""

from __future__ import annotations

import pytest
from guests import guest_artifact, run_minivmm


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
