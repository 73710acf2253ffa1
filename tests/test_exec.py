"""`minivmm exec` end to end: a Linux guest, the agent appended as /init, one command.

Each test boots the guest once (about 40 s on a host whose KVM emulates guest kernel
code, where guest/out/vmlinux-emulated is used; guest/out/vmlinux elsewhere), so there
are few of them; the protocol's details are tested without a VM in tests/test_agent.py.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests import ROOT, guest_artifact, run_minivmm
from linuxguest import HARD_TIMEOUT, kvm_emulates_kernel

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

KERNEL = "vmlinux-emulated" if kvm_emulates_kernel() else "vmlinux"


def guest_options() -> list[str]:
    guest_artifact("minivmm-agent")
    return ["--kernel", str(guest_artifact(KERNEL).relative_to(ROOT)),
            "--initrd", str(guest_artifact("initramfs.cpio").relative_to(ROOT))]


def test_exit_status_and_separate_streams() -> None:
    # The "done when" command, as written there.
    r = run_minivmm("exec", *guest_options(), "--", "sh", "-c",
                    "echo out; echo err >&2; exit 7", timeout=HARD_TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")


def read_until(proc: subprocess.Popen[bytes], want: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while want not in got:
            left = deadline - time.monotonic()
            assert left > 0, f"no {want!r} on stdout after {timeout} s; got {got!r}"
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"stdout ended before {want!r}; got {got!r}"
                got += chunk
    return got


def test_output_streams_as_produced_and_stdin_is_forwarded(tmp_path: Path) -> None:
    # CMD prints, then waits for a line that is only written once its first line has
    # reached us: output held back until CMD ends would make this hang, not pass.
    # It also leaves a file and a directory that --collect brings back.
    got, tree = tmp_path / "got.txt", tmp_path / "tree"
    cmd = [sys.executable, "-m", "minivmm", "exec", *guest_options(),
           "--collect", f"/tmp/result.txt:{got}", "--collect", f"/tmp/out:{tree}",
           "--", "sh", "-c",
           'echo first; read x; echo "got $x" >&2; echo "$x" > /tmp/result.txt; '
           "mkdir -p /tmp/out/sub; echo deep > /tmp/out/sub/f; chmod 640 /tmp/out/sub/f; "
           "ln -s sub/f /tmp/out/in; ln -s /etc /tmp/out/abs; mkfifo /tmp/out/p; "
           "echo last; exit 3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stderr is not None
        first = read_until(proc, b"first\n", HARD_TIMEOUT)
        assert proc.poll() is None
        proc.stdin.write(b"hello\n")
        proc.stdin.close()
        rest = proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(60) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first + rest == b"first\nlast\n"
    assert got.read_bytes() == b"hello\n"
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == ["in", "sub", "sub/f"]
    assert (tree / "in").read_bytes() == b"deep\n" and os.readlink(tree / "in") == "sub/f"
    assert (tree / "sub" / "f").stat().st_mode & 0o777 == 0o640
    note = f"minivmm: --collect /tmp/out:{tree}: "
    assert sorted(err.decode().splitlines()) == sorted([
        "got hello", note + "abs: a symlink to '/etc', outside the tree: skipped",
        note + "p: a FIFO: skipped"])


def test_timeout_is_124_and_added_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "hello.txt").write_text("hello from the host\n")
    (tmp_path / "link").symlink_to("sub/hello.txt")
    r = run_minivmm("exec", *guest_options(), "--add", f"{tmp_path}:/w", "--timeout", "10",
                    "--check-driver=strict",
                    "--", "sh", "-c", 'read -r l < /w/link; echo "$l"; exec sleep 1000',
                    timeout=HARD_TIMEOUT)  # builtins: no process to spawn (a loaded host is slow)
    assert r.returncode == 124, r.stderr  # strict and no violation: the command's status
    assert r.stdout == "hello from the host\n"
    assert "minivmm: sh: timed out after 10 s" in r.stderr
    # Linux's virtio-vsock driver (the agent's connection) keeps every rule; exec sums up.
    assert r.stderr.splitlines()[-1] == ("minivmm: check-driver: no violations of the virtio "
                                         "1.2 driver rules (1 device watched)"), r.stderr


# The guest kernel panics while the command runs: the command makes the agent (PID 1)
# fault. It writes over the code where PID 1 waits in read() (its user pc, from
# /proc/1/syscall) through /proc/1/mem, then kills PID 1's spare handler (a child of
# PID 1 that is not the command's parent): PID 1 returns from read(), faults, and the
# kernel panics ("Attempted to kill init!").
KILL_INIT = """
echo before
set -- $(cat /proc/1/syscall); shift 8
dd if=/dev/zero of=/proc/1/mem bs=1 seek=$(($1)) count=16 conv=notrunc 2>/dev/null
for s in /proc/[0-9]*/stat; do
  read -r pid comm state ppid rest < $s || continue
  [ "$ppid" = 1 ] && [ "$pid" != "$PPID" ] && [ "$comm" = "(init)" ] && kill -9 $pid
done
exec sleep 1000
"""


def test_guest_panic_under_the_command_is_125_with_the_panic_line() -> None:
    r = run_minivmm("exec", *guest_options(), "--", "sh", "-c", KILL_INIT,
                    timeout=HARD_TIMEOUT)
    assert r.returncode == 125, r.stderr
    assert r.stdout == "before\n"
    assert "minivmm: the guest kernel crashed while the command ran" in r.stderr
    assert ("minivmm: the guest kernel crashed: Kernel panic - not syncing: Attempted to "
            "kill init!") in r.stderr
    tail = [ln for ln in r.stderr.splitlines() if ln.startswith("  | ")]
    assert 0 < len(tail) <= 20
    assert any("Kernel panic" in ln for ln in tail)
