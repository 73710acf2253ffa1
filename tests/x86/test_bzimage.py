"""The bzImage loader against synthetic kernels: what lands where, and every refusal."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from minivmm.errors import UsageError
from minivmm.memory import GuestMemory
from minivmm.x86 import layout
from minivmm.x86.bootparams import BootParams
from minivmm.x86.e820 import E820_RAM, E820_RESERVED
from minivmm.x86.loader import load_kernel

from .synthetic_kernels import PAYLOAD_MARK, make_bzimage

MiB = 1 << 20


def _write(tmp_path: Path, data: bytes, name: str = "bzImage") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _zero_page(mem: GuestMemory) -> BootParams:
    return BootParams.from_buffer_copy(mem.read(layout.ZERO_PAGE_ADDR, 4096))


def test_loads_at_preferred_address_and_fills_zero_page(tmp_path: Path) -> None:
    mem = GuestMemory(32 * MiB)
    initrd = _write(tmp_path, b"INITRD" * 1000, "initrd")
    info = load_kernel(
        mem, _write(tmp_path, make_bzimage()), initrd=initrd, cmdline="console=ttyS0"
    )
    assert info.protocol == "linux64"
    assert info.entry == 0x20_0000 + 0x200
    assert info.boot_params_addr == layout.ZERO_PAGE_ADDR
    assert mem.read(0x20_0000, len(PAYLOAD_MARK)) == PAYLOAD_MARK
    assert info.kernel_end == 0x20_0000 + 0x4_0000  # init_size beyond the payload

    zp = _zero_page(mem)
    h = zp.hdr
    assert (h.boot_flag, h.header, h.version) == (0xAA55, 0x53726448, 0x20F)
    assert h.type_of_loader == 0xFF
    assert h.loadflags & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert h.heap_end_ptr != 0
    assert h.cmd_line_ptr == layout.CMDLINE_ADDR
    assert mem.read(layout.CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    assert h.cmdline_size == 2047  # the kernel's value is kept
    assert h.code32_start == 0x20_0000
    assert zp.sentinel == 0  # nothing beyond the setup header was copied

    # initrd: page-aligned, as high as it goes, contents intact
    assert info.initrd is not None
    gpa, size = info.initrd
    assert (h.ramdisk_image, h.ramdisk_size) == (gpa, size) == (gpa, 6000)
    assert gpa % 4096 == 0 and gpa + size <= 32 * MiB and gpa + size + 4096 > 32 * MiB
    assert mem.read(gpa, size) == b"INITRD" * 1000

    e820 = [(e.addr, e.size, e.type) for e in zp.e820_table[: zp.e820_entries]]
    assert e820 == [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, 0x10_0000 - layout.EBDA_START, E820_RESERVED),
        (0x10_0000, 31 * MiB, E820_RAM),
    ]


def test_relocatable_kernel_goes_to_himem_when_preferred_address_is_unusable(
    tmp_path: Path,
) -> None:
    mem = GuestMemory(16 * MiB)
    kernel = _write(tmp_path, make_bzimage(pref_address=0x8_0000, init_size=0x10_0000))
    info = load_kernel(mem, kernel, initrd=None, cmdline="")
    assert info.entry == layout.HIMEM_START + 0x200
    assert mem.read(layout.HIMEM_START, len(PAYLOAD_MARK)) == PAYLOAD_MARK
    # it decompresses at its load address aligned up to kernel_alignment (2 MiB)
    assert info.kernel_end == 0x20_0000 + 0x10_0000
    fixed = _write(tmp_path, make_bzimage(pref_address=0x8_0000, relocatable=0), "fixed")
    with pytest.raises(UsageError, match="overlaps the boot data below 0x100000"):
        load_kernel(mem, fixed, initrd=None, cmdline="")


def test_decompression_buffer_starts_at_the_preferred_address(tmp_path: Path) -> None:
    mem = GuestMemory(32 * MiB)
    kernel = _write(tmp_path, make_bzimage(pref_address=0x100_0000, init_size=0x80_0000))
    info = load_kernel(mem, kernel, initrd=None, cmdline="")
    assert info.entry == 0x100_0000 + 0x200
    assert info.kernel_end == 0x180_0000


def test_memory_too_small_for_the_decompressed_kernel(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    kernel = _write(tmp_path, make_bzimage(pref_address=0x100_0000, init_size=0x100_0000))
    with pytest.raises(UsageError, match=r"bzImage: .*give the guest more memory"):
        load_kernel(mem, kernel, initrd=None, cmdline="")


def test_non_relocatable_kernel_must_fit_at_its_address(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    kernel = _write(tmp_path, make_bzimage(pref_address=0x200_0000, relocatable=0))
    with pytest.raises(UsageError, match="give the guest more memory"):
        load_kernel(mem, kernel, initrd=None, cmdline="")


def test_setup_sects_zero_means_four(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    info = load_kernel(mem, _write(tmp_path, make_bzimage(setup_sects=0)), initrd=None, cmdline="")
    assert mem.read(info.entry - 0x200, len(PAYLOAD_MARK)) == PAYLOAD_MARK


def test_cmdline_limit_is_the_kernels_cmdline_size(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    kernel = _write(tmp_path, make_bzimage(cmdline_size=255))
    load_kernel(mem, kernel, initrd=None, cmdline="x" * 255)
    assert mem.read(layout.CMDLINE_ADDR + 254, 2) == b"x\0"
    with pytest.raises(UsageError, match=r"the command line is 256 bytes.* at most 255"):
        load_kernel(mem, kernel, initrd=None, cmdline="x" * 256)
    with pytest.raises(UsageError, match="NUL"):
        load_kernel(mem, kernel, initrd=None, cmdline="a\0b")


def test_initrd_respects_initrd_addr_max(tmp_path: Path) -> None:
    mem = GuestMemory(64 * MiB)
    kernel = _write(tmp_path, make_bzimage(initrd_addr_max=0x1FF_FFFF))
    initrd = _write(tmp_path, b"r" * 5000, "initrd")
    info = load_kernel(mem, kernel, initrd=initrd, cmdline="")
    assert info.initrd == (0x200_0000 - 0x2000, 5000)


def test_initrd_too_big(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    initrd = _write(tmp_path, bytes(15 * MiB), "initrd")
    with pytest.raises(UsageError, match=r"initrd: initrd of 15 MiB does not fit below .*memory"):
        load_kernel(mem, _write(tmp_path, make_bzimage()), initrd=initrd, cmdline="")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 0x205}, r"boot protocol 2\.05 is too old; minivmm needs 2\.06"),
        ({"version": 0x20B}, r"no 64-bit entry point \(boot protocol 2\.11"),
        ({"xloadflags": 0}, "no 64-bit entry point"),
        ({"magic": 0x12345678}, "without the 'HdrS' setup header"),
        ({"boot_flag": 0x1234}, "not a Linux kernel"),
    ],
)
def test_rejects_bad_headers(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    mem = GuestMemory(16 * MiB)
    with pytest.raises(UsageError, match=message):
        load_kernel(mem, _write(tmp_path, make_bzimage(**kwargs)), initrd=None, cmdline="")


@pytest.mark.parametrize(
    "cut", [1, 0x100, 0x1F1 + 10, 0x203, 0x300, 5 * 512, 5 * 512 + 0x50, -16 * 2]
)
def test_rejects_truncated_bzimage(tmp_path: Path, cut: int) -> None:
    mem = GuestMemory(16 * MiB)
    data = make_bzimage()
    with pytest.raises(UsageError, match=r"bzImage: (truncated|not a Linux kernel)"):
        load_kernel(mem, _write(tmp_path, data[:cut]), initrd=None, cmdline="")


def test_rejects_non_kernels_and_missing_files(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    text = _write(tmp_path, b"myhost\n", "hostname")
    with pytest.raises(UsageError, match=r"hostname: not a Linux kernel"):
        load_kernel(mem, text, initrd=None, cmdline="")
    with pytest.raises(UsageError, match="empty"):
        load_kernel(mem, _write(tmp_path, b"", "empty"), initrd=None, cmdline="")
    with pytest.raises(UsageError, match="no such file"):
        load_kernel(mem, tmp_path / "missing", initrd=None, cmdline="")
    with pytest.raises(UsageError, match="is a directory"):
        load_kernel(mem, tmp_path, initrd=None, cmdline="")
    kernel = _write(tmp_path, make_bzimage())
    with pytest.raises(UsageError, match=r"initrd: no such file"):
        load_kernel(mem, kernel, initrd=tmp_path / "initrd", cmdline="")
    with pytest.raises(UsageError, match="empty"):
        load_kernel(mem, kernel, initrd=_write(tmp_path, b"", "e"), cmdline="")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    with pytest.raises(UsageError) as e:
        load_kernel(mem, _write(tmp_path, make_bzimage()[:700]), initrd=None, cmdline="")
    assert "\n" not in str(e.value)


def test_syssize_is_read_little_endian(tmp_path: Path) -> None:
    data = bytearray(make_bzimage())
    struct.pack_into("<I", data, 0x1F4, 0x10000)  # claims 1 MiB of payload
    with pytest.raises(UsageError, match="truncated bzImage"):
        load_kernel(GuestMemory(16 * MiB), _write(tmp_path, bytes(data)), initrd=None, cmdline="")
