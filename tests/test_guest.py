"""minivmm.Guest: one boot (module scope), many commands through the agent.

About 40 s to boot on a host whose KVM emulates guest kernel code
(guest/out/vmlinux-emulated there, guest/out/vmlinux elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guests import guest_artifact
from linuxguest import kvm_emulates_kernel

import minivmm
from minivmm.guest import CompletedProcess

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

KERNEL = "vmlinux-emulated" if kvm_emulates_kernel() else "vmlinux"


@pytest.fixture(scope="module")
def guest() -> Iterator[minivmm.Guest]:
    guest_artifact("minivmm-agent")
    cfg = minivmm.VmConfig(kernel=guest_artifact(KERNEL),
                           initrd=guest_artifact("initramfs.cpio"), mem="256M")
    with minivmm.Guest(cfg) as g:
        yield g


def test_run_status_and_streams(guest: minivmm.Guest) -> None:
    r = guest.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=60)
    assert r == CompletedProcess(["sh", "-c", "echo out; echo err >&2; exit 7"], 7,
                                 b"out\n", b"err\n")
    with pytest.raises(subprocess.CalledProcessError):
        r.check_returncode()


def test_input_env_cwd(guest: minivmm.Guest) -> None:
    r = guest.run(["sh", "-c", 'read x; echo "$x|$GREETING|$(pwd)"'], input=b"hi\n",
                  env={"GREETING": "hello"}, cwd="/proc", timeout=60)
    assert (r.returncode, r.stdout) == (0, b"hi|hello|/proc\n")


def test_signal_and_exec_failure(guest: minivmm.Guest) -> None:
    assert guest.run(["sh", "-c", "kill -KILL $$"], timeout=60).returncode == -9
    with pytest.raises(FileNotFoundError):
        guest.run(["no-such-command"], timeout=60)


def test_timeout_then_still_usable(guest: minivmm.Guest) -> None:
    with pytest.raises(subprocess.TimeoutExpired) as e:
        guest.run(["sh", "-c", "echo partial; exec sleep 1000"], timeout=10)
    assert e.value.output == b"partial\n"
    assert guest.run(["true"], timeout=60).returncode == 0


def test_put_and_get(guest: minivmm.Guest, tmp_path: Path) -> None:
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(200_000))
    local.chmod(0o750)
    guest.put(local, "/tmp/x")
    assert guest.get("/tmp/x") == local.read_bytes()
    r = guest.run(["stat", "-c", "%a %s", "/tmp/x"], timeout=60)
    assert r.stdout == b"750 200000\n"
    guest.put(b"from bytes\n", "/tmp/y")
    assert guest.run(["cat", "/tmp/y"], timeout=60).stdout == b"from bytes\n"
    with pytest.raises(FileNotFoundError):
        guest.get("/no/such/file")


def test_collect_a_directory(guest: minivmm.Guest, tmp_path: Path) -> None:
    guest.run(["sh", "-c", "mkdir -p /tmp/t/a/b && echo one > /tmp/t/a/b/one && "
               "ln -s a/b/one /tmp/t/ln && ln -s ../../etc /tmp/t/out && "
               "chmod 500 /tmp/t/a"], timeout=60, check=True)
    done = guest.collect("/tmp/t", tmp_path / "t")
    assert sorted(str(p.relative_to(tmp_path / "t")) for p in (tmp_path / "t").rglob("*")) \
        == ["a", "a/b", "a/b/one", "ln"]
    assert (tmp_path / "t" / "ln").read_bytes() == b"one\n"
    assert (tmp_path / "t" / "a").stat().st_mode & 0o777 == 0o700
    assert (done.files, done.dirs, done.symlinks) == (1, 3, 1)
    assert done.notes == ["out: a symlink to '../../etc', outside the tree: skipped"]


def test_console_log_and_no_crash(guest: minivmm.Guest) -> None:
    assert "minivmm-agent: listening on vsock port 52" in guest.console_log()
    assert guest.crash() is None


def test_round_trip(guest: minivmm.Guest) -> None:
    """What one trivial command costs once booted (printed, not asserted: timings)."""
    n = 5
    start = time.monotonic()
    for _ in range(n):
        assert guest.run(["true"], timeout=60).returncode == 0
    print(f"Guest.run(['true']) round trip: {(time.monotonic() - start) / n * 1000:.0f} ms")
