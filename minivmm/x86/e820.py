"""The guest's physical memory map, as the BIOS E820 call would report it.

Both boot paths hand the kernel the same map: the Linux zero page carries it in
``boot_params.e820_table`` and PVH in the ``hvm_memmap_table_entry`` array (the entry types
are the E820 ones). The first RAM region is split around the EBDA, where the MP table lives:

    0 .. EBDA_START             usable  (real-mode IVT, boot GDT, zero page, page tables)
    EBDA_START .. HIMEM_START   reserved (EBDA with the MP table; legacy VGA/ROM hole, where
                                the ACPI tables live, from layout.ACPI_RSDP_ADDR)
    HIMEM_START .. region end   usable

Every further RAM region (RAM above 4 GiB) is usable as a whole.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ..memory import GuestMemory
from . import layout

E820_RAM: Final = 1
E820_RESERVED: Final = 2


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(mem: GuestMemory) -> tuple[E820Entry, ...]:
    """The memory map of ``mem``, in address order."""
    entries: list[E820Entry] = []
    for gpa, size in mem.ram_ranges():
        end = gpa + size
        if gpa == 0 and end > layout.HIMEM_START:
            entries.append(E820Entry(0, layout.EBDA_START, E820_RAM))
            entries.append(
                E820Entry(layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820_RESERVED)
            )
            entries.append(E820Entry(layout.HIMEM_START, end - layout.HIMEM_START, E820_RAM))
        else:
            entries.append(E820Entry(gpa, size, E820_RAM))
    return tuple(entries)


def low_ram_end(mem: GuestMemory) -> int:
    """One past the highest RAM address below 4 GiB (the end of the first region)."""
    gpa, size = next(iter(mem.ram_ranges()))
    return min(gpa + size, layout.MMIO_GAP_START)
