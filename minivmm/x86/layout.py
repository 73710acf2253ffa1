"""The guest-physical address map: every fixed address minivmm uses, in one place.

    0x0000_0000  real-mode IVT and BIOS data area (left zero)
    0x0000_0500  boot GDT                       (GDT_ADDR)
    0x0000_0520  boot IDT (empty)               (IDT_ADDR)
    0x0000_6000  PVH hvm_start_info + memmap    (PVH_INFO_ADDR)
    0x0000_7000  Linux zero page (boot_params)  (ZERO_PAGE_ADDR)
    0x0000_8ff0  initial stack pointer          (BOOT_STACK_POINTER)
    0x0000_9000  page tables: PML4, PDPT, PDs   (PML4_ADDR ...)
    0x0002_0000  kernel command line            (CMDLINE_ADDR, CMDLINE_MAX bytes)
    0x0009_fc00  EBDA: MP table                 (MPTABLE_ADDR), reserved in e820
    0x000e_0000  ACPI: RSDP, then the tables    (ACPI_RSDP_ADDR, ACPI_TABLES_ADDR), reserved
    0x0010_0000  kernel (HIMEM_START)
    ...          RAM up to MMIO_GAP_START
    0xc000_0000  MMIO gap: no RAM from here up to 4 GiB
    0xd000_0000  virtio-mmio devices, VIRTIO_MMIO_SIZE bytes each (VIRTIO_MMIO_BASE)
    0xfec0_0000  IOAPIC
    0xfee0_0000  local APIC
    0xfffb_c000  KVM identity-map page and TSS (3 pages)
    0x1_0000_0000 RAM above 4 GiB, when the guest has more than MMIO_GAP_START bytes

Ports: 8250 UART 0x3f8-0x3ff, i8042 0x60-0x64, CMOS RTC 0x70-0x71, debug-exit 0x501,
ACPI sleep control and status registers ACPI_PM_PORT and ACPI_PM_PORT + 1.

Interrupts: the 8250 UART uses IRQ 4 (ISA), the i8042 IRQ 1, the CMOS RTC IRQ 8;
virtio-mmio devices take one IRQ each from VIRTIO_IRQ_FIRST to VIRTIO_IRQ_LAST (IOAPIC
pins, edge-triggered).
"""

from typing import Final

GDT_ADDR: Final = 0x500
IDT_ADDR: Final = 0x520
PVH_INFO_ADDR: Final = 0x6000
ZERO_PAGE_ADDR: Final = 0x7000
BOOT_STACK_POINTER: Final = 0x8FF0
PML4_ADDR: Final = 0x9000
PDPT_ADDR: Final = 0xA000
PD_ADDR: Final = 0xB000  # four page directories: identity map of the first 4 GiB
PD_COUNT: Final = 4
CMDLINE_ADDR: Final = 0x20000
CMDLINE_MAX: Final = 0x10000
EBDA_START: Final = 0x9FC00
MPTABLE_ADDR: Final = EBDA_START
# The BIOS area 0xE0000-0xFFFFF (reserved in e820): where a kernel that scans for the RSDP
# looks for it, on a 16-byte boundary (ACPI 6.4 §5.2.5.1); the tables follow it.
ACPI_RSDP_ADDR: Final = 0xE0000
ACPI_TABLES_ADDR: Final = 0xE0040
ACPI_AREA_END: Final = 0x100000
HIMEM_START: Final = 0x100000

MMIO_GAP_START: Final = 0xC000_0000
MMIO_GAP_END: Final = 0x1_0000_0000
MMIO_GAP: Final = (MMIO_GAP_START, MMIO_GAP_END)

VIRTIO_MMIO_BASE: Final = 0xD000_0000
VIRTIO_MMIO_SIZE: Final = 0x1000
VIRTIO_MMIO_MAX_DEVICES: Final = 19
VIRTIO_IRQ_FIRST: Final = 5
VIRTIO_IRQ_LAST: Final = VIRTIO_IRQ_FIRST + VIRTIO_MMIO_MAX_DEVICES - 1  # 23: last IOAPIC pin

IOAPIC_ADDR: Final = 0xFEC0_0000
LAPIC_ADDR: Final = 0xFEE0_0000
KVM_IDENTITY_MAP_ADDR: Final = 0xFFFB_C000
KVM_TSS_ADDR: Final = 0xFFFB_D000

SERIAL_PORT: Final = 0x3F8
SERIAL_IRQ: Final = 4
I8042_PORT: Final = 0x60
I8042_IRQ: Final = 1
DEBUG_EXIT_PORT: Final = 0x501
RTC_PORT: Final = 0x70
RTC_IRQ: Final = 8
ACPI_PM_PORT: Final = 0x600  # +0 sleep control register, +1 sleep status register
