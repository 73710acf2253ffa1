"""System, Vm and Vcpu: the KVM file descriptors, owned and closed deterministically.

Every ioctl goes through one ctypes call of libc's ioctl (which releases the GIL, so a
vCPU thread blocked in KVM_RUN does not stop the rest of the VMM). A failing ioctl raises
:class:`KvmError` carrying the ioctl's name and the errno's name.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
import threading
from typing import Any, Final

from ..errors import HostError
from . import release
from . import structs as s
from .constants import (
    CAPABILITY_NAMES,
    KVM_API_VERSION,
    KVM_CAP_CHECK_EXTENSION_VM,
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_NR_VCPUS,
    KVM_CAP_XSAVE2,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_PIT_SPEAKER_DUMMY,
)
from .ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO: Final = 0xAE

KVM_GET_API_VERSION: Final = _IO(KVMIO, 0x00)
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST: Final = _IOWR(KVMIO, 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID: Final = _IOWR(KVMIO, 0x05, s.kvm_cpuid2)
KVM_CREATE_VCPU: Final = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION: Final = _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP: Final = _IO(KVMIO, 0x60)
KVM_IRQ_LINE: Final = _IOW(KVMIO, 0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP: Final = _IOWR(KVMIO, 0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP: Final = _IOR(KVMIO, 0x63, s.kvm_irqchip)  # _IOR: so encoded by the header
KVM_IRQFD: Final = _IOW(KVMIO, 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2: Final = _IOW(KVMIO, 0x77, s.kvm_pit_config)
KVM_IOEVENTFD: Final = _IOW(KVMIO, 0x79, s.kvm_ioeventfd)
KVM_SET_CLOCK: Final = _IOW(KVMIO, 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK: Final = _IOR(KVMIO, 0x7C, s.kvm_clock_data)
KVM_RUN: Final = _IO(KVMIO, 0x80)
KVM_GET_REGS: Final = _IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS: Final = _IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS: Final = _IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS: Final = _IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_GET_MSRS: Final = _IOWR(KVMIO, 0x88, s.kvm_msrs)
KVM_SET_MSRS: Final = _IOW(KVMIO, 0x89, s.kvm_msrs)
KVM_SET_SIGNAL_MASK: Final = _IOW(KVMIO, 0x8B, s.kvm_signal_mask)
KVM_GET_FPU: Final = _IOR(KVMIO, 0x8C, s.kvm_fpu)
KVM_SET_FPU: Final = _IOW(KVMIO, 0x8D, s.kvm_fpu)
KVM_GET_LAPIC: Final = _IOR(KVMIO, 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC: Final = _IOW(KVMIO, 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2: Final = _IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_GET_MP_STATE: Final = _IOR(KVMIO, 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE: Final = _IOW(KVMIO, 0x99, s.kvm_mp_state)
# VM ioctls and vCPU ioctls share these numbers; the argument sizes tell them apart.
KVM_GET_PIT2: Final = _IOR(KVMIO, 0x9F, s.kvm_pit_state2)
KVM_SET_PIT2: Final = _IOW(KVMIO, 0xA0, s.kvm_pit_state2)
KVM_GET_VCPU_EVENTS: Final = _IOR(KVMIO, 0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS: Final = _IOW(KVMIO, 0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS: Final = _IOR(KVMIO, 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS: Final = _IOW(KVMIO, 0xA2, s.kvm_debugregs)
KVM_GET_TSC_KHZ: Final = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE: Final = _IOR(KVMIO, 0xA4, s.kvm_xsave)
KVM_SET_XSAVE: Final = _IOW(KVMIO, 0xA5, s.kvm_xsave)
KVM_GET_XCRS: Final = _IOR(KVMIO, 0xA6, s.kvm_xcrs)
KVM_SET_XCRS: Final = _IOW(KVMIO, 0xA7, s.kvm_xcrs)
KVM_GET_XSAVE2: Final = _IOR(KVMIO, 0xCF, s.kvm_xsave)

IOCTL_NAMES: Final = {
    v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and k != "KVMIO"
}

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
# The same libc function, prototyped with an integer third argument.
_ioctl_int_fn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, use_errno=True
)(ctypes.cast(_libc.ioctl, ctypes.c_void_p).value or 0)
# The same function once more, for the vCPU loop's KVM_RUN only: without a prototype,
# ctypes passes the Python ints (fd, KVM_RUN, 0) as C ints with no argtypes conversion,
# about 0.3 us less per call than _ioctl_int_fn here (libffi widens each int to the
# 64-bit register the variadic ioctl reads, so only values below 2**31 may be passed).
kvm_run_fn = ctypes.CDLL(None, use_errno=True).ioctl  # its own handle: no argtypes
assert KVM_RUN < 1 << 31


@functools.cache
def _msr_index_struct(n: int) -> struct.Struct:
    """Packs ``n`` MSR indices into kvm_msr_entry slots (index; reserved and data zero)."""
    return struct.Struct("<" + "I12x" * n)


class KvmError(HostError, OSError):
    """A KVM ioctl failed. ``ioctl`` names the request, ``errno_name`` the error."""

    def __init__(self, request: int, err: int) -> None:
        self.ioctl = IOCTL_NAMES.get(request, f"ioctl 0x{request:x}")
        self.errno_name = errno.errorcode.get(err, str(err))
        OSError.__init__(self, err, f"{self.ioctl} failed: {self.errno_name} "
                                    f"({os.strerror(err)})")


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """ioctl(2) with a ctypes structure (passed by reference), an int, or nothing."""
    if arg is None or isinstance(arg, int):
        ret = _ioctl_int_fn(fd, request, arg or 0)
    else:
        ret = _ioctl(fd, request, ctypes.byref(arg))
    if ret < 0:
        raise KvmError(request, ctypes.get_errno())
    return int(ret)


class _Fd:
    """An owned file descriptor, closed exactly once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


