"""Machine state KVM keeps: saved from a stopped VM, restored into a fresh one (snapshots).

:func:`save_vcpu` / :func:`restore_vcpu` cover one vCPU: general and special registers,
the FPU/SSE/AVX state (XSAVE where KVM has it, else KVM_GET_FPU) with XCR0, the MSRs KVM
reports through KVM_GET_MSR_INDEX_LIST (api.rst 4.3) that this vCPU accepts, the local
APIC, the MP state, and, where KVM has KVM_CAP_VCPU_EVENTS / KVM_CAP_DEBUGREGS, pending
events and debug registers. :func:`save_vm` / :func:`restore_vm` cover the VM's in-kernel
devices: both PICs and the IOAPIC (KVM_GET_IRQCHIP), the PIT (KVM_GET_PIT2) and kvmclock
(KVM_GET_CLOCK).

Each state is a set of named pieces, each the raw bytes of the <linux/kvm.h> structure it
came from, and serialises to a versioned, self-describing layout (:func:`pack_pieces`), so
a snapshot manifest can store it as one blob and a reader can name what it holds.

Without KVM_CAP_VCPU_EVENTS a restored vCPU loses: an exception or interrupt KVM was in
the middle of injecting, a pending NMI and the NMI mask, the one-instruction interrupt
shadow after STI or MOV SS, and SMM state. Saving at an exit boundary after
:meth:`Vcpu.complete_pending_exit` keeps the first rare; a guest that is inside an NMI
handler or right after STI at the snapshot can still lose an interrupt. Without
KVM_CAP_DEBUGREGS, DR0-DR3, DR6 and DR7 (hardware breakpoints a guest debugger set) are
lost.
"""

from __future__ import annotations

import ctypes
import struct
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeVar

from ..errors import UsageError
from ..kvm import KvmError, Vcpu, Vm
from ..kvm import constants as c
from ..kvm import structs as s

#: Version of the layout written by :func:`pack_pieces`; readers refuse any other.
FORMAT_VERSION: Final = 1
MAGIC: Final = b"MVMSTATE"
_HEAD = struct.Struct("<8sHHB")  # magic, version, piece count, kind length
_PIECE = struct.Struct("<BI")  # name length, data length
_MAX_PIECE: Final = 1 << 24

# MSRs outside KVM_GET_MSR_INDEX_LIST that guests (and minivmm's own vCPU set-up) use:
# the MTRRs (Intel SDM vol. 3 §12.11; QEMU and Firecracker save them the same way).
MSR_MTRR_PHYS_FIRST: Final = 0x200  # 8 variable ranges: base/mask pairs 0x200-0x20f
MSR_MTRR_FIX_64K: Final = 0x250
MSR_MTRR_FIX_16K: Final = (0x258, 0x259)
MSR_MTRR_FIX_4K: Final = tuple(range(0x268, 0x270))
EXTRA_MSRS: Final = (
    *range(MSR_MTRR_PHYS_FIRST, MSR_MTRR_PHYS_FIRST + 16),
    MSR_MTRR_FIX_64K, *MSR_MTRR_FIX_16K, *MSR_MTRR_FIX_4K, c.MSR_MTRR_DEF_TYPE,
)
MSR_KVM_ASYNC_PF_EN: Final = 0x4B564D02
MSR_KVM_ASYNC_PF_INT: Final = 0x4B564D06
MSR_IA32_TSC_DEADLINE: Final = 0x6E0
#: MSRs restored first (order matters to KVM): the async-PF vector before async PF is
#: enabled with it (as QEMU orders them)
_RESTORE_FIRST: Final = {MSR_KVM_ASYNC_PF_INT: 0, MSR_KVM_ASYNC_PF_EN: 1}
#: MSRs that move with time by themselves; a round trip cannot give the same value back
TIME_MSRS: Final = frozenset({c.MSR_IA32_TSC})

