"""The platform of one VM: KVM, guest memory, the interrupt controllers and the vCPUs.

A :class:`Platform` owns, through one ``ExitStack``, everything KVM gives a VM: the
/dev/kvm handle, the VM with its in-kernel irqchip (PIC + IOAPIC + local APICs) and PIT,
guest RAM registered as memory slots, and the vCPUs (CPUID, MSRs, FPU and local APIC set
as a BIOS leaves them). If building fails half way, what was made is released at once;
:meth:`close` releases the rest, in the right order (vCPUs, then the VM, then memory).

It holds the two buses that exits are dispatched on, but knows no device: the machine's
wiring (minivmm.vm) puts devices on them.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Final, TypeVar

from .bus import Bus
from .config import format_size
from .errors import UsageError
from .kvm import KvmError, System, Vcpu, Vm, release
from .kvm import constants as c
from .kvm.structs import kvm_cpuid_entry2
from .memory import GuestMemory
from .x86 import cpu as x86cpu
from .x86 import layout
from .x86.cpuid import filter_cpuid

REQUIRED_CAPS: Final = (
    c.KVM_CAP_USER_MEMORY, c.KVM_CAP_IRQCHIP, c.KVM_CAP_PIT2, c.KVM_CAP_IRQFD,
    c.KVM_CAP_IOEVENTFD, c.KVM_CAP_SET_TSS_ADDR, c.KVM_CAP_SET_IDENTITY_MAP_ADDR,
    c.KVM_CAP_EXT_CPUID,
)
_Owned = TypeVar("_Owned", System, Vm, Vcpu)
#: minivmm's own limit on vCPUs (the MP table and MADT sizes are planned for it)
MAX_CPUS: Final = 64


def _host_cpu(supported: list[kvm_cpuid_entry2]) -> str:
    """The CPU's vendor and its family/model/stepping signature (CPUID leaf 0, leaf 1
    EAX), e.g. 'GenuineIntel 0x000906ea'."""
    leaves = {(e.function, e.index): e for e in supported}
    zero, one = leaves.get((0, 0)), leaves.get((1, 0))
    vendor = b"".join(int(r).to_bytes(4, "little") for r in (
        (zero.ebx, zero.edx, zero.ecx) if zero is not None else (0, 0, 0)))
    return (f"{vendor.decode('ascii', 'replace').strip(chr(0))} "
            f"0x{one.eax if one is not None else 0:08x}")


class IrqLine:
    """An interrupt controller input driven with KVM_IRQ_LINE (legacy ISA devices)."""

    def __init__(self, vm: Vm, irq: int) -> None:
        self.vm = vm
        self.irq = irq

    def trigger(self) -> None:
        self.vm.irq_line(self.irq, 1)
        self.vm.irq_line(self.irq, 0)

    def set_level(self, high: bool) -> None:
        self.vm.irq_line(self.irq, 1 if high else 0)


class Platform:
    """KVM VM + memory + irqchip + PIT + vCPUs, released together."""

    def __init__(self, mem_size: int, *, cpus: int = 1,
                 ram_file: str | os.PathLike[str] | None = None) -> None:
        """``ram_file``: guest RAM from a snapshot's RAM file (copy-on-write) instead of
        zeroed memory; the vCPUs are then left for the snapshot's state (no BIOS set-up)."""
        self._stack = ExitStack()
        self._closed = False
        with ExitStack() as building:
            building.callback(self.close)
            self.memory = GuestMemory(mem_size, gap=layout.MMIO_GAP, backing=ram_file)
            # Registered first, so handed to the releaser last: unmapped there after the
            # VM that uses it is gone (minivmm.kvm.release).
            self._stack.callback(release.defer, self.memory.close)
            self.system = self._own(System())
            self.system.require(*REQUIRED_CAPS)
            limit = min(self.system.max_vcpus(), MAX_CPUS)
            if not 1 <= cpus <= limit:
                raise UsageError(f"{cpus} vCPUs: this host's KVM and minivmm take 1 to "
                                 f"{limit}", field="cpus")
            self.vm = self._own(self.system.create_vm())
            self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
            self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            for region in self.memory.regions:
                try:
                    self.vm.set_user_memory_region(region.gpa, region.size,
                                                   region.host_addr)
                except KvmError as e:
                    raise UsageError(f"this host's KVM refused {format_size(mem_size)} of "
                                     f"guest memory ({e.errno_name}): ask for less",
                                     field="mem") from None
            supported = self.system.supported_cpuid()
            self.host_cpu = _host_cpu(supported)
            self.vcpus: list[Vcpu] = []
            cpuid: list[bytes] = []
            for i in range(cpus):
                vcpu = self._own(self.vm.create_vcpu(i))
                entries = filter_cpuid(supported, cpu_index=i, cpu_count=cpus)
                cpuid.extend(bytes(entry) for entry in entries)
                vcpu.set_cpuid2(entries)
                if ram_file is None:  # a snapshot's vCPU state replaces what a BIOS leaves
                    x86cpu.setup_vcpu(vcpu)
                self.vcpus.append(vcpu)
            self._cpuid = b"".join(cpuid)
            building.pop_all()
        self.pio_bus = Bus("port I/O")
        self.mmio_bus = Bus("MMIO")

    @property
    def cpuid_digest(self) -> str:
        """What the guest's CPUID says, all vCPUs, as a SHA-256 (a snapshot restores only
        on a host that gives the same); hashlib (2-3 ms with OpenSSL) is imported when a
        snapshot asks, not at start-up."""
        import hashlib

        return hashlib.sha256(self._cpuid).hexdigest()

    def _own(self, obj: _Owned) -> _Owned:
        self._stack.callback(obj.close)
        return obj

    def irq_line(self, irq: int) -> IrqLine:
        return IrqLine(self.vm, irq)

    def set_boot(self, protocol: str, entry: int, boot_params: int) -> None:
        """Point the boot vCPU at a loaded kernel (see x86.loader.BootInfo)."""
        x86cpu.set_boot_state(self.vcpus[0], self.memory, protocol, entry, boot_params)

    def close(self) -> None:
        """Release the vCPUs, the VM, /dev/kvm and guest memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stack.close()
