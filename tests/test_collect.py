"""minivmm.collect against a hostile agent: frames written by hand on a socket pair.

Whatever the "agent" sends, nothing may be written outside the host path, no symlink may
be followed, and no declared size may make the host allocate or write beyond its limit.
The real agent's side (guest/agent/tree.c) is tested in tests/test_agent.py.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeguest import fake_guest

from minivmm import collect as collect_module
from minivmm.agent import (
    ENTRY,
    HEADER,
    T_ENTRY,
    T_EXITED,
    T_FAILED,
    T_GET,
    T_NOTE,
    T_STDOUT,
    T_TREE,
    AgentError,
    Exec,
)
from minivmm.collect import Collected, TreeUnsupported, UnsafeTree, collect
from minivmm.exec import _collect

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777


def frame(type_: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(type_, len(payload)) + payload


def entry(mode: int, path: bytes, size: int = 0, target: bytes = b"") -> bytes:
    return frame(T_ENTRY, ENTRY.pack(mode, size, len(path)) + path + target)


def data(b: bytes) -> bytes:
    return frame(T_STDOUT, b)


OK = frame(T_EXITED, struct.pack("<I", 0))
ROOT = entry(DIR, b"")


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory next to the host path that must stay as it is."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_bytes(b"untouched")
    yield d
    assert sorted(p.name for p in d.iterdir()) == ["victim"]
    assert (d / "victim").read_bytes() == b"untouched"


def fake_agent(stream: bytes, dst: Path, **kw: Any) -> Collected:
    """Run collect() against an "agent" that sends ``stream`` (and checks the request)."""
    ours, theirs = socket.socketpair()
    got = bytearray()

    def agent() -> None:
        with theirs:
            got.extend(theirs.recv(4096))
            try:
                theirs.sendall(stream)
            except OSError:
                pass  # the host stopped reading: fine

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    try:
        return collect(Exec(ours), "/guest/dir", dst, timeout=10, **kw)
    finally:
        ours.close()
        t.join(10)
        assert bytes(got[:HEADER.size + 10]) == frame(T_TREE, b"/guest/dir")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_tree_is_written_under_exactly_the_host_path(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    done = fake_agent(ROOT + entry(DIR, b"sub") + entry(REG, b"sub/a.txt", 5) + data(b"hel")
                      + data(b"lo") + entry(stat.S_IFREG | 0o4750, b"suid", 1) + data(b"x")
                      + entry(stat.S_IFDIR | 0o555, b"ro") + entry(REG, b"ro/in", 0)
                      + entry(LNK, b"sub/ln", 5, b"a.txt") + entry(LNK, b"sub/up", 5, b"../ro")
                      + frame(T_NOTE, b"secret: Permission denied") + OK, dst)
    assert tree(dst) == ["ro", "ro/in", "sub", "sub/a.txt", "sub/ln", "sub/up", "suid"]
    assert (dst / "sub" / "a.txt").read_bytes() == b"hello"
    assert os.readlink(dst / "sub" / "ln") == "a.txt"
    assert stat.S_IMODE((dst / "suid").stat().st_mode) == 0o750  # no setuid on the host
    assert stat.S_IMODE((dst / "ro").stat().st_mode) == 0o755  # the owner may write
    assert (done.files, done.dirs, done.symlinks, done.bytes) == (3, 3, 2, 6)
    assert done.notes == ["guest: secret: Permission denied"]


def test_a_single_file_goes_to_exactly_the_host_path(tmp_path: Path) -> None:
    dst = tmp_path / "file.out"
    done = fake_agent(entry(REG, b"", 3) + data(b"abc") + OK, dst)
    assert dst.read_bytes() == b"abc" and done.files == 1
    assert tree(tmp_path) == ["file.out"]


@pytest.mark.parametrize("path", [b"../x", b"/etc/x", b"a/../../x", b"./x", b"a//x",
                                  b"a/.", b"x\0y", b"n" * 256, b"a/" * 2100 + b"x"])
def test_unsafe_paths_end_the_collect(tmp_path: Path, outside: Path, path: bytes) -> None:
    dst = tmp_path / "dst"
    with pytest.raises(UnsafeTree, match="unsafe path"):
        fake_agent(ROOT + entry(DIR, b"a") + entry(REG, path, 4) + data(b"evil") + OK, dst)
    assert tree(dst) == ["a"]
    assert not Path("/etc/x").exists()


def test_guest_symlinks_are_never_followed(tmp_path: Path, outside: Path) -> None:
    dst = tmp_path / "dst"
    # A link out of the tree is not made; one inside is, but nothing goes through it.
    stream = (ROOT + entry(DIR, b"sub") + entry(LNK, b"out", len(str(outside)),
                                                str(outside).encode())
              + entry(LNK, b"rel", 13, b"../../outside") + entry(LNK, b"in", 3, b"sub"))
    for through in (b"out/victim", b"rel/victim", b"in/x"):
        with pytest.raises(UnsafeTree, match="its parent is not a directory"):
            fake_agent(stream + entry(REG, through, 4) + data(b"evil") + OK, dst)
    assert tree(dst) == ["in", "sub"]
    assert os.readlink(dst / "in") == "sub"


def test_a_tree_of_too_many_entries_ends_the_collect(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect_module, "MAX_ENTRIES", 5)
    dst = tmp_path / "dst"
    with pytest.raises(UnsafeTree, match="more than 5 entries in one tree"):
        fake_agent(ROOT + entry(DIR, b"a") * 10 + OK, dst)
    assert tree(dst) == ["a"]


def test_a_guest_that_stops_mid_tree_ends_the_collect_at_once(tmp_path: Path) -> None:
    """No frame for a while and ``alive`` says the guest is gone: an AgentError at the
    next quarter-second look, not after the whole timeout (10 s here)."""
    calls: list[bool] = []

    def alive() -> bool:
        calls.append(len(calls) < 1)
        return calls[-1]

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(ROOT + entry(DIR, b"a"))  # then silence, the connection open
        with pytest.raises(AgentError, match="the guest stopped while it sent the tree"):
            collect(Exec(ours), "/guest/dir", tmp_path / "dst", timeout=10, alive=alive)
    assert calls == [True, False]
    assert tree(tmp_path / "dst") == ["a"]


def test_a_symlink_going_up_after_a_name_is_skipped(tmp_path: Path) -> None:
    """``r -> .`` is inside, but ``x -> r/..`` is the tree's parent once the kernel has
    followed r: a ``..`` after a name is never made, whatever the text adds up to."""
    dst = tmp_path / "dst"
    done = fake_agent(ROOT + entry(DIR, b"sub") + entry(LNK, b"r", 1, b".")
                      + entry(LNK, b"x", 4, b"r/..") + entry(LNK, b"sub/y", 9, b"../sub/..")
                      + entry(LNK, b"sub/z", 6, b"../sub") + OK, dst)
    assert tree(dst) == ["r", "sub", "sub/z"]
    assert os.path.realpath(dst / "sub" / "z") == str((dst / "sub").resolve())
    assert [n for n in done.notes if "outside the tree" in n] == [
        "x: a symlink to 'r/..', outside the tree: skipped",
        "sub/y: a symlink to '../sub/..', outside the tree: skipped"]


def test_a_symlink_then_a_file_of_its_name_replaces_the_link(tmp_path: Path,
                                                           outside: Path) -> None:
    dst = tmp_path / "dst"
    fake_agent(ROOT + entry(LNK, b"l", 1, b".") + entry(REG, b"l", 2) + data(b"ok") + OK, dst)
    assert not (dst / "l").is_symlink() and (dst / "l").read_bytes() == b"ok"


def test_symlinks_already_in_the_host_path_do_not_redirect_writes(tmp_path: Path,
                                                                 outside: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "d").symlink_to(outside)
    (dst / "f").symlink_to(outside / "victim")
    (dst / "keep").write_bytes(b"mine")
    done = fake_agent(ROOT + entry(DIR, b"d") + entry(REG, b"d/victim", 4) + data(b"evil")
                      + entry(REG, b"f", 3) + data(b"new") + OK, dst)
    assert not (dst / "d").is_symlink() and (dst / "d" / "victim").read_bytes() == b"evil"
    assert not (dst / "f").is_symlink() and (dst / "f").read_bytes() == b"new"
    assert (dst / "keep").read_bytes() == b"mine"  # merged into what was there
    assert done.files == 2


def test_other_file_types_are_skipped_with_a_note(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    done = fake_agent(ROOT + entry(stat.S_IFIFO | 0o644, b"fifo")
                      + entry(stat.S_IFCHR | 0o600, b"null") + entry(0, b"weird") + OK, dst)
    assert tree(dst) == []
    assert done.notes == ["fifo: a FIFO: skipped", "null: a character device: skipped",
                          "weird: mode 0: skipped"]


def test_huge_declared_sizes_are_refused_before_writing(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    with pytest.raises(UnsafeTree, match="declares 1152921504606846976 bytes"):
        fake_agent(ROOT + entry(REG, b"big", 1 << 60) + data(b"x") + OK, dst)
    assert tree(dst) == []
    with pytest.raises(UnsafeTree, match="declares 2000 bytes, more than the 1000 left"):
        fake_agent(ROOT + entry(REG, b"a", 600) + data(b"a" * 600)
                   + entry(REG, b"b", 2000) + OK, dst, limit=1600)
    assert tree(dst) == ["a"]
    # A frame header that claims 2 GiB is refused from its 8 bytes.
    with pytest.raises(AgentError, match="bad frame header"):
        fake_agent(ROOT + HEADER.pack(T_STDOUT, 1 << 31), tmp_path / "d2")


@pytest.mark.parametrize(("stream", "message"), [
    (ROOT + entry(REG, b"f", 3) + data(b"abcd") + OK, "more content than the 3 bytes"),
    (ROOT + entry(REG, b"f", 3) + data(b"ab") + OK, "1 bytes of content missing"),
    (ROOT + entry(REG, b"f", 3) + data(b"ab") + entry(REG, b"g", 0) + OK, "1 bytes of"),
    (ROOT + data(b"stray") + OK, "content without a file entry"),
    (ROOT + ROOT + OK, "a second root"),
    (entry(REG, b"x", 0) + OK, "first entry is b'x', not its root"),
    (ROOT + entry(REG, b"missing/x", 0) + OK, "its parent is not a directory"),
    (ROOT + entry(LNK, b"l", 99, b"short") + OK, "a symlink without a valid target"),
    (ROOT + frame(T_ENTRY, ENTRY.pack(REG, 0, 1 << 30) + b"x") + OK, "unexpected frame"),
    (OK, "the agent sent no tree"),
    (ROOT + frame(T_EXITED, struct.pack("<I", 1)), "unexpected answer"),
])
def test_protocol_violations_end_the_collect(tmp_path: Path, stream: bytes,
                                             message: str) -> None:
    with pytest.raises(AgentError, match=message):
        fake_agent(stream, tmp_path / "dst")


def test_guest_errors_and_an_old_agent(tmp_path: Path) -> None:
    def failed(err: int, msg: bytes) -> bytes:
        return frame(T_FAILED, struct.pack("<I", err) + msg)

    with pytest.raises(FileNotFoundError, match="No such file"):
        fake_agent(failed(errno.ENOENT, b"/guest/dir: No such file or directory"),
                   tmp_path / "dst")
    with pytest.raises(TreeUnsupported, match="too old for directories"):
        fake_agent(failed(errno.EINVAL, b"unexpected frame type 0x54 before EXEC"),
                   tmp_path / "dst")
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fake_agent(ROOT + OK, tmp_path / "plain")
    with pytest.raises(IsADirectoryError):
        fake_agent(entry(REG, b"", 1) + data(b"x") + OK, tmp_path)


def test_guest_collect_passes_the_agents_misdeeds_on(tmp_path: Path, outside: Path) -> None:
    stream = ROOT + entry(REG, b"../outside/victim", 4) + data(b"evil") + OK
    with fake_guest(tmp_path, stream) as (g, _), pytest.raises(UnsafeTree, match="unsafe"):
        g.collect("/guest/dir", tmp_path / "dst")
    assert tree(tmp_path / "dst") == []


def test_exec_collect_falls_back_to_files_with_an_old_agent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def old_agent(request: bytes) -> bytes:  # protocol version 1: no TREE
        if request[:1] == b"T":
            return frame(T_FAILED, struct.pack("<I", errno.EINVAL)
                         + b"unexpected frame type 0x54 before EXEC")
        if request == frame(T_GET, b"/f"):
            return data(b"old") + OK
        return frame(T_FAILED, struct.pack("<I", errno.EISDIR) + b"/d: Is a directory")

    with fake_guest(tmp_path, old_agent) as (g, _):
        ok = _collect(g.agent_socket, [("/f", tmp_path / "f")], lambda: True)
        assert ok and (tmp_path / "f").read_bytes() == b"old"
        assert not _collect(g.agent_socket, [("/d", tmp_path / "d")], lambda: True)
    err = capsys.readouterr().err
    assert "--collect /d:" in err and "Is a directory" in err
    assert "too old for directories" in err
