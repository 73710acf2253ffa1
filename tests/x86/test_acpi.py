"""The ACPI tables, read back from guest memory the way a kernel finds them, and checked by
ACPICA's own tools: iasl disassembles and recompiles every table without a warning, and
acpiexec loads them and enters S5 through the sleep registers. (Tests needing iasl or
acpiexec fail, never skip, where acpica-tools is installed.)"""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from minivmm.memory import GuestMemory
from minivmm.x86 import acpi, layout
from minivmm.x86.e820 import E820_RESERVED, e820_map

MiB = 1 << 20
VIRTIO_ALL = [(layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_MMIO_SIZE,
               layout.VIRTIO_IRQ_FIRST + i) for i in range(layout.VIRTIO_MMIO_MAX_DEVICES)]

# (cpus, virtio devices, serial, rtc, i8042)
MACHINES = [
    (1, [], True, True, False),
    (2, VIRTIO_ALL[:1], True, True, True),
    (4, VIRTIO_ALL[:4], True, False, False),
    (64, VIRTIO_ALL, True, True, True),
    (1, VIRTIO_ALL[:2], False, False, False),
]
IDS = ["1cpu-bare", "2cpu-1dev-i8042", "4cpu-4dev-nortc", "64cpu-19dev", "noserial"]


@dataclass
class Found:
    rsdp_addr: int
    rsdp: bytes
    tables: dict[str, tuple[int, bytes]]


def find_rsdp(mem: GuestMemory) -> int:
    """Scan 0xE0000-0xFFFFF on 16-byte boundaries, as Linux does without a pointer."""
    area = mem.read(0xE0000, 0x20000)
    for off in range(0, len(area), 16):
        if area[off:off + 8] == b"RSD PTR " and sum(area[off:off + 20]) % 256 == 0:
            return 0xE0000 + off
    raise AssertionError("no RSDP in the BIOS area")


def read_table(mem: GuestMemory, addr: int) -> bytes:
    length = struct.unpack("<I", mem.read(addr + 4, 4))[0]
    data = mem.read(addr, length)
    assert sum(data) % 256 == 0, f"{data[:4]!r}: bad checksum"
    assert length >= 36
    return data


