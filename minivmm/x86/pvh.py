"""PVH boot: the Xen ELF note that marks a PVH entry point, and ``struct hvm_start_info``.

A PVH kernel is entered in 32-bit protected mode, paging off, with EBX holding the
guest-physical address of ``hvm_start_info`` (Xen's public header
arch-x86/hvm/start_info.h; version 1 adds the memory map). Everything the kernel gets --
the start info, its module list (the initrd) and its memory map -- is placed in the page
at layout.PVH_INFO_ADDR; the command line is at layout.CMDLINE_ADDR.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator, Sequence
from typing import Final

from ..errors import InternalError
from ..memory import GuestMemory
from . import layout
from .e820 import E820Entry

XEN_ELFNOTE_PHYS32_ENTRY: Final = 18
XEN_NOTE_NAME: Final = b"Xen"
HVM_START_MAGIC_VALUE: Final = 0x336EC578
HVM_START_INFO_VERSION: Final = 1
PVH_INFO_SPACE: Final = layout.ZERO_PAGE_ADDR - layout.PVH_INFO_ADDR  # the next thing above

_NOTE_HEADER = struct.Struct("<III")  # n_namesz, n_descsz, n_type (ELF gABI, "Note Section")


class HvmStartInfo(ctypes.LittleEndianStructure):
    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        # version 1
        ("memmap_paddr", ctypes.c_uint64),
        ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


class HvmModlistEntry(ctypes.LittleEndianStructure):
    _fields_ = (
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    )


class HvmMemmapTableEntry(ctypes.LittleEndianStructure):
    _fields_ = (
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


def _align4(n: int) -> int:
    return (n + 3) & ~3


def iter_notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each ELF note in ``data``; stops at the first malformed one."""
    pos = 0
    while pos + _NOTE_HEADER.size <= len(data):
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(data, pos)
        name_at = pos + _NOTE_HEADER.size
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if desc_at + descsz > len(data):
            return
        yield (
            data[name_at : name_at + namesz].rstrip(b"\0"),
            ntype,
            data[desc_at : desc_at + descsz],
        )
        pos = end


def find_pvh_entry(notes: bytes) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address in a run of ELF notes, or None.

    Linux emits it as a 32-bit value; a 64-bit one is accepted if it fits in 32 bits.
    """
    for name, ntype, desc in iter_notes(notes):
        if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) == 4:
                return int(struct.unpack("<I", desc)[0])
            if len(desc) == 8:
                value = int(struct.unpack("<Q", desc)[0])
                return value if value < 1 << 32 else None
    return None


def write_start_info(
    mem: GuestMemory,
    *,
    cmdline_addr: int,
    e820: Sequence[E820Entry],
    initrd: tuple[int, int] | None,
    rsdp_addr: int | None = None,
) -> int:
    """Write hvm_start_info, its module list and memory map at layout.PVH_INFO_ADDR;
    ``rsdp_addr`` is the ACPI RSDP's address (rsdp_paddr), None without ACPI tables.

    Returns the start info's address (for EBX).
    """
    info_addr = layout.PVH_INFO_ADDR
    modlist_addr = info_addr + ctypes.sizeof(HvmStartInfo)
    modules = [initrd] if initrd is not None else []
    memmap_addr = modlist_addr + len(modules) * ctypes.sizeof(HvmModlistEntry)
    end = memmap_addr + len(e820) * ctypes.sizeof(HvmMemmapTableEntry)
    if end > info_addr + PVH_INFO_SPACE:
        raise InternalError(
            f"PVH start info with {len(e820)} memory map entries needs {end - info_addr} "
            f"bytes, more than the {PVH_INFO_SPACE} reserved at 0x{info_addr:x}"
        )

    info = HvmStartInfo(
        magic=HVM_START_MAGIC_VALUE,
        version=HVM_START_INFO_VERSION,
        nr_modules=len(modules),
        modlist_paddr=modlist_addr if modules else 0,
        cmdline_paddr=cmdline_addr,
        rsdp_paddr=rsdp_addr or 0,
        memmap_paddr=memmap_addr,
        memmap_entries=len(e820),
    )
    blob = bytearray(info)
    for gpa, size in modules:
        blob += bytes(HvmModlistEntry(paddr=gpa, size=size))
    for entry in e820:
        blob += bytes(HvmMemmapTableEntry(addr=entry.addr, size=entry.size, type=entry.type))
    mem.write(info_addr, blob)
    return info_addr
