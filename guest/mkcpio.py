#!/usr/bin/env python3
"""Write a Linux initramfs (cpio "newc" format) without root privileges.

Usage: mkcpio.py SPEC OUTPUT

SPEC lists one entry per line (blank lines and # comments ignored), in the
same spirit as the kernel's usr/gen_init_cpio:

    dir   PATH MODE
    file  PATH MODE SOURCE
    slink PATH MODE TARGET
    nod   PATH MODE c|b MAJOR MINOR

MODE is octal permission bits. Every entry is owned by root, has mtime 0 and
a fresh inode number, so the archive depends only on the spec and the source
files. Device nodes are written into the archive, not created on the host,
which is why no root is needed (the kernel opens /dev/console before any
devtmpfs is mounted, so an initramfs must carry it).

Format: Documentation/driver-api/early-userspace/buffer-format.rst.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "slink": stat.S_IFLNK,
    "nod:c": stat.S_IFCHR,
    "nod:b": stat.S_IFBLK,
}


class SpecError(Exception):
    pass


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def entry(
    ino: int,
    name: str,
    mode: int,
    data: bytes = b"",
    nlink: int = 1,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    """One newc header + name + data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += _pad4(len(out))
    out += data + _pad4(len(data))
    return out


def build(spec_path: Path) -> bytes:
    parts: list[bytes] = []
    ino = 1
    for lineno, raw in enumerate(spec_path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kind = words[0]
        try:
            path = words[1].lstrip("/")
            perm = int(words[2], 8)
            if kind == "dir" and len(words) == 3:
                parts.append(entry(ino, path, TYPE_BITS["dir"] | perm, nlink=2))
            elif kind == "file" and len(words) == 4:
                data = Path(words[3]).read_bytes()
                parts.append(entry(ino, path, TYPE_BITS["file"] | perm, data))
            elif kind == "slink" and len(words) == 4:
                parts.append(entry(ino, path, TYPE_BITS["slink"] | perm, words[3].encode()))
            elif kind == "nod" and len(words) == 6 and words[3] in ("c", "b"):
                rdev = (int(words[4]), int(words[5]))
                parts.append(entry(ino, path, TYPE_BITS["nod:" + words[3]] | perm, rdev=rdev))
            else:
                raise SpecError(f"bad entry {raw!r}")
        except (IndexError, ValueError, OSError, SpecError) as e:
            raise SpecError(f"{spec_path}:{lineno}: {e}") from None
        ino += 1
    parts.append(entry(0, TRAILER, 0))
    data = b"".join(parts)
    return data + _pad4(len(data))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} SPEC OUTPUT", file=sys.stderr)
        return 2
    try:
        data = build(Path(argv[1]))
    except SpecError as e:
        print(f"mkcpio: {e}", file=sys.stderr)
        return 2
    Path(argv[2]).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
