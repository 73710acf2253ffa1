"""The guest agent (guest/agent/agent.c) and its host client (minivmm.agent), on the host.

The agent listens on a Unix socket here (``minivmm-agent /PATH``) instead of vsock: the
protocol above the socket is the same. No VM: tests/test_exec.py boots one.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from guests import guest_artifact

from minivmm import cpio
from minivmm.agent import (
    HEADER,
    AgentError,
    Event,
    Exec,
    Exited,
    Failed,
    Output,
    Signaled,
    Started,
    failed_status,
)
from minivmm.collect import collect
from minivmm.errors import UsageError
from minivmm.exec import agent_archive, crash_line, parse_add


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("agent") / "a.sock"
    proc = subprocess.Popen([str(guest_artifact("minivmm-agent")), str(path)],
                            stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if path.exists():
                break
            time.sleep(0.01)
        assert path.exists(), "the agent never listened"
        yield path
        assert proc.poll() is None, "the agent died"
    finally:
        proc.kill()
        proc.wait()


def open_exec(path: Path) -> Exec:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return Exec(s)


def run(path: Path, argv: Sequence[str], stdin: bytes = b"", env: Sequence[str] = (),
        cwd: str | None = None) -> list[Event]:
    ex = open_exec(path)
    try:
        ex.start(argv, env, cwd)

        def feed() -> None:  # while we read: the agent stops reading when we don't
            try:
                ex.send_stdin(stdin)
                ex.close_stdin()
            except OSError:
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        events: list[Event] = []
        while True:
            ev = ex.next_event(30)
            assert ev is not None, f"no event in 30 s after {events}"
            events.append(ev)
            if not isinstance(ev, Started | Output):
                feeder.join(30)
                return events
    finally:
        ex.close()


def stream(events: list[Event], fd: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Output) and e.fd == fd)


def test_exit_status_and_separate_streams(agent: Path) -> None:
    ev = run(agent, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert isinstance(ev[0], Started) and ev[0].pid > 0
    assert stream(ev, 1) == b"out\n" and stream(ev, 2) == b"err\n"
    assert ev[-1] == Exited(7)


def test_streamed_as_produced_and_stdin(agent: Path) -> None:
    # The command prints, then waits for input that is only sent once the host has seen
    # that line: buffering the output until the end would hang here.
    ex = open_exec(agent)
    try:
        ex.start(["sh", "-c", "echo first; read x; echo got $x >&2; exit 3"])
        seen: list[Event] = []
        while stream(seen, 1) != b"first\n":
            ev = ex.next_event(30)
            assert ev is not None and not isinstance(ev, Exited), seen
            seen.append(ev)
        ex.send_stdin(b"hello\n")
        while not isinstance(ev, Exited):
            ev = ex.next_event(30)
            assert ev is not None
            seen.append(ev)
    finally:
        ex.close()
    assert stream(seen, 2) == b"got hello\n" and seen[-1] == Exited(3)


def test_large_output_and_stdin(agent: Path) -> None:
    blob = os.urandom(3 << 20)
    ev = run(agent, ["cat"], stdin=blob)
    assert stream(ev, 1) == blob and ev[-1] == Exited(0)


def test_signal(agent: Path) -> None:
    assert run(agent, ["sh", "-c", "kill -TERM $$"])[-1] == Signaled(signal.SIGTERM)


def test_kill_frame(agent: Path) -> None:
    ex = open_exec(agent)
    try:
        ex.start(["sleep", "1000"])
        assert isinstance(ex.next_event(30), Started)
        ex.kill(signal.SIGKILL)
        assert ex.next_event(30) == Signaled(signal.SIGKILL)
    finally:
        ex.close()


def test_env_cwd_and_defaults(agent: Path) -> None:
    ev = run(agent, ["sh", "-c", 'echo "$FOO|$HOME|$PATH|$(pwd)"'], env=["FOO=a b"],
             cwd="/tmp")
    assert stream(ev, 1) == (b"a b|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                             b"/usr/bin:/sbin:/bin|/tmp\n")
    ev = run(agent, ["sh", "-c", 'echo "$PATH|$(pwd)"'], env=["PATH=/bin:/usr/bin"])
    assert stream(ev, 1) == b"/bin:/usr/bin|/\n"


def test_exec_failures(agent: Path) -> None:
    (ev,) = run(agent, ["no-such-command-here"])
    assert isinstance(ev, Failed) and ev.errno == errno.ENOENT
    assert "no-such-command-here" in ev.message and failed_status(ev) == 127
    (ev,) = run(agent, ["/etc/passwd"])
    assert isinstance(ev, Failed) and failed_status(ev) == 126
    (ev,) = run(agent, ["true"], cwd="/no/such/dir")
    assert isinstance(ev, Failed) and ev.message.startswith("cd /no/such/dir")
    assert failed_status(ev) == 125


@pytest.mark.parametrize("request_bytes", [
    HEADER.pack(ord("Z"), 0),                        # unknown type
    b"A\1\0\0\0\0\0\0",                               # reserved bytes set
    HEADER.pack(ord("A"), 0xFFFFFFFF),               # oversized
    HEADER.pack(ord("X"), 0),                        # EXEC without ARG
    HEADER.pack(ord("A"), 2) + b"a\0" + HEADER.pack(ord("X"), 0),  # NUL in an argument
    HEADER.pack(ord("E"), 3) + b"=ab",               # ENV without a name
    HEADER.pack(ord("I"), 1) + b"x",                 # STDIN before EXEC
])
def test_bad_requests_get_failed_and_the_agent_lives(agent: Path,
                                                     request_bytes: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent))
        s.settimeout(30)
        s.sendall(request_bytes)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply[:1] == b"F" and len(reply) >= 12, reply
    assert run(agent, ["true"])[-1] == Exited(0)


def test_half_requests_and_vanishing_hosts(agent: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent))
        s.sendall(HEADER.pack(ord("A"), 5) + b"ab")  # then gone mid-frame
    ex = open_exec(agent)
    ex.start(["sleep", "1000"])
    assert isinstance(ex.next_event(30), Started)
    ex.close()  # the agent kills the command's group
    assert run(agent, ["true"])[-1] == Exited(0)


def test_host_client_rejects_a_bad_frame() -> None:
    a, b = socket.socketpair()
    with a, b:
        ex = Exec(a)
        b.sendall(b"O\0\0\1\0\0\0\0")
        with pytest.raises(AgentError, match="bad frame header"):
            ex.next_event(5)
    a, b = socket.socketpair()
    with a, b:
        ex = Exec(a)
        b.sendall(HEADER.pack(ord("W"), 1) + b"x")
        with pytest.raises(AgentError, match="unexpected frame"):
            ex.next_event(5)
    a, b = socket.socketpair()
    with a, b:
        ex = Exec(a)
        b.close()
        with pytest.raises(AgentError, match="without an exit status"):
            ex.next_event(5)


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive, checking its layout."""
    assert len(data) % 4 == 0 and data.startswith(cpio.MAGIC)
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        head = data[pos:pos + 110]
        assert head.startswith(cpio.MAGIC)
        fields = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == cpio.TRAILER:
            break
        entries[name] = (fields[1], data[pos:pos + size])
        pos += size + (-size % 4)
    assert pos == len(data)
    return entries


