"""Kernel modules for the guest agent: the vsock driver of kernels that build it as one.

Stock distribution kernels build virtio-vsock (``vsock``,
``vmw_vsock_virtio_transport_common``, ``vmw_vsock_virtio_transport``) and often
``virtio_mmio`` as modules. :func:`vsock_modules` finds them for the kernel minivmm boots:
its version from the image (a bzImage's setup header names it, Documentation/arch/x86/
boot.rst "kernel_version"; a vmlinux holds the "Linux version" banner), the module tree
``/lib/modules/<version>`` (or the one the user names), ``modules.dep`` for what they
depend on and ``modules.builtin`` for what needs no loading. :func:`pack` puts them,
decompressed, into the archive minivmm appends to the initramfs, with the load order;
the agent (guest/agent/modload.c) loads them before it listens.

With no module tree for the kernel, the kernel must have the driver built in: the image
is searched for the driver's name (a bzImage's payload decompressed for that, when
Python can), and a kernel without it is a usage error naming what to do.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import itertools
import lzma
import mmap
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from .cpio import Archive
from .errors import UsageError

#: what the agent needs, besides what these depend on
VSOCK_MODULES = ("virtio_mmio", "vmw_vsock_virtio_transport")
#: the vsock driver's name (KBUILD_MODNAME) as a built-in kernel holds it
VSOCK_DRIVER = b"vmw_vsock_virtio_transport"
#: the archive's directory for the modules (no leading /) and its load-order file
GUEST_DIR = ".minivmm/modules"
ORDER = "order"
HOST_TREES = Path("/lib/modules")
NO_VSOCK_HELP = ("build it with CONFIG_VIRTIO_VSOCKETS and CONFIG_VIRTIO_MMIO (=y, or =m "
                 "with the modules installed), or name its module tree with --modules DIR")

# boot.rst, "THE REAL-MODE KERNEL HEADER"
_SETUP_SECTS = 0x1F1
_BOOT_FLAG = 0x1FE
_HEADER = 0x202
_KERNEL_VERSION = 0x20E
_PAYLOAD = 0x248  # payload_offset, payload_length (protocol 2.08+)
_HDRS = b"HdrS"
_ELF = b"\x7fELF"
_BANNER = b"Linux version "


def canon(name: str) -> str:
    """A module's name as the kernel has it (``kvm-amd`` and ``kvm_amd`` are one)."""
    return name.replace("-", "_")


def name_of(path: str) -> str:
    """``kernel/net/vmw_vsock/vsock.ko.xz`` -> ``vsock``."""
    return canon(PurePath(path).name.split(".ko")[0])


@dataclass(frozen=True)
class ModuleTree:
    """What ``modules.dep`` and ``modules.builtin`` of one /lib/modules/<version> say."""

    root: Path
    paths: dict[str, str]  # module name -> its file, relative to root
    deps: dict[str, tuple[str, ...]]
    builtin: frozenset[str]

    @classmethod
    def read(cls, root: Path) -> ModuleTree:
        paths: dict[str, str] = {}
        deps: dict[str, tuple[str, ...]] = {}
        for line in (root / "modules.dep").read_text(errors="replace").splitlines():
            target, colon, rest = line.partition(":")
            if not colon or not target.strip():
                continue
            name = name_of(target.strip())
            paths[name] = target.strip()
            deps[name] = tuple(name_of(d) for d in rest.split())
            for d in rest.split():
                paths.setdefault(name_of(d), d)
        builtin: set[str] = set()
        try:
            builtin = {name_of(p) for p in (root / "modules.builtin").read_text().split()}
        except FileNotFoundError:
            pass
        return cls(root, paths, deps, frozenset(builtin))

    def has(self, name: str) -> bool:
        """Built in or there to load."""
        return canon(name) in self.builtin or canon(name) in self.paths

    def load_order(self, names: Iterable[str]) -> list[str]:
        """The modules to load for ``names``, each once, dependencies first; built-in
        ones left out. ValueError for a module the tree lacks or a dependency cycle."""
        order: list[str] = []
        done: set[str] = set()
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done or name in self.builtin:
                return
            if name in visiting:
                raise ValueError(f"{self.root}/modules.dep: a dependency cycle: "
                                 f"{' -> '.join([*visiting, name])}")
            if name not in self.paths:
                raise ValueError(f"{self.root}: no module {name!r} (modules.dep)")
            visiting.append(name)
            for dep in self.deps.get(name, ()):
                visit(dep)
            visiting.pop()
            done.add(name)
            order.append(name)

        for name in names:
            visit(canon(name))
        return order


