"""ACPI end to end: the tables and the RSDP pointer are in the guest, and a guest that
enters S5 through the FADT's sleep registers ends the VM as a poweroff with status 0."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
from guests import ProbeRun, guest_artifact, tiny_elf

from minivmm.config import VmConfig
from minivmm.vm import Vm
from minivmm.x86 import acpi, layout, pvh
from minivmm.x86.bootparams import BootParams

pytestmark = pytest.mark.kvm
MiB = 1 << 20

# What ACPICA's AcpiHwExtendedSleep(S5) does, then a debug-exit 7 that only runs if the
# VM is still going.
S5_THEN_EXIT_7 = f"""
mov $0x80, %al
mov ${acpi.SLEEP_STATUS_PORT:#x}, %dx
out %al, %dx
mov ${(acpi.SLEEP_TYPE_S5 << 2) | 0x20:#x}, %al
mov ${acpi.SLEEP_CONTROL_PORT:#x}, %dx
out %al, %dx
mov $7, %al
mov ${layout.DEBUG_EXIT_PORT:#x}, %dx
out %al, %dx
hlt
"""


@pytest.mark.parametrize("acpi_on", [True, False])
def test_s5_powers_off_only_with_acpi(tmp_path: Path, acpi_on: bool) -> None:
    elf = tiny_elf(tmp_path, "s5", S5_THEN_EXIT_7)
    seen: dict[str, object] = {}

    def inspect(machine: Vm) -> None:  # no PVH note: the 64-bit boot protocol
        mem = machine.memory
        zero_page = BootParams.from_buffer_copy(mem.read(layout.ZERO_PAGE_ADDR, 4096))
        seen["rsdp_paddr"] = zero_page.acpi_rsdp_addr
        seen["bios_area"] = mem.read(layout.ACPI_RSDP_ADDR, 8)

    cfg = VmConfig(kernel=elf, mem=32 * MiB, console=f"file:{tmp_path / 'out'}",
                   acpi=acpi_on)
    with Vm(cfg, setup_hooks=[inspect]) as vm:
        result = vm.run()
    if acpi_on:
        assert (result.status, result.reason, result.detail) == (0, "poweroff", "ACPI S5")
        assert seen == {"rsdp_paddr": layout.ACPI_RSDP_ADDR, "bios_area": b"RSD PTR "}
    else:
        assert (result.status, result.reason) == (7, "debug-exit")
        assert seen == {"rsdp_paddr": 0, "bios_area": bytes(8)}


@pytest.mark.parametrize("acpi_on", [True, False])
def test_probe_boots_through_pvh_with_and_without_acpi(tmp_path: Path, acpi_on: bool) -> None:
    """The probe (no ACPI support: devices from the command line, CPUs from the MP
    table) is unaffected; PVH's start info carries the RSDP."""
    seen: list[int] = []

    def inspect(machine: Vm) -> None:
        info = pvh.HvmStartInfo.from_buffer_copy(
            machine.memory.read(layout.PVH_INFO_ADDR, ctypes.sizeof(pvh.HvmStartInfo)))
        seen.append(info.rsdp_paddr)

    log = tmp_path / "out"
    cfg = VmConfig(kernel=guest_artifact("probe.elf"), cmdline="probe.check=virtio",
                   mem=64 * MiB, console=f"file:{log}", rng=True, acpi=acpi_on)
    with Vm(cfg, setup_hooks=[inspect]) as vm:
        result = vm.run()
    run = ProbeRun(result.status, log.read_text())
    run.assert_pass()
    assert run.one("boot=") == "boot=pvh"
    assert seen == [layout.ACPI_RSDP_ADDR if acpi_on else 0]
