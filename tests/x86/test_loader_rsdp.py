"""Every boot path hands the kernel the RSDP's address when there are ACPI tables, and
nothing when there are none (zero-page.rst: acpi_rsdp_addr at 0x070; PVH: rsdp_paddr)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from minivmm.memory import GuestMemory
from minivmm.x86 import acpi, layout, pvh
from minivmm.x86.bootparams import BootParams
from minivmm.x86.loader import load_kernel

from .synthetic_kernels import ElfBuilder, make_bzimage

MiB = 1 << 20


def _rsdp_in_zero_page(mem: GuestMemory) -> int:
    page = mem.read(layout.ZERO_PAGE_ADDR, 4096)
    assert BootParams.acpi_rsdp_addr.offset == 0x70
    return int(BootParams.from_buffer_copy(page).acpi_rsdp_addr)


def _rsdp_in_start_info(mem: GuestMemory) -> int:
    info = mem.read(layout.PVH_INFO_ADDR, ctypes.sizeof(pvh.HvmStartInfo))
    return int(pvh.HvmStartInfo.from_buffer_copy(info).rsdp_paddr)


@pytest.mark.parametrize("with_acpi", [True, False])
def test_bzimage_zero_page(tmp_path: Path, with_acpi: bool) -> None:
    mem = GuestMemory(32 * MiB)
    rsdp = acpi.write_acpi_tables(mem, cpus=2) if with_acpi else None
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    info = load_kernel(mem, kernel, initrd=None, cmdline="", rsdp_addr=rsdp)
    assert info.protocol == "linux64"
    assert _rsdp_in_zero_page(mem) == (layout.ACPI_RSDP_ADDR if with_acpi else 0)


@pytest.mark.parametrize("with_acpi", [True, False])
@pytest.mark.parametrize("prefer_pvh", [True, False])
def test_elf_pvh_and_zero_page(build_elf: ElfBuilder, with_acpi: bool,
                               prefer_pvh: bool) -> None:
    mem = GuestMemory(16 * MiB)
    rsdp = acpi.write_acpi_tables(mem, cpus=1) if with_acpi else None
    info = load_kernel(mem, build_elf(), initrd=None, cmdline="", prefer_pvh=prefer_pvh,
                       rsdp_addr=rsdp)
    expected = layout.ACPI_RSDP_ADDR if with_acpi else 0
    if prefer_pvh:
        assert info.protocol == "pvh"
        assert _rsdp_in_start_info(mem) == expected
    else:
        assert info.protocol == "linux64"
        assert _rsdp_in_zero_page(mem) == expected
    if with_acpi:
        assert mem.read(expected, 8) == b"RSD PTR "