_MSR_ENTRY = ctypes.sizeof(s.kvm_msr_entry)
#: fixed-size pieces: name -> structure; "xsave" and "msrs" are checked separately
VCPU_PIECES: Final[dict[str, type[ctypes.Structure]]] = {
    "regs": s.kvm_regs,
    "sregs": s.kvm_sregs,
    "fpu": s.kvm_fpu,
    "xcrs": s.kvm_xcrs,
    "lapic": s.kvm_lapic_state,
    "mp_state": s.kvm_mp_state,
    "vcpu_events": s.kvm_vcpu_events,
    "debugregs": s.kvm_debugregs,
}
IRQCHIPS: Final = {
    "pic_master": c.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": c.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": c.KVM_IRQCHIP_IOAPIC,
}
VM_PIECES: Final[dict[str, type[ctypes.Structure]]] = {
    **dict.fromkeys(IRQCHIPS, s.kvm_irqchip),
    "pit2": s.kvm_pit_state2,
    "clock": s.kvm_clock_data,
}


class StateError(UsageError):
    """Saved machine state that cannot be read or does not fit this host's KVM."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="snapshot")


# -- the serialised layout ---------------------------------------------------------------


def pack_pieces(kind: str, pieces: Mapping[str, bytes]) -> bytes:
    """``MAGIC``, u16 version, u16 count, u8 len + kind; per piece u8 len + name (ASCII),
    u32 size, the bytes. Little-endian throughout."""
    kind_b = kind.encode("ascii")
    out = [_HEAD.pack(MAGIC, FORMAT_VERSION, len(pieces), len(kind_b)), kind_b]
    for name, data in pieces.items():
        name_b = name.encode("ascii")
        out += [_PIECE.pack(len(name_b), len(data)), name_b, bytes(data)]
    return b"".join(out)


def unpack_pieces(kind: str, data: bytes | memoryview) -> dict[str, bytes]:
    """The pieces of a :func:`pack_pieces` blob of ``kind``; :class:`StateError` (one
    line) for anything else: a wrong magic, version or kind, a truncated or padded blob."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise StateError(f"{kind} state: {len(view)} bytes is too short to be one")
    magic, version, count, kind_len = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise StateError(f"{kind} state: not minivmm machine state (bad magic)")
    if version != FORMAT_VERSION:
        raise StateError(f"{kind} state: format version {version}, this minivmm reads "
                         f"version {FORMAT_VERSION}")
    at = _HEAD.size
    got_kind = bytes(view[at:at + kind_len])
    at += kind_len
    if got_kind != kind.encode("ascii"):
        raise StateError(f"{kind} state: this blob holds {got_kind!r} state")
    pieces: dict[str, bytes] = {}
    for _ in range(count):
        if at + _PIECE.size > len(view):
            raise StateError(f"{kind} state: truncated after {len(pieces)} pieces")
        name_len, size = _PIECE.unpack_from(view, at)
        at += _PIECE.size
        if size > _MAX_PIECE or at + name_len + size > len(view):
            raise StateError(f"{kind} state: truncated after {len(pieces)} pieces")
        try:
            name = bytes(view[at:at + name_len]).decode("ascii")
        except UnicodeDecodeError:
            raise StateError(f"{kind} state: piece {len(pieces)} has a non-ASCII name"
                             ) from None
        at += name_len
        if name in pieces:
            raise StateError(f"{kind} state: piece {name!r} appears twice")
        pieces[name] = bytes(view[at:at + size])
        at += size
    if at != len(view):
        raise StateError(f"{kind} state: {len(view) - at} bytes after the last piece")
    return pieces


_S = TypeVar("_S", bound=ctypes.Structure)


def _piece(kind: str, pieces: Mapping[str, bytes], name: str, cls: type[_S]) -> _S:
    data = pieces[name]
    if len(data) != ctypes.sizeof(cls):
        raise StateError(f"{kind} state: {name} is {len(data)} bytes, this KVM's "
                         f"{cls.__name__} is {ctypes.sizeof(cls)}")
    return cls.from_buffer_copy(data)


