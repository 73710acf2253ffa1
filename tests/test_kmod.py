"""minivmm.kmod: a stock kernel's vsock modules found, ordered and packed for the agent.

Fake module trees (modules.dep, modules.builtin, modules plain and compressed) and fake
kernel images (a bzImage setup header with a compressed payload, an ELF with the
banner); the project's minimal bzImage for the real thing (vsock built in). The agent
loading them in a guest: tests/hwvirt/test_exec.py with Debian's kernel.
"""

from __future__ import annotations

import gzip
import lzma
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from guests import guest_artifact
from test_agent import read_newc

from minivmm import kmod
from minivmm.errors import UsageError
from minivmm.exec import agent_archive

VERSION = "6.1.0-99-amd64"
#: Debian 6.1's vsock modules and their modules.dep lines (paths shortened)
DEP = """\
kernel/drivers/virtio/virtio_ring.ko{z}:
kernel/drivers/virtio/virtio.ko{z}: kernel/drivers/virtio/virtio_ring.ko{z}
kernel/drivers/virtio/virtio_mmio.ko{z}: kernel/drivers/virtio/virtio.ko{z} \
kernel/drivers/virtio/virtio_ring.ko{z}
kernel/net/vmw_vsock/vsock.ko{z}:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko{z}: \
kernel/net/vmw_vsock/vsock.ko{z}
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko{z}: \
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko{z} \
kernel/drivers/virtio/virtio.ko{z} kernel/drivers/virtio/virtio_ring.ko{z} \
kernel/net/vmw_vsock/vsock.ko{z}
kernel/arch/x86/kvm/kvm-amd.ko{z}: kernel/arch/x86/kvm/kvm.ko{z}
kernel/arch/x86/kvm/kvm.ko{z}:
"""
ORDER = ["virtio_ring", "virtio", "virtio_mmio", "vsock",
         "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda b: b, ".xz": lzma.compress, ".gz": gzip.compress}


def content(name: str, version: str = VERSION) -> bytes:
    return (b"\x7fELF module " + name.encode() * 50 + b"\0license=GPL\0vermagic="
            + version.encode() + b" SMP preempt mod_unload modversions \0")


def make_tree(root: Path, z: str = "", builtin: str = "", drop: str = "") -> Path:
    """A /lib/modules/<version> with modules.dep, modules.builtin and the modules
    (compressed with ``z``), leaving out the lines of module ``drop``."""
    root.mkdir(parents=True)
    lines = [ln for ln in DEP.format(z=z).replace("\\\n", "").splitlines()
             if not drop or not ln.split(":")[0].endswith(f"/{drop}.ko{z}")]
    (root / "modules.dep").write_text("\n".join(lines) + "\n")
    (root / "modules.builtin").write_text(builtin)
    for line in lines:
        path = line.split(":")[0]
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(COMPRESS[z](content(kmod.name_of(path))))
    return root


def make_bzimage(path: Path, payload: bytes, version: str = VERSION) -> Path:
    """The bytes of a bzImage the functions read (boot.rst): boot flag, HdrS,
    kernel_version, setup_sects 1, payload_offset/length; the payload after the setup."""
    head = bytearray(1024)
    head[0x1F1] = 1
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x100)
    text = f"{version} (someone@somewhere) #1 SMP".encode() + b"\0"
    head[0x300:0x300 + len(text)] = text
    struct.pack_into("<II", head, 0x248, 16, len(payload))
    path.write_bytes(bytes(head) + b"\0" * 16 + payload + b"\0\0\0\0")
    return path


@pytest.fixture(autouse=True)
def no_host_trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This host's /lib/modules and cache stay out of it."""
    monkeypatch.setattr(kmod, "HOST_TREES", tmp_path / "host-lib-modules")
    monkeypatch.setenv("MINIVMM_CACHE", str(tmp_path / "cache"))


