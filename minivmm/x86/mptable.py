"""The MP table (Intel MultiProcessor Specification 1.4): how a Linux booted without ACPI
finds its CPUs, its buses and the IOAPIC.

Written at layout.MPTABLE_ADDR, the first KiB of the EBDA, where Linux scans for the
floating pointer (MP spec §4: "the first kilobyte of the EBDA" / "the last kilobyte of
system base memory"): the 16-byte floating pointer structure (§4.1), then the
configuration table (§4.2) with its entries (§4.3), in this order:

    one processor entry per vCPU (local APIC id = vCPU index, BSP flag on vCPU 0)
    one bus entry: bus 0, "ISA"
    one IOAPIC entry: id = number of vCPUs, version 0x11, at layout.IOAPIC_ADDR
    one I/O interrupt entry per IOAPIC pin 0..23: INT, ISA IRQ n -> pin n, conforming
    two local interrupt entries: ExtINT -> LINT0 of the BSP, NMI -> LINT1 of every CPU

The table may run past the first KiB into the reserved range below HIMEM_START (e820
marks EBDA_START..HIMEM_START reserved); it must end there.
"""

from __future__ import annotations

import ctypes
from typing import Final

from ..errors import UsageError
from ..memory import GuestMemory
from . import layout

MP_SPEC_REV_1_4: Final = 4
MAX_CPUS: Final = 254  # APIC ids 0..253, the IOAPIC takes the next id, 0xff is broadcast
IOAPIC_PINS: Final = 24
IOAPIC_VERSION: Final = 0x11
LAPIC_VERSION: Final = 0x14
CPU_SIGNATURE: Final = 0x600  # family 6 (§4.3.1: stepping | model << 4 | family << 8)
CPU_FEATURES: Final = (1 << 0) | (1 << 9)  # FPU, APIC (CPUID.1:EDX)
ISA_BUS_ID: Final = 0
MPTABLE_SPACE: Final = layout.HIMEM_START - layout.MPTABLE_ADDR

# Entry types (§4.3, table 4-3) and their fields.
MP_PROCESSOR: Final = 0
MP_BUS: Final = 1
MP_IOAPIC: Final = 2
MP_INTSRC: Final = 3
MP_LINTSRC: Final = 4
CPU_ENABLED: Final = 1 << 0
CPU_BOOTPROCESSOR: Final = 1 << 1
IOAPIC_USABLE: Final = 1 << 0
MP_INT: Final = 0  # interrupt types (§4.3.4, table 4-8)
MP_NMI: Final = 1
MP_EXTINT: Final = 3
MP_IRQ_CONFORMING: Final = 0  # polarity and trigger mode "conforms to the bus"
ALL_LAPICS: Final = 0xFF