# -- what a vCPU can save ----------------------------------------------------------------


@dataclass(frozen=True)
class VcpuCaps:
    """What this vCPU's KVM saves, found once per vCPU."""

    xsave_size: int  # bytes of KVM_GET_XSAVE2, 4096 for KVM_GET_XSAVE, 0: only KVM_GET_FPU
    xcrs: bool
    vcpu_events: bool
    debugregs: bool
    msrs: tuple[int, ...]  # the MSRs saved, in KVM's order
    refused_msrs: tuple[int, ...]  # listed (or minivmm's extras) but refused by KVM_GET_MSRS


_caps: weakref.WeakKeyDictionary[Vcpu, VcpuCaps] = weakref.WeakKeyDictionary()


def vcpu_caps(vcpu: Vcpu) -> VcpuCaps:
    """The capabilities and the MSR list for ``vcpu`` (KVM_GET_MSRS stops at the first
    MSR it refuses: each refusal is dropped and the rest asked again)."""
    found = _caps.get(vcpu)
    if found is not None:
        return found
    vm = vcpu.vm
    listed = vm.system.msr_index_list()
    candidates = listed + [m for m in EXTRA_MSRS if m not in listed]
    accepted: list[int] = []
    refused: list[int] = []
    while candidates:
        got = vcpu.get_msrs(candidates)
        accepted += candidates[:len(got)]
        if len(got) < len(candidates):
            refused.append(candidates[len(got)])
        candidates = candidates[len(got) + 1:]
    xsave = 0
    if vm.check_extension(c.KVM_CAP_XSAVE) > 0:
        xsave = max(s.KVM_XSAVE_SIZE, vm.xsave_size())
    found = VcpuCaps(
        xsave_size=xsave,
        xcrs=vm.check_extension(c.KVM_CAP_XCRS) > 0,
        vcpu_events=vm.check_extension(c.KVM_CAP_VCPU_EVENTS) > 0,
        debugregs=vm.check_extension(c.KVM_CAP_DEBUGREGS) > 0,
        msrs=tuple(accepted),
        refused_msrs=tuple(refused),
    )
    _caps[vcpu] = found
    return found


# -- vCPU --------------------------------------------------------------------------------


@dataclass
class VcpuState:
    """One vCPU's saved state: piece name -> the raw bytes of its KVM structure."""

    pieces: dict[str, bytes] = field(default_factory=dict)

    KIND: ClassVar[str] = "vcpu"

    def to_bytes(self) -> bytes:
        return pack_pieces(self.KIND, self.pieces)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> VcpuState:
        return cls(unpack_pieces(cls.KIND, data))

    @property
    def msrs(self) -> dict[int, int]:
        """The saved MSRs, index -> value."""
        raw = self.pieces.get("msrs", b"")
        return {index: value for index, _, value in struct.iter_unpack("<IIQ", raw)}

    @property
    def regs(self) -> s.kvm_regs:
        return s.kvm_regs.from_buffer_copy(self.pieces["regs"])


