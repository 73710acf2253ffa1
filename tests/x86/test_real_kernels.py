"""The loaders against the kernels `make guest` builds (guest/out), and truncated copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from minivmm.errors import UsageError
from minivmm.memory import GuestMemory
from minivmm.x86 import layout
from minivmm.x86.bootparams import BootParams
from minivmm.x86.loader import load_kernel

OUT = Path(__file__).resolve().parents[2] / "guest" / "out"


def _need(name: str) -> Path:
    path = OUT / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: run make guest")
    return path


def _initrd() -> Path | None:
    path = OUT / "initramfs.cpio"
    return path if path.is_file() else None


def test_real_bzimage() -> None:
    kernel = _need("bzImage")
    mem = GuestMemory(256 << 20)
    info = load_kernel(mem, kernel, initrd=_initrd(), cmdline="console=ttyS0")
    assert info.protocol == "linux64"
    zp = BootParams.from_buffer_copy(mem.read(layout.ZERO_PAGE_ADDR, 4096))
    assert zp.hdr.version >= 0x20C and zp.hdr.header == 0x53726448
    assert info.entry - 0x200 in (zp.hdr.pref_address, layout.HIMEM_START)
    setup = (zp.hdr.setup_sects or 4) * 512 + 512
    assert mem.read(info.entry - 0x200, 64) == kernel.read_bytes()[setup : setup + 64]
    if info.initrd is not None:
        assert info.initrd[0] >= info.kernel_end
        assert (zp.hdr.ramdisk_image, zp.hdr.ramdisk_size) == info.initrd


@pytest.mark.parametrize("name", ["vmlinux", "probe.elf"])
def test_real_elf(name: str) -> None:
    kernel = _need(name)
    with kernel.open("rb") as f:
        e_entry = ELFFile(f)["e_entry"]
    mem = GuestMemory(256 << 20)
    info = load_kernel(mem, kernel, initrd=_initrd(), cmdline="console=ttyS0")
    assert info.protocol == "pvh"  # both carry XEN_ELFNOTE_PHYS32_ENTRY
    assert info.entry < 1 << 32 and info.boot_params_addr == layout.PVH_INFO_ADDR
    info64 = load_kernel(mem, kernel, initrd=None, cmdline="", prefer_pvh=False)
    assert info64.protocol == "linux64"
    assert info64.entry == e_entry  # vmlinux and probe.elf give a physical e_entry


@pytest.mark.parametrize("name", ["bzImage", "vmlinux", "probe.elf"])
def test_real_kernel_truncated(name: str, tmp_path: Path) -> None:
    kernel = _need(name)
    size = kernel.stat().st_size
    mem = GuestMemory(256 << 20)
    for cut in (0x1F0, 0x400, size // 2, size - 1):
        short = tmp_path / f"{name}.{cut}"
        with kernel.open("rb") as src, short.open("wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.truncate(cut)
        with pytest.raises(UsageError, match=r"truncated|not a Linux kernel"):
            load_kernel(mem, short, initrd=None, cmdline="")