# -- the kernel image -------------------------------------------------------------------


def _is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x250 and head[_BOOT_FLAG:_BOOT_FLAG + 2] == b"\x55\xaa" and \
        head[_HEADER:_HEADER + 4] == _HDRS


def kernel_version(kernel: Path) -> str | None:
    """The kernel's release (``uname -r``), or None if the image does not say."""
    with kernel.open("rb") as f:
        head = f.read(0x1000)
        if _is_bzimage(head):
            (ptr,) = struct.unpack_from("<H", head, _KERNEL_VERSION)
            if not ptr:
                return None
            f.seek(ptr + 0x200)
            text = f.read(256).split(b"\0")[0].split()
        elif head.startswith(_ELF):
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                at = m.find(_BANNER)
                text = m[at + len(_BANNER):at + len(_BANNER) + 256].split() if at >= 0 else []
        else:
            return None
    version = text[0].decode(errors="replace") if text else ""
    return version if version and "/" not in version and version not in (".", "..") else None


def _decompressor(magic: bytes) -> Any:
    """A decompressor (with .decompress(data)) for a bzImage payload's format, or None.
    Payload formats: arch/x86/boot/compressed/Makefile (gzip, bzip2, lzma, xz, lzo, lz4,
    zstd); the kernel's xz and zstd streams end with a 4-byte size, left unread here."""
    if magic.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)
    if magic.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE)
    if magic.startswith(b"BZh"):
        return bz2.BZ2Decompressor()
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        zstd = _zstd()
        return None if zstd is None else zstd.ZstdDecompressor()
    return None  # lzo, lz4: no decompressor in Python's standard library


def _zstd() -> Any:
    try:
        import compression.zstd as zstd  # type: ignore[import-not-found]  # Python 3.14+
    except ImportError:
        return None
    return zstd


def _chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    while size > 0 and (chunk := f.read(min(size, 1 << 20))):
        size -= len(chunk)
        yield chunk


def image_contains(kernel: Path, needle: bytes) -> bool | None:
    """Whether the kernel's code and data hold ``needle`` (a bzImage's compressed payload
    is decompressed for that, and the search stops at the first hit); None when the
    image's format or compression is not one this can read."""
    with kernel.open("rb") as f:
        head = f.read(0x1000)
        if head.startswith(_ELF):
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(needle) >= 0
        if not _is_bzimage(head):
            return None
        offset, length = struct.unpack_from("<II", head, _PAYLOAD)
        f.seek((head[_SETUP_SECTS] or 4) * 512 + 512 + offset)  # 0 means 4 (boot.rst)
        first = f.read(min(length, 16))
        dec = _decompressor(first)
        if dec is None or not length:
            return None
        tail = b""
        try:
            for chunk in itertools.chain([first], _chunks(f, length - len(first))):
                out = tail + dec.decompress(chunk)
                if needle in out:
                    return True
                tail = out[-len(needle):]
                if getattr(dec, "eof", False):
                    break
        except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError):
            return None  # a payload this cannot read: the boot will tell
        return False


def has_vsock_driver(kernel: Path) -> bool | None:
    """:func:`image_contains` for VSOCK_DRIVER, remembered per kernel file (path, inode,
    size, mtime) in $MINIVMM_CACHE/kernel-vsock/: decompressing a bzImage costs a
    noticeable part of a short ``minivmm exec``."""
    st = kernel.stat()
    key = hashlib.sha256(f"{kernel.resolve()}:{st.st_dev}:{st.st_ino}:{st.st_size}:"
                         f"{st.st_mtime_ns}".encode()).hexdigest()[:24]
    try:
        cache = Path(os.environ.get("MINIVMM_CACHE") or Path.home() / ".cache" / "minivmm")
    except RuntimeError:  # no home directory: nowhere to remember it
        return image_contains(kernel, VSOCK_DRIVER)
    memo = cache / "kernel-vsock" / key
    try:
        return {"1": True, "0": False}[memo.read_text()]
    except (OSError, KeyError):
        pass
    found = image_contains(kernel, VSOCK_DRIVER)
    if found is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{key}.{os.getpid()}")
            tmp.write_text("1" if found else "0")
            tmp.replace(memo)
        except OSError:
            pass  # a read-only cache: ask the image again next time
    return found


# -- the modules ------------------------------------------------------------------------


