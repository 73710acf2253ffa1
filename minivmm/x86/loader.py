"""Kernel loaders: a bzImage through the Linux x86 boot protocol, an ELF vmlinux through
PVH or the 64-bit boot protocol.

:func:`load_kernel` reads the kernel (and initrd) straight into guest memory and writes
everything the kernel's entry point expects to find there -- the zero page or PVH start
info, the command line, the memory map -- and returns a :class:`BootInfo` saying how to
enter it. GDT, page tables and registers are the vCPU set-up's job.

Every problem with the user's files is a :class:`~minivmm.errors.UsageError` whose one
line names the file, the problem and the fix.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import struct
from typing import BinaryIO, Final, Literal, NamedTuple

from ..errors import HostError, UsageError
from ..memory import GuestMemory
from . import bootparams as bp
from . import layout, pvh
from .e820 import e820_map, low_ram_end

PAGE_SIZE: Final = 0x1000
MIN_BOOT_PROTOCOL: Final = 0x206  # cmdline_size appears in 2.06
XLF_BOOT_PROTOCOL: Final = 0x20C  # xloadflags (and so XLF_KERNEL_64) appear in 2.12
ENTRY_64_OFFSET: Final = 0x200  # boot.rst: the 64-bit entry is 0x200 past the load address
SECTOR: Final = 512
DEFAULT_SETUP_SECTS: Final = 4  # boot.rst: "If this field is 0, the real value is 4"
ELF_MAGIC: Final = b"\x7fELF"
# What a loader tells a kernel entered without a bzImage header (64-bit boot protocol).
ELF_BOOT_PROTOCOL: Final = 0x20C
ELF_KERNEL_ALIGNMENT: Final = 0x100_0000
ELF_INITRD_ADDR_MAX: Final = 0x7FFF_FFFF  # what x86-64 kernels put in initrd_addr_max
# The errors pyelftools raises on a malformed file, besides its own two (added on import).
_PARSE_ERRORS: Final = (struct.error, ValueError, IndexError, KeyError)


class BootInfo(NamedTuple):
    """How to enter the loaded kernel.

    linux64: long mode, RIP=entry, RSI=boot_params_addr (the zero page).
    pvh: 32-bit protected mode, paging off, EIP=entry, EBX=boot_params_addr (hvm_start_info).
    kernel_end: first byte after the memory the kernel occupies (for a bzImage, after the
    buffer it decompresses into: init_size bytes at its preferred address).
    """

    protocol: Literal["pvh", "linux64"]
    entry: int
    boot_params_addr: int
    kernel_end: int
    initrd: tuple[int, int] | None


def load_kernel(
    mem: GuestMemory,
    kernel: pathlib.Path,
    *,
    initrd: pathlib.Path | None,
    cmdline: str,
    prefer_pvh: bool = True,
    rsdp_addr: int | None = None,
) -> BootInfo:
    """Load ``kernel`` (a bzImage or an x86-64 ELF) and ``initrd`` into ``mem``.

    ``rsdp_addr``: where the ACPI tables' RSDP is (acpi.write_acpi_tables), handed to the
    kernel in the zero page or the PVH start info; None when there are no tables.
    """
    with _open(kernel, "kernel") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(PAGE_SIZE)
        if not head:
            raise UsageError(f"{kernel}: the kernel file is empty; pass a bzImage or a vmlinux",
                             field="kernel")
        if head.startswith(ELF_MAGIC):
            return _load_elf(mem, kernel, f, size, initrd, cmdline, prefer_pvh, rsdp_addr)
        if _is_bzimage(head):
            return _load_bzimage(mem, kernel, f, size, head, initrd, cmdline, rsdp_addr)
    raise UsageError(
        f"{kernel}: not a Linux kernel (neither a bzImage nor an ELF file); "
        "pass a bzImage or a vmlinux", field="kernel")


def _open(path: pathlib.Path, option: str) -> BinaryIO:
    try:
        return open(path, "rb")  # the caller's `with` closes it
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory; pass a file", field=option) from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; check the path", field=option) from None
    except OSError as e:
        raise UsageError(f"{path}: cannot open ({e.strerror})", field=option) from None


def _read_into(f: BinaryIO, offset: int, view: memoryview) -> int:
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            break
        done += n
    return done


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _check_in_ram(mem: GuestMemory, path: pathlib.Path, what: str, gpa: int, size: int) -> None:
    if gpa < layout.HIMEM_START:
        raise UsageError(
            f"{path}: {what} at 0x{gpa:x} overlaps the boot data below 0x{layout.HIMEM_START:x}; "
            "link the kernel at or above 1 MiB", field="kernel")
    if not mem.contains(gpa, size):
        raise UsageError(
            f"{path}: {what} at 0x{gpa:x}-0x{gpa + size:x} does not fit in guest memory "
            f"({mem.size >> 20} MiB); give the guest more memory", field="kernel")


# ---- bzImage: Documentation/arch/x86/boot.rst ----------------------------------------


def _is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x202 and struct.unpack_from("<H", head, 0x1FE)[0] == bp.BOOT_FLAG


def _load_bzimage(
    mem: GuestMemory,
    path: pathlib.Path,
    f: BinaryIO,
    size: int,
    head: bytes,
    initrd: pathlib.Path | None,
    cmdline: str,
    rsdp_addr: int | None,
) -> BootInfo:
    hdr_size = ctypes.sizeof(bp.SetupHeader)
    if len(head) < bp.SETUP_HEADER_OFFSET + hdr_size:
        raise UsageError(f"{path}: truncated bzImage ({size} bytes); rebuild it or copy it again",
                         field="kernel")
    hdr = bp.SetupHeader.from_buffer_copy(head, bp.SETUP_HEADER_OFFSET)
    # "THE REAL-MODE KERNEL HEADER": the "HdrS" magic marks protocol 2.00 and later.
    if hdr.header != bp.HDRS_MAGIC:
        raise UsageError(
            f"{path}: boot sector without the 'HdrS' setup header (a pre-2.00 kernel); "
            "minivmm boots kernels with boot protocol 2.06 or newer", field="kernel")
    version = f"{hdr.version >> 8}.{hdr.version & 0xFF:02d}"
    if hdr.version < MIN_BOOT_PROTOCOL:
        raise UsageError(
            f"{path}: boot protocol {version} is too old; minivmm needs 2.06 or newer "
            "(Linux 2.6.22+)", field="kernel")
    if hdr.version < XLF_BOOT_PROTOCOL or not hdr.xloadflags & bp.XLF_KERNEL_64:
        raise UsageError(
            f"{path}: no 64-bit entry point (boot protocol {version}, XLF_KERNEL_64 not set); "
            "pass a 64-bit x86 kernel", field="kernel")

    # The setup code is setup_sects sectors after the boot sector; the protected-mode
    # kernel follows it to the end of the file.
    setup_sects = hdr.setup_sects or DEFAULT_SETUP_SECTS
    kernel_offset = (setup_sects + 1) * SECTOR
    hdr_end = 0x202 + head[0x201]
    payload = size - kernel_offset
    # syssize counts the protected-mode part in 16-byte paragraphs; the kernel build pads
    # the image to a whole number of them, so a complete file is at least that long.
    if payload <= 0 or payload < hdr.syssize * 16 or hdr_end > len(head):
        raise UsageError(
            f"{path}: truncated bzImage ({size} bytes, its header describes "
            f"{kernel_offset + hdr.syssize * 16}); rebuild it or copy it again", field="kernel")
    if hdr.payload_offset + hdr.payload_length > payload:
        raise UsageError(
            f"{path}: truncated bzImage (compressed payload ends past the file end); "
            "rebuild it or copy it again", field="kernel")

    # Load at the preferred address if it fits; a relocatable kernel may go lower.
    ram_end = low_ram_end(mem)
    pref = hdr.pref_address
    align = max(hdr.kernel_alignment, PAGE_SIZE) if hdr.relocatable_kernel else 1
    fits = pref >= layout.HIMEM_START and pref + max(payload, hdr.init_size) <= ram_end
    load = pref if fits or not hdr.relocatable_kernel else layout.HIMEM_START
    # The kernel decompresses itself into init_size bytes at its load address aligned up
    # to kernel_alignment, but never below its preferred address (LOAD_PHYSICAL_ADDR).
    out = max(pref, (load + align - 1) // align * align) if hdr.relocatable_kernel else load
    kernel_end = max(load + payload, out + hdr.init_size)
    _check_in_ram(mem, path, "the kernel (with its init_size)", load, kernel_end - load)
    if kernel_end > ram_end:
        raise UsageError(f"{path}: the kernel needs memory up to 0x{kernel_end:x}; give the "
                         "guest more memory", field="kernel")
    if _read_into(f, kernel_offset, mem.translate(load, payload)) != payload:
        raise UsageError(f"{path}: the file shrank while it was read; try again", field="kernel")

    # "64-bit BOOT PROTOCOL": a zeroed boot_params with the setup header copied in.
    page = bytearray(bp.ZERO_PAGE_SIZE)
    page[bp.SETUP_HEADER_OFFSET : hdr_end] = head[bp.SETUP_HEADER_OFFSET : hdr_end]
    params = bp.BootParams.from_buffer(page)
    params.hdr.code32_start = load
    bp.write_cmdline(
        mem, cmdline, params.hdr.cmdline_size, limit_source="the kernel's cmdline_size"
    )
    initrd_at = _load_initrd(mem, initrd, kernel_end, params.hdr.initrd_addr_max)
    bp.fill_boot_params(params, e820=e820_map(mem), initrd=initrd_at, rsdp_addr=rsdp_addr)
    return BootInfo(
        "linux64", load + ENTRY_64_OFFSET, bp.write_boot_params(mem, params), kernel_end, initrd_at
    )


# ---- ELF vmlinux: PVH (Xen start_info.h) or the 64-bit boot protocol ---------------------


class _Segment(NamedTuple):
    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int


def _corrupt(path: pathlib.Path, e: Exception) -> UsageError:
    return UsageError(f"{path}: truncated or corrupt ELF file ({e}); rebuild it or copy it again",
                      field="kernel")


def _load_elf(
    mem: GuestMemory,
    path: pathlib.Path,
    f: BinaryIO,
    size: int,
    initrd: pathlib.Path | None,
    cmdline: str,
    prefer_pvh: bool,
    rsdp_addr: int | None,
) -> BootInfo:
    try:
        e_entry, loads, notes = _read_elf(path, f, size)
    except ImportError:
        raise HostError(f"{path} is an ELF kernel, and reading one needs pyelftools, which "
                        "is not installed: pip install pyelftools") from None
    if not loads:
        raise UsageError(f"{path}: ELF file without loadable segments; pass a vmlinux",
                         field="kernel")

    for s in loads:
        if s.filesz > s.memsz:
            raise UsageError(
                f"{path}: corrupt ELF segment (file size > memory size at 0x{s.paddr:x})",
                field="kernel")
        _check_in_ram(mem, path, "ELF segment", s.paddr, s.memsz)
    for s in loads:
        view = mem.translate(s.paddr, s.memsz)
        if _read_into(f, s.offset, view[: s.filesz]) != s.filesz:
            raise UsageError(f"{path}: the file shrank while it was read; try again",
                             field="kernel")
        view[s.filesz :] = bytes(s.memsz - s.filesz)
    kernel_end = max(s.paddr + s.memsz for s in loads)

    pvh_entry = pvh.find_pvh_entry(notes) if prefer_pvh else None
    entry = _physical_entry(path, loads, pvh_entry if pvh_entry is not None else e_entry)
    cmdline_addr = layout.CMDLINE_ADDR
    bp.write_cmdline(mem, cmdline, layout.CMDLINE_MAX - 1, limit_source="minivmm")
    initrd_at = _load_initrd(mem, initrd, kernel_end, ELF_INITRD_ADDR_MAX)
    e820 = e820_map(mem)
    if pvh_entry is not None:
        info = pvh.write_start_info(mem, cmdline_addr=cmdline_addr, e820=e820, initrd=initrd_at,
                                    rsdp_addr=rsdp_addr)
        return BootInfo("pvh", entry, info, kernel_end, initrd_at)

    # No setup header in a vmlinux: fill in what the 64-bit entry reads from one.
    params = bp.BootParams()
    hdr = params.hdr
    hdr.boot_flag = bp.BOOT_FLAG
    hdr.header = bp.HDRS_MAGIC
    hdr.version = ELF_BOOT_PROTOCOL
    hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT
    hdr.initrd_addr_max = ELF_INITRD_ADDR_MAX
    hdr.cmdline_size = layout.CMDLINE_MAX - 1
    hdr.xloadflags = bp.XLF_KERNEL_64
    bp.fill_boot_params(params, e820=e820, initrd=initrd_at, rsdp_addr=rsdp_addr)
    return BootInfo("linux64", entry, bp.write_boot_params(mem, params), kernel_end, initrd_at)


def _read_elf(path: pathlib.Path, f: BinaryIO, size: int
              ) -> tuple[int, list[_Segment], bytes]:
    """(e_entry, the PT_LOAD segments, the notes) of an ELF kernel, read through
    pyelftools' ELF structures (ELF-64 gABI: the file header, the program headers, and the
    section headers when no PT_NOTE segment carries the notes). Only those: elffile's
    import (DWARF, relocations, dynamic sections) costs ~10 ms more than the structures
    and a kernel needs none of it. ImportError without pyelftools."""
    # pyelftools is imported only when the kernel is an ELF file.
    from elftools.common.exceptions import ELFError
    from elftools.common.utils import struct_parse
    from elftools.construct import ConstructError
    from elftools.elf.structs import ELFStructs

    try:
        f.seek(0)
        ident = f.read(6)
        if len(ident) < 6:
            raise UsageError(f"{path}: truncated ELF file ({size} bytes); rebuild it or copy "
                             "it again", field="kernel")
        elfclass = {1: 32, 2: 64}.get(ident[4])
        if elfclass is None or ident[5] not in (1, 2):
            raise _corrupt(path, ValueError(f"EI_CLASS {ident[4]}, EI_DATA {ident[5]}"))
        structs = ELFStructs(little_endian=ident[5] == 1, elfclass=elfclass)
        structs.create_basic_structs()
        ehdr = struct_parse(structs.Elf_Ehdr, f, stream_pos=0)
        machine = ehdr["e_machine"]
        if elfclass != 64 or machine != "EM_X86_64" or ident[5] != 1:
            arch = _ARCH_NAMES.get(machine, str(machine).removeprefix("EM_"))
            raise UsageError(f"{path}: an ELF file for {arch} ({elfclass}-bit), not x86-64; "
                             "pass a 64-bit x86 kernel", field="kernel")
        if ehdr["e_type"] not in ("ET_EXEC", "ET_DYN"):
            raise UsageError(f"{path}: an ELF {ehdr['e_type']}, not an executable kernel",
                             field="kernel")
        structs.create_advanced_structs(ehdr["e_type"], machine, ehdr["e_ident"]["EI_OSABI"])
        tables_end = max(ehdr["e_phoff"] + ehdr["e_phnum"] * ehdr["e_phentsize"],
                         ehdr["e_shoff"] + ehdr["e_shnum"] * ehdr["e_shentsize"])
        if tables_end > size:
            raise UsageError(
                f"{path}: truncated ELF file (its headers end at byte {tables_end}, the file "
                f"has {size}); rebuild it or copy it again", field="kernel")
        if ehdr["e_phnum"] and ehdr["e_phentsize"] < structs.Elf_Phdr.sizeof():
            raise _corrupt(path, ValueError(f"e_phentsize {ehdr['e_phentsize']}"))
        if ehdr["e_shnum"] and ehdr["e_shentsize"] < structs.Elf_Shdr.sizeof():
            raise _corrupt(path, ValueError(f"e_shentsize {ehdr['e_shentsize']}"))
        loads: list[_Segment] = []
        notes = b""
        for i in range(ehdr["e_phnum"]):
            ph = struct_parse(structs.Elf_Phdr, f, ehdr["e_phoff"] + i * ehdr["e_phentsize"])
            s = _Segment(int(ph["p_offset"]), int(ph["p_paddr"]), int(ph["p_vaddr"]),
                         int(ph["p_filesz"]), int(ph["p_memsz"]))
            if s.offset + s.filesz > size:
                raise UsageError(
                    f"{path}: truncated ELF file (a segment ends at byte {s.offset + s.filesz}, "
                    f"the file has {size}); rebuild it or copy it again", field="kernel")
            if ph["p_type"] == "PT_LOAD" and s.memsz:
                loads.append(s)
            elif ph["p_type"] == "PT_NOTE":
                f.seek(s.offset)
                notes += f.read(s.filesz)
        if not notes:
            for i in range(ehdr["e_shnum"]):
                sh = struct_parse(structs.Elf_Shdr, f, ehdr["e_shoff"] + i * ehdr["e_shentsize"])
                if sh["sh_type"] == "SHT_NOTE" and sh["sh_offset"] + sh["sh_size"] <= size:
                    f.seek(sh["sh_offset"])
                    notes += f.read(sh["sh_size"])
        return int(ehdr["e_entry"]), loads, notes
    except (ELFError, ConstructError, *_PARSE_ERRORS) as e:
        raise _corrupt(path, e) from None


#: e_machine names for the error that says which architecture a foreign ELF file is for
_ARCH_NAMES: Final = {
    "EM_386": "x86", "EM_AARCH64": "AArch64", "EM_ARM": "ARM", "EM_RISCV": "RISC-V",
    "EM_PPC64": "64-bit PowerPC", "EM_PPC": "PowerPC", "EM_S390": "IBM S/390",
    "EM_MIPS": "MIPS", "EM_LOONGARCH": "LoongArch", "EM_SPARCV9": "SPARC v9",
}


def _physical_entry(path: pathlib.Path, loads: list[_Segment], entry: int) -> int:
    """The entry as a physical address: vmlinux gives a physical e_entry; other ELF files
    give a virtual one, translated through the segment that contains it."""
    for s in loads:
        if s.paddr <= entry < s.paddr + s.memsz:
            return entry
    for s in loads:
        if s.vaddr <= entry < s.vaddr + s.memsz:
            return entry - s.vaddr + s.paddr
    raise UsageError(f"{path}: entry point 0x{entry:x} is outside every loadable segment",
                     field="kernel")


# ---- initrd ------------------------------------------------------------------------------


def _load_initrd(
    mem: GuestMemory, path: pathlib.Path | None, kernel_end: int, addr_max: int
) -> tuple[int, int] | None:
    """Load the initrd page-aligned as high as possible below min(addr_max + 1, top of RAM
    below 4 GiB) and above the kernel; return (gpa, size)."""
    if path is None:
        return None
    with _open(path, "initrd") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise UsageError(f"{path}: the initrd is empty; pass a cpio archive or none",
                             field="initrd")
        top = min(addr_max + 1, low_ram_end(mem))
        gpa = (top - size) & ~(PAGE_SIZE - 1)
        if gpa < _page_up(kernel_end):
            raise UsageError(
                f"{path}: initrd of {-(-size >> 20)} MiB does not fit below 0x{top:x} above the "
                f"kernel (which ends at 0x{kernel_end:x}); give the guest more memory",
                field="initrd")
        if _read_into(f, 0, mem.translate(gpa, size)) != size:
            raise UsageError(f"{path}: the file shrank while it was read; try again",
                             field="initrd")
    return gpa, size
