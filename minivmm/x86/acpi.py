"""ACPI tables: how a kernel built with CONFIG_ACPI finds the CPUs, the interrupt
controllers, the devices, and how to power the machine off.

Everything is written into the BIOS area (layout.ACPI_RSDP_ADDR .. layout.ACPI_AREA_END,
reserved in the e820 map), which is where a kernel that scans for the RSDP looks; the
loaders also hand its address over directly (zero page ``acpi_rsdp_addr``, PVH
``rsdp_paddr``). References are to ACPI 6.4:

    RSDP  revision 2, points at the XSDT (§5.2.5.3)
    XSDT  the FADT and the MADT (§5.2.8)
    FACP  the FADT, revision 6 (§5.2.9): hardware-reduced ACPI (§4.1) -- no PM1 blocks, no
          SCI, no FACS -- with the sleep control and status registers (§4.8.3.7) in I/O
          space at layout.ACPI_PM_PORT, so that \\_S5 powers the machine off; points at
          the DSDT
    APIC  the MADT (§5.2.12): a Local APIC (x2APIC from id 255) per vCPU, the IOAPIC,
          NMI on LINT1, PCAT_COMPAT (KVM's in-kernel irqchip has the 8259 pair)
    DSDT  in AML (aml.py): the processors (ACPI0007), the 8250 (PNP0501), the CMOS RTC
          (PNP0B00), the i8042 (PNP0303), each virtio-mmio device (LNRO0005, as QEMU
          microvm and Firecracker describe them) and \\_S5

No interrupt source overrides: minivmm keeps KVM's default GSI routing, in which ISA IRQ n
is IOAPIC pin n (the PIT included; QEMU instead routes IRQ0 to pin 2 and says so with an
override) -- the same identity wiring the MP table states.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from ..memory import GuestMemory
from . import aml, layout

OEM_ID: Final = b"MNVMM "
OEM_TABLE_ID: Final = b"MINIVMM "
OEM_REVISION: Final = 1
CREATOR_ID: Final = b"MNVM"
CREATOR_REVISION: Final = 1
HYPERVISOR_VENDOR: Final = b"MINIVMM "

#: SLP_TYPx value that \\_S5 declares and the sleep control register acts on.
SLEEP_TYPE_S5: Final = 5
#: Sleep control register (§4.8.3.7): SLP_TYPx in bits 2-4, SLP_EN bit 5.
SLP_TYP_SHIFT: Final = 2
SLP_TYP_MASK: Final = 0x7 << SLP_TYP_SHIFT
SLP_EN: Final = 1 << 5
#: Sleep status register (§4.8.3.8): WAK_STS bit 7.
WAK_STS: Final = 1 << 7
SLEEP_CONTROL_PORT: Final = layout.ACPI_PM_PORT
SLEEP_STATUS_PORT: Final = layout.ACPI_PM_PORT + 1

IOAPIC_ID: Final = 0  # what KVM's in-kernel IOAPIC reports in its ID register after reset
IOAPIC_PINS: Final = 24
MAX_XAPIC_ID: Final = 254  # 0xff is the broadcast id; larger ids need x2APIC entries

# FADT revision and flags (§5.2.9, tables 5.10 and 5.11).
FADT_REVISION: Final = 6
FADT_MINOR_REVISION: Final = 4
FADT_WBINVD: Final = 1 << 0
FADT_PWR_BUTTON: Final = 1 << 4  # no fixed-feature power button
FADT_SLP_BUTTON: Final = 1 << 5  # no fixed-feature sleep button
FADT_HW_REDUCED_ACPI: Final = 1 << 20
IAPC_LEGACY_DEVICES: Final = 1 << 0
IAPC_8042: Final = 1 << 1
IAPC_VGA_NOT_PRESENT: Final = 1 << 2
IAPC_MSI_NOT_SUPPORTED: Final = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT: Final = 1 << 5

# MADT (§5.2.12) flags and structure types.
MADT_REVISION: Final = 5
MADT_PCAT_COMPAT: Final = 1 << 0
MADT_LOCAL_APIC: Final = 0
MADT_IO_APIC: Final = 1
MADT_LOCAL_APIC_NMI: Final = 4
MADT_LOCAL_X2APIC: Final = 9
MADT_LOCAL_X2APIC_NMI: Final = 0x0A
LAPIC_ENABLED: Final = 1 << 0
ALL_PROCESSORS_UID: Final = 0xFF
ALL_PROCESSORS_X2APIC_UID: Final = 0xFFFF_FFFF
NMI_LINT: Final = 1

GAS_SYSTEM_IO: Final = 1  # Generic Address Structure address space (§5.2.3.2)
GAS_ACCESS_BYTE: Final = 1


class SdtHeader(ctypes.LittleEndianStructure):
    """System Description Table Header (§5.2.6)."""

    _pack_ = 1
    _fields_ = (
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint32),
        ("revision", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem_id", ctypes.c_char * 6),
        ("oem_table_id", ctypes.c_char * 8),
        ("oem_revision", ctypes.c_uint32),
        ("creator_id", ctypes.c_char * 4),
        ("creator_revision", ctypes.c_uint32),
    )


class Rsdp(ctypes.LittleEndianStructure):
    """Root System Description Pointer, revision 2 (§5.2.5.3)."""

    _pack_ = 1
    _fields_ = (
        ("signature", ctypes.c_char * 8),
        ("checksum", ctypes.c_uint8),  # of the first 20 bytes (the ACPI 1.0 part)
        ("oem_id", ctypes.c_char * 6),
        ("revision", ctypes.c_uint8),
        ("rsdt_address", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
        ("xsdt_address", ctypes.c_uint64),
        ("extended_checksum", ctypes.c_uint8),  # of the whole structure
        ("reserved", ctypes.c_uint8 * 3),
    )


RSDP_V1_SIZE: Final = 20


class Gas(ctypes.LittleEndianStructure):
    """Generic Address Structure (§5.2.3.2)."""

    _pack_ = 1
    _fields_ = (
        ("space_id", ctypes.c_uint8),
        ("bit_width", ctypes.c_uint8),
        ("bit_offset", ctypes.c_uint8),
        ("access_size", ctypes.c_uint8),
        ("address", ctypes.c_uint64),
    )


class Fadt(ctypes.LittleEndianStructure):
    """Fixed ACPI Description Table, revision 6 (§5.2.9, table 5.9), after its header.

    Hardware-reduced: every PM1/PM2/GPE/timer block, SCI and SMI field stays zero.
    """

    _pack_ = 1
    _fields_ = (
        ("firmware_ctrl", ctypes.c_uint32),
        ("dsdt", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint8),
        ("preferred_pm_profile", ctypes.c_uint8),
        ("sci_int", ctypes.c_uint16),
        ("smi_cmd", ctypes.c_uint32),
        ("acpi_enable", ctypes.c_uint8),
        ("acpi_disable", ctypes.c_uint8),
        ("s4bios_req", ctypes.c_uint8),
        ("pstate_cnt", ctypes.c_uint8),
        ("pm_blocks", ctypes.c_uint32 * 8),  # PM1a/b EVT, PM1a/b CNT, PM2 CNT, PM TMR, GPE0/1
        ("block_lengths", ctypes.c_uint8 * 6),  # PM1 EVT ... GPE1 lengths
        ("gpe1_base", ctypes.c_uint8),
        ("cst_cnt", ctypes.c_uint8),
        ("p_lvl2_lat", ctypes.c_uint16),
        ("p_lvl3_lat", ctypes.c_uint16),
        ("flush_size", ctypes.c_uint16),
        ("flush_stride", ctypes.c_uint16),
        ("duty_offset", ctypes.c_uint8),
        ("duty_width", ctypes.c_uint8),
        ("day_alrm", ctypes.c_uint8),
        ("mon_alrm", ctypes.c_uint8),
        ("century", ctypes.c_uint8),
        ("iapc_boot_arch", ctypes.c_uint16),
        ("reserved1", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("reset_reg", Gas),
        ("reset_value", ctypes.c_uint8),
        ("arm_boot_arch", ctypes.c_uint16),
        ("minor_revision", ctypes.c_uint8),
        ("x_firmware_ctrl", ctypes.c_uint64),
        ("x_dsdt", ctypes.c_uint64),
        ("x_pm_blocks", Gas * 8),  # X_PM1a_EVT_BLK ... X_GPE1_BLK
        ("sleep_control_reg", Gas),
        ("sleep_status_reg", Gas),
        ("hypervisor_vendor_id", ctypes.c_char * 8),
    )


assert ctypes.sizeof(SdtHeader) == 36
assert ctypes.sizeof(Rsdp) == 36
assert ctypes.sizeof(SdtHeader) + ctypes.sizeof(Fadt) == 276  # FADT revision 6 length


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with its checksum byte zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header (length, checksum) followed by ``body``."""
    header = SdtHeader(
        signature=signature,
        length=ctypes.sizeof(SdtHeader) + len(body),
        revision=revision,
        oem_id=OEM_ID,
        oem_table_id=OEM_TABLE_ID,
        oem_revision=OEM_REVISION,
        creator_id=CREATOR_ID,
        creator_revision=CREATOR_REVISION,
    )
    header.checksum = checksum(bytes(header) + body)
    return bytes(header) + body