def find_tree(version: str | None, given: Path | None) -> Path | None:
    """The module tree (a directory with modules.dep) for the kernel ``version``:
    ``given`` itself, its ``<version>/`` or its ``lib/modules/<version>/``; without
    ``given``, /lib/modules/<version> if there is one. UsageError if ``given`` holds
    none of them."""
    if given is None:
        if version is None:
            return None
        tree = HOST_TREES / version
        return tree if (tree / "modules.dep").is_file() else None
    places = [given]
    if version is not None:
        places += [given / version, given / "lib" / "modules" / version]
    for place in places:
        if (place / "modules.dep").is_file():
            return place
    where = " or ".join(str(p) for p in places)
    raise UsageError(f"--modules {given}: no modules.dep in {where} (the kernel is "
                     f"{version or 'of an unknown version'}; run depmod -b ROOT VERSION "
                     "for an unpacked tree)")


def module_file(tree: Path, path: str) -> tuple[str, bytes]:
    """The module's name in the archive and its content: xz and gzip modules
    decompressed here, zstd too where Python can (else left for the guest kernel:
    the agent loads it with MODULE_INIT_COMPRESSED_FILE)."""
    where = tree / path  # modules.dep of old depmods gives absolute paths
    name = name_of(path)
    try:
        data = where.read_bytes()
        if path.endswith(".ko.xz"):
            return f"{name}.ko", lzma.decompress(data)
        if path.endswith(".ko.gz"):
            return f"{name}.ko", gzip.decompress(data)
        if path.endswith(".ko.zst"):
            zstd = _zstd()
            if zstd is None:
                return f"{name}.ko.zst", data
            return f"{name}.ko", zstd.decompress(data)
    except OSError as e:
        raise UsageError(f"{where}: cannot read the module ({e.strerror}; modules.dep "
                         "names it)") from None
    except (lzma.LZMAError, EOFError, zlib.error) as e:
        raise UsageError(f"{where}: cannot decompress the module: {e}") from None
    if not path.endswith(".ko"):
        raise UsageError(f"{where}: not a kernel module (.ko, .ko.xz, .ko.gz, .ko.zst)")
    return f"{name}.ko", data


def vsock_modules(kernel: Path, given: Path | None = None) -> list[tuple[str, bytes]]:
    """The modules the agent must load for vsock on ``kernel``, in load order, as
    (file name, content); [] when the kernel has them built in (or cannot be asked).
    ``given``: the module tree to use (see :func:`find_tree`)."""
    version = kernel_version(kernel)
    tree_dir = find_tree(version, given)
    label = f"{kernel} (Linux {version or 'of an unknown version'})"
    if tree_dir is None:
        if has_vsock_driver(kernel) is False:
            where = f" and {HOST_TREES / version} does not exist" if version else ""
            raise UsageError(f"{label} has no virtio-vsock driver built in{where}: "
                             f"{NO_VSOCK_HELP}")
        return []
    tree = ModuleTree.read(tree_dir)
    missing = [n for n in VSOCK_MODULES if not tree.has(n)]
    if missing:
        raise UsageError(f"{label}: {', '.join(missing)} neither built in nor a module in "
                         f"{tree_dir}: {NO_VSOCK_HELP}")
    try:
        order = tree.load_order(VSOCK_MODULES)
    except ValueError as e:
        raise UsageError(str(e)) from None
    modules = [module_file(tree_dir, tree.paths[name]) for name in order]
    for (_, data), name in zip(modules, order, strict=True):
        built_for = vermagic(data)
        if version and built_for and built_for != version:
            raise UsageError(f"{tree_dir / tree.paths[name]} is built for Linux {built_for}, "
                             f"{label}: name the tree of that kernel with --modules DIR")
    return modules


def vermagic(data: bytes) -> str | None:
    """The kernel release a module was built for (the first word of its .modinfo
    ``vermagic=``), or None (compressed, or none found)."""
    at = data.find(b"\0vermagic=")
    if at < 0:
        return None
    words = data[at + 10:data.find(b"\0", at + 10)].split()
    return words[0].decode(errors="replace") if words else None


def pack(archive: Archive, modules: Sequence[tuple[str, bytes]]) -> None:
    """Put ``modules`` (from :func:`vsock_modules`) into ``archive`` under GUEST_DIR,
    with their load order in GUEST_DIR/ORDER (one file name a line)."""
    if not modules:
        return
    parts = GUEST_DIR.split("/")
    for i in range(len(parts)):
        archive.directory("/".join(parts[:i + 1]), 0o755)
    for name, data in modules:
        archive.file(f"{GUEST_DIR}/{name}", data, 0o644)
    archive.file(f"{GUEST_DIR}/{ORDER}", "".join(f"{n}\n" for n, _ in modules).encode())
