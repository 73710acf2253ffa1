"""Fixtures for the x86 boot tests: ELF kernels linked with the system binutils."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from .synthetic_kernels import ASM, LDS, ElfBuilder


@pytest.fixture(scope="session")
def build_elf(tmp_path_factory: pytest.TempPathFactory) -> ElfBuilder:
    """build_elf(pvh=True, virt=0, phys=0x200000, bits=64) -> path of a linked ELF."""
    if not (shutil.which("as") and shutil.which("ld") and shutil.which("gcc")):
        pytest.skip("gcc/binutils not installed")
    out = tmp_path_factory.mktemp("elf")
    cache: dict[tuple[bool, int, int, int], pathlib.Path] = {}

    def build(
        *, pvh: bool = True, virt: int = 0, phys: int = 0x20_0000, bits: int = 64
    ) -> pathlib.Path:
        key = (pvh, virt, phys, bits)
        if key in cache:
            return cache[key]
        name = f"k-{int(pvh)}-{virt:x}-{phys:x}-{bits}"
        src = (
            ASM if pvh else ASM.replace('.section .note.Xen, "a", @note', '.section .comment2, ""')
        )
        (out / f"{name}.s").write_text(src)
        (out / f"{name}.lds").write_text(LDS.format(virt=hex(virt), phys=hex(phys)))
        mode = ("--64", "elf_x86_64") if bits == 64 else ("--32", "elf_i386")
        subprocess.run(
            ["as", mode[0], "--defsym", f"VIRT={virt:#x}", "-o", str(out / f"{name}.o"),
             str(out / f"{name}.s")],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["ld", "-m", mode[1], "-static", "-nostdlib", "-z", "max-page-size=0x1000",
             "-T", str(out / f"{name}.lds"), "-o", str(out / name), str(out / f"{name}.o")],
            check=True,
        )  # fmt: skip
        cache[key] = out / name
        return out / name

    return build