class VirtioMmio(NamedTuple):
    """One virtio-mmio transport as the DSDT describes it."""

    base: int
    size: int
    irq: int


@dataclass(frozen=True)
class Platform:
    """The machine the tables describe."""

    cpus: int
    virtio: Sequence[VirtioMmio] = ()
    serial: bool = True
    rtc: bool = True
    i8042: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= 0x1000:
            raise ValueError(f"the DSDT names 1-4096 CPUs (C000-CFFF), not {self.cpus}")
        for dev in self.virtio:
            if not (dev.size > 0 and dev.base + dev.size <= 1 << 32):
                raise ValueError(f"virtio-mmio window 0x{dev.base:x}+0x{dev.size:x} "
                                 "is not below 4 GiB")
            if not 0 <= dev.irq < IOAPIC_PINS:
                raise ValueError(f"virtio-mmio IRQ {dev.irq} is not an IOAPIC pin")
        if len(self.virtio) > 256:
            raise ValueError("the DSDT names at most 256 virtio-mmio devices (VR00-VRFF)")


# ---- DSDT -------------------------------------------------------------------------------


def dsdt_aml(m: Platform) -> bytes:
    """The DSDT's definition block body (everything after the table header)."""
    sb: list[aml.Aml] = []
    # ACPI 6.4 §8.4: processors are Device objects with _HID ACPI0007 whose _UID is the
    # "ACPI Processor UID" of their MADT entry.
    for cpu in range(m.cpus):
        sb.append(aml.Device(f"C{cpu:03X}", [
            aml.Name("_HID", "ACPI0007"),
            aml.Name("_UID", cpu),
        ]))
    if m.serial:
        sb.append(aml.Device("COM1", [
            aml.Name("_HID", aml.EisaId("PNP0501")),
            aml.Name("_UID", 1),
            aml.Name("_CRS", aml.ResourceTemplate([
                aml.Io(layout.SERIAL_PORT, 8),
                aml.IrqNoFlags(layout.SERIAL_IRQ),
            ])),
        ]))
    if m.rtc:
        sb.append(aml.Device("RTC", [
            aml.Name("_HID", aml.EisaId("PNP0B00")),
            aml.Name("_CRS", aml.ResourceTemplate([
                aml.Io(layout.RTC_PORT, 2),
                aml.IrqNoFlags(layout.RTC_IRQ),
            ])),
        ]))
    if m.i8042:
        sb.append(aml.Device("PS2K", [
            aml.Name("_HID", aml.EisaId("PNP0303")),
            aml.Name("_CRS", aml.ResourceTemplate([
                aml.Io(layout.I8042_PORT, 1),  # data
                aml.Io(layout.I8042_PORT + 4, 1),  # status / command
                aml.IrqNoFlags(layout.I8042_IRQ),
            ])),
        ]))
    for index, dev in enumerate(m.virtio):
        sb.append(aml.Device(f"VR{index:02X}", [
            aml.Name("_HID", "LNRO0005"),
            aml.Name("_UID", index),
            aml.Name("_CCA", 1),  # cache-coherent DMA (§6.2.17)
            aml.Name("_CRS", aml.ResourceTemplate([
                aml.Memory32Fixed(dev.base, dev.size),
                # minivmm raises virtio interrupts through irqfd as edges
                aml.Interrupt(dev.irq, edge=True, active_low=False),
            ])),
        ]))
    terms: list[aml.Aml] = [
        aml.Scope("\\_SB", sb),
        # §7.4.2: \_Sx holds the SLP_TYPa and SLP_TYPb values; hardware-reduced platforms
        # use the first, written to the sleep control register.
        aml.Name("\\_S5", aml.Package([SLEEP_TYPE_S5, 0])),
    ]
    return b"".join(t.encode() for t in terms)