class MpfIntel(ctypes.LittleEndianStructure):
    """MP floating pointer structure (§4.1)."""

    _pack_ = 1
    _fields_ = (
        ("signature", ctypes.c_char * 4),
        ("physptr", ctypes.c_uint32),
        ("length", ctypes.c_uint8),  # in 16-byte paragraphs
        ("specification", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("feature1", ctypes.c_uint8),  # 0: a configuration table is present
        ("feature2", ctypes.c_uint8),
        ("feature3", ctypes.c_uint8),
        ("feature4", ctypes.c_uint8),
        ("feature5", ctypes.c_uint8),
    )


class MpcTable(ctypes.LittleEndianStructure):
    """MP configuration table header (§4.2)."""

    _pack_ = 1
    _fields_ = (
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint16),  # base table length, header included
        ("spec", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem", ctypes.c_char * 8),
        ("productid", ctypes.c_char * 12),
        ("oemptr", ctypes.c_uint32),
        ("oemsize", ctypes.c_uint16),
        ("oemcount", ctypes.c_uint16),  # number of entries
        ("lapic", ctypes.c_uint32),
        ("extended_length", ctypes.c_uint16),
        ("extended_checksum", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
    )


class MpcCpu(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("cpuflag", ctypes.c_uint8),
        ("cpufeature", ctypes.c_uint32),
        ("featureflag", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 2),
    )


class MpcBus(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("busid", ctypes.c_uint8),
        ("bustype", ctypes.c_char * 6),
    )


class MpcIoapic(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("apicaddr", ctypes.c_uint32),
    )


class MpcIntsrc(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbus", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("dstapic", ctypes.c_uint8),
        ("dstirq", ctypes.c_uint8),
    )


class MpcLintsrc(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbusid", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("destapic", ctypes.c_uint8),
        ("destapiclint", ctypes.c_uint8),
    )


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with its checksum byte zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def mptable_size(num_cpus: int) -> int:
    """Bytes the floating pointer plus configuration table take for ``num_cpus``."""
    return (
        ctypes.sizeof(MpfIntel)
        + ctypes.sizeof(MpcTable)
        + num_cpus * ctypes.sizeof(MpcCpu)
        + ctypes.sizeof(MpcBus)
        + ctypes.sizeof(MpcIoapic)
        + IOAPIC_PINS * ctypes.sizeof(MpcIntsrc)
        + 2 * ctypes.sizeof(MpcLintsrc)
    )


def build_mptable(num_cpus: int) -> bytes:
    """The MP table for ``num_cpus`` vCPUs, as it is to be placed at layout.MPTABLE_ADDR."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise UsageError(f"{num_cpus} vCPUs: the MP table takes 1 to {MAX_CPUS}", field="cpus")
    size = mptable_size(num_cpus)
    if size > MPTABLE_SPACE:
        raise UsageError(
            f"the MP table for {num_cpus} vCPUs needs {size} bytes, more than the {MPTABLE_SPACE} "
            f"reserved at 0x{layout.MPTABLE_ADDR:x}; use fewer vCPUs", field="cpus")
    ioapic_id = num_cpus
    entries: list[ctypes.LittleEndianStructure] = [
        MpcCpu(
            type=MP_PROCESSOR,
            apicid=cpu,
            apicver=LAPIC_VERSION,
            cpuflag=CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0),
            cpufeature=CPU_SIGNATURE,
            featureflag=CPU_FEATURES,
        )
        for cpu in range(num_cpus)
    ]
    entries.append(MpcBus(type=MP_BUS, busid=ISA_BUS_ID, bustype=b"ISA   "))
    entries.append(
        MpcIoapic(
            type=MP_IOAPIC,
            apicid=ioapic_id,
            apicver=IOAPIC_VERSION,
            flags=IOAPIC_USABLE,
            apicaddr=layout.IOAPIC_ADDR,
        )
    )
    entries.extend(
        MpcIntsrc(
            type=MP_INTSRC,
            irqtype=MP_INT,
            irqflag=MP_IRQ_CONFORMING,
            srcbus=ISA_BUS_ID,
            srcbusirq=pin,
            dstapic=ioapic_id,
            dstirq=pin,
        )
        for pin in range(IOAPIC_PINS)
    )
    entries.append(
        MpcLintsrc(
            type=MP_LINTSRC, irqtype=MP_EXTINT, srcbusid=ISA_BUS_ID, destapic=0, destapiclint=0
        )
    )
    entries.append(
        MpcLintsrc(
            type=MP_LINTSRC,
            irqtype=MP_NMI,
            srcbusid=ISA_BUS_ID,
            destapic=ALL_LAPICS,
            destapiclint=1,
        )
    )
    body = b"".join(bytes(e) for e in entries)

    table_addr = layout.MPTABLE_ADDR + ctypes.sizeof(MpfIntel)
    header = MpcTable(
        signature=b"PCMP",
        length=ctypes.sizeof(MpcTable) + len(body),
        spec=MP_SPEC_REV_1_4,
        oem=b"MINIVMM ",
        productid=b"000000000000",
        oemcount=len(entries),
        lapic=layout.LAPIC_ADDR,
    )
    header.checksum = checksum(bytes(header) + body)
    pointer = MpfIntel(
        signature=b"_MP_",
        physptr=table_addr,
        length=ctypes.sizeof(MpfIntel) // 16,
        specification=MP_SPEC_REV_1_4,
    )
    pointer.checksum = checksum(bytes(pointer))
    return bytes(pointer) + bytes(header) + body


def write_mptable(mem: GuestMemory, num_cpus: int) -> None:
    """Write the MP table for ``num_cpus`` vCPUs at layout.MPTABLE_ADDR."""
    mem.write(layout.MPTABLE_ADDR, build_mptable(num_cpus))
