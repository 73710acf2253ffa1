"""The memory map both boot paths hand the kernel."""

from __future__ import annotations

from minivmm.memory import GuestMemory
from minivmm.x86 import layout
from minivmm.x86.e820 import E820_RAM, E820_RESERVED, E820Entry, e820_map, low_ram_end

MiB = 1 << 20


def test_small_guest_splits_the_first_region_around_the_ebda() -> None:
    mem = GuestMemory(16 * MiB)
    assert e820_map(mem) == (
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, 0x10_0000 - layout.EBDA_START, E820_RESERVED),
        E820Entry(0x10_0000, 15 * MiB, E820_RAM),
    )
    assert low_ram_end(mem) == 16 * MiB


def test_large_guest_continues_above_4g() -> None:
    mem = GuestMemory(3584 * MiB, gap=layout.MMIO_GAP, hugepages=False)
    e820 = e820_map(mem)
    assert e820[2] == E820Entry(0x10_0000, layout.MMIO_GAP_START - 0x10_0000, E820_RAM)
    assert e820[3] == E820Entry(1 << 32, 3584 * MiB - layout.MMIO_GAP_START, E820_RAM)
    assert len(e820) == 4
    assert low_ram_end(mem) == layout.MMIO_GAP_START
    usable = sum(e.size for e in e820 if e.type == E820_RAM)
    assert usable == 3584 * MiB - (0x10_0000 - layout.EBDA_START)


def test_mptable_lies_in_the_reserved_range() -> None:
    reserved = [e for e in e820_map(GuestMemory(16 * MiB)) if e.type == E820_RESERVED]
    assert reserved[0].addr <= layout.MPTABLE_ADDR < reserved[0].end
