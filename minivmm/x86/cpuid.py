"""The CPUID a vCPU sees: KVM's supported set, filtered.

The filter, applied to KVM_GET_SUPPORTED_CPUID's entries in this order:

1. Leaf 1: set the hypervisor bit (ECX bit 31) so the guest knows it is virtualized, put
   the vCPU's APIC id in EBX[31:24] and the logical processor count in EBX[23:16].
2. Leaf 0xB (extended topology, Intel SDM vol. 2A "CPUID"): one thread per core and
   ``cpu_count`` cores per package, as sub-leaf 0 (SMT) and 1 (core), the vCPU's
   x2APIC id in EDX; KVM reports the leaf empty (EBX = 0), which a guest reads as "no
   topology leaf", so minivmm writes it whole.
3. Leaves 0x40000000/0x40000001 (KVM paravirtual): the "KVMKVMKVM" signature and KVM's
   feature bits as KVM reports them, so Linux finds kvm-clock (KVM_FEATURE_CLOCKSOURCE2)
   and never polls a CMOS clock minivmm does not have. Added if KVM did not list them.
4. Masks: each (leaf, subleaf, register) -> bits to clear, from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal

from ..kvm.structs import kvm_cpuid_entry2

Register = Literal["eax", "ebx", "ecx", "edx"]
CpuidMask = Mapping[tuple[int, int, Register], int]

LEAF_FEATURES: Final = 0x1
LEAF_EXT_TOPOLOGY: Final = 0xB
KVM_CPUID_SIGNATURE: Final = 0x40000000
KVM_CPUID_FEATURES: Final = 0x40000001
CPUID_1_ECX_HYPERVISOR: Final = 1 << 31
CPUID_1_EDX_HTT: Final = 1 << 28
KVM_FEATURE_CLOCKSOURCE: Final = 1 << 0
KVM_FEATURE_NOP_IO_DELAY: Final = 1 << 1
KVM_FEATURE_CLOCKSOURCE2: Final = 1 << 3
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: Final = 1 << 24

_KVM_SIGNATURE: Final = b"KVMKVMKVM\0\0\0"


def _entry(function: int, **regs: int) -> kvm_cpuid_entry2:
    e = kvm_cpuid_entry2(function=function)
    for name, value in regs.items():
        setattr(e, name, value)
    return e


TOPOLOGY_SMT: Final = 1
TOPOLOGY_CORE: Final = 2


def _topology(e: kvm_cpuid_entry2, cpu_index: int, cpu_count: int) -> None:
    """Leaf 0xB sub-leaf e.index: level type, APIC-id shift and count at this level."""
    if e.index == 0:
        e.eax, e.ebx, e.ecx = 0, 1, TOPOLOGY_SMT << 8
    elif e.index == 1:
        e.eax = max(cpu_count - 1, 0).bit_length()
        e.ebx = cpu_count
        e.ecx = (TOPOLOGY_CORE << 8) | 1
    else:
        e.eax = e.ebx = 0
        e.ecx = e.index  # level type 0: invalid, the end of the list
    e.edx = cpu_index


def filter_cpuid(
    supported: Iterable[kvm_cpuid_entry2], *, cpu_index: int, cpu_count: int,
    mask: CpuidMask | None = None,
) -> list[kvm_cpuid_entry2]:
    out: list[kvm_cpuid_entry2] = []
    for src in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == LEAF_FEATURES:
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            e.ebx = (e.ebx & 0x0000FFFF) | (cpu_index << 24) | (min(cpu_count, 255) << 16)
            if cpu_count > 1:
                e.edx |= CPUID_1_EDX_HTT  # "max logical processors" (EBX[23:16]) is valid
        elif e.function == LEAF_EXT_TOPOLOGY:
            _topology(e, cpu_index, cpu_count)
        out.append(e)
    functions = {e.function for e in out}
    if KVM_CPUID_SIGNATURE not in functions:
        ebx, ecx, edx = (int.from_bytes(_KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8))
        out.append(_entry(KVM_CPUID_SIGNATURE, eax=KVM_CPUID_FEATURES, ebx=ebx, ecx=ecx, edx=edx))
    if KVM_CPUID_FEATURES not in functions:
        out.append(_entry(KVM_CPUID_FEATURES, eax=KVM_FEATURE_CLOCKSOURCE
                          | KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_NOP_IO_DELAY))
    for (leaf, subleaf, reg), bits in (mask or {}).items():
        for e in out:
            if e.function == leaf and e.index == subleaf:
                setattr(e, reg, getattr(e, reg) & ~bits)
    return out
