"""The probe guest (guest/probe) under QEMU's microvm: the proof that the probe is right.

minivmm's end-to-end tests trust what the probe prints, so the probe itself is checked
against the reference VMM first. QEMU boots probe.elf through its Xen PVH note (firmware
qboot builds the hvm_start_info); the probe reports through the 8250 at 0x3f8 and ends
QEMU through isa-debug-exit at 0x501, which makes QEMU exit with status (v << 1) | 1
(v = 0: every check passed). With -no-reboot a triple fault ends QEMU with status 0.

Skipped (with the reason) only where qemu-system-x86_64 is not installed. Without
/dev/kvm, QEMU runs the probe under TCG instead, so the tests still run.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from guests import QEMU, debug_exit_status, qemu_probe
from guests import ProbeRun as Run

if QEMU is None:
    pytest.skip("qemu-system-x86_64 is not installed", allow_module_level=True)

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
PROBE_SRC = REPO / "guest" / "probe"
MiB = 1 << 20
TIMEOUT = 120  # seconds; a run takes well under one second here

# The debug-exit codes the probe uses besides "number of failed checks".
EXIT_FAULT = 125

KV = re.compile(r"(\w+)=(\S+)")


@pytest.fixture(scope="session")
def probe_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the probe from the current sources into a private directory."""
    out = tmp_path_factory.mktemp("probe-out")
    subprocess.run(["make", "-s", "-C", str(PROBE_SRC), f"OUT={out}"], check=True, timeout=300)
    elf = out / "probe.elf"
    assert elf.is_file()
    return elf


def qemu(elf: Path, append: str, *, mem: str = "128M", extra: tuple[str, ...] = ()) -> Run:
    return qemu_probe(elf, append, mem=mem, extra=extra, timeout=TIMEOUT)


def test_boot_report_and_cmdline_intact(probe_elf: Path) -> None:
    special = "a=b,c:d/e x=~!@#$%^&*()_+[]{}|;'<>?.`"
    append = f"console=ttyS0 {special} probe.expect_mem=128M"
    r = qemu(probe_elf, append)
    assert r.status == debug_exit_status(0), r.raw
    assert r.one("boot=") == "boot=pvh"
    cmdline = r.one("cmdline=")[len("cmdline=") :]
    # QEMU may append virtio_mmio.device= entries; what we passed comes first, intact.
    assert cmdline == append or cmdline.startswith(append + " "), r.raw
    for name in ("boot", "memmap", "bss", "options", "expect_mem"):
        assert r.check(name).startswith(f"check {name} ok"), r.raw
    assert r.lines[-1] == "result pass"


@pytest.mark.parametrize("mem_mib", [64, 128, 1000, 2048, 5120])
def test_memory_map_matches_m(probe_elf: Path, mem_mib: int) -> None:
    r = qemu(probe_elf, f"probe.expect_mem={mem_mib}M", mem=f"{mem_mib}M")
    assert r.status == debug_exit_status(0), r.raw
    e820 = [e for e in r.e820() if e[1]]  # qboot ends its PVH map with an empty entry
    usable = [(a, s) for a, s, t in e820 if t == 1]
    assert usable, r.raw
    low_end = max(a + s for a, s in usable if a + s <= 1 << 32)
    high = [a + s for a, s in usable if a + s > 1 << 32]
    ram = low_end + (max(high) - (1 << 32) if high else 0)
    assert ram == mem_mib * MiB
    f = r.fields("mem ")
    assert int(f["ram"]) == ram
    assert int(f["total"]) == sum(s for _, s in usable)
    assert int(f["ranges"]) == len(usable)
    assert r.check("expect_mem") == f"check expect_mem ok ram={ram}"
    assert r.check("memmap") == "check memmap ok"
    # The probe (loaded at 1 MiB) sits in usable RAM.
    assert any(a <= 0x100000 < a + s for a, s in usable)


