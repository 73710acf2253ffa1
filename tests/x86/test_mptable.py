"""The MP table, parsed back with an independent reader (Intel MP spec 1.4 §4)."""

from __future__ import annotations

import struct

import pytest

from minivmm.errors import UsageError
from minivmm.memory import GuestMemory
from minivmm.x86 import layout
from minivmm.x86.mptable import MAX_CPUS, write_mptable

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(mem: GuestMemory) -> dict[int, list[bytes]]:
    fp = mem.read(layout.MPTABLE_ADDR, 16)
    assert fp[:4] == b"_MP_"
    assert sum(fp) % 256 == 0
    physptr, length, spec = struct.unpack_from("<IBB", fp, 4)
    assert (length, spec) == (1, 4)
    assert fp[11] == 0  # feature1: a configuration table follows
    hdr = mem.read(physptr, 44)
    assert hdr[:4] == b"PCMP"
    base_len, spec, _ = struct.unpack_from("<HBB", hdr, 4)
    count, lapic, ext_len = struct.unpack_from("<HIH", hdr, 34)
    assert (spec, lapic, ext_len) == (4, layout.LAPIC_ADDR, 0)
    table = mem.read(physptr, base_len)
    assert sum(table) % 256 == 0
    assert physptr + base_len <= layout.HIMEM_START
    entries: dict[int, list[bytes]] = {t: [] for t in ENTRY_SIZES}
    pos = 44
    for _ in range(count):
        kind = table[pos]
        entries[kind].append(table[pos : pos + ENTRY_SIZES[kind]])
        pos += ENTRY_SIZES[kind]
    assert pos == base_len
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 7, MAX_CPUS])
def test_mptable_round_trip(cpus: int) -> None:
    mem = GuestMemory(16 << 20)
    write_mptable(mem, cpus)
    e = parse(mem)
    assert len(e[0]) == cpus
    for i, cpu in enumerate(e[0]):
        _, apic_id, _, flags = struct.unpack_from("<BBBB", cpu)
        assert apic_id == i
        assert flags == (3 if i == 0 else 1)  # enabled, BSP on 0 only
    assert [b[2:8] for b in e[1]] == [b"ISA   "]
    ((_, ioapic_id, ver, flags, addr),) = [struct.unpack("<BBBBI", b) for b in e[2]]
    assert (ioapic_id, ver, flags, addr) == (cpus, 0x11, 1, layout.IOAPIC_ADDR)
    src = [struct.unpack("<BBHBBBB", b) for b in e[3]]
    assert src == [(3, 0, 0, 0, irq, cpus, irq) for irq in range(24)]
    lint = [struct.unpack("<BBHBBBB", b) for b in e[4]]
    assert lint == [(4, 3, 0, 0, 0, 0, 0), (4, 1, 0, 0, 0, 0xFF, 1)]


@pytest.mark.parametrize("cpus", [0, MAX_CPUS + 1, 1000])
def test_mptable_rejects_cpu_counts(cpus: int) -> None:
    with pytest.raises(UsageError, match=f"{cpus} vCPUs"):
        write_mptable(GuestMemory(16 << 20), cpus)
