"""What a failure report shows about a vCPU: its registers and the code at RIP."""

from __future__ import annotations

from ..kvm import Vcpu
from ..kvm import constants as c
from ..memory import GuestMemory
from .cpu import PTE_PAGE_SIZE

_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_ADDR_MASK = 0x000F_FFFF_FFFF_F000


def describe_vcpu(vcpu: Vcpu, memory: GuestMemory) -> str:
    """Register state and the instruction bytes at RIP, for a failure report."""
    try:
        r = vcpu.get_regs()
        sr = vcpu.get_sregs()
    except OSError as e:
        return f"(registers unavailable: {e})"
    lines = [f"  vcpu {vcpu.index}"]
    lines += ["  " + "  ".join(f"{n}={getattr(r, n):016x}" for n in _REG_NAMES[i:i + 4])
              for i in range(0, len(_REG_NAMES), 4)]
    lines.append(f"  cr0={sr.cr0:x} cr2={sr.cr2:x} cr3={sr.cr3:x} cr4={sr.cr4:x} "
                 f"efer={sr.efer:x} cs={sr.cs.selector:x} (dpl {sr.cs.dpl}, l={sr.cs.l})")
    paging = sr.cr0 & c.X86_CR0_PG and sr.cr3
    rip = translate(memory, sr.cr3, r.rip) if paging else r.rip
    code = "unavailable (RIP not in guest RAM)"
    if rip is not None and memory.contains(rip, 16):
        code = memory.read(rip, 16).hex(" ")
    lines.append(f"  code at rip: {code}")
    return "\n".join(lines)


def translate(memory: GuestMemory, cr3: int, va: int) -> int | None:
    """Walk the guest's 4-level page tables (long mode); None if ``va`` is not mapped or
    the tables are not in guest RAM."""
    table = cr3 & ~0xFFF
    for shift in (39, 30, 21, 12):
        at = table + ((va >> shift) & 0x1FF) * 8
        if not memory.contains(at, 8):
            return None
        entry = memory.read_u64(at)
        if not entry & 1:
            return None
        if shift in (30, 21) and entry & PTE_PAGE_SIZE:
            mask = (1 << shift) - 1
            return (entry & _ADDR_MASK & ~mask) | (va & mask)
        table = entry & _ADDR_MASK
    return table | (va & 0xFFF)