def test_agent_archive_is_newc_with_init(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF-not-really")
    data = agent_archive(agent)
    entries = read_newc(data)
    assert entries["init"] == (0o100755, agent.read_bytes())
    assert {"init", "dev/console", "proc", "sys", "tmp"} <= set(entries)

    user = tmp_path / "user.cpio"
    user.write_bytes(b"abcde")
    out = tmp_path / "initrd"
    cpio.append_to(out, user, data)
    assert out.read_bytes() == b"abcde\0\0\0" + data


def test_added_files(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.write_bytes(b"x")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"content")
    (tree / "sub" / "f").chmod(0o640)
    (tree / "link").symlink_to("/etc/passwd")
    entries = read_newc(agent_archive(agent, [parse_add(f"{tree}:/opt/w/tree")]))
    assert entries["opt"][0] == 0o40755 and entries["opt/w"][0] == 0o40755
    assert entries["opt/w/tree/sub/f"] == (0o100640, b"content")
    assert entries["opt/w/tree/link"] == (0o120777, b"/etc/passwd")  # not followed
    entries = read_newc(agent_archive(agent, [parse_add(str(tree / "sub" / "f"))]))
    assert entries["f"] == (0o100640, b"content")
    with pytest.raises(UsageError, match="more than 0 MiB"):
        agent_archive(agent, [parse_add(str(tree))], limit=3)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="not a regular file"):
        agent_archive(agent, [parse_add(str(tmp_path / "fifo"))])
    for bad in (f"{tree}:relative", f"{tree}:/a/../b", f"{tree}:/", ":/x", "/no/such:/x"):
        with pytest.raises(UsageError):
            parse_add(bad)


