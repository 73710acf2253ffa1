"""Saving and restoring KVM's machine state (minivmm.x86.vcpustate), on real KVM.

A round trip into a second, fresh VM must give back every piece byte for byte (the pieces
that move with time by themselves are compared for direction only), and a guest stopped
in the middle of a loop, copied with its RAM into a second VM, must carry on exactly where
it stopped: no port write lost or repeated.
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guests import tiny_elf

from minivmm.kvm import constants as c
from minivmm.kvm import structs as s
from minivmm.platform import Platform
from minivmm.stop import StopController
from minivmm.vcpu import VcpuRunner
from minivmm.x86 import vcpustate as vs
from minivmm.x86.loader import load_kernel

MEM = 64 << 20
PORT = 0x600  # the test device: writes at +0, +4, +8; reads at +12
COUNTER_ADDR = 0x30_0000  # a guest RAM counter the loop increments

# Iteration i writes i to PORT, reads PORT + 12 (the device answers with its count of
# reads: i), adds what it read to a register sum that it writes to PORT + 4, and writes
# its RAM counter (== i) to PORT + 8: registers, RAM, and a port read that the snapshot
# interrupted all must survive a restore.
LOOP = f"""
    xor %r8d, %r8d
    xor %r9d, %r9d
    movq $0, {COUNTER_ADDR:#x}
1:  inc %r8
    incq {COUNTER_ADDR:#x}
    mov ${PORT:#x}, %edx
    mov %r8d, %eax
    out %eax, (%dx)
    mov ${PORT + 12:#x}, %edx
    in (%dx), %eax
    add %rax, %r9
    mov ${PORT + 4:#x}, %edx
    mov %r9d, %eax
    out %eax, (%dx)
    mov ${PORT + 8:#x}, %edx
    mov {COUNTER_ADDR:#x}, %eax
    out %eax, (%dx)
    jmp 1b
"""
PER_ITERATION = 4


def expected_accesses(n: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = 0
    while len(out) < n:
        i += 1
        out += [(PORT, i), (PORT + 12, i), (PORT + 4, i * (i + 1) // 2), (PORT + 8, i)]
    return out[:n]


class Recorder:
    """Records (port, value) of every access and stops the VM after ``limit`` of them.
    ``reads`` is the device's own state: the count of reads answered so far."""

    def __init__(self, stop: StopController, limit: int, reads: int) -> None:
        self.stop = stop
        self.limit = limit
        self.reads = reads
        self.accesses: list[tuple[int, int]] = []

    def _record(self, port: int, value: int) -> None:
        if len(self.accesses) < self.limit:
            self.accesses.append((port, value))
        if len(self.accesses) >= self.limit:
            self.stop.request(0, "test", "enough accesses")

    def read(self, offset: int, data: memoryview) -> None:
        self.reads += 1
        data[:] = self.reads.to_bytes(len(data), "little")
        self._record(PORT + offset, self.reads)

    def write(self, offset: int, data: memoryview) -> None:
        self._record(PORT + offset, int.from_bytes(data, "little"))


def run_until(p: Platform, limit: int, reads: int = 0) -> list[tuple[int, int]]:
    """Run vCPU 0 until the guest made ``limit`` port accesses; the vCPU thread has
    ended, the last access's exit not completed."""
    stop = StopController()
    rec = Recorder(stop, limit, reads)
    p.pio_bus.register(PORT, 16, rec)
    runner = VcpuRunner(p.vcpus[0], pio=p.pio_bus, mmio=p.mmio_bus, memory=p.memory,
                        stop=stop)
    runner.start()
    result = stop.wait(120)
    if result is None:
        stop.request(1, "test", "timed out")
    assert runner.join(30)
    assert result is not None and result.reason == "test", (result, rec.accesses[-5:])
    return rec.accesses


@pytest.fixture()
def platforms() -> Iterator[list[Platform]]:
    made: list[Platform] = []
    yield made
    for p in made:
        p.close()


def new_platform(made: list[Platform], cpus: int = 1) -> Platform:
    p = Platform(MEM, cpus=cpus)
    made.append(p)
    return p


def without_time(name: str, data: bytes) -> bytes:
    """A piece with the fields that advance on their own zeroed."""
    if name == "msrs":
        return b"".join(struct.pack("<IIQ", i, 0, 0 if i in vs.TIME_MSRS else v)
                        for i, _, v in struct.iter_unpack("<IIQ", data))
    if name == "pit2":
        pit = s.kvm_pit_state2.from_buffer_copy(data)
        for ch in pit.channels:
            ch.count_load_time = 0
        return bytes(pit)
    if name == "clock":
        return b""
    return data


def dirty_vcpu(p: Platform) -> None:
    """Give vCPU 0 values a fresh vCPU does not have, in every piece."""
    v = p.vcpus[0]
    regs = v.get_regs()
    for i, field in enumerate(s.kvm_regs._fields_):
        setattr(regs, field[0], 0x1111_0000_0000 + i)
    regs.rflags = 0x202
    v.set_regs(regs)
    if vs.vcpu_caps(v).xsave_size:
        # KVM_SET_FPU alone does not do here: KVM_GET_XSAVE (what a guest entry loads)
        # still shows the initial x87/SSE state afterwards, as XSTATE_BV leaves them off.
        xs = v.get_xsave()
        raw = memoryview(xs).cast("B")
        for i in range(16):  # XMM0-15 at byte 160 of the legacy area (SDM vol. 1 §10.5.1)
            raw[160 + 16 * i:176 + 16 * i] = bytes(range(i, i + 16))
        struct.pack_into("<H", raw, 0, 0x27F)  # FCW
        xstate_bv = struct.unpack_from("<Q", raw, 512)[0]
        struct.pack_into("<Q", raw, 512, xstate_bv | 3)  # x87 and SSE state present
        v.set_xsave(xs)
    else:
        fpu = v.get_fpu()
        for i in range(16):
            fpu.xmm[i][:] = bytes(range(i, i + 16))
        fpu.fcw = 0x27F
        v.set_fpu(fpu)
    v.set_msrs({c.MSR_LSTAR: 0xFFFF_FFFF_8100_0000, c.MSR_STAR: 0x0023_0010_0000_0000,
                c.MSR_KERNEL_GS_BASE: 0xFFFF_8880_1234_5000, vs.MSR_MTRR_PHYS_FIRST: 0x6})
    lapic = v.get_lapic()
    raw = memoryview(lapic).cast("B")
    struct.pack_into("<I", raw, 0x80, 0x20)  # TPR
    v.set_lapic(lapic)
    v.set_mp_state(s.kvm_mp_state(mp_state=c.KVM_MP_STATE_HALTED))
    caps = vs.vcpu_caps(v)
    if caps.vcpu_events:
        ev = v.get_vcpu_events()
        ev.nmi.masked = 1
        v.set_vcpu_events(ev)
    if caps.debugregs:
        dr = v.get_debugregs()
        dr.db[0] = 0x20_1000
        dr.dr7 = 0x403  # DR0 enabled (SDM vol. 3 §18.2.4)
        v.set_debugregs(dr)


def dirty_vm(p: Platform) -> None:
    pic = p.vm.get_irqchip(c.KVM_IRQCHIP_PIC_MASTER)
    pic.chip.pic.imr = 0xFA
    pic.chip.pic.irq_base = 0x20
    p.vm.set_irqchip(pic)
    ioapic = p.vm.get_irqchip(c.KVM_IRQCHIP_IOAPIC)
    ioapic.chip.ioapic.redirtbl[4] = 0x0100_0000_0000_0034
    p.vm.set_irqchip(ioapic)


@pytest.mark.kvm
def test_state_round_trips_into_a_fresh_vm(platforms: list[Platform]) -> None:
    a = new_platform(platforms, cpus=2)
    dirty_vcpu(a)
    dirty_vm(a)
    vcpu_state, ap_state = (vs.save_vcpu(v) for v in a.vcpus)
    vm_state = vs.save_vm(a.vm)
    # through the serialised form, as a snapshot would store it
    vcpu_state = vs.VcpuState.from_bytes(vcpu_state.to_bytes())
    vm_state = vs.VmState.from_bytes(vm_state.to_bytes())

    b = new_platform(platforms, cpus=2)
    fresh = vs.save_vcpu(b.vcpus[0])
    vs.restore_vm(b.vm, vm_state)
    vs.restore_vcpu(b.vcpus[0], vcpu_state)
    vs.restore_vcpu(b.vcpus[1], ap_state)
    again = vs.save_vcpu(b.vcpus[0])
    vm_again = vs.save_vm(b.vm)
    # the application processor, never started, waits for INIT/SIPI in both VMs
    ap_again = vs.save_vcpu(b.vcpus[1])
    assert s.kvm_mp_state.from_buffer_copy(ap_again.pieces["mp_state"]).mp_state == (
        c.KVM_MP_STATE_UNINITIALIZED)
    for name, data in ap_state.pieces.items():
        assert without_time(name, ap_again.pieces[name]) == without_time(name, data), name

    assert set(again.pieces) == set(vcpu_state.pieces)
    for name, data in vcpu_state.pieces.items():
        assert without_time(name, again.pieces[name]) == without_time(name, data), name
    # the dirtied values really were saved and restored, not equal by default
    dirtied = ["regs", "msrs", "lapic", "mp_state", "vcpu_events", "debugregs"]
    for name in dirtied[:4] + [n for n in dirtied[4:] if n in again.pieces]:
        assert fresh.pieces[name] != again.pieces[name], name
    xsave = again.pieces.get("xsave")
    if xsave is not None:
        assert xsave[160:176] == bytes(range(16)) and xsave[400:416] == bytes(range(15, 31))
        assert xsave[:2] == b"\x7f\x02"
    else:
        fpu = s.kvm_fpu.from_buffer_copy(again.pieces["fpu"])
        assert bytes(fpu.xmm[15]) == bytes(range(15, 31)) and fpu.fcw == 0x27F
    assert again.msrs[c.MSR_LSTAR] == 0xFFFF_FFFF_8100_0000
    assert again.msrs[c.MSR_IA32_TSC] >= vcpu_state.msrs[c.MSR_IA32_TSC]
    for name, data in vm_state.pieces.items():
        assert without_time(name, vm_again.pieces[name]) == without_time(name, data), name
    assert s.kvm_irqchip.from_buffer_copy(vm_again.pieces["pic_master"]).chip.pic.imr == 0xFA
    assert vm_again.clock.clock >= vm_state.clock.clock


@pytest.mark.kvm
def test_saved_clock_is_what_kvm_continues_from(platforms: list[Platform]) -> None:
    p = new_platform(platforms)
    st = vs.save_vm(p.vm)
    ahead = s.kvm_clock_data.from_buffer_copy(st.pieces["clock"])
    ahead.clock += 3600 * 10**9  # an hour later than this VM's clock
    st.pieces["clock"] = bytes(ahead)
    vs.restore_vm(p.vm, st)
    assert p.vm.get_clock().clock >= ahead.clock


@pytest.mark.kvm
def test_msr_probe_finds_what_kvm_lists(platforms: list[Platform]) -> None:
    p = new_platform(platforms)
    caps = vs.vcpu_caps(p.vcpus[0])
    listed = set(p.system.msr_index_list())
    assert set(caps.msrs) | set(caps.refused_msrs) == listed | set(vs.EXTRA_MSRS)
    assert not set(caps.msrs) & set(caps.refused_msrs)
    assert c.MSR_LSTAR in caps.msrs and c.MSR_IA32_TSC in caps.msrs
    assert vs.vcpu_caps(p.vcpus[0]) is caps  # probed once per vCPU


@pytest.mark.kvm
@pytest.mark.parametrize("pending", ["out", "in"])
def test_guest_continues_after_restore_in_another_vm(pending: str, tmp_path: Path,
                                                     platforms: list[Platform]) -> None:
    """50 whole iterations, then the 51st's first OUT (or its IN) is the last exit before
    the save: its instruction is not complete until KVM_RUN is entered once more (for an
    IN, the value read is not yet in RAX), which save_vcpu must see to."""
    elf = tiny_elf(tmp_path, "loop", LOOP)
    a = new_platform(platforms)
    boot = load_kernel(a.memory, elf, initrd=None, cmdline="")
    a.set_boot(boot.protocol, boot.entry, boot.boot_params_addr)
    stop_at = 50 * PER_ITERATION + (1 if pending == "out" else 2)
    first = run_until(a, stop_at)
    assert first == expected_accesses(stop_at)

    t0 = time.perf_counter()
    vcpu_blob = vs.save_vcpu(a.vcpus[0]).to_bytes()
    vm_blob = vs.save_vm(a.vm).to_bytes()
    save_s = time.perf_counter() - t0
    assert a.memory.read(COUNTER_ADDR, 8) == struct.pack("<Q", 51)

    b = new_platform(platforms)
    for src, dst in zip(a.memory.regions, b.memory.regions, strict=True):
        dst.view[:] = src.view
    a.close()  # nothing of the first VM is needed any more
    t0 = time.perf_counter()
    vs.restore_vm(b.vm, vs.VmState.from_bytes(vm_blob))
    vs.restore_vcpu(b.vcpus[0], vs.VcpuState.from_bytes(vcpu_blob))
    restore_s = time.perf_counter() - t0
    print(f"vCPU+VM state: {len(vcpu_blob) + len(vm_blob)} bytes, save "
          f"{save_s * 1e3:.2f} ms, restore {restore_s * 1e3:.2f} ms")

    reads = sum(1 for port, _ in first if port == PORT + 12)
    second = run_until(b, 90, reads=reads)  # the device's state goes along
    assert first + second == expected_accesses(stop_at + 90)


# -- the serialised layout ---------------------------------------------------------------


def sample() -> vs.VcpuState:
    return vs.VcpuState({"regs": bytes(ctypes.sizeof(s.kvm_regs)), "lapic": b"\x01" * 1024})


def test_layout_round_trips_and_names_its_pieces() -> None:
    st = sample()
    blob = st.to_bytes()
    assert blob.startswith(vs.MAGIC) and b"regs" in blob and b"lapic" in blob
    assert vs.VcpuState.from_bytes(blob) == st
    assert vs.VcpuState.from_bytes(memoryview(blob)) == st


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:5], "too short"),
    (lambda b: b"X" + b[1:], "bad magic"),
    (lambda b: b[:8] + struct.pack("<H", vs.FORMAT_VERSION + 1) + b[10:],
     f"format version {vs.FORMAT_VERSION + 1}"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:-1030], "truncated"),
    (lambda b: b + b"\0", "1 bytes after the last piece"),
    (lambda b: vs.pack_pieces("vm", {"clock": b""}), "holds b'vm' state"),
    (lambda b: b.replace(b"lapic", b"regs\xff"), "non-ASCII name"),
])
def test_damaged_state_is_a_one_line_error(damage: object, message: str) -> None:
    blob = damage(sample().to_bytes())  # type: ignore[operator]
    with pytest.raises(vs.StateError) as e:
        vs.VcpuState.from_bytes(blob)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_duplicate_piece_is_refused() -> None:
    one = vs.pack_pieces("vcpu", {"regs": b"ab"})
    head, body = one[:vs._HEAD.size + 4], one[vs._HEAD.size + 4:]
    two = head[:10] + struct.pack("<H", 2) + head[12:] + body + body
    with pytest.raises(vs.StateError, match="appears twice"):
        vs.VcpuState.from_bytes(two)


@pytest.mark.kvm
def test_restore_refuses_wrong_sizes_and_unknown_pieces(platforms: list[Platform]) -> None:
    p = new_platform(platforms)
    good = vs.save_vcpu(p.vcpus[0])
    for change, message in (
        ({"regs": b"\0" * 10}, "regs is 10 bytes"),
        ({"future": b""}, "unknown pieces future"),
        ({"msrs": b"\0" * 15}, "whole number"),
    ):
        with pytest.raises(vs.StateError, match=message):
            vs.restore_vcpu(p.vcpus[0], vs.VcpuState({**good.pieces, **change}))
    missing = dict(good.pieces)
    del missing["sregs"]
    with pytest.raises(vs.StateError, match="missing sregs"):
        vs.restore_vcpu(p.vcpus[0], vs.VcpuState(missing))
    vm = vs.save_vm(p.vm)
    swapped = {**vm.pieces, "pic_master": vm.pieces["ioapic"]}
    with pytest.raises(vs.StateError, match="pic_master holds irqchip 2"):
        vs.restore_vm(p.vm, vs.VmState(swapped))
    # nothing was written by the refused restores
    assert vs.save_vcpu(p.vcpus[0]).pieces["regs"] == good.pieces["regs"]
    # an MSR this KVM does not know (a snapshot from another kind of host) is named
    bogus = good.pieces["msrs"] + struct.pack("<IIQ", 0xDEAD_BEEF, 0, 7)
    with pytest.raises(vs.StateError, match="KVM_SET_MSRS refused MSR 0xdeadbeef"):
        vs.restore_vcpu(p.vcpus[0], vs.VcpuState({**good.pieces, "msrs": bogus}))


@pytest.mark.kvm
def test_raw_msr_entries_agree_with_get_msrs(platforms: list[Platform]) -> None:
    v = new_platform(platforms).vcpus[0]
    v.set_msrs({c.MSR_LSTAR: 0x1234_5678_9ABC})
    wanted = [c.MSR_STAR, c.MSR_LSTAR, 0xDEAD_BEEF, c.MSR_CSTAR]
    raw = v.get_msr_entries(wanted)
    assert list(struct.iter_unpack("<IIQ", raw)) == [
        (i, 0, val) for i, val in v.get_msrs(wanted).items()]
    assert len(raw) == 2 * 16 and raw[16:20] == struct.pack("<I", c.MSR_LSTAR)
    assert v.set_msr_entries(struct.pack("<IIQ", c.MSR_LSTAR, 0, 42) * 2 +
                             struct.pack("<IIQ", 0xDEAD_BEEF, 0, 1)) == 2
    assert v.get_msrs([c.MSR_LSTAR]) == {c.MSR_LSTAR: 42}
