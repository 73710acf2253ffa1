"""A guest file or directory tree, written under exactly one host path, trusting nothing.

The guest agent sends a tree as Entry events (minivmm.agent, guest/agent/README.md
"TREE"), each regular file's content right after its entry. :func:`collect` writes them
under the host path the user named, by these rules:

* Nothing is written outside that path. A path from the guest must be relative, made of
  names (no empty component, no ``.`` or ``..``, each at most 255 bytes, 4095 in all),
  and its parent must be a directory this collect made or found there: each component is
  opened with O_NOFOLLOW relative to the one before, so no symlink is ever followed,
  neither one from the guest nor one that was already in the host directory. A file is
  created with O_EXCL after the old name is unlinked (a symlink there is replaced, not
  written through); a directory entry replaces a non-directory of that name.
* Symlinks from the guest are created as symlinks when their target stays inside the
  tree (relative, and no ``..`` that climbs above the root); others are skipped with a
  note, so that nothing reading the tree later is led out of it.
* FIFOs, sockets and devices are skipped with a note.
* Permission bits are kept, less setuid, setgid and sticky, and the owner can always
  read and write (and enter a directory); directories get theirs at the end.
* A file that declares more bytes than the host file system has free (or than
  ``limit``) ends the collect before anything of it is written. An agent that breaks
  these rules or the protocol (an unsafe path, content that does not match its size, an
  entry under a symlink) ends it with :class:`UnsafeTree`; what was written so far
  stays, all of it under the host path.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .agent import AgentError, Entry, Event, Exec, Exited, Failed, Note, Output

__all__ = ["Collected", "TreeUnsupported", "UnsafeTree", "collect"]

NAME_MAX = 255
PATH_MAX = 4095
MAX_NOTES = 1000
#: entries one collect takes (files, directories, symlinks, skipped ones): a tree of more
#: is not an honest one, and each costs the host an inode or memory
MAX_ENTRIES = 1_000_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TYPES = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


class UnsafeTree(AgentError):
    """The agent sent what no honest agent sends; the collect stopped there."""


class TreeUnsupported(AgentError):
    """The agent predates TREE (protocol version 1): it can send files only (GET)."""


@dataclass
class Collected:
    """What a collect wrote, and what it skipped (``notes``: the agent's and ours)."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)


def collect(ex: Exec, guest: str, host: str | os.PathLike[str], *, timeout: float = 60.0,
            limit: int | None = None, alive: Callable[[], bool] | None = None) -> Collected:
    """Copy the guest file or directory ``guest`` to exactly ``host`` through the agent
    connection ``ex`` (one request). ``timeout``: seconds without a frame from the agent;
    ``alive``: asked every quarter second while none comes, AgentError once it says the
    guest is gone (a stop, a crash) rather than after the whole timeout.
    OSError when the guest path cannot be read or the host path cannot be written;
    UnsafeTree, TreeUnsupported or AgentError when the agent misbehaves."""
    writer = _Writer(Path(host), limit)
    try:
        ex.send_tree(guest)
        while True:
            event = _next_event(ex, timeout, alive)
            if event is None:
                raise AgentError(f"{guest}: no answer from the agent in {timeout:g} s")
            if isinstance(event, Output) and event.fd == 1:
                writer.content(event.data)
            elif isinstance(event, Entry):
                writer.entry(event)
            elif isinstance(event, Note):
                writer.note(f"guest: {event.message}")
            elif event == Exited(0):
                writer.finish()
                return writer.done
            elif isinstance(event, Failed):
                if event.errno == errno.EINVAL and "unexpected frame type" in event.message:
                    raise TreeUnsupported(f"{guest}: the guest agent is too old for "
                                          f"directories ({event.message})")
                raise OSError(event.errno, f"{guest} (guest): {event.message}")
            else:
                raise UnsafeTree(f"{guest}: unexpected answer from the agent: {event}")
    finally:
        writer.close()


def _next_event(ex: Exec, timeout: float, alive: Callable[[], bool] | None) -> Event | None:
    if alive is None:
        return ex.next_event(timeout)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = ex.next_event(min(left, 0.25))
        if event is not None:
            return event
        if not alive():
            raise AgentError("the guest stopped while it sent the tree")
    return None


@dataclass
class _Open:
    """The regular file being written: its fd, what it still expects, its mode."""

    fd: int
    left: int
    mode: int
    name: str


class _Writer:
    def __init__(self, host: Path, limit: int | None) -> None:
        self.host = host
        self.limit = limit
        self.done = Collected()
        self.root_fd = -1
        self.root_is_file = False
        self.started = False
        self.made_root = False
        self.budget: int | None = None  # bytes the files may take (set when needed)
        self.file: _Open | None = None
        # directory -> its mode, chmod at the end (a directory sent twice: the last mode)
        self.dirs: dict[tuple[bytes, ...], int] = {}
        self.entries = 0
        self.dropped_notes = 0

    def note(self, text: str) -> None:
        if len(self.done.notes) < MAX_NOTES:
            self.done.notes.append(text)
        else:
            self.dropped_notes += 1

    # -- entries -------------------------------------------------------------------

    def entry(self, e: Entry) -> None:
        if self.file is not None:
            raise UnsafeTree(f"{self.file.name}: {self.file.left} bytes of content missing")
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise UnsafeTree(f"more than {MAX_ENTRIES} entries in one tree")
        if not self.started:
            self._root(e)
            return
        if self.root_is_file or not e.path:
            raise UnsafeTree("a second root in one tree")
        parts = _safe_parts(e.path)
        name = os.fsdecode(e.path)
        parent = self._open_parent(parts, name)
        try:
            kind = stat.S_IFMT(e.mode)
            if kind == stat.S_IFDIR:
                self._replace_non_dir(parent, parts[-1])
                try:
                    os.mkdir(parts[-1], 0o700, dir_fd=parent)
                except FileExistsError:
                    pass  # a directory already there: merged
                self.dirs[tuple(parts)] = e.mode
                self.done.dirs += 1
            elif kind == stat.S_IFREG:
                self._check_size(e.size, name)
                if not self._replace_non_dir(parent, parts[-1]):
                    self.note(f"{name}: a directory on the host: the guest's file skipped")
                    self.file = _Open(-1, e.size, e.mode, name)
                else:
                    fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                 os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
                    self.file = _Open(fd, e.size, e.mode, name)
                    self.done.files += 1
                if e.size == 0:
                    self._close_file()
            elif kind == stat.S_IFLNK:
                self._symlink(parent, parts, e, name)
            else:
                self.note(f"{name}: {_TYPES.get(kind, f'mode {e.mode:o}')}: skipped")
        finally:
            if parent != self.root_fd:
                os.close(parent)

    def _root(self, e: Entry) -> None:
        self.started = True
        if e.path:
            raise UnsafeTree(f"the tree's first entry is {e.path!r}, not its root")
        kind = stat.S_IFMT(e.mode)
        if kind == stat.S_IFREG:  # the user named this path: opened as they named it
            self._check_size(e.size, str(self.host), parent=self.host.parent)
            fd = os.open(self.host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)
            self.root_is_file = True
            self.file = _Open(fd, e.size, e.mode, str(self.host))
            self.done.files += 1
            if e.size == 0:
                self._close_file()
        elif kind == stat.S_IFDIR:
            try:
                self.host.mkdir(0o700)
                self.made_root = True
            except FileExistsError:
                if not self.host.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, f"{self.host}: exists and is "
                                             "not a directory (the guest's is)") from None
            self.root_fd = os.open(self.host, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if self.made_root:
                self.dirs[()] = e.mode
            self.done.dirs += 1
        else:
            raise OSError(errno.EINVAL, f"{self.host}: the guest's path is "
                          f"{_TYPES.get(kind, 'a symlink')}, not a file or directory")

    def _check_size(self, size: int, name: str, parent: Path | None = None) -> None:
        if self.budget is None:
            st = os.statvfs(parent if parent is not None else self.host)
            free = st.f_bavail * st.f_frsize
            self.budget = free if self.limit is None else min(free, self.limit)
        if size > self.budget - self.done.bytes:
            left = self.budget - self.done.bytes
            raise UnsafeTree(f"{name}: the guest declares {size} bytes, more than the "
                             f"{left} left (free space on the host, or the limit)")

    def _open_parent(self, parts: list[bytes], name: str) -> int:
        fd = self.root_fd
        try:
            for part in parts[:-1]:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nxt
        except OSError as e:
            if fd != self.root_fd:
                os.close(fd)
            raise UnsafeTree(f"{name}: its parent is not a directory of this tree "
                             f"({e.strerror})") from None
        return fd

    def _replace_non_dir(self, parent: int, name: bytes) -> bool:
        """Unlink what is at ``name`` unless it is a directory (True: the name is free
        or a directory, as the caller needs: see the callers)."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode):
            return False
        os.unlink(name, dir_fd=parent)
        return True

    def _symlink(self, parent: int, parts: list[bytes], e: Entry, name: str) -> None:
        target = e.target
        if not target or b"\0" in target or len(target) != e.size or len(target) > PATH_MAX:
            raise UnsafeTree(f"{name}: a symlink without a valid target")
        if not _stays_inside(parts, target):
            self.note(f"{name}: a symlink to {os.fsdecode(target)!r}, outside the tree: "
                      "skipped")
            return
        if not self._replace_non_dir(parent, parts[-1]):
            self.note(f"{name}: a directory on the host: the guest's symlink skipped")
            return
        os.symlink(target, parts[-1], dir_fd=parent)
        self.done.symlinks += 1

    # -- content -------------------------------------------------------------------

    def content(self, data: bytes) -> None:
        f = self.file
        if f is None:
            raise UnsafeTree("file content without a file entry")
        if len(data) > f.left:
            raise UnsafeTree(f"{f.name}: more content than the {f.left} bytes declared")
        if f.fd >= 0:
            view = memoryview(data)
            while view:
                view = view[os.write(f.fd, view):]
            self.done.bytes += len(data)
        f.left -= len(data)
        if f.left == 0:
            self._close_file()

    def _close_file(self) -> None:
        f, self.file = self.file, None
        if f is not None and f.fd >= 0:
            try:
                os.fchmod(f.fd, f.mode & 0o777 | 0o600)
            finally:
                os.close(f.fd)

    def finish(self) -> None:
        if self.file is not None:
            raise UnsafeTree(f"{self.file.name}: {self.file.left} bytes of content missing")
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise UnsafeTree(f"more than {MAX_ENTRIES} entries in one tree")
        if not self.started:
            raise UnsafeTree("the agent sent no tree")
        for parts, mode in sorted(self.dirs.items(), key=lambda d: -len(d[0])):  # deepest 1st
            fd = self.root_fd if not parts else self._open_parent([*parts, b""], "")
            try:
                os.fchmod(fd, mode & 0o777 | 0o700)
            finally:
                if fd != self.root_fd:
                    os.close(fd)
        if self.dropped_notes:
            self.done.notes.append(f"... and {self.dropped_notes} more notes")

    def close(self) -> None:
        if self.file is not None and self.file.fd >= 0:
            os.close(self.file.fd)
        self.file = None
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1


def _safe_parts(path: bytes) -> list[bytes]:
    """The components of a relative path from the guest; UnsafeTree unless it is safe."""
    parts = path.split(b"/")
    if (len(path) > PATH_MAX or b"\0" in path
            or any(p in (b"", b".", b"..") or len(p) > NAME_MAX for p in parts)):
        shown = os.fsdecode(path[:80]) + ("..." if len(path) > 80 else "")
        raise UnsafeTree(f"the agent sent an unsafe path {shown!r} ({len(path)} bytes)")
    return parts


def _stays_inside(parts: list[bytes], target: bytes) -> bool:
    """Whether a symlink at ``parts`` pointing to ``target`` resolves inside the tree,
    read as text: ``..`` only before the first name (the link's own directories are real
    ones: nothing is written through a symlink) and no deeper than the link. A ``..``
    after a name is refused, since that name may be one of the tree's symlinks, which the
    kernel follows before going up (``r -> .`` then ``x -> r/..`` is the tree's parent);
    symlinks met on the way down are this tree's own, checked likewise."""
    if target.startswith(b"/"):
        return False
    depth = len(parts) - 1
    named = False
    for p in target.split(b"/"):
        if p == b"..":
            depth -= 1
            if named or depth < 0:
                return False
        elif p not in (b"", b"."):
            named = True
    return True