def test_crash_line() -> None:
    console = ("[    1.0] ok\nKernel panic - not syncing: Attempted to kill init!\n"
               "BUG: later\n")
    assert crash_line(console) == "Kernel panic - not syncing: Attempted to kill init!"
    assert crash_line("all fine\nminivmm-agent: listening\n") is None


def test_put_and_get(agent: Path, tmp_path: Path) -> None:
    blob = os.urandom((1 << 20) + 12345)
    target = tmp_path / "put.bin"
    open_exec(agent).put(str(target), blob, mode=0o600)
    assert target.read_bytes() == blob and target.stat().st_mode & 0o777 == 0o600
    assert open_exec(agent).get(str(target)) == blob
    open_exec(agent).put(str(target), b"")  # truncates
    assert open_exec(agent).get(str(target)) == b""


def test_put_and_get_errors(agent: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no/such/dir/x"):
        open_exec(agent).put(str(tmp_path / "no/such/dir/x"), b"data")
    with pytest.raises(FileNotFoundError):
        open_exec(agent).get(str(tmp_path / "missing"))
    with pytest.raises(IsADirectoryError):
        open_exec(agent).get(str(tmp_path))
    # A PUT must come first, and its content only in STDIN frames.
    path = str(tmp_path / "y").encode()
    for bad in (HEADER.pack(ord("A"), 4) + b"true" + HEADER.pack(ord("Q"), 4) + b"/etc",
                HEADER.pack(ord("P"), 4) + b"\0\0\0\0",
                HEADER.pack(ord("P"), 4 + len(path)) + b"\xa4\1\0\0" + path
                + HEADER.pack(ord("O"), 0)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(agent))
            s.settimeout(30)
            s.sendall(bad)
            assert s.recv(1) == b"F"
    assert run(agent, ["true"])[-1] == Exited(0)


def test_tree_through_the_agent(agent: Path, tmp_path: Path) -> None:
    # The agent's side of TREE (guest/agent/tree.c), written out by minivmm.collect.
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "sub" / "deep" / "b.bin").write_bytes(payload := os.urandom(300_000))
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "a.txt").chmod(0o640)
    (src / "empty").write_bytes(b"")
    (src / "ro").mkdir()
    (src / "ro" / "in").write_bytes(b"in")
    (src / "ro").chmod(0o555)
    (src / "link").symlink_to("sub/deep/b.bin")
    (src / "abs").symlink_to("/etc/passwd")
    (src / "up").symlink_to("../outside")
    os.mkfifo(src / "fifo")
    dst = tmp_path / "dst"
    done = collect(open_exec(agent), str(src), dst)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == [
        "a.txt", "empty", "link", "ro", "ro/in", "sub", "sub/deep", "sub/deep/b.bin"]
    assert (dst / "sub" / "deep" / "b.bin").read_bytes() == payload
    assert (dst / "link").read_bytes() == payload and os.readlink(dst / "link") == "sub/deep/b.bin"
    assert oct((dst / "a.txt").stat().st_mode & 0o777) == oct(0o640)
    assert oct((dst / "ro").stat().st_mode & 0o777) == oct(0o755)
    assert (done.files, done.dirs, done.symlinks, done.bytes) == (4, 4, 1, 300_008)
    assert sorted(done.notes) == [
        "abs: a symlink to '/etc/passwd', outside the tree: skipped",
        "fifo: a FIFO: skipped",
        "up: a symlink to '../outside', outside the tree: skipped"]
    # A file alone, and a path that is not there.
    collect(open_exec(agent), str(src / "a.txt"), tmp_path / "one")
    assert (tmp_path / "one").read_bytes() == b"hello\n"
    with pytest.raises(FileNotFoundError):
        collect(open_exec(agent), str(src / "nothing"), tmp_path / "none")
    assert not (tmp_path / "none").exists()
