"""The machine-state ioctls of minivmm.kvm, against the host's KVM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from minivmm.kvm import KvmError, System, Vcpu, Vm
from minivmm.kvm import constants as c
from minivmm.kvm import structs as s

pytestmark = pytest.mark.kvm


@pytest.fixture()
def vcpu() -> Iterator[Vcpu]:
    with System() as system, system.create_vm() as vm:
        vm.create_irqchip()
        vm.create_pit2()
        with vm.create_vcpu(0) as v:
            yield v


def test_msr_index_list_names_the_syscall_msrs() -> None:
    with System() as system:
        msrs = system.msr_index_list()
    assert len(msrs) == len(set(msrs)) > 4
    assert {c.MSR_STAR, c.MSR_LSTAR, c.MSR_IA32_TSC} <= set(msrs)


def test_xsave2_gives_what_xsave_gives(vcpu: Vcpu) -> None:
    vm: Vm = vcpu.vm
    if vm.check_extension(c.KVM_CAP_XSAVE) <= 0:
        with pytest.raises(KvmError):
            vcpu.get_xsave()
        return
    legacy = bytes(vcpu.get_xsave())
    assert len(legacy) == s.KVM_XSAVE_SIZE
    size = vm.xsave_size()
    if size:  # KVM_GET_XSAVE2 fills the size KVM_CAP_XSAVE2 names, 4096 at least
        assert size >= s.KVM_XSAVE_SIZE
        assert bytes(vcpu.get_xsave(size))[:s.KVM_XSAVE_SIZE] == legacy
    vcpu.set_xsave(vcpu.get_xsave(size))


def test_irqchips_answer_with_their_own_ids(vcpu: Vcpu) -> None:
    vm = vcpu.vm
    for chip_id in (c.KVM_IRQCHIP_PIC_MASTER, c.KVM_IRQCHIP_PIC_SLAVE,
                    c.KVM_IRQCHIP_IOAPIC):
        assert vm.get_irqchip(chip_id).chip_id == chip_id
    ioapic = vm.get_irqchip(c.KVM_IRQCHIP_IOAPIC).chip.ioapic
    assert ioapic.base_address == 0xFEC0_0000  # the IOAPIC's architectural default
    with pytest.raises(KvmError) as e:
        vm.get_irqchip(7)
    assert e.value.ioctl == "KVM_GET_IRQCHIP" and e.value.errno_name == "EINVAL"


def test_mp_state_and_xcrs_round_trip(vcpu: Vcpu) -> None:
    assert vcpu.get_mp_state().mp_state == c.KVM_MP_STATE_RUNNABLE  # vCPU 0 is the BSP
    vcpu.set_mp_state(s.kvm_mp_state(mp_state=c.KVM_MP_STATE_HALTED))
    assert vcpu.get_mp_state().mp_state == c.KVM_MP_STATE_HALTED
    if vcpu.vm.check_extension(c.KVM_CAP_XCRS) > 0:
        xcrs = vcpu.get_xcrs()
        assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].xcr == 0
        assert xcrs.xcrs[0].value & 1  # XCR0 bit 0 (x87) is always set
        vcpu.set_xcrs(xcrs)


def test_pending_exit_completes_without_running_the_guest(vcpu: Vcpu) -> None:
    before = bytes(vcpu.get_regs())
    vcpu.complete_pending_exit()
    assert bytes(vcpu.get_regs()) == before and vcpu.run.immediate_exit == 0
