"""Every ctypes structure's size and field offsets, checked against <linux/kvm.h>."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from minivmm.kvm import api
from minivmm.kvm import constants as c
from minivmm.kvm import structs as s
from minivmm.kvm.ioctl import _IO, _IOR, _IOW, _IOWR

STRUCTS: dict[str, tuple[type[ctypes.Structure], list[str]]] = {
    "kvm_regs": (s.kvm_regs, ["rax", "rsi", "r15", "rip", "rflags"]),
    "kvm_segment": (s.kvm_segment, ["base", "limit", "selector", "type", "present", "dpl",
                                    "db", "s", "l", "g", "avl", "unusable", "padding"]),
    "kvm_dtable": (s.kvm_dtable, ["base", "limit", "padding"]),
    "kvm_sregs": (s.kvm_sregs, ["cs", "ds", "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3",
                                "cr4", "cr8", "efer", "apic_base", "interrupt_bitmap"]),
    "kvm_fpu": (s.kvm_fpu, ["fpr", "fcw", "fsw", "ftwx", "last_opcode", "last_ip",
                            "last_dp", "xmm", "mxcsr"]),
    "kvm_msr_entry": (s.kvm_msr_entry, ["index", "reserved", "data"]),
    "kvm_msrs": (s.kvm_msrs, ["nmsrs", "pad"]),
    "kvm_signal_mask": (s.kvm_signal_mask, ["len"]),
    "kvm_cpuid_entry2": (s.kvm_cpuid_entry2, ["function", "index", "flags", "eax", "ebx",
                                              "ecx", "edx", "padding"]),
    "kvm_cpuid2": (s.kvm_cpuid2, ["nent", "padding"]),
    "kvm_userspace_memory_region": (s.kvm_userspace_memory_region,
                                    ["slot", "flags", "guest_phys_addr", "memory_size",
                                     "userspace_addr"]),
    "kvm_irqfd": (s.kvm_irqfd, ["fd", "gsi", "flags", "resamplefd", "pad"]),
    "kvm_ioeventfd": (s.kvm_ioeventfd, ["datamatch", "addr", "len", "fd", "flags", "pad"]),
    "kvm_pit_config": (s.kvm_pit_config, ["flags", "pad"]),
    "kvm_irq_level": (s.kvm_irq_level, ["irq", "level"]),
    "kvm_lapic_state": (s.kvm_lapic_state, ["regs"]),
    "kvm_msr_list": (s.kvm_msr_list, ["nmsrs"]),
    "kvm_mp_state": (s.kvm_mp_state, ["mp_state"]),
    "kvm_xsave": (s.kvm_xsave, ["region"]),
    "kvm_xcr": (s.kvm_xcr, ["xcr", "reserved", "value"]),
    "kvm_xcrs": (s.kvm_xcrs, ["nr_xcrs", "flags", "xcrs", "padding"]),
    "kvm_vcpu_events": (s.kvm_vcpu_events, ["exception", "interrupt", "nmi", "sipi_vector",
                                            "flags", "smi", "triple_fault", "reserved",
                                            "exception_has_payload", "exception_payload"]),
    "kvm_debugregs": (s.kvm_debugregs, ["db", "dr6", "dr7", "flags", "reserved"]),
    "kvm_pic_state": (s.kvm_pic_state, ["last_irr", "irr", "imr", "isr", "priority_add",
                                        "irq_base", "read_reg_select", "poll",
                                        "special_mask", "init_state", "auto_eoi",
                                        "rotate_on_auto_eoi", "special_fully_nested_mode",
                                        "init4", "elcr", "elcr_mask"]),
    "kvm_ioapic_state": (s.kvm_ioapic_state, ["base_address", "ioregsel", "id", "irr",
                                              "pad", "redirtbl"]),
    "kvm_irqchip": (s.kvm_irqchip, ["chip_id", "pad", "chip"]),
    "kvm_pit_channel_state": (s.kvm_pit_channel_state,
                              ["count", "latched_count", "count_latched", "status_latched",
                               "status", "read_state", "write_state", "write_latch",
                               "rw_mode", "mode", "bcd", "gate", "count_load_time"]),
    "kvm_pit_state2": (s.kvm_pit_state2, ["channels", "flags", "reserved"]),
    "kvm_clock_data": (s.kvm_clock_data, ["clock", "flags", "pad0", "realtime", "host_tsc",
                                          "pad"]),
    "kvm_run": (s.kvm_run, ["request_interrupt_window", "immediate_exit", "exit_reason",
                            "ready_for_interrupt_injection", "if_flag", "flags", "cr8",
                            "apic_base", "kvm_valid_regs", "kvm_dirty_regs", "s"]),
}
# Members of kvm_run's exit union, as "path in C" -> (ctypes struct, field)
RUN_UNION = {
    "io.direction": (s.kvm_run_io, "direction"), "io.size": (s.kvm_run_io, "size"),
    "io.port": (s.kvm_run_io, "port"), "io.count": (s.kvm_run_io, "count"),
    "io.data_offset": (s.kvm_run_io, "data_offset"),
    "mmio.phys_addr": (s.kvm_run_mmio, "phys_addr"), "mmio.data": (s.kvm_run_mmio, "data"),
    "mmio.len": (s.kvm_run_mmio, "len"), "mmio.is_write": (s.kvm_run_mmio, "is_write"),
    "fail_entry.hardware_entry_failure_reason":
        (s.kvm_run_fail_entry, "hardware_entry_failure_reason"),
    "internal.suberror": (s.kvm_run_internal, "suberror"),
    "internal.ndata": (s.kvm_run_internal, "ndata"),
    "internal.data": (s.kvm_run_internal, "data"),
    "system_event.type": (s.kvm_run_system_event, "type"),
    "system_event.ndata": (s.kvm_run_system_event, "ndata"),
}
# Members of nested structures and unions: "struct.path in C" -> (outer ctypes struct,
# the ctypes path)
NESTED = {
    "kvm_vcpu_events.exception.error_code": (s.kvm_vcpu_events, "exception.error_code"),
    "kvm_vcpu_events.interrupt.shadow": (s.kvm_vcpu_events, "interrupt.shadow"),
    "kvm_vcpu_events.nmi.masked": (s.kvm_vcpu_events, "nmi.masked"),
    "kvm_vcpu_events.smi.latched_init": (s.kvm_vcpu_events, "smi.latched_init"),
    "kvm_vcpu_events.triple_fault.pending": (s.kvm_vcpu_events, "triple_fault.pending"),
    "kvm_irqchip.chip.pic.elcr_mask": (s.kvm_irqchip, "chip.pic.elcr_mask"),
    "kvm_irqchip.chip.ioapic.redirtbl": (s.kvm_irqchip, "chip.ioapic.redirtbl"),
    "kvm_irqchip.chip.ioapic.irr": (s.kvm_irqchip, "chip.ioapic.irr"),
    "kvm_pit_state2.channels[1].count_load_time":
        (s.kvm_pit_state2, "channels[1].count_load_time"),
}
# Sizes of whole members (arrays, unions): "struct.member" -> ctypes size
MEMBER_SIZES = {
    "kvm_irqchip.chip": ctypes.sizeof(s.kvm_irqchip_chip),
    "kvm_ioapic_state.redirtbl": s.kvm_ioapic_state.redirtbl.size,
    "kvm_xcrs.xcrs": ctypes.sizeof(s.kvm_xcr) * s.KVM_MAX_XCRS,
    "kvm_vcpu_events.reserved": 26,
    "kvm_debugregs.reserved": 72,
}
IOCTLS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
          "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU",
          "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
          "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_IRQFD", "KVM_CREATE_PIT2",
          "KVM_IOEVENTFD", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS",
          "KVM_SET_SREGS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU",
          "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2", "KVM_GET_TSC_KHZ",
          "KVM_SET_SIGNAL_MASK", "KVM_GET_MSR_INDEX_LIST", "KVM_GET_MSRS",
          "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_XSAVE", "KVM_SET_XSAVE",
          "KVM_GET_XSAVE2", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_VCPU_EVENTS",
          "KVM_SET_VCPU_EVENTS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
          "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2",
          "KVM_GET_CLOCK", "KVM_SET_CLOCK"]
# Constants from the headers: name -> minivmm's value
CONSTANTS = {name: getattr(c, name) for name in (
    "KVM_CAP_MP_STATE", "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS",
    "KVM_CAP_XSAVE", "KVM_CAP_XCRS", "KVM_CAP_CHECK_EXTENSION_VM", "KVM_CAP_XSAVE2",
    "KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC",
    "KVM_CLOCK_TSC_STABLE", "KVM_CLOCK_REALTIME", "KVM_CLOCK_HOST_TSC",
    "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED", "KVM_MP_STATE_INIT_RECEIVED",
    "KVM_MP_STATE_HALTED", "KVM_MP_STATE_SIPI_RECEIVED",
)} | {"KVM_IOAPIC_NUM_PINS": s.KVM_IOAPIC_NUM_PINS, "KVM_MAX_XCRS": s.KVM_MAX_XCRS}


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and the Linux UAPI headers (linux-libc-dev)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>',
             'int main(void) {']
    for cname, (_, fields) in STRUCTS.items():
        lines.append(f'printf("sizeof {cname} %zu\\n", sizeof(struct {cname}));')
        for f in fields:
            lines.append(f'printf("offsetof {cname}.{f} %zu\\n", offsetof(struct {cname}, {f}));')
    for path in RUN_UNION:
        lines.append(f'printf("offsetof kvm_run.{path} %zu\\n", offsetof(struct kvm_run, {path}));')
    for path in NESTED:
        cname, member = path.split(".", 1)
        lines.append(f'printf("offsetof {path} %zu\\n", offsetof(struct {cname}, {member}));')
    for path in MEMBER_SIZES:
        cname, member = path.split(".", 1)
        lines.append(f'printf("sizeof {path} %zu\\n", sizeof(((struct {cname} *)0)->{member}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
    for name in CONSTANTS:
        lines.append(f'printf("const {name} %ld\\n", (long){name});')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("kvmh")
    (d / "facts.c").write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(d / "facts"), str(d / "facts.c")], check=True)
    out = subprocess.run([str(d / "facts")], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        facts[f"{kind} {key}"] = int(value)
    return facts


@pytest.mark.parametrize("cname", list(STRUCTS))
def test_struct_layout_matches_header(cname: str, header_facts: dict[str, int]) -> None:
    cls, fields = STRUCTS[cname]
    if cname != "kvm_run":  # the header's kvm_run size includes arch-specific tails
        assert ctypes.sizeof(cls) == header_facts[f"sizeof {cname}"]
    for f in fields:
        assert getattr(cls, f).offset == header_facts[f"offsetof {cname}.{f}"], f


@pytest.mark.parametrize("path", list(RUN_UNION))
def test_kvm_run_exit_union_offsets(path: str, header_facts: dict[str, int]) -> None:
    cls, field = RUN_UNION[path]
    offset = s.kvm_run.u.offset + getattr(cls, field).offset
    assert offset == header_facts[f"offsetof kvm_run.{path}"]


def _offset(cls: type[ctypes.Structure], path: str) -> int:
    """The byte offset of a dotted path (with [i] array indices) inside ``cls``."""
    offset = 0
    t: Any = cls
    for part in path.split("."):
        name, _, index = part.partition("[")
        member = getattr(t, name)
        offset += member.offset
        t = dict(t._fields_)[name]
        if index:
            t = t._type_
            offset += int(index.rstrip("]")) * ctypes.sizeof(t)
    return offset


@pytest.mark.parametrize("path", list(NESTED))
def test_nested_member_offsets(path: str, header_facts: dict[str, int]) -> None:
    cls, ctypes_path = NESTED[path]
    assert _offset(cls, ctypes_path) == header_facts[f"offsetof {path}"]


@pytest.mark.parametrize("path", list(MEMBER_SIZES))
def test_member_sizes(path: str, header_facts: dict[str, int]) -> None:
    assert MEMBER_SIZES[path] == header_facts[f"sizeof {path}"]


@pytest.mark.parametrize("name", list(CONSTANTS))
def test_constants_match_header(name: str, header_facts: dict[str, int]) -> None:
    assert CONSTANTS[name] == header_facts[f"const {name}"]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers_match_header(name: str, header_facts: dict[str, int]) -> None:
    assert getattr(api, name) == header_facts[f"ioctl {name}"]


def test_ioctl_encoding_fields() -> None:
    # _IOC packs direction (2 bits), size (14), type (8), number (8).
    assert _IO(0xAE, 0x80) == 0xAE80
    assert _IOR(0xAE, 0x81, s.kvm_regs) == (2 << 30) | (144 << 16) | 0xAE81
    assert _IOW(0xAE, 0x82, s.kvm_regs) == (1 << 30) | (144 << 16) | 0xAE82
    assert _IOWR(0xAE, 0x05, s.kvm_cpuid2) == (3 << 30) | (8 << 16) | 0xAE05
    with pytest.raises(ValueError):
        _IOR(0xAE, 1, ctypes.c_char * (1 << 14))
