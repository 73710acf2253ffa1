"""ctypes mirrors of the structures in <linux/kvm.h> that minivmm passes to KVM.

Field names follow the header. tests/kvm/test_structs.py compiles a C program against
the real header and compares every size and offset with these definitions.
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Final

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64

KVM_NR_INTERRUPTS: Final = 256
KVM_APIC_REG_SIZE: Final = 0x400


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """The fixed head; use :func:`kvm_msrs_n` for a structure with entries."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """The fixed head; use :func:`kvm_cpuid2_n` for a structure with entries."""

    _fields_ = [("nent", u32), ("padding", u32)]


@cache
def kvm_cpuid2_n(n: int) -> type[ctypes.Structure]:
    """kvm_cpuid2 followed by ``n`` entries (the header's flexible array member)."""
    return type(
        f"kvm_cpuid2_{n}",
        (ctypes.Structure,),
        {"_fields_": [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]},
    )


@cache
def kvm_msrs_n(n: int) -> type[ctypes.Structure]:
    """kvm_msrs followed by ``n`` entries."""
    return type(
        f"kvm_msrs_{n}",
        (ctypes.Structure,),
        {"_fields_": [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]},
    )


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_signal_mask(ctypes.Structure):
    """The fixed head (len); the kernel's sigset follows."""

    _fields_ = [("len", u32)]


class kvm_signal_mask_sigset(ctypes.Structure):
    """kvm_signal_mask with the 8-byte sigset_t of x86-64 after it."""

    _fields_ = [("len", u32), ("sigset", ctypes.c_uint64)]
    _pack_ = 4


class kvm_irq_level(ctypes.Structure):
    # The header's anonymous union {irq; status} is represented by its first member.
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


# --- machine state (snapshots) --------------------------------------------------------

KVM_IOAPIC_NUM_PINS: Final = 24
KVM_MAX_XCRS: Final = 16
KVM_XSAVE_SIZE: Final = 4096  # struct kvm_xsave without its flexible tail


class kvm_msr_list(ctypes.Structure):
    """The fixed head; use :func:`kvm_msr_list_n` for a structure with indices."""

    _fields_ = [("nmsrs", u32)]


@cache
def kvm_msr_list_n(n: int) -> type[ctypes.Structure]:
    """kvm_msr_list followed by ``n`` MSR indices."""
    return type(
        f"kvm_msr_list_{n}",
        (ctypes.Structure,),
        {"_fields_": [("nmsrs", u32), ("indices", u32 * n)]},
    )


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_xsave(ctypes.Structure):
    """The 4096-byte legacy size; KVM_GET_XSAVE2 may fill more (:func:`kvm_xsave_n`)."""

    _fields_ = [("region", u32 * (KVM_XSAVE_SIZE // 4))]


@cache
def kvm_xsave_n(size: int) -> type[ctypes.Structure]:
    """A kvm_xsave of ``size`` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM)."""
    if size < KVM_XSAVE_SIZE or size % 4:
        raise ValueError(f"XSAVE area of {size} bytes: KVM uses 4096 or more, in u32s")
    return type(f"kvm_xsave_{size}", (ctypes.Structure,),
                {"_fields_": [("region", u32 * (size // 4))]})


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        (name, u8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]  # fmt: skip


class kvm_ioapic_state(ctypes.Structure):
    # redirtbl is the header's union {bits; fields}, represented by ``bits``.
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", u8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", kvm_irqchip_chip)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


# --- struct kvm_run and the exit-specific parts of its union --------------------------


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * 2048),
    ]


# Byte offsets the run loop reads with precompiled struct.Struct objects (faster than
# ctypes attribute access on the hot path). Derived from the structures above, never typed.
RUN_EXIT_REASON_OFFSET: Final = kvm_run.exit_reason.offset
RUN_EXIT_UNION_OFFSET: Final = kvm_run.u.offset
RUN_IMMEDIATE_EXIT_OFFSET: Final = kvm_run.immediate_exit.offset