# ---- MADT -------------------------------------------------------------------------------


def madt_body(m: Platform) -> bytes:
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(m.cpus):
        apic_id = cpu  # KVM gives vCPU n local APIC id n
        if apic_id <= MAX_XAPIC_ID:
            body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, apic_id, LAPIC_ENABLED)
        else:
            body += struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, apic_id, LAPIC_ENABLED, cpu)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_ADDR, 0)
    # NMI arrives on LINT1 of every processor, as the MP table says too; flags 0 =
    # "conforms to the bus" (§5.2.12.7).
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID, 0, NMI_LINT)
    if m.cpus > MAX_XAPIC_ID + 1:
        body += struct.pack("<BBHIB3x", MADT_LOCAL_X2APIC_NMI, 12, 0,
                            ALL_PROCESSORS_X2APIC_UID, NMI_LINT)
    return bytes(body)


# ---- FADT -------------------------------------------------------------------------------


#: CMOS index of the century byte (minivmm.devices.legacy.rtc keeps it there)
RTC_CENTURY_INDEX: Final = 0x32


def _sleep_register(port: int) -> Gas:
    return Gas(space_id=GAS_SYSTEM_IO, bit_width=8, bit_offset=0, access_size=GAS_ACCESS_BYTE,
               address=port)