class System(_Fd):
    """/dev/kvm itself."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HostError(f"cannot open {path} ({e.strerror}): minivmm needs KVM; check "
                            "that the kvm module is loaded and that you may read and write "
                            f"{path}") from None
        super().__init__(fd)
        version = ioctl(self.fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            self.close()
            raise HostError(f"{path} speaks KVM API {version}, minivmm needs "
                            f"{KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def require(self, *caps: int) -> None:
        """Raise a sentence naming the first capability this host's KVM lacks."""
        for cap in caps:
            if self.check_extension(cap) <= 0:
                name = CAPABILITY_NAMES.get(cap, f"capability {cap}")
                raise HostError(f"this host's KVM lacks {name}, which minivmm needs")

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def max_vcpus(self) -> int:
        """KVM_CAP_MAX_VCPUS (falling back to KVM_CAP_NR_VCPUS, then 4, as api.rst says)."""
        return (self.check_extension(KVM_CAP_MAX_VCPUS)
                or self.check_extension(KVM_CAP_NR_VCPUS) or 4)

    def supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        n = 64
        while True:
            buf = s.kvm_cpuid2_n(n)()
            buf.nent = n
            try:
                ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [buf.entries[i] for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU (api.rst
        4.3). Not every one of them need be accepted by a given vCPU (see KVM_GET_MSRS)."""
        n = 0
        while True:
            buf = s.kvm_msr_list_n(n)()
            buf.nmsrs = n
            try:
                ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as e:
                # E2BIG: KVM wrote the count it needs into nmsrs
                if e.errno == errno.E2BIG and n < buf.nmsrs <= 65536:
                    n = int(buf.nmsrs)
                    continue
                raise
            return [int(buf.indices[i]) for i in range(buf.nmsrs)]

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, KVM_CREATE_VM, 0))


class Vm(_Fd):
    """A VM: memory slots, the in-kernel irqchip and PIT, irqfds and ioeventfds."""

    def __init__(self, system: System, fd: int) -> None:
        super().__init__(fd)
        self.system = system
        self._next_slot = 0
        self._irq_level = s.kvm_irq_level()
        self._irq_lock = threading.Lock()  # several vCPU threads drive ISA lines

    def close(self) -> None:
        """Close the VM's descriptor on the releaser thread (minivmm.kvm.release: the
        kernel destroys the VM there, which waits for RCU grace periods) and return."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            release.defer(functools.partial(os.close, fd))

    def __del__(self) -> None:
        # A VM nobody closed: closed here, not handed over (a finalizer may run while
        # the releaser's lock is held by this thread).
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def set_user_memory_region(self, gpa: int, size: int, host_addr: int, flags: int = 0) -> int:
        region = s.kvm_userspace_memory_region(
            slot=self._next_slot, flags=flags, guest_phys_addr=gpa,
            memory_size=size, userspace_addr=host_addr,
        )
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        self._next_slot += 1
        return int(region.slot)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        ioctl(self.fd, KVM_CREATE_PIT2, s.kvm_pit_config(flags=KVM_PIT_SPEAKER_DUMMY))

    def irq_line(self, irq: int, level: int) -> None:
        with self._irq_lock:
            lv = self._irq_level
            lv.irq = irq
            lv.level = level
            ioctl(self.fd, KVM_IRQ_LINE, lv)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        flags = KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, KVM_IRQFD, s.kvm_irqfd(fd=fd, gsi=gsi, flags=flags))

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        flags = 0
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        ioctl(self.fd, KVM_IOEVENTFD, s.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags))

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (its answer may differ from the system's), or on
        /dev/kvm where KVM cannot be asked per VM."""
        if self.system.check_extension(KVM_CAP_CHECK_EXTENSION_VM) > 0:
            return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)
        return self.system.check_extension(cap)

    def xsave_size(self) -> int:
        """The bytes KVM_GET_XSAVE2 fills (KVM_CAP_XSAVE2), or 0 where KVM lacks it."""
        return max(0, self.check_extension(KVM_CAP_XSAVE2))

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        """One in-kernel interrupt controller: KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC."""
        chip = s.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        ioctl(self.fd, KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.kvm_pit_state2:
        st = s.kvm_pit_state2()
        ioctl(self.fd, KVM_GET_PIT2, st)
        return st

    def set_pit2(self, st: s.kvm_pit_state2) -> None:
        ioctl(self.fd, KVM_SET_PIT2, st)

    def get_clock(self) -> s.kvm_clock_data:
        """KVM_GET_CLOCK: kvmclock's nanoseconds (and, where flagged, realtime/host TSC)."""
        data = s.kvm_clock_data()
        ioctl(self.fd, KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: s.kvm_clock_data) -> None:
        ioctl(self.fd, KVM_SET_CLOCK, data)

    def create_vcpu(self, index: int) -> Vcpu:
        return Vcpu(self, index, ioctl(self.fd, KVM_CREATE_VCPU, index))


class Vcpu(_Fd):
    """One vCPU and its shared kvm_run page."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.index = index
        size = vm.system.vcpu_mmap_size()
        self.run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = s.kvm_run.from_buffer(self.run_map)
        #: the kvm_run page as a memoryview, for the run loop's struct reads
        self.run_view = memoryview(self.run_map)

    def close(self) -> None:
        if self.fd >= 0:
            self.__dict__.pop("run", None)
            self.run_view.release()
            try:
                self.run_map.close()
            except BufferError:
                pass  # a view of the page is still held (a traceback): unmapped with it
        super().close()

    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        ioctl(self.fd, KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        ioctl(self.fd, KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        ioctl(self.fd, KVM_SET_FPU, fpu)

    def set_cpuid2(self, entries: list[s.kvm_cpuid_entry2]) -> None:
        buf = s.kvm_cpuid2_n(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, KVM_SET_CPUID2, buf)

    def set_msrs(self, msrs: dict[int, int]) -> None:
        buf = s.kvm_msrs_n(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        written = ioctl(self.fd, KVM_SET_MSRS, buf)
        if written != len(msrs):
            bad = list(msrs)[written]
            raise OSError(f"KVM_SET_MSRS accepted {written} of {len(msrs)} MSRs; "
                          f"MSR 0x{bad:x} was refused")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: index -> value for the MSRs KVM read. KVM stops at the first MSR
        it refuses, so the result holds a prefix of ``indices``: the next one was refused."""
        n = len(indices)
        buf = s.kvm_msrs_n(n)()
        buf.nmsrs = n
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        read = ioctl(self.fd, KVM_GET_MSRS, buf)
        return {int(buf.entries[i].index): int(buf.entries[i].data) for i in range(read)}

    def get_msr_entries(self, indices: list[int]) -> bytes:
        """KVM_GET_MSRS, answered as the raw array of struct kvm_msr_entry (16 bytes
        each) for the MSRs KVM read: a prefix of ``indices``, as in :meth:`get_msrs`."""
        n = len(indices)
        buf = s.kvm_msrs_n(n)()
        head = ctypes.sizeof(s.kvm_msrs)
        buf.nmsrs = n
        _msr_index_struct(n).pack_into(buf, head, *indices)
        read = ioctl(self.fd, KVM_GET_MSRS, buf)
        return ctypes.string_at(ctypes.addressof(buf) + head,
                                read * ctypes.sizeof(s.kvm_msr_entry))

    def set_msr_entries(self, entries: bytes) -> int:
        """KVM_SET_MSRS from a raw kvm_msr_entry array; the number KVM wrote (it stops at
        the first MSR it refuses)."""
        size = ctypes.sizeof(s.kvm_msr_entry)
        if len(entries) % size:
            raise ValueError(f"{len(entries)} bytes is not a whole number of MSR entries")
        buf = s.kvm_msrs_n(len(entries) // size)()
        buf.nmsrs = len(entries) // size
        ctypes.memmove(ctypes.addressof(buf) + ctypes.sizeof(s.kvm_msrs), entries,
                       len(entries))
        return ioctl(self.fd, KVM_SET_MSRS, buf)

    def get_mp_state(self) -> s.kvm_mp_state:
        st = s.kvm_mp_state()
        ioctl(self.fd, KVM_GET_MP_STATE, st)
        return st

    def set_mp_state(self, st: s.kvm_mp_state) -> None:
        ioctl(self.fd, KVM_SET_MP_STATE, st)

    def get_xsave(self, size: int = 0) -> ctypes.Structure:
        """The XSAVE area: KVM_GET_XSAVE (4096 bytes), or KVM_GET_XSAVE2 with ``size`` =
        Vm.xsave_size() when that is non-zero."""
        if size:
            xs: ctypes.Structure = s.kvm_xsave_n(size)()
            ioctl(self.fd, KVM_GET_XSAVE2, xs)
        else:
            xs = s.kvm_xsave()
            ioctl(self.fd, KVM_GET_XSAVE, xs)
        return xs

    def set_xsave(self, xs: ctypes.Structure) -> None:
        """KVM_SET_XSAVE (which reads as many bytes as KVM_GET_XSAVE2 wrote)."""
        ioctl(self.fd, KVM_SET_XSAVE, xs)

    def get_xcrs(self) -> s.kvm_xcrs:
        xcrs = s.kvm_xcrs()
        ioctl(self.fd, KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        ioctl(self.fd, KVM_SET_XCRS, xcrs)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        """Pending and injected exceptions, interrupts, NMIs (KVM_CAP_VCPU_EVENTS)."""
        ev = s.kvm_vcpu_events()
        ioctl(self.fd, KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, ev: s.kvm_vcpu_events) -> None:
        ioctl(self.fd, KVM_SET_VCPU_EVENTS, ev)

    def get_debugregs(self) -> s.kvm_debugregs:
        """DR0-3, DR6, DR7 (KVM_CAP_DEBUGREGS)."""
        dr = s.kvm_debugregs()
        ioctl(self.fd, KVM_GET_DEBUGREGS, dr)
        return dr

    def set_debugregs(self, dr: s.kvm_debugregs) -> None:
        ioctl(self.fd, KVM_SET_DEBUGREGS, dr)

    def complete_pending_exit(self) -> None:
        """Finish the instruction of the last exit (an I/O or MMIO read's data written
        back, RIP past it) without running the guest: KVM_RUN with immediate_exit set,
        as api.rst advises before saving state. Call it with the vCPU's thread stopped."""
        if self.vm.system.check_extension(KVM_CAP_IMMEDIATE_EXIT) <= 0:
            # without it KVM_RUN would run the guest, with nobody to handle its exits
            raise HostError("this host's KVM lacks KVM_CAP_IMMEDIATE_EXIT, which saving "
                            "a vCPU's state needs")
        run = self.run
        run.immediate_exit = 1
        try:
            ioctl(self.fd, KVM_RUN)
        except KvmError as e:
            if e.errno not in (errno.EINTR, errno.EAGAIN):
                raise
        else:
            raise KvmError(KVM_RUN, errno.EINVAL)  # returned without honouring it
        finally:
            run.immediate_exit = 0

    def get_lapic(self) -> s.kvm_lapic_state:
        st = s.kvm_lapic_state()
        ioctl(self.fd, KVM_GET_LAPIC, st)
        return st

    def set_lapic(self, st: s.kvm_lapic_state) -> None:
        ioctl(self.fd, KVM_SET_LAPIC, st)

    def set_signal_mask(self, signals: set[int]) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is in KVM_RUN."""
        mask = s.kvm_signal_mask_sigset()
        mask.len = 8  # the kernel's sigset_t on x86-64
        bits = 0
        for sig in signals:
            bits |= 1 << (sig - 1)
        mask.sigset = bits
        ioctl(self.fd, KVM_SET_SIGNAL_MASK, mask)

    def tsc_khz(self) -> int:
        return ioctl(self.fd, KVM_GET_TSC_KHZ)
