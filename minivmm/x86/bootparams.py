"""The Linux zero page (``struct boot_params``) and the kernel command line.

Layouts follow ``asm/bootparam.h`` field for field (tests compare them with the C header);
the meaning of each field is the Linux x86 boot protocol's (Documentation/arch/x86/boot.rst,
"THE REAL-MODE KERNEL HEADER" and "64-bit BOOT PROTOCOL"). Structures nobody here reads
(screen_info, edid_info, edd tables...) are byte arrays of their size under their C name.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Final

from ..errors import UsageError
from ..memory import GuestMemory
from . import layout
from .e820 import E820Entry

# Setup header constants (boot.rst, "THE REAL-MODE KERNEL HEADER").
SETUP_HEADER_OFFSET: Final = 0x1F1
BOOT_FLAG: Final = 0xAA55
HDRS_MAGIC: Final = 0x53726448  # "HdrS"
LOADER_TYPE_UNDEFINED: Final = 0xFF  # boot.rst: "0xFF: undefined boot loader"
LOADED_HIGH: Final = 1 << 0
CAN_USE_HEAP: Final = 1 << 7
XLF_KERNEL_64: Final = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G: Final = 1 << 1
HEAP_END_PTR: Final = 0xFE00  # end of setup heap, relative to the real-mode code, - 0x200
E820_MAX_ENTRIES_ZEROPAGE: Final = 128
ZERO_PAGE_SIZE: Final = 0x1000


class SetupHeader(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("setup_sects", ctypes.c_uint8),
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),
        ("jump", ctypes.c_uint16),
        ("header", ctypes.c_uint32),
        ("version", ctypes.c_uint16),
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),
        ("loadflags", ctypes.c_uint8),
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),
        ("ramdisk_image", ctypes.c_uint32),
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),
        ("initrd_addr_max", ctypes.c_uint32),
        ("kernel_alignment", ctypes.c_uint32),
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),
        ("cmdline_size", ctypes.c_uint32),
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),
        ("payload_length", ctypes.c_uint32),
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),
        ("init_size", ctypes.c_uint32),
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),
    )


class BootE820Entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    )


_EDD_MBR_SIG_MAX: Final = 16
_EDDMAXNR: Final = 6
_EDD_INFO_SIZE: Final = 82


class BootParams(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("screen_info", ctypes.c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),  # 0x054
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ctypes.c_uint8 * 16),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),  # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),  # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 16),  # 0x0a0
        ("olpc_ofw_header", ctypes.c_uint8 * 16),  # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),  # 0x0cc
        ("cc_blob_address", ctypes.c_uint32),  # 0x13c
        ("edid_info", ctypes.c_uint8 * 128),  # 0x140
        ("efi_info", ctypes.c_uint8 * 32),  # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1e0
        ("scratch", ctypes.c_uint32),  # 0x1e4
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),  # 0x1ea
        ("kbd_status", ctypes.c_uint8),  # 0x1eb
        ("secure_boot", ctypes.c_uint8),  # 0x1ec
        ("_pad5", ctypes.c_uint8 * 2),  # 0x1ed
        ("sentinel", ctypes.c_uint8),  # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),  # 0x1f0
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - SETUP_HEADER_OFFSET - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * _EDD_MBR_SIG_MAX),  # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),  # 0xcd0
        ("eddbuf", ctypes.c_uint8 * (_EDDMAXNR * _EDD_INFO_SIZE)),  # 0xd00
        ("_pad9", ctypes.c_uint8 * 276),  # 0xeec
    )


assert ctypes.sizeof(BootParams) == ZERO_PAGE_SIZE


def write_cmdline(mem: GuestMemory, cmdline: str, limit: int, *, limit_source: str) -> int:
    """Write ``cmdline`` NUL-terminated at layout.CMDLINE_ADDR; return its length.

    ``limit`` is the longest command line (without the NUL) the kernel accepts;
    ``limit_source`` says where that limit comes from, for the error message.
    """
    data = cmdline.encode()
    if b"\0" in data:
        raise UsageError("the command line contains a NUL byte; remove it", field="cmdline")
    limit = min(limit, layout.CMDLINE_MAX - 1)
    if len(data) > limit:
        raise UsageError(
            f"the command line is {len(data)} bytes, but {limit_source} accepts at most {limit}; "
            "shorten it", field="cmdline")
    mem.write(layout.CMDLINE_ADDR, data + b"\0")
    return len(data)


def fill_boot_params(
    bp: BootParams,
    *,
    e820: Sequence[E820Entry],
    initrd: tuple[int, int] | None,
    rsdp_addr: int | None = None,
) -> None:
    """Fill what the loader owns in a zero page whose setup header is already in place:
    loader identity, command line, initrd, memory map (boot.rst, "64-bit BOOT PROTOCOL")
    and the ACPI RSDP's address, if there are ACPI tables (zero-page.rst: acpi_rsdp_addr,
    offset 0x070, read by every kernel that has the field, whatever its boot protocol)."""
    hdr = bp.hdr
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.cmd_line_ptr = layout.CMDLINE_ADDR
    bp.ext_cmd_line_ptr = layout.CMDLINE_ADDR >> 32
    gpa, size = initrd if initrd is not None else (0, 0)
    hdr.ramdisk_image = gpa & 0xFFFF_FFFF
    hdr.ramdisk_size = size & 0xFFFF_FFFF
    bp.ext_ramdisk_image = gpa >> 32
    bp.ext_ramdisk_size = size >> 32
    bp.acpi_rsdp_addr = rsdp_addr or 0
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(e820)} e820 entries do not fit in the zero page")
    bp.e820_entries = len(e820)
    for slot, entry in zip(bp.e820_table, e820, strict=False):
        slot.addr, slot.size, slot.type = entry.addr, entry.size, entry.type


def write_boot_params(mem: GuestMemory, bp: BootParams) -> int:
    """Write the zero page at layout.ZERO_PAGE_ADDR and return that address."""
    mem.write(layout.ZERO_PAGE_ADDR, bytes(bp))
    return layout.ZERO_PAGE_ADDR