def fadt_body(m: Platform, dsdt_addr: int) -> bytes:
    boot_arch = IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED
    if m.serial:
        boot_arch |= IAPC_LEGACY_DEVICES  # §5.2.9.3: e.g. a serial port the OS drives
    if m.i8042:
        boot_arch |= IAPC_8042
    if not m.rtc:
        boot_arch |= IAPC_CMOS_RTC_NOT_PRESENT
    fadt = Fadt(
        dsdt=dsdt_addr,
        iapc_boot_arch=boot_arch,
        flags=FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_HW_REDUCED_ACPI,
        minor_revision=FADT_MINOR_REVISION,
        century=RTC_CENTURY_INDEX if m.rtc else 0,  # the RTC keeps the century in CMOS
        x_dsdt=dsdt_addr,
        sleep_control_reg=_sleep_register(SLEEP_CONTROL_PORT),
        sleep_status_reg=_sleep_register(SLEEP_STATUS_PORT),
        hypervisor_vendor_id=HYPERVISOR_VENDOR,
    )
    return bytes(fadt)


# ---- Putting it together ----------------------------------------------------------------


class Tables(NamedTuple):
    """The RSDP and every table, each with the guest-physical address it belongs at."""

    rsdp_addr: int
    rsdp: bytes
    tables: dict[str, tuple[int, bytes]]  # signature -> (address, bytes)

    def extent(self) -> int:
        """One past the last byte written."""
        return max(addr + len(data) for addr, data in self.tables.values())


def _align16(n: int) -> int:
    return (n + 15) & ~15


def build_tables(m: Platform) -> Tables:
    """Lay the tables out from layout.ACPI_TABLES_ADDR, each 16-byte aligned."""
    at = layout.ACPI_TABLES_ADDR
    placed: dict[str, tuple[int, bytes]] = {}

    def place(sig: str, data: bytes) -> int:
        nonlocal at
        addr = at
        placed[sig] = (addr, data)
        at = _align16(addr + len(data))
        return addr

    dsdt_addr = place("DSDT", sdt(b"DSDT", 2, dsdt_aml(m)))  # revision 2: 64-bit integers
    fadt_addr = place("FACP", sdt(b"FACP", FADT_REVISION, fadt_body(m, dsdt_addr)))
    madt_addr = place("APIC", sdt(b"APIC", MADT_REVISION, madt_body(m)))
    xsdt_addr = place("XSDT", sdt(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr)))
    end = max(a + len(d) for a, d in placed.values())
    if end > layout.ACPI_AREA_END:
        raise ValueError(f"ACPI tables for {m.cpus} CPUs and {len(m.virtio)} devices end at "
                         f"0x{end:x}, past 0x{layout.ACPI_AREA_END:x}")

    rsdp = Rsdp(signature=b"RSD PTR ", oem_id=OEM_ID, revision=2,
                length=ctypes.sizeof(Rsdp), xsdt_address=xsdt_addr)
    rsdp.checksum = checksum(bytes(rsdp)[:RSDP_V1_SIZE])
    rsdp.extended_checksum = checksum(bytes(rsdp))
    return Tables(layout.ACPI_RSDP_ADDR, bytes(rsdp), placed)


def write_acpi_tables(
    mem: GuestMemory,
    *,
    cpus: int,
    virtio: Sequence[tuple[int, int, int]] = (),
    serial: bool = True,
    rtc: bool = True,
    i8042: bool = False,
) -> int:
    """Write the RSDP and the tables describing this machine; return the RSDP's address.

    ``virtio`` lists each virtio-mmio transport as (base, size, irq).
    """
    platform = Platform(cpus, tuple(VirtioMmio(*v) for v in virtio), serial, rtc, i8042)
    tables = build_tables(platform)
    mem.write(tables.rsdp_addr, tables.rsdp)
    for addr, data in tables.tables.values():
        mem.write(addr, data)
    return tables.rsdp_addr
