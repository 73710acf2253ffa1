"""The ELF loader against kernels linked here: PVH and 64-bit entries, and refusals."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest

from minivmm.errors import UsageError
from minivmm.memory import GuestMemory
from minivmm.x86 import layout, pvh
from minivmm.x86.bootparams import BootParams
from minivmm.x86.e820 import e820_map
from minivmm.x86.loader import load_kernel

from .synthetic_kernels import ElfBuilder

MiB = 1 << 20
PHYS = 0x20_0000
PVH_START = PHYS + 3  # hlt; jmp _start; then pvh_start


def _filled(size: int = 16 * MiB) -> GuestMemory:
    mem = GuestMemory(size)
    mem.write(PHYS, b"\xaa" * 0x10000)  # so zero-filling the bss is visible
    return mem


def _check_segments(mem: GuestMemory) -> None:
    assert mem.read(PHYS, 3) == b"\xf4\xeb\xfd"  # hlt; jmp _start
    assert mem.read(PHYS + 0x1000, 16) == b"MINIVMM-ELF-DATA"
    assert mem.read(PHYS + 0x1010, 0x3000) == bytes(0x3000)


def test_pvh_boot(build_elf: ElfBuilder, tmp_path: Path) -> None:
    mem = _filled()
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"cpio" * 300)
    info = load_kernel(mem, build_elf(), initrd=initrd, cmdline="console=ttyS0 x=1")
    assert info.protocol == "pvh"
    assert info.entry == PVH_START
    assert info.boot_params_addr == layout.PVH_INFO_ADDR
    assert info.kernel_end == PHYS + 0x1010 + 0x3000
    _check_segments(mem)

    si = pvh.HvmStartInfo.from_buffer_copy(mem.read(layout.PVH_INFO_ADDR, 56))
    assert (si.magic, si.version) == (0x336EC578, 1)
    assert si.cmdline_paddr == layout.CMDLINE_ADDR
    assert mem.read(si.cmdline_paddr, 18) == b"console=ttyS0 x=1\0"
    expected = [(e.addr, e.size, e.type) for e in e820_map(mem)]
    entries = [
        pvh.HvmMemmapTableEntry.from_buffer_copy(mem.read(si.memmap_paddr + 24 * i, 24))
        for i in range(si.memmap_entries)
    ]
    assert [(e.addr, e.size, e.type) for e in entries] == expected
    assert si.nr_modules == 1
    mod = pvh.HvmModlistEntry.from_buffer_copy(mem.read(si.modlist_paddr, 32))
    assert info.initrd == (mod.paddr, mod.size)
    assert mem.read(mod.paddr, mod.size) == b"cpio" * 300
    assert mod.paddr % 4096 == 0 and mod.paddr >= info.kernel_end
    end = si.memmap_paddr + 24 * si.memmap_entries
    assert si.modlist_paddr >= layout.PVH_INFO_ADDR and end <= layout.ZERO_PAGE_ADDR


def test_pvh_without_initrd_has_no_modules(build_elf: ElfBuilder) -> None:
    mem = _filled()
    info = load_kernel(mem, build_elf(), initrd=None, cmdline="")
    si = pvh.HvmStartInfo.from_buffer_copy(mem.read(info.boot_params_addr, 56))
    assert (si.nr_modules, si.modlist_paddr, info.initrd) == (0, 0, None)


@pytest.mark.parametrize("pvh_note", [True, False])
def test_64bit_entry_with_zero_page(build_elf: ElfBuilder, tmp_path: Path, pvh_note: bool) -> None:
    mem = _filled()
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"z" * 9000)
    info = load_kernel(mem, build_elf(pvh=pvh_note), initrd=initrd, cmdline="hi", prefer_pvh=False)
    assert info.protocol == "linux64"
    assert info.entry == PHYS  # e_entry
    assert info.boot_params_addr == layout.ZERO_PAGE_ADDR
    _check_segments(mem)
    zp = BootParams.from_buffer_copy(mem.read(layout.ZERO_PAGE_ADDR, 4096))
    h = zp.hdr
    assert (h.boot_flag, h.header, h.version, h.type_of_loader) == (0xAA55, 0x53726448, 0x20C, 0xFF)
    assert h.cmd_line_ptr == layout.CMDLINE_ADDR and mem.read(h.cmd_line_ptr, 3) == b"hi\0"
    assert h.kernel_alignment != 0
    assert info.initrd == (h.ramdisk_image, h.ramdisk_size)
    assert h.ramdisk_size == 9000
    assert [(e.addr, e.size, e.type) for e in zp.e820_table[: zp.e820_entries]] == [
        (e.addr, e.size, e.type) for e in e820_map(mem)
    ]


def test_no_pvh_note_means_64bit_entry(build_elf: ElfBuilder) -> None:
    info = load_kernel(_filled(), build_elf(pvh=False), initrd=None, cmdline="")
    assert (info.protocol, info.entry) == ("linux64", PHYS)


def test_virtual_entry_is_translated_to_physical(build_elf: ElfBuilder) -> None:
    kernel = build_elf(virt=0xFFFF_FFFF_8000_0000)
    mem = _filled()
    assert load_kernel(mem, kernel, initrd=None, cmdline="", prefer_pvh=False).entry == PHYS
    _check_segments(mem)
    assert load_kernel(mem, kernel, initrd=None, cmdline="").entry == PVH_START


def test_cmdline_limit(build_elf: ElfBuilder) -> None:
    mem = _filled()
    load_kernel(mem, build_elf(), initrd=None, cmdline="y" * (layout.CMDLINE_MAX - 1))
    with pytest.raises(UsageError, match=f"at most {layout.CMDLINE_MAX - 1}"):
        load_kernel(mem, build_elf(), initrd=None, cmdline="y" * layout.CMDLINE_MAX)


def test_rejects_32bit_and_foreign_elf(build_elf: ElfBuilder, tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    with pytest.raises(UsageError, match=r"32-bit.*not x86-64"):
        load_kernel(mem, build_elf(bits=32), initrd=None, cmdline="")
    data = bytearray(build_elf().read_bytes())
    struct.pack_into("<H", data, 18, 183)  # e_machine = EM_AARCH64
    arm = tmp_path / "arm"
    arm.write_bytes(data)
    with pytest.raises(UsageError, match=r"arm: an ELF file for AArch64.*not x86-64"):
        load_kernel(mem, arm, initrd=None, cmdline="")


def test_segment_beyond_ram(build_elf: ElfBuilder) -> None:
    mem = GuestMemory(16 * MiB)
    with pytest.raises(UsageError, match=r"does not fit in guest memory \(16 MiB\); give"):
        load_kernel(mem, build_elf(phys=0x200_0000), initrd=None, cmdline="")


def test_segment_over_boot_data(build_elf: ElfBuilder) -> None:
    with pytest.raises(UsageError, match="overlaps the boot data"):
        load_kernel(GuestMemory(16 * MiB), build_elf(phys=0x8000), initrd=None, cmdline="")


def test_initrd_too_big(build_elf: ElfBuilder, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(16 * MiB))
    with pytest.raises(UsageError, match=r"initrd of 16 MiB does not fit below 0x1000000"):
        load_kernel(GuestMemory(16 * MiB), build_elf(), initrd=initrd, cmdline="")


def test_truncated_elf(build_elf: ElfBuilder, tmp_path: Path) -> None:
    data = build_elf().read_bytes()
    mem = GuestMemory(16 * MiB)
    for cut in (4, 20, 63, 64, 100, 0x1002, 0x1800, 0x2008, len(data) - 1):
        short = tmp_path / f"cut{cut}"
        short.write_bytes(data[:cut])
        with pytest.raises(UsageError, match=rf"cut{cut}: truncated"):
            load_kernel(mem, short, initrd=None, cmdline="")


def test_segment_past_file_end(build_elf: ElfBuilder, tmp_path: Path) -> None:
    data = bytearray(build_elf().read_bytes())
    phoff = struct.unpack_from("<Q", data, 32)[0]
    struct.pack_into("<Q", data, phoff + 32, 1 << 20)  # first PT_LOAD's p_filesz
    bad = tmp_path / "bad"
    bad.write_bytes(data)
    with pytest.raises(UsageError, match="truncated ELF file"):
        load_kernel(GuestMemory(16 * MiB), bad, initrd=None, cmdline="")


def test_start_info_sizes_fit_the_reserved_page() -> None:
    assert layout.ZERO_PAGE_ADDR - layout.PVH_INFO_ADDR >= 56 + 32 + 24 * 128
    assert ctypes.sizeof(pvh.HvmStartInfo) == 56


@pytest.mark.parametrize(("offset", "field"), [(54, "e_phentsize"), (58, "e_shentsize")])
def test_header_entries_smaller_than_the_structures_are_corrupt(
        build_elf: ElfBuilder, tmp_path: Path, offset: int, field: str) -> None:
    data = bytearray(build_elf().read_bytes())
    struct.pack_into("<H", data, offset, 8)  # smaller than a program/section header
    bad = tmp_path / "bad"
    bad.write_bytes(data)
    with pytest.raises(UsageError, match=rf"bad: truncated or corrupt ELF file \({field} 8\)"):
        load_kernel(GuestMemory(16 * MiB), bad, initrd=None, cmdline="")