def test_expect_mem_mismatch_fails(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.expect_mem=256M", mem="128M")
    assert r.check("expect_mem") == (f"check expect_mem FAIL ram={128 * MiB} expected={256 * MiB}")
    assert r.lines[-1] == "result fail 1"
    assert r.status == debug_exit_status(1), r.raw


def test_unknown_option_and_check_fail(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.bogus=1 probe.check=nope")
    assert r.check("options") == "check options FAIL unknown option probe.bogus"
    assert r.check("nope") == "check nope FAIL unknown check"
    assert r.lines[-1] == "result fail 2"
    assert r.status == debug_exit_status(2), r.raw


def test_cpl3_check(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=cpl3")
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check cpl3 ok")
    assert f["iterations"] == "10000000"
    assert int(f["cycles"]) > 0


def test_virtio_device_listed(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=virtio", extra=("-device", "virtio-rng-device"))
    assert r.status == debug_exit_status(0), r.raw
    cmdline = r.one("cmdline=")
    m = re.search(r"virtio_mmio\.device=(\d+)@(0x[0-9a-f]+):(\d+)", cmdline)
    assert m, r.raw
    f = r.fields("virtio dev ")
    assert int(f["base"], 16) == int(m.group(2), 16)
    assert int(f["size"]) == int(m.group(1))
    assert int(f["irq"]) == int(m.group(3))
    assert f["magic"] == "0x74726976"
    assert f["version"] == "2"
    assert f["device"] == "4"  # entropy source
    assert r.check("virtio") == "check virtio ok devices=1"


def test_virtio_check_fails_without_devices(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=virtio")
    assert r.check("virtio").startswith("check virtio FAIL ")
    assert r.status == debug_exit_status(1), r.raw


def test_virtio_mmio_device_syntax(probe_elf: Path) -> None:
    # Nothing lives there under QEMU: the listing shows what the probe parsed and read.
    r = qemu(
        probe_elf, "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=0x200@0xd0001000:6:3"
    )
    assert r.status == debug_exit_status(0), r.raw
    devs = [dict(KV.findall(line)) for line in r.lines if line.startswith("virtio dev ")]
    assert [(d["base"], d["size"], d["irq"]) for d in devs] == [
        ("0xd0000000", "4096", "5"),
        ("0xd0001000", "512", "6"),
    ]
    bad = qemu(probe_elf, "virtio_mmio.device=4K@zz:5")
    assert bad.check("options").startswith("check options FAIL bad virtio_mmio.device=")
    assert bad.status == debug_exit_status(1), bad.raw


def test_triple_fault_ends_qemu(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=triplefault")
    assert r.lines[-2:] == ["result pass", "triplefault"], r.raw
    assert r.status == 0, r.raw  # -no-reboot: the reset ends QEMU normally


def test_cpl3_exception_is_reported(probe_elf: Path) -> None:
    # Port I/O at CPL3 raises #GP: the probe must report it and end, not loop.
    r = qemu(probe_elf, "probe.check=fault")
    f = r.fields("fault exception")
    assert f["vector"] == "13"
    assert int(f["cs"], 16) & 3 == 3
    assert r.lines[-1] == "result fail fault"
    assert r.status == debug_exit_status(EXIT_FAULT), r.raw


# ---- the probe as a virtio-mmio driver (guest/probe/vcheck.c, blk.c) ----------------

SECTOR = 512
GOLDEN = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1
BLK_WRITTEN = 8  # the probe writes the last 8 sectors with the pattern of seed + 1

RNG = ("-device", "virtio-rng-device")


def pattern(seed: int, sector: int) -> bytes:
    """Sector `sector` of the probe's blk pattern: word w = seed*GOLDEN + sector*64 + w."""
    base = (seed * GOLDEN + sector * 64) & M64
    return b"".join(((base + w) & M64).to_bytes(8, "little") for w in range(64))


def make_image(path: Path, seed: int, sectors: int) -> Path:
    path.write_bytes(b"".join(pattern(seed, s) for s in range(sectors)))
    return path


def blk(img: Path, *, serial: str | None = None, ro: bool = False, n: int = 0) -> tuple[str, ...]:
    dev = f"virtio-blk-device,drive=d{n}" + (f",serial={serial}" if serial else "")
    drive = f"id=d{n},file={img},format=raw,if=none" + (",readonly=on" if ro else "")
    return ("-device", dev, "-drive", drive)


def console(path: Path) -> tuple[str, ...]:
    return (
        "-device",
        "virtio-serial-device",
        "-device",
        "virtconsole,chardev=c0",
        "-chardev",
        f"file,id=c0,path={path}",
    )


def test_rng_check(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=rng", extra=RNG)
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check rng ok")
    assert f["requests"] == "4"
    assert 0 < int(f["bytes"]) <= 256
    assert int(f["features"], 16) & (1 << 32)  # VERSION_1 negotiated
    assert int(f["queue_size"]) in (1, 2, 4, 8, 16)


def test_rng_irq_check(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=rng_irq", extra=RNG)
    assert r.status == debug_exit_status(0), r.raw
    irq = int(r.fields("virtio dev ")["irq"])
    f = r.fields("check rng_irq ok")
    assert f["irq"] == str(irq)
    assert int(f["vector"], 16) == 0x30 + irq
    assert f["interrupts"] == "1"
    assert int(f["isr"], 16) & 1


def test_blk_check_reads_and_writes(probe_elf: Path, tmp_path: Path) -> None:
    seed, sectors = 0x1234, 4096
    img = make_image(tmp_path / "disk.img", seed, sectors)
    append = (
        f"probe.check=blk probe.blk_pattern={seed} probe.blk_sectors={sectors}"
        " probe.blk_serial=probe-disk-1"
    )
    r = qemu(probe_elf, append, extra=blk(img, serial="probe-disk-1"))
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check blk ok")
    assert f["capacity"] == str(sectors)
    assert f["ro"] == "0" and f["written"] == str(BLK_WRITTEN) and f["flush"] == "yes"
    assert f["id"] == "probe-disk-1"
    data = img.read_bytes()
    assert len(data) == sectors * SECTOR
    for s in range(sectors):
        want = pattern(seed + 1 if s >= sectors - BLK_WRITTEN else seed, s)
        assert data[s * SECTOR : (s + 1) * SECTOR] == want, f"sector {s}"


def test_blk_check_read_only_disk(probe_elf: Path, tmp_path: Path) -> None:
    seed, sectors = 99, 64
    img = make_image(tmp_path / "ro.img", seed, sectors)
    before = img.read_bytes()
    r = qemu(
        probe_elf,
        f"probe.check=blk probe.blk_pattern={seed} probe.blk_ro=1",
        extra=blk(img, ro=True),
    )
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check blk ok")
    assert f["ro"] == "1" and f["written"] == "0"
    assert img.read_bytes() == before


@pytest.mark.parametrize(
    ("append", "ro", "why"),
    [
        ("probe.blk_sectors=63", False, "capacity 64 sectors, probe.blk_sectors=63"),
        ("probe.blk_pattern=6", False, "sector 0 word 0 is 0x"),
        ("probe.blk_serial=other", False, 'get_id: "serial1" (7 bytes), want probe.blk_serial'),
        ("probe.blk_ro=1", False, "device does not offer VIRTIO_BLK_F_RO but probe.blk_ro=1"),
        ("", True, "device offers VIRTIO_BLK_F_RO but probe.blk_ro=0"),
        ("probe.blk=1", False, "no virtio-blk device (virtio device ID 2) with index 1"),
    ],
)
def test_blk_check_fails_precisely(
    probe_elf: Path, tmp_path: Path, append: str, ro: bool, why: str
) -> None:
    img = make_image(tmp_path / "disk.img", 5, 64)
    r = qemu(probe_elf, f"probe.check=blk {append}", extra=blk(img, serial="serial1", ro=ro))
    line = r.check("blk")
    assert line.startswith("check blk FAIL " + why), r.raw
    assert r.status == debug_exit_status(1), r.raw


def test_console_check(probe_elf: Path, tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    r = qemu(probe_elf, "probe.check=console", extra=console(out))
    assert r.status == debug_exit_status(0), r.raw
    assert r.check("console") == "check console ok bytes=33"
    assert out.read_bytes() == b"probe: hello from virtio-console\n"


def test_features_refused_check(probe_elf: Path) -> None:
    # QEMU masks unoffered feature bits and keeps FEATURES_OK (allowed by virtio 1.2
    # 2.2.1 as the probe reads it); probe.strict=1 demands refusal, so QEMU fails it.
    r = qemu(probe_elf, "probe.check=features_refused", extra=RNG)
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check features_refused ok")
    assert f["bit"] == "31"
    assert f["unoffered"] in ("accepted", "refused")
    assert f["after"] == "ok"
    strict = qemu(probe_elf, "probe.check=features_refused probe.strict=1", extra=RNG)
    assert strict.check("features_refused").startswith(
        "check features_refused FAIL FEATURES_OK accepted with unoffered feature bit 31"
    ), strict.raw
    assert strict.status == debug_exit_status(1), strict.raw


def test_bad_chain_check(probe_elf: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 1, 64)
    r = qemu(probe_elf, "probe.check=bad_chain", extra=RNG + blk(img))
    assert r.status == debug_exit_status(0), r.raw
    f = r.fields("check bad_chain ok")
    # QEMU's virtio_error(): DEVICE_NEEDS_RESET plus a config interrupt.
    assert f["next_oob"] == "needs_reset" and f["loop"] == "needs_reset"
    # An address outside RAM is unbacked I/O memory to QEMU: data dropped, buffer used.
    assert f["addr_oob"] in ("needs_reset", "used_len0", "used_dropped")
    assert f["after"] == "ok" and f["blk"] == "ok"
    strict = qemu(probe_elf, "probe.check=bad_chain probe.strict=1", extra=RNG)
    assert strict.check("bad_chain").startswith("check bad_chain FAIL addr_oob: used buffer")
    assert strict.status == debug_exit_status(1), strict.raw


def test_reset_check(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=reset", extra=RNG)
    assert r.status == debug_exit_status(0), r.raw
    assert r.fields("check reset ok")["requests_after"] == "2"


def test_all_device_checks_together(probe_elf: Path, tmp_path: Path) -> None:
    seed, sectors = 3, 256
    img = make_image(tmp_path / "disk.img", seed, sectors)
    out = tmp_path / "console.txt"
    checks = "rng,blk,console,features_refused,bad_chain,reset,rng_irq"
    append = f"probe.check={checks} probe.blk_pattern={seed} probe.blk_serial=abc"
    r = qemu(probe_elf, append, extra=RNG + blk(img, serial="abc") + console(out))
    assert r.status == debug_exit_status(0), r.raw
    for name in checks.split(","):
        assert r.check(name).startswith(f"check {name} ok"), r.raw
    assert out.read_bytes() == b"probe: hello from virtio-console\n"
    assert img.read_bytes()[-BLK_WRITTEN * SECTOR :] == b"".join(
        pattern(seed + 1, s) for s in range(sectors - BLK_WRITTEN, sectors)
    )


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("rng", "virtio-rng"),
        ("rng_irq", "virtio-rng"),
        ("console", "virtio-console"),
        ("features_refused", "virtio-rng"),
        ("bad_chain", "virtio-rng"),
        ("reset", "virtio-rng"),
        ("blk", "virtio-blk"),
    ],
)
def test_device_check_without_device_fails(probe_elf: Path, name: str, what: str) -> None:
    r = qemu(probe_elf, f"probe.check={name}")
    assert r.check(name).startswith(f"check {name} FAIL no {what} device"), r.raw
    assert r.status == debug_exit_status(1), r.raw


def test_device_option_values_are_checked(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.blk_ro=2")
    assert r.check("options") == "check options FAIL bad value: probe.blk_ro"
    assert r.status == debug_exit_status(1), r.raw


# ---- the smp check (guest/probe/smp.c) ----------------------------------------------

AP_COUNTER_ADDS = 100000  # each AP's locked additions to the shared counter


def smp(cpus: int) -> tuple[str, ...]:
    return ("-smp", str(cpus))


def ap_lines(r: Run) -> list[dict[str, str]]:
    return [dict(KV.findall(line)) for line in r.lines if line.startswith("smp ap ")]


@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_check_starts_every_ap(probe_elf: Path, cpus: int) -> None:
    # qboot (QEMU microvm's firmware) writes an MP table even with acpi=off: the probe
    # reads the APIC IDs there and starts each AP with INIT-SIPI-SIPI.
    r = qemu(probe_elf, "probe.check=smp", extra=smp(cpus) + RNG)
    assert r.status == debug_exit_status(0), r.raw
    ids = ",".join(str(i) for i in range(cpus))
    assert r.one("smp cpus=") == f"smp cpus={cpus} ids={ids} source=mptable bsp=0"
    aps = ap_lines(r)
    assert sorted(int(a["apic_id"]) for a in aps) == list(range(1, cpus)), r.raw
    assert sorted(a["slot"] for a in aps) == [str(i) for i in range(cpus - 1)]
    for a in aps:
        assert a["cpuid_id"] == a["apic_id"] and a["x2apic_id"] in (a["apic_id"], "-1"), r.raw
        assert a["cpl"] == "3"
        assert a["mmio_reads"] == "3"  # the rng's MagicValue, Version, DeviceID
    assert len({a["work"] for a in aps}) == cpus - 1
    f = r.fields("check smp ok")
    assert f["cpus"] == str(cpus) and f["aps"] == str(cpus - 1)
    assert f["counter"] == str((cpus - 1) * AP_COUNTER_ADDS)
    assert f["mmio_devices"] == "1"


def test_smp_check_single_cpu(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=smp probe.cpus=1")
    assert r.status == debug_exit_status(0), r.raw
    assert r.one("smp cpus=") == "smp cpus=1 ids=0 source=mptable bsp=0"
    assert not ap_lines(r)


def test_smp_broadcast_start_without_mp_table(probe_elf: Path) -> None:
    # probe.smp_mptable=0: the count comes from probe.cpus= and one all-but-self
    # INIT-SIPI-SIPI starts the APs, which take their slots in arrival order.
    r = qemu(probe_elf, "probe.check=smp probe.smp_mptable=0 probe.cpus=4", extra=smp(4))
    assert r.status == debug_exit_status(0), r.raw
    assert r.one("smp cpus=") == "smp cpus=4 ids=0,1,2,3 source=cmdline bsp=0"
    assert r.fields("check smp ok")["counter"] == str(3 * AP_COUNTER_ADDS)
    # Two CPUs promised, four present: the broadcast starts all three APs.
    few = qemu(probe_elf, "probe.check=smp probe.smp_mptable=0 probe.cpus=2", extra=smp(4))
    assert re.fullmatch(r"check smp FAIL [23] APs started, [1-3] arrived, 1 expected",
                        few.check("smp")), few.raw
    assert few.status == debug_exit_status(1), few.raw


def test_smp_check_fails_on_a_count_mismatch(probe_elf: Path) -> None:
    r = qemu(probe_elf, "probe.check=smp probe.cpus=3", extra=smp(2))
    assert r.check("smp") == "check smp FAIL the MP table lists 2 CPUs, probe.cpus=3", r.raw
    assert r.status == debug_exit_status(1), r.raw
    bad = qemu(probe_elf, "probe.cpus=65")
    assert bad.check("options") == "check options FAIL bad value: probe.cpus", bad.raw


def test_smp_then_device_checks(probe_elf: Path) -> None:
    # Parked APs (cli; hlt) stay out of the way of the BSP's later interrupt work.
    r = qemu(probe_elf, "probe.check=smp,rng,rng_irq", extra=smp(2) + RNG)
    assert r.status == debug_exit_status(0), r.raw
    for name in ("smp", "rng", "rng_irq"):
        assert r.check(name).startswith(f"check {name} ok"), r.raw
