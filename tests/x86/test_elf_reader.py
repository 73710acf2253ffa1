"""minivmm.x86.elf against pyelftools (the reference reader, a test dependency) on the
kernels linked here and built by `make guest`, and its refusals of odd headers."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from minivmm.x86 import elf, pvh

from .synthetic_kernels import ElfBuilder

OUT = Path(__file__).resolve().parents[2] / "guest" / "out"


def _reference(path: Path) -> tuple[int, list[tuple[int, int, int, int, int, int]], bytes]:
    with open(path, "rb") as f:
        e = ELFFile(f)
        segs = [({"PT_LOAD": 1, "PT_NOTE": 4}.get(s["p_type"], -1), s["p_offset"],
                 s["p_vaddr"], s["p_paddr"], s["p_filesz"], s["p_memsz"])
                for s in e.iter_segments()]
        notes = b"".join(s.data() for s in e.iter_segments() if s["p_type"] == "PT_NOTE")
        return int(e["e_entry"]), segs, notes


def _read(path: Path) -> elf.ElfKernel:
    with open(path, "rb") as f:
        return elf.read_elf(f, path.stat().st_size)


def _kernels(build_elf: ElfBuilder) -> list[Path]:
    paths = [build_elf(), build_elf(pvh=False), build_elf(virt=0xFFFF_FFFF_8000_0000)]
    return paths + [p for p in (OUT / "probe.elf", OUT / "vmlinux") if p.is_file()]


def test_same_header_segments_and_notes_as_pyelftools(build_elf: ElfBuilder) -> None:
    for path in _kernels(build_elf):
        entry, segs, notes = _reference(path)
        got = _read(path)
        assert got.entry == entry
        known = [(t, *rest) for t, *rest in segs if t in (1, 4)]
        assert [tuple(s) for s in got.segments if s.type in (1, 4)] == known
        assert got.notes == notes


def test_the_notes_give_the_pvh_entry(build_elf: ElfBuilder) -> None:
    assert pvh.find_pvh_entry(_read(build_elf()).notes) is not None
    assert pvh.find_pvh_entry(_read(build_elf(pvh=False)).notes) is None


def _header(data: bytearray, field: str, value: int) -> bytes:
    offsets = {"e_type": (16, "H"), "e_phentsize": (54, "H"), "e_phnum": (56, "H"),
               "e_shentsize": (58, "H")}
    off, fmt = offsets[field]
    struct.pack_into("<" + fmt, data, off, value)
    return bytes(data)


@pytest.mark.parametrize(("field", "value", "error", "message"), [
    ("e_type", 1, elf.ForeignElf, "an ELF ET_REL, not an executable kernel"),
    ("e_type", 9, elf.ForeignElf, "an ELF file of type 9"),
    ("e_phnum", 0xFFFF, elf.ElfError, "(headers end|65534)"),  # truncated, or PN_XNUM
    ("e_phentsize", 8, elf.ElfError, "program header entries of 8 bytes"),
])
def test_odd_headers_are_refused(build_elf: ElfBuilder, field: str, value: int,
                                 error: type[Exception], message: str) -> None:
    data = _header(bytearray(build_elf().read_bytes()), field, value)
    with pytest.raises(error, match=message):
        elf.read_elf(io.BytesIO(data), len(data))


def test_a_big_endian_or_32_bit_file_is_named() -> None:
    for ident, machine, want in ((b"\x7fELF\x02\x02", struct.pack(">H", 62), r"x64 \(64-bit, big"),
                                 (b"\x7fELF\x01\x01", struct.pack("<H", 3), r"x86 \(32-bit\)")):
        data = ident + bytes(12) + machine + bytes(64)
        with pytest.raises(elf.ForeignElf, match=rf"for {want}.*not x86-64"):
            elf.read_elf(io.BytesIO(data), len(data))


def test_notes_from_sections_when_no_segment_has_them(build_elf: ElfBuilder) -> None:
    """A PT_NOTE turned into PT_NULL: the notes come from the SHT_NOTE section, as
    pyelftools' users did; a short section header entry size is refused."""
    data = bytearray(build_elf().read_bytes())
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == elf.PT_NOTE:
            struct.pack_into("<I", data, phoff + i * phentsize, 0)
    shnum, = struct.unpack_from("<H", data, 60)
    assert shnum, "the builder links section headers"
    got = elf.read_elf(io.BytesIO(bytes(data)), len(data))
    assert pvh.find_pvh_entry(got.notes) is not None
    short = _header(data, "e_shentsize", 40)
    with pytest.raises(elf.ElfError):
        elf.read_elf(io.BytesIO(short), len(short))
