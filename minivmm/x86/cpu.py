"""vCPU set-up: MSRs, FPU, local APIC, and the registers for each boot protocol.

Two ways in, as the loaders report them (x86/loader.BootInfo):

* ``linux64``, the 64-bit Linux boot protocol (boot.rst, "64-bit boot protocol"): long
  mode, paging on with an identity map of the first 4 GiB, flat 64-bit code and data
  segments from a GDT, interrupts off, RSI = the zero page.
* ``pvh``, the Xen PVH entry: 32-bit protected mode, paging off, flat 4 GiB code and data
  segments, EBX = the hvm_start_info structure.
"""

from __future__ import annotations

import struct
from typing import Final

from ..kvm import Vcpu
from ..kvm import constants as c
from ..kvm.structs import kvm_segment
from ..memory import GuestMemory
from . import layout

# GDT entries (Intel SDM vol. 3 §3.4.5): null, 64-bit code, data, TSS, 32-bit code.
GDT_NULL: Final = 0
GDT_CODE64: Final = 0x00AF9B000000FFFF
GDT_DATA: Final = 0x00CF93000000FFFF
GDT_TSS: Final = 0x008F8B000000FFFF
GDT_CODE32: Final = 0x00CF9B000000FFFF
GDT_ENTRIES: Final = (GDT_NULL, GDT_CODE64, GDT_DATA, GDT_TSS, GDT_CODE32)
SEL_CODE64: Final = 1 << 3
SEL_DATA: Final = 2 << 3
SEL_TSS: Final = 3 << 3
SEL_CODE32: Final = 4 << 3

# Page-table entry bits
PTE_PRESENT: Final = 1 << 0
PTE_WRITABLE: Final = 1 << 1
PTE_PAGE_SIZE: Final = 1 << 7

X86_RFLAGS_RESERVED: Final = 1 << 1  # bit 1 always reads as 1
X87_FCW_DEFAULT: Final = 0x37F
MXCSR_DEFAULT: Final = 0x1F80

APIC_LVT0: Final = 0x350
APIC_LVT1: Final = 0x360
APIC_MODE_EXTINT: Final = 0x7
APIC_MODE_NMI: Final = 0x4


def segment_from_gdt(entry: int, selector: int) -> kvm_segment:
    """The kvm_segment a processor would load from GDT ``entry`` (the hidden part)."""
    base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    return kvm_segment(
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
        unusable=0 if (entry >> 47) & 1 else 1,
    )


def write_gdt(mem: GuestMemory) -> None:
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    mem.write(layout.IDT_ADDR, bytes(8))


def write_identity_page_tables(mem: GuestMemory) -> None:
    """PML4 -> one PDPT -> four page directories of 2 MiB pages: the first 4 GiB, 1:1."""
    rw = PTE_PRESENT | PTE_WRITABLE
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | rw)
    pdpt = struct.pack(
        f"<{layout.PD_COUNT}Q",
        *((layout.PD_ADDR + i * 0x1000) | rw for i in range(layout.PD_COUNT)),
    )
    mem.write(layout.PDPT_ADDR, pdpt)
    pds = struct.pack(
        f"<{512 * layout.PD_COUNT}Q",
        *((i << 21) | rw | PTE_PAGE_SIZE for i in range(512 * layout.PD_COUNT)),
    )
    mem.write(layout.PD_ADDR, pds)


def setup_fpu(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = X87_FCW_DEFAULT
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


def setup_msrs(vcpu: Vcpu) -> None:
    vcpu.set_msrs({
        c.MSR_IA32_SYSENTER_CS: 0,
        c.MSR_IA32_SYSENTER_ESP: 0,
        c.MSR_IA32_SYSENTER_EIP: 0,
        c.MSR_STAR: 0,
        c.MSR_CSTAR: 0,
        c.MSR_KERNEL_GS_BASE: 0,
        c.MSR_SYSCALL_MASK: 0,
        c.MSR_LSTAR: 0,
        c.MSR_IA32_TSC: 0,
        c.MSR_IA32_MISC_ENABLE: c.MSR_IA32_MISC_ENABLE_FAST_STRING,
        c.MSR_MTRR_DEF_TYPE: (1 << 11) | 6,  # MTRRs enabled, default type write-back
    })


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a BIOS leaves them."""
    st = vcpu.get_lapic()
    raw = memoryview(st).cast("B")  # the whole register page (c_char arrays stop at NUL)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (v,) = struct.unpack_from("<I", raw, reg)
        struct.pack_into("<I", raw, reg, (v & ~0x700) | (mode << 8))
    vcpu.set_lapic(st)


def setup_long_mode(vcpu: Vcpu, entry: int, boot_params: int) -> None:
    """Registers for the 64-bit Linux boot protocol."""
    sregs = vcpu.get_sregs()
    code = segment_from_gdt(GDT_CODE64, SEL_CODE64)
    data = segment_from_gdt(GDT_DATA, SEL_DATA)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_gdt(GDT_TSS, SEL_TSS)
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.IDT_ADDR, 7
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = c.X86_CR4_PAE
    sregs.cr0 = c.X86_CR0_PE | c.X86_CR0_ET | c.X86_CR0_NE | c.X86_CR0_PG
    sregs.efer = c.EFER_LME | c.EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rflags = X86_RFLAGS_RESERVED
    regs.rip = entry
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = boot_params
    vcpu.set_regs(regs)


def setup_pvh(vcpu: Vcpu, entry: int, start_info: int) -> None:
    """Registers for the PVH entry: 32-bit protected mode, paging off (PVH ABI)."""
    sregs = vcpu.get_sregs()
    data = segment_from_gdt(GDT_DATA, SEL_DATA)
    sregs.cs = segment_from_gdt(GDT_CODE32, SEL_CODE32)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_gdt(GDT_TSS, SEL_TSS)
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.IDT_ADDR, 7
    sregs.cr0 = c.X86_CR0_PE | c.X86_CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rflags = X86_RFLAGS_RESERVED
    regs.rip = entry
    regs.rbx = start_info
    vcpu.set_regs(regs)


def setup_vcpu(vcpu: Vcpu) -> None:
    """What a BIOS leaves in every vCPU, the boot processor and the others alike."""
    setup_msrs(vcpu)
    setup_fpu(vcpu)
    setup_lapic(vcpu)


def set_boot_state(vcpu: Vcpu, mem: GuestMemory, protocol: str, entry: int,
                   boot_params: int) -> None:
    """Point the boot vCPU at a loaded kernel (see x86.loader.BootInfo). The other vCPUs
    wait for the guest's INIT/SIPI in the in-kernel local APIC."""
    write_gdt(mem)
    if protocol == "linux64":
        write_identity_page_tables(mem)
        setup_long_mode(vcpu, entry, boot_params)
    elif protocol == "pvh":
        setup_pvh(vcpu, entry, boot_params)
    else:
        raise ValueError(f"unknown boot protocol {protocol!r}")
