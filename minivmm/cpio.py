"""A cpio "newc" archive writer for the archives minivmm appends to a guest's initramfs.

Format: Linux Documentation/driver-api/early-userspace/buffer-format.rst. Every entry is
owned by root with mtime 0, so an archive depends only on what is put in it. Linux
unpacks concatenated archives (each starting 4-byte aligned), later entries replacing
earlier ones: :func:`append_to` relies on that.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class Archive:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0), ino: int | None = None) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        if ino is None:
            ino = self._ino
            self._ino += 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        head = MAGIC + b"".join(b"%08X" % f for f in fields) + encoded
        self._parts += [head, _pad4(len(head)), data, _pad4(len(data))]

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def char_device(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    @property
    def size(self) -> int:
        """Bytes so far (without the trailer)."""
        return sum(len(p) for p in self._parts)

    def add_host_path(self, host: Path, name: str) -> None:
        """The host file, directory (recursively) or symlink ``host`` as ``name``:
        permission bits kept, symlinks stored as symlinks (never followed), owner root.
        ValueError for anything else (a device, a FIFO, a socket)."""
        st = host.lstat()
        if stat.S_ISLNK(st.st_mode):
            self.symlink(name, os.readlink(host))
        elif stat.S_ISREG(st.st_mode):
            self.file(name, host.read_bytes(), stat.S_IMODE(st.st_mode))
        elif stat.S_ISDIR(st.st_mode):
            self.directory(name, stat.S_IMODE(st.st_mode))
            for child in sorted(host.iterdir()):
                self.add_host_path(child, f"{name.rstrip('/')}/{child.name}")
        else:
            raise ValueError(f"{host}: not a regular file, directory or symlink")

    def to_bytes(self) -> bytes:
        parts = [*self._parts]
        trailer = Archive()
        trailer._entry(TRAILER, 0, ino=0)
        data = b"".join(parts + trailer._parts)
        return data + _pad4(len(data))


def append_to(out: Path, first: Path | None, archive: bytes) -> None:
    """Write ``first`` (an initramfs, possibly compressed; may be None), zero-padded to 4
    bytes, then ``archive``, to ``out``."""
    with out.open("wb") as f:
        if first is not None:
            with first.open("rb") as src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
            f.write(_pad4(f.tell()))
        f.write(archive)
