"""The ctypes layouts of the zero page against the kernel's own header, and the PVH
structures against Xen's public start_info.h (sizes and offsets from its comments)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from minivmm.x86 import bootparams as bp
from minivmm.x86 import pvh

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/bootparam.h")


def _c_layout(tmp_path: Path, structs: dict[str, type[ctypes.Structure]]) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is not installed (linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <asm/bootparam.h>",
             "int main(void) {"]  # fmt: skip
    for cname, cls in structs.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field in cls._fields_:
            name = field[0]
            lines.append(f'printf("{cname}.{name} %zu\\n", offsetof(struct {cname}, {name}));')
    lines.append("return 0; }")
    (tmp_path / "layout.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")], check=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def test_zero_page_matches_asm_bootparam_h(tmp_path: Path) -> None:
    structs: dict[str, type[ctypes.Structure]] = {
        "boot_params": bp.BootParams,
        "setup_header": bp.SetupHeader,
        "boot_e820_entry": bp.BootE820Entry,
    }
    c = _c_layout(tmp_path, structs)
    for cname, cls in structs.items():
        assert c[cname] == ctypes.sizeof(cls), cname
        for field in cls._fields_:
            name = field[0]
            assert c[f"{cname}.{name}"] == getattr(cls, name).offset, f"{cname}.{name}"


def test_zero_page_is_one_page_and_header_at_0x1f1() -> None:
    assert ctypes.sizeof(bp.BootParams) == 4096
    assert bp.BootParams.hdr.offset == 0x1F1
    assert bp.BootParams.e820_table.offset == 0x2D0
    assert bp.SetupHeader.header.offset + 0x1F1 == 0x202
    assert bp.SetupHeader.kernel_info_offset.offset + 0x1F1 == 0x268


@pytest.mark.parametrize(
    ("cls", "size", "offsets"),
    [
        (pvh.HvmStartInfo, 56, {"nr_modules": 12, "modlist_paddr": 16, "cmdline_paddr": 24,
                                "rsdp_paddr": 32, "memmap_paddr": 40, "memmap_entries": 48}),
        (pvh.HvmModlistEntry, 32, {"size": 8, "cmdline_paddr": 16}),
        (pvh.HvmMemmapTableEntry, 24, {"size": 8, "type": 16, "reserved": 20}),
    ],
)  # fmt: skip
def test_pvh_structures_match_start_info_h(
    cls: type[ctypes.Structure], size: int, offsets: dict[str, int]
) -> None:
    assert ctypes.sizeof(cls) == size
    for name, offset in offsets.items():
        assert getattr(cls, name).offset == offset, name