def walk(mem: GuestMemory) -> Found:
    addr = find_rsdp(mem)
    rsdp = mem.read(addr, 36)
    assert rsdp[15] == 2  # revision
    length, xsdt_addr = struct.unpack_from("<IQ", rsdp, 20)
    assert length == 36 and sum(rsdp) % 256 == 0  # extended checksum
    xsdt = read_table(mem, xsdt_addr)
    assert xsdt[:4] == b"XSDT"
    tables = {"XSDT": (xsdt_addr, xsdt)}
    for (ptr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = read_table(mem, ptr)
        tables[t[:4].decode()] = (ptr, t)
    fadt = tables["FACP"][1]
    dsdt32, = struct.unpack_from("<I", fadt, 40)
    x_dsdt, = struct.unpack_from("<Q", fadt, 140)
    assert dsdt32 == x_dsdt
    tables["DSDT"] = (x_dsdt, read_table(mem, x_dsdt))
    return Found(addr, rsdp, tables)


def written(cpus: int, virtio: list[tuple[int, int, int]], serial: bool, rtc: bool,
            i8042: bool) -> tuple[GuestMemory, Found]:
    mem = GuestMemory(16 * MiB)
    rsdp = acpi.write_acpi_tables(mem, cpus=cpus, virtio=virtio, serial=serial, rtc=rtc,
                                  i8042=i8042)
    found = walk(mem)
    assert found.rsdp_addr == rsdp
    return mem, found


@pytest.mark.parametrize(("cpus", "virtio", "serial", "rtc", "i8042"), MACHINES, ids=IDS)
def test_tables_are_found_and_consistent(cpus: int, virtio: list[tuple[int, int, int]],
                                         serial: bool, rtc: bool, i8042: bool) -> None:
    mem, found = written(cpus, virtio, serial, rtc, i8042)
    assert found.rsdp_addr % 16 == 0 and 0xE0000 <= found.rsdp_addr < 0x100000
    assert set(found.tables) == {"XSDT", "FACP", "APIC", "DSDT"}
    reserved = [e for e in e820_map(mem) if e.type == E820_RESERVED]
    spans = [(found.rsdp_addr, 36)] + [(a, len(d)) for a, d in found.tables.values()]
    for addr, size in spans:
        assert any(e.addr <= addr and addr + size <= e.end for e in reserved), hex(addr)
    spans.sort()
    for (a, n), (b, _) in itertools.pairwise(spans):
        assert a + n <= b, "tables overlap"

    fadt = found.tables["FACP"][1]
    assert (len(fadt), fadt[8], fadt[131]) == (276, 6, 4)  # revision 6.4
    flags, = struct.unpack_from("<I", fadt, 112)
    assert flags & acpi.FADT_HW_REDUCED_ACPI
    boot_arch, = struct.unpack_from("<H", fadt, 109)
    assert boot_arch & acpi.IAPC_VGA_NOT_PRESENT
    assert bool(boot_arch & acpi.IAPC_8042) == i8042
    assert bool(boot_arch & acpi.IAPC_CMOS_RTC_NOT_PRESENT) == (not rtc)
    for offset, port in ((244, acpi.SLEEP_CONTROL_PORT), (256, acpi.SLEEP_STATUS_PORT)):
        space, width, bit, access, address = struct.unpack_from("<BBBBQ", fadt, offset)
        assert (space, width, bit, access, address) == (1, 8, 0, 1, port)  # I/O, byte

    madt = found.tables["APIC"][1]
    lapic_addr, madt_flags = struct.unpack_from("<II", madt, 36)
    assert (lapic_addr, madt_flags) == (layout.LAPIC_ADDR, 1)
    entries = parse_madt(madt)
    assert [e[1] for e in entries if e[0] == 0] == [(cpu, cpu, 1) for cpu in range(cpus)]
    assert [e[1] for e in entries if e[0] == 1] == [(0, layout.IOAPIC_ADDR, 0)]
    assert not [e for e in entries if e[0] == 2]  # KVM's routing is the identity

    dsdt = found.tables["DSDT"][1]
    assert dsdt.count(b"LNRO0005") == len(virtio)
    for base, _size, _irq in virtio:
        assert struct.pack("<I", base) in dsdt
    assert dsdt.count(b"ACPI0007") == cpus
    assert (b"_S5_" in dsdt) and (b"COM1" in dsdt) == serial and (b"RTC_" in dsdt) == rtc


def parse_madt(madt: bytes) -> list[tuple[int, tuple[int, ...]]]:
    out: list[tuple[int, tuple[int, ...]]] = []
    pos = 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        body = madt[pos + 2 : pos + length]
        if kind == 0:
            uid, apic_id, flags = struct.unpack("<BBI", body)
            out.append((0, (uid, apic_id, flags)))
        elif kind == 1:
            ioapic_id, _, addr, gsi = struct.unpack("<BBII", body)
            out.append((1, (ioapic_id, addr, gsi)))
        elif kind == 9:
            _, apic_id, flags, uid = struct.unpack("<HIII", body)
            out.append((9, (uid, apic_id, flags)))
        else:
            out.append((kind, tuple(body)))
        pos += length
    assert pos == len(madt)
    return out


def test_x2apic_entries_from_id_255() -> None:
    tables = acpi.build_tables(acpi.Platform(300))
    entries = parse_madt(tables.tables["APIC"][1])
    assert [e[1][1] for e in entries if e[0] == 0] == list(range(255))
    assert [e[1] for e in entries if e[0] == 9] == [(c, c, 1) for c in range(255, 300)]
    assert any(e[0] == 0x0A for e in entries)  # the x2APIC NMI entry


@pytest.mark.parametrize("bad", [
    {"cpus": 0},
    {"cpus": 1, "virtio": [(0xFFFF_F000, 0x2000, 5)]},
    {"cpus": 1, "virtio": [(0xD000_0000, 0x1000, 24)]},
    {"cpus": 1, "virtio": [(0xD000_0000, 0, 5)]},
])
def test_refuses_impossible_machines(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        acpi.write_acpi_tables(GuestMemory(16 * MiB), **bad)  # type: ignore[arg-type]


def test_too_many_cpus_for_the_bios_area() -> None:
    with pytest.raises(ValueError, match="past 0x100000"):
        acpi.build_tables(acpi.Platform(4000))
    with pytest.raises(ValueError, match="4096"):
        acpi.build_tables(acpi.Platform(4097))


# ---- ACPICA's tools ----------------------------------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package acpica-tools)")
    return path


def run(args: list[str], cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    return text


@pytest.mark.parametrize(("cpus", "virtio", "serial", "rtc", "i8042"), MACHINES, ids=IDS)
def test_iasl_disassembles_and_recompiles_every_table(
    tmp_path: Path, cpus: int, virtio: list[tuple[int, int, int]], serial: bool, rtc: bool,
    i8042: bool,
) -> None:
    iasl = tool("iasl")
    _, found = written(cpus, virtio, serial, rtc, i8042)
    for sig, (_, data) in found.tables.items():
        name = sig.lower()
        (tmp_path / f"{name}.dat").write_bytes(data)
        text = run([iasl, "-d", f"{name}.dat"], tmp_path)
        dsl = (tmp_path / f"{name}.dsl").read_text()
        for bad in ("Warning", "Error", "Invalid", "****", "Unknown"):
            assert bad.lower() not in (text + dsl).lower(), f"{sig}: {bad}\n{text}\n{dsl}"
        # Recompiled without optimisations, the source gives back the same bytes.
        text = run([iasl, "-oa", "-p", f"rt-{name}", f"{name}.dsl"], tmp_path)
        assert "0 Errors, 0 Warnings, 0 Remarks" in text, text
        again = (tmp_path / f"rt-{name}.aml").read_bytes()
        assert again[36:] == data[36:] and len(again) == len(data), sig


@pytest.mark.parametrize(("cpus", "virtio", "serial", "rtc", "i8042"), MACHINES[2:4],
                         ids=IDS[2:4])
def test_acpiexec_loads_the_tables_and_enters_s5_through_the_sleep_registers(
    tmp_path: Path, cpus: int, virtio: list[tuple[int, int, int]], serial: bool, rtc: bool,
    i8042: bool,
) -> None:
    acpiexec = tool("acpiexec")
    _, found = written(cpus, virtio, serial, rtc, i8042)
    files = []
    for sig in ("FACP", "DSDT", "APIC"):
        (tmp_path / f"{sig}.dat").write_bytes(found.tables[sig][1])
        files.append(f"{sig}.dat")
    last = len(virtio) - 1
    text = run([acpiexec, "-b", f"resources \\_SB.VR{last:02X}; sleep 5", *files], tmp_path)
    for bad in ("ACPI Error", "ACPI Warning", "ACPI Exception", "AE_"):
        assert bad not in text.replace("AE_NOT_FOUND", ""), text  # _SRS absent: fine
    assert f"{len(virtio) + cpus + serial + rtc + i8042} Devices" in text
    assert "Sleep-A: 05" in text
    assert "HwExtendedSleep" in text  # the FADT's sleep registers, not PM1 blocks
    base, size, irq = virtio[last]
    assert f"Address : {base:08X}" in text and f"Address Length : {size:08X}" in text
    assert f"Dword00 : {irq:08X}" in text and "Triggering : Edge" in text
