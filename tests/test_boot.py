"""Booting under minivmm: the boot contract, checked from inside the guest (guest/probe).

Each test runs ``minivmm run`` as a user would and asserts on what the probe reports:
the memory map matches --mem, the command line arrives intact, the serial console works,
both entry paths (PVH and the 64-bit boot protocol) work, a triple fault is a reboot.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests import ROOT, ProbeRun, guest_artifact, run_minivmm, tiny_elf

import minivmm
from minivmm import hostinfo

pytestmark = pytest.mark.kvm
MiB = 1 << 20
GiB = 1 << 30


def probe(cmdline: str, *, mem: str = "128M", extra: tuple[str, ...] = ()) -> ProbeRun:
    elf = guest_artifact("probe.elf")
    p = run_minivmm("run", "--kernel", str(elf), "--mem", mem, "--cmdline", cmdline, *extra)
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def expected_e820(mem: int) -> list[tuple[int, int, int]]:
    low = min(mem, 3 * GiB)
    want = [(0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2), (0x100000, low - 0x100000, 1)]
    if mem > 3 * GiB:
        want.append((4 * GiB, mem - 3 * GiB, 1))
    return want


@pytest.mark.parametrize("mem", ["64M", "128M", "1000M", "3584M", "5G"])
def test_memory_map_matches_mem(mem: str) -> None:
    size = int(mem[:-1]) * (GiB if mem.endswith("G") else MiB)
    run = probe(f"probe.expect_mem={mem}", mem=mem)
    run.assert_pass()
    assert run.e820() == expected_e820(size)
    assert run.fields("mem ")["ram"] == str(size)
    assert run.result("expect_mem").startswith("ok")


def test_command_line_arrives_intact() -> None:
    cmdline = "probe.check=cpl3 a=b,c:d/e x=~!@#$%^&*()_+[]{}|;'<>?. quiet"
    run = probe(cmdline)
    run.assert_pass()
    assert run.one("cmdline=") == f"cmdline={cmdline}"
    assert run.one("boot=") == "boot=pvh"


def test_wrong_expectation_is_reported_through_debug_exit() -> None:
    run = probe("probe.expect_mem=256M")  # the guest has 128M: one failed check
    assert run.status == 1
    assert "FAIL" in run.result("expect_mem")


def test_triple_fault_is_a_reboot() -> None:
    run = probe("probe.check=triplefault")
    assert run.status == 0, run.err
    assert "triplefault" in run.lines


def test_64bit_boot_protocol_entry(tmp_path: Path) -> None:
    """The same probe.elf entered at e_entry in long mode with a zero page."""
    log = tmp_path / "console.txt"
    cfg = minivmm.VmConfig(kernel=guest_artifact("probe.elf"), cmdline="probe.expect_mem=96M",
                           mem=96 * MiB, console=f"file:{log}", prefer_pvh=False)
    with minivmm.Vm(cfg) as vm:
        result = vm.run()
    run = ProbeRun(result.status, log.read_text())
    run.assert_pass()
    assert run.one("boot=") == "boot=linux64"
    assert run.e820() == expected_e820(96 * MiB)


def test_console_to_file_and_stats_and_timeline(tmp_path: Path) -> None:
    log = tmp_path / "out.txt"
    run = probe("probe.check=cpl3", extra=("--console", f"file:{log}", "--stats",
                                            "--timeline"))
    assert run.status == 0
    assert "probe: result pass" in log.read_text()
    assert "probe:" not in run.out
    assert "stats: vcpu0 exits io:" in run.err
    for mark in ("process start", "kvm ready", "kernel loaded", "first KVM_RUN",
                 "first console byte", "vm exit"):
        assert f"timeline: {mark}" in run.err


def test_emulation_failure_report(tmp_path: Path) -> None:
    """An instruction KVM cannot run ends the VM with status 1 and a readable report:
    here int3 at CPL0 fails in kvm_pvm's emulator; with VT-x/AMD-V it is an exception
    with no IDT, i.e. a triple fault (a reboot)."""
    elf = tiny_elf(tmp_path, "int3", "nop\nint3\nhlt")
    p = run_minivmm("run", "--kernel", str(elf), "--mem", "32M")
    if hostinfo.kvm_emulates_guest_kernel():
        assert p.returncode == 1, p.stderr
        assert "emulation failure" in p.stderr
        assert "rip=0000000000200001" in p.stderr
        assert "code at rip: cc f4" in p.stderr
        assert "Traceback" not in p.stderr
    else:
        assert p.returncode == 0, p.stderr


#: a guest that says "R" (a line) on the serial port, then spins forever
SPIN_ASM = ("mov $0x3f8, %dx\nmov $0x52, %al\nout %al, %dx\nmov $0x0a, %al\n"
            "out %al, %dx\n1: pause\njmp 1b")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_vm_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal while the guest runs (it has printed, so it runs) ends the VM through the
    normal end of a run, however long the host took to get there."""
    elf = tiny_elf(tmp_path, "spin", SPIN_ASM)
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "run", "--kernel", str(elf),
                             "--mem", "32M", "--stats"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.read(2) == b"R\n", proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}".encode() in err
    assert b"stats: unhandled port I/O" in err  # it went through the normal end of run
    assert b"Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("delay", [0.01, 0.05, 0.1, 0.3])
def test_signal_during_start_up(tmp_path: Path, sig: signal.Signals, delay: float) -> None:
    """From the first instruction of minivmm on, a signal is 128+N and one line, whether
    it comes during imports, while the VM is built, or once it runs (the delays only
    spread the moments; the assertions hold for any of them)."""
    elf = tiny_elf(tmp_path, "spin", SPIN_ASM)
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "run", "--kernel", str(elf),
                             "--mem", "32M", "--console", "none"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    ours = str(ROOT / "minivmm").encode()  # a frame of minivmm's own code
    if proc.returncode == -sig or (b"KeyboardInterrupt" in err and ours not in err):
        pytest.skip("the signal arrived before the interpreter ran minivmm's first line")
    assert proc.returncode == 128 + sig, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
    assert err.count(b"\n") <= 1, err


@pytest.mark.skipif(hostinfo.kvm_emulates_guest_kernel(),
                    reason="this host's KVM (kvm_pvm) emulates guest kernel code: a stock "
                           "Linux cannot boot at a useful speed (see test_linux_emulated)")
def test_linux_bzimage_reaches_initramfs() -> None:
    p = run_minivmm("run", "--kernel", str(guest_artifact("bzImage")),
                    "--initrd", str(guest_artifact("initramfs.cpio")), "--mem", "256M",
                    timeout=60)
    assert "minivmm-guest: init" in p.stdout, p.stdout[-3000:] + p.stderr
    assert p.returncode == 0


@pytest.mark.skipif(not hostinfo.kvm_emulates_guest_kernel(),
                    reason="only hosts whose KVM emulates guest kernel code print the note")
def test_linux_guest_on_emulating_host_gets_a_one_sentence_note() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "run", "--kernel",
                             str(guest_artifact("bzImage")), "--console", "none"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert first.startswith("minivmm: note: this host's KVM (kvm_pvm) emulates guest kernel")
    assert proc.returncode == 128 + signal.SIGTERM
