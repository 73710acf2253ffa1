"""Every ctypes structure's size and field offsets, checked against <linux/kvm.h>."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from minivmm.kvm import api
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
IOCTLS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
          "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU",
          "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
          "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_IRQFD", "KVM_CREATE_PIT2",
          "KVM_IOEVENTFD", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS",
          "KVM_SET_SREGS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU",
          "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2", "KVM_GET_TSC_KHZ",
          "KVM_SET_SIGNAL_MASK"]


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
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
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