def save_vcpu(vcpu: Vcpu) -> VcpuState:
    """Everything KVM holds for a stopped vCPU (its thread out of KVM_RUN for good).

    The instruction of the last exit is completed first (:meth:`Vcpu.complete_pending_exit`),
    so the state never describes an I/O instruction half done."""
    caps = vcpu_caps(vcpu)
    vcpu.complete_pending_exit()
    p: dict[str, bytes] = {}
    p["regs"] = bytes(vcpu.get_regs())
    p["sregs"] = bytes(vcpu.get_sregs())
    if caps.xsave_size:
        size = caps.xsave_size if caps.xsave_size > s.KVM_XSAVE_SIZE else 0
        p["xsave"] = bytes(vcpu.get_xsave(size))
    else:
        p["fpu"] = bytes(vcpu.get_fpu())
    if caps.xcrs:
        p["xcrs"] = bytes(vcpu.get_xcrs())
    p["msrs"] = msrs = vcpu.get_msr_entries(list(caps.msrs))
    if len(msrs) != len(caps.msrs) * _MSR_ENTRY:
        refused = caps.msrs[len(msrs) // _MSR_ENTRY]
        raise StateError(f"vCPU {vcpu.index}: KVM_GET_MSRS refused MSR 0x{refused:x}, "
                         "which it read before")
    p["lapic"] = bytes(vcpu.get_lapic())
    p["mp_state"] = bytes(vcpu.get_mp_state())
    if caps.vcpu_events:
        p["vcpu_events"] = bytes(vcpu.get_vcpu_events())
    if caps.debugregs:
        p["debugregs"] = bytes(vcpu.get_debugregs())
    return VcpuState(p)


def _check_vcpu_pieces(caps: VcpuCaps, pieces: Mapping[str, bytes]) -> None:
    unknown = set(pieces) - set(VCPU_PIECES) - {"xsave", "msrs"}
    if unknown:
        raise StateError(f"vcpu state: unknown pieces {', '.join(sorted(unknown))} (made "
                         "by a newer minivmm?)")
    missing = {"regs", "sregs", "msrs", "lapic", "mp_state"} - set(pieces)
    if "xsave" not in pieces and "fpu" not in pieces:
        missing.add("xsave")
    if missing:
        raise StateError(f"vcpu state: missing {', '.join(sorted(missing))}")
    if "xsave" in pieces:
        n = len(pieces["xsave"])
        if not caps.xsave_size:
            raise StateError("vcpu state: has XSAVE state; this host's KVM lacks "
                             "KVM_CAP_XSAVE")
        if n != caps.xsave_size:
            raise StateError(f"vcpu state: XSAVE area of {n} bytes, this host's KVM "
                             f"uses {caps.xsave_size}")
    if "xcrs" in pieces and not caps.xcrs:
        raise StateError("vcpu state: has XCRs; this host's KVM lacks KVM_CAP_XCRS")
    if len(pieces["msrs"]) % _MSR_ENTRY:
        raise StateError(f"vcpu state: MSR list of {len(pieces['msrs'])} bytes is not a "
                         f"whole number of {_MSR_ENTRY}-byte entries")
    for name, cap in (("vcpu_events", caps.vcpu_events), ("debugregs", caps.debugregs)):
        if name in pieces and not cap:
            raise StateError(f"vcpu state: has {name}; this host's KVM cannot restore "
                             "them")


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Load ``state`` into a vCPU that is not running (a fresh one, set up as usual).

    The order follows what KVM needs (QEMU's order): registers, FPU/XSAVE and XCR0,
    special registers (CR0/CR4/EFER and the APIC base), the local APIC before the MSRs
    (the TSC deadline MSR is only accepted in TSC-deadline mode), the MSRs, then the MP
    state and pending events. Every piece is validated before anything is written."""
    caps = vcpu_caps(vcpu)
    p = state.pieces
    _check_vcpu_pieces(caps, p)
    kind = VcpuState.KIND
    regs = _piece(kind, p, "regs", s.kvm_regs)
    sregs = _piece(kind, p, "sregs", s.kvm_sregs)
    lapic = _piece(kind, p, "lapic", s.kvm_lapic_state)
    mp_state = _piece(kind, p, "mp_state", s.kvm_mp_state)
    fpu = _piece(kind, p, "fpu", s.kvm_fpu) if "fpu" in p else None
    xcrs = _piece(kind, p, "xcrs", s.kvm_xcrs) if "xcrs" in p else None
    events = _piece(kind, p, "vcpu_events", s.kvm_vcpu_events) if "vcpu_events" in p else None
    dregs = _piece(kind, p, "debugregs", s.kvm_debugregs) if "debugregs" in p else None
    raw = p["msrs"]
    entries = sorted((raw[i:i + _MSR_ENTRY] for i in range(0, len(raw), _MSR_ENTRY)),
                     key=lambda e: _RESTORE_FIRST.get(int.from_bytes(e[:4], "little"),
                                                      len(_RESTORE_FIRST)))
    msrs = b"".join(entries)
    vcpu.set_regs(regs)
    if "xsave" in p:
        vcpu.set_xsave(s.kvm_xsave_n(len(p["xsave"])).from_buffer_copy(p["xsave"]))
    elif fpu is not None:
        vcpu.set_fpu(fpu)
    if xcrs is not None:
        vcpu.set_xcrs(xcrs)
    vcpu.set_sregs(sregs)
    vcpu.set_lapic(lapic)
    written = vcpu.set_msr_entries(msrs)
    if written != len(entries):
        index = int.from_bytes(entries[written][:4], "little")
        raise StateError(f"vCPU {vcpu.index}: KVM_SET_MSRS refused MSR 0x{index:x} "
                         f"(value 0x{int.from_bytes(entries[written][8:], 'little'):x})")
    vcpu.set_mp_state(mp_state)
    if events is not None:
        vcpu.set_vcpu_events(events)
    if dregs is not None:
        vcpu.set_debugregs(dregs)


# -- VM ----------------------------------------------------------------------------------


@dataclass
class VmState:
    """The VM's in-kernel devices: piece name -> the raw bytes of its KVM structure."""

    pieces: dict[str, bytes] = field(default_factory=dict)

    KIND: ClassVar[str] = "vm"

    def to_bytes(self) -> bytes:
        return pack_pieces(self.KIND, self.pieces)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> VmState:
        return cls(unpack_pieces(cls.KIND, data))

    @property
    def clock(self) -> s.kvm_clock_data:
        return s.kvm_clock_data.from_buffer_copy(self.pieces["clock"])


def save_vm(vm: Vm) -> VmState:
    """Both PICs, the IOAPIC, the PIT and kvmclock, with every vCPU stopped."""
    p = {name: bytes(vm.get_irqchip(chip)) for name, chip in IRQCHIPS.items()}
    p["pit2"] = bytes(vm.get_pit2())
    p["clock"] = bytes(vm.get_clock())
    return VmState(p)


def restore_vm(vm: Vm, state: VmState, *, add_elapsed_time: bool = False) -> None:
    """Load ``state`` into a fresh VM (made with the same irqchip and PIT).

    kvmclock continues from the saved value: the guest sees no time pass while it was
    saved. With ``add_elapsed_time`` (and a clock saved with KVM_CLOCK_REALTIME) KVM adds
    the host's real time since the save instead (api.rst 4.29)."""
    p = state.pieces
    unknown = set(p) - set(VM_PIECES)
    missing = set(VM_PIECES) - set(p)
    if unknown or missing:
        what = [f"unknown {', '.join(sorted(unknown))}"] if unknown else []
        what += [f"missing {', '.join(sorted(missing))}"] if missing else []
        raise StateError(f"vm state: {'; '.join(what)}")
    kind = VmState.KIND
    chips = {name: _piece(kind, p, name, s.kvm_irqchip) for name in IRQCHIPS}
    pit = _piece(kind, p, "pit2", s.kvm_pit_state2)
    clock = _piece(kind, p, "clock", s.kvm_clock_data)
    for name, chip_id in IRQCHIPS.items():
        chip = chips[name]
        if chip.chip_id != chip_id:
            raise StateError(f"vm state: {name} holds irqchip {chip.chip_id}")
    for chip in chips.values():
        vm.set_irqchip(chip)
    vm.set_pit2(pit)
    clock.flags &= c.KVM_CLOCK_REALTIME if add_elapsed_time else 0
    try:
        vm.set_clock(clock)
    except KvmError as e:
        raise StateError(f"vm state: KVM refused the saved clock ({e.errno_name})"
                         ) from None
