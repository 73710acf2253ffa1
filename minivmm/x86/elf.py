"""The part of an ELF file a kernel loader reads: the file header, the program headers
and the notes (System V ABI, "ELF-64 Object File Format" 1.5: §3 the file header, §6
program headers, §7 notes; section headers, §4, only for notes that no PT_NOTE segment
carries).

A few struct unpacks instead of pyelftools, whose import (15-25 ms) was the largest single
cost of starting a VM from a vmlinux. Every offset and size is checked against the file's
size before it is read; anything that does not add up is an :class:`ElfError`, which the
loader turns into a one-line usage error.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Final, NamedTuple

ELFCLASS64: Final = 2
ELFDATA2LSB: Final = 1
EM_X86_64: Final = 62
ET_EXEC: Final = 2
ET_DYN: Final = 3
PT_LOAD: Final = 1
PT_NOTE: Final = 4
SHT_NOTE: Final = 7
PN_XNUM: Final = 0xFFFF  # e_phnum escape: the real count is in section 0 (§3)

# e_ident (16 bytes), then e_type .. e_shstrndx of an ELF64 header (§3, 64 bytes).
_EHDR: Final = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR: Final = struct.Struct("<IIQQQQQQ")  # §6: p_type .. p_align, 56 bytes
_SHDR: Final = struct.Struct("<IIQQQQIIQQ")  # §4: sh_name .. sh_entsize, 64 bytes

# e_machine values (the ELF ABI's registry) named in the refusal of a foreign kernel.
_MACHINES: Final = {3: "x86", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "IBM S/390",
                    40: "ARM", 50: "IA-64", 62: "x64", 183: "AArch64", 243: "RISC-V",
                    258: "LoongArch"}
_TYPES: Final = {0: "ET_NONE", 1: "ET_REL", 4: "ET_CORE"}


class ElfError(Exception):
    """The file is truncated or its headers are inconsistent."""


class TruncatedElf(ElfError):
    """A header or a segment lies beyond the end of the file."""


class ForeignElf(Exception):
    """A well-formed ELF file that is not a 64-bit little-endian x86-64 executable."""


class Segment(NamedTuple):
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


class ElfKernel(NamedTuple):
    entry: int
    segments: list[Segment]
    notes: bytes  # every PT_NOTE segment's bytes (or SHT_NOTE section's, if none)


def machine_name(e_machine: int) -> str:
    return _MACHINES.get(e_machine, f"machine {e_machine}")


def read_elf(f: BinaryIO, size: int) -> ElfKernel:
    """The x86-64 executable in ``f`` (``size`` bytes). Raises ForeignElf for a valid
    ELF file of another kind, ElfError for a truncated or inconsistent one."""
    f.seek(0)
    head = f.read(_EHDR.size)
    if len(head) < 20:
        raise TruncatedElf(f"the ELF header needs {_EHDR.size} bytes, the file has {len(head)}")
    ei_class, ei_data = head[4], head[5]
    order = "<" if ei_data == ELFDATA2LSB else ">"
    e_machine = struct.unpack_from(order + "H", head, 18)[0]
    bits = 64 if ei_class == ELFCLASS64 else 32
    if ei_class != ELFCLASS64 or ei_data != ELFDATA2LSB or e_machine != EM_X86_64:
        endian = "" if ei_data == ELFDATA2LSB else ", big-endian"
        raise ForeignElf(f"an ELF file for {machine_name(e_machine)} ({bits}-bit{endian}), "
                         "not x86-64; pass a 64-bit x86 kernel")
    if len(head) < _EHDR.size:
        raise TruncatedElf(f"the ELF header needs {_EHDR.size} bytes, the file has {len(head)}")
    (_, e_type, _, _, e_entry, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize,
     e_shnum, _) = _EHDR.unpack(head)
    if e_type not in (ET_EXEC, ET_DYN):
        name = _TYPES.get(e_type, f"file of type {e_type}")
        raise ForeignElf(f"an ELF {name}, not an executable kernel")
    tables_end = max(e_phoff + e_phnum * e_phentsize, e_shoff + e_shnum * e_shentsize)
    if tables_end > size:
        raise TruncatedElf(f"its headers end at byte {tables_end}, the file has {size}")
    if e_phnum == PN_XNUM:
        raise ElfError("more than 65534 program headers")
    if e_phnum and e_phentsize < _PHDR.size:
        raise ElfError(f"program header entries of {e_phentsize} bytes, not {_PHDR.size}")
    segments: list[Segment] = []
    if e_phnum:
        f.seek(e_phoff)
        table = _read_exact(f, e_phnum * e_phentsize)
        for i in range(e_phnum):
            p_type, _, off, vaddr, paddr, filesz, memsz, _ = _PHDR.unpack_from(
                table, i * e_phentsize)
            if off + filesz > size:
                raise TruncatedElf(f"a segment ends at byte {off + filesz}, the file has {size}")
            segments.append(Segment(p_type, off, vaddr, paddr, filesz, memsz))
    notes = b"".join(_read_at(f, s.offset, s.filesz) for s in segments if s.type == PT_NOTE)
    if not notes and e_shnum:
        notes = _section_notes(f, size, e_shoff, e_shnum, e_shentsize)
    return ElfKernel(e_entry, segments, notes)


def _section_notes(f: BinaryIO, size: int, shoff: int, shnum: int, shentsize: int) -> bytes:
    """The bytes of every SHT_NOTE section that lies inside the file."""
    if shentsize < _SHDR.size:
        raise ElfError(f"section header entries of {shentsize} bytes, not {_SHDR.size}")
    f.seek(shoff)
    table = _read_exact(f, shnum * shentsize)
    notes = []
    for i in range(shnum):
        _, sh_type, _, _, off, sz, _, _, _, _ = _SHDR.unpack_from(table, i * shentsize)
        if sh_type == SHT_NOTE and off + sz <= size:
            notes.append(_read_at(f, off, sz))
    return b"".join(notes)


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return _read_exact(f, n)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ElfError(f"the file ended {n - len(data)} bytes early (did it shrink?)")
    return data