def test_load_order_dependencies_first_each_once_builtin_skipped(tmp_path: Path) -> None:
    tree = kmod.ModuleTree.read(make_tree(tmp_path / VERSION, builtin=(
        "kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio.ko\n")))
    assert tree.load_order(kmod.VSOCK_MODULES) == ORDER[2:]
    assert tree.load_order(["kvm-amd", "kvm_amd", "kvm"]) == ["kvm", "kvm_amd"]
    with pytest.raises(ValueError, match="no module 'nope'"):
        tree.load_order(["nope"])
    (tmp_path / "cyc").mkdir()
    (tmp_path / "cyc" / "modules.dep").write_text("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        kmod.ModuleTree.read(tmp_path / "cyc").load_order(["a"])


@pytest.mark.parametrize("z", sorted(COMPRESS))
def test_vsock_modules_from_the_tree_decompressed(tmp_path: Path, z: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = make_bzimage(tmp_path / "bzImage", gzip.compress(b"no driver here"))
    tree = make_tree(tmp_path / "root" / "lib" / "modules" / VERSION, z=z)
    expected = [(f"{n}.ko", content(n)) for n in ORDER]
    # --modules DIR: the tree itself, DIR/<version>, or DIR/lib/modules/<version>
    for given in (tree, tree.parent, tmp_path / "root"):
        assert kmod.vsock_modules(kernel, given) == expected
    monkeypatch.setattr(kmod, "HOST_TREES", tree.parent)  # /lib/modules, by default
    assert kmod.vsock_modules(kernel) == expected


def test_zstd_modules_left_for_the_kernel_without_a_zstd_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "modules.dep").write_text("vsock.ko.zst:\n")
    (tree / "vsock.ko.zst").write_bytes(b"(zstd bytes)")
    monkeypatch.setattr(kmod, "_zstd", lambda: None)
    assert kmod.module_file(tree, "vsock.ko.zst") == ("vsock.ko.zst", b"(zstd bytes)")
    (tree / "bad.ko.xz").write_bytes(b"not xz")
    with pytest.raises(UsageError, match="cannot decompress"):
        kmod.module_file(tree, "bad.ko.xz")
    with pytest.raises(UsageError, match=r"missing\.ko: cannot read the module"):
        kmod.module_file(tree, "missing.ko")


def test_the_archive_holds_the_modules_and_their_order(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF agent")
    kernel = make_bzimage(tmp_path / "bzImage", lzma.compress(b"x"))
    mods = kmod.vsock_modules(kernel, make_tree(tmp_path / VERSION, z=".xz"))
    entries = read_newc(agent_archive(agent, modules=mods))
    d = kmod.GUEST_DIR
    assert entries[f"{d}/{kmod.ORDER}"] == (0o100644, "".join(
        f"{n}.ko\n" for n in ORDER).encode())
    for n in ORDER:
        assert entries[f"{d}/{n}.ko"] == (0o100644, content(n))
    assert entries[".minivmm"][0] == entries[d][0] == 0o40755
    assert entries["init"] == (0o100755, b"\x7fELF agent")
    assert not any(k.startswith(".minivmm") for k in read_newc(agent_archive(agent)))


def test_no_vsock_anywhere_is_a_usage_error(tmp_path: Path) -> None:
    kernel = make_bzimage(tmp_path / "bzImage", lzma.compress(b"nothing " * 1000))
    with pytest.raises(UsageError) as e:
        kmod.vsock_modules(kernel)
    msg = str(e.value)
    assert f"(Linux {VERSION}) has no virtio-vsock driver built in" in msg
    assert "CONFIG_VIRTIO_VSOCKETS" in msg and "CONFIG_VIRTIO_MMIO" in msg
    assert "--modules DIR" in msg and "\n" not in msg
    # the answer is remembered for this kernel file
    (memo,) = (tmp_path / "cache" / "kernel-vsock").iterdir()
    assert memo.read_text() == "0"
    # a tree without the vsock modules says which are missing
    tree = make_tree(tmp_path / VERSION, drop="vmw_vsock_virtio_transport")
    with pytest.raises(UsageError, match=r"vmw_vsock_virtio_transport neither built in nor a "
                                         r"module in .*CONFIG_VIRTIO_VSOCKETS"):
        kmod.vsock_modules(kernel, tree)
    with pytest.raises(UsageError, match=r"--modules .*: no modules\.dep in"):
        kmod.vsock_modules(kernel, tmp_path / "cache")


def test_modules_of_another_kernel_are_a_usage_error(tmp_path: Path) -> None:
    kernel = make_bzimage(tmp_path / "bzImage", b"", version="6.1.0-98-amd64")
    tree = make_tree(tmp_path / "t")  # built for VERSION, found as --modules DIR itself
    with pytest.raises(UsageError, match=rf"virtio_ring\.ko is built for Linux {VERSION}, "
                                         r".*\(Linux 6\.1\.0-98-amd64\)"):
        kmod.vsock_modules(kernel, tree)
    assert kmod.vermagic(b"no modinfo") is None


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_a_builtin_driver_needs_no_modules(tmp_path: Path,
                                           compress: Callable[[bytes], bytes]) -> None:
    data = b"\0" * 300000 + kmod.VSOCK_DRIVER + b"\0" * 1000
    kernel = make_bzimage(tmp_path / "bzImage", compress(data))
    assert kmod.image_contains(kernel, kmod.VSOCK_DRIVER) is True
    assert kmod.image_contains(kernel, b"vmw_vsock_virtio_transport_X") is False
    assert kmod.vsock_modules(kernel) == []
    # the driver's name across a chunk boundary of the decompressed stream
    split = make_bzimage(tmp_path / "split", compress(b"\1" * ((1 << 20) - 5) + data[300000:]))
    assert kmod.image_contains(split, kmod.VSOCK_DRIVER) is True


def test_unreadable_payload_and_elf_kernels(tmp_path: Path) -> None:
    lz4ish = make_bzimage(tmp_path / "lz4", b"\x02\x21\x4c\x18" + b"?" * 100)
    assert kmod.image_contains(lz4ish, kmod.VSOCK_DRIVER) is None
    assert kmod.vsock_modules(lz4ish) == []  # cannot tell: the boot will
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + b"\0" * 5000 + b"Linux version 6.9.1-test (x@y) #2\n\0"
                    + kmod.VSOCK_DRIVER)
    assert kmod.kernel_version(elf) == "6.9.1-test"
    assert kmod.image_contains(elf, kmod.VSOCK_DRIVER) is True
    (tmp_path / "junk").write_bytes(b"MZ" + b"\0" * 100)
    assert kmod.kernel_version(tmp_path / "junk") is None
    evil = make_bzimage(tmp_path / "evil", b"", version="../../etc")
    assert kmod.kernel_version(evil) is None


def test_the_minimal_kernel_has_vsock_built_in() -> None:
    kernel = guest_artifact("bzImage")
    version = kmod.kernel_version(kernel)
    assert version is not None and re.fullmatch(r"\d+\.\d+\.\d+\S*", version)
    assert kmod.image_contains(kernel, kmod.VSOCK_DRIVER) is True
    assert kmod.vsock_modules(kernel) == []
