"""Synthetic kernels for the loader tests (imported by name: conftest is not importable).

A bzImage here is a boot sector + setup sectors carrying a setup header written at the
offsets boot.rst gives (independently of minivmm's ctypes layout), followed by a marked
payload. ELF kernels are assembled and linked from a tiny source with the system
binutils (tests that need them skip only where gcc/as/ld are absent).
"""

from __future__ import annotations

import pathlib
import struct
from collections.abc import Callable

HDRS = 0x53726448
PAYLOAD_MARK = b"MINIVMM-PROTECTED-MODE-KERNEL!!!"


def make_bzimage(
    *,
    version: int = 0x20F,
    setup_sects: int = 4,
    payload_size: int = 0x6000,
    pref_address: int = 0x20_0000,
    init_size: int = 0x4_0000,
    relocatable: int = 1,
    xloadflags: int = 1,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    kernel_alignment: int = 0x20_0000,
    boot_flag: int = 0xAA55,
    magic: int = HDRS,
) -> bytes:
    sects = setup_sects or 4
    setup = bytearray((sects + 1) * 512)
    payload = PAYLOAD_MARK + bytes(range(256)) * ((payload_size - len(PAYLOAD_MARK)) // 256 + 1)
    payload = payload[:payload_size]
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, (len(payload) + 15) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    struct.pack_into("<BB", setup, 0x200, 0xEB, 0x6A)  # jmp over the header: ends at 0x26c
    struct.pack_into("<I", setup, 0x202, magic)
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, 0x01)  # loadflags: LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x10_0000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, 0x100, 0x200)  # payload_offset, payload_length
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


ASM = r"""
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long pvh_start - VIRT
    .balign 4
    .text
    .globl _start
_start:
    hlt
    jmp _start
pvh_start:
    hlt
    .data
    .ascii "MINIVMM-ELF-DATA"
    .bss
    .space 0x3000
"""

LDS = """
ENTRY(_start)
PHDRS {{ text PT_LOAD; data PT_LOAD; note PT_NOTE; }}
SECTIONS {{
  . = {virt} + {phys};
  .text : AT({phys}) {{ *(.text) }} :text
  .note.Xen : {{ *(.note.Xen) }} :text :note
  . = ALIGN(0x1000);
  .data : AT(ADDR(.data) - {virt}) {{ *(.data) }} :data
  .bss : AT(ADDR(.bss) - {virt}) {{ *(.bss) }} :data
  /DISCARD/ : {{ *(.note.gnu.property) }}
}}
"""

ElfBuilder = Callable[..., pathlib.Path]
