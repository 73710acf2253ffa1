"""The crash detector (minivmm.crashwatch) on console output as it is written, no VM."""

from __future__ import annotations

import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fakeguest import FakeVm, fake_guest

from minivmm.agent import HEADER, T_STARTED, ReadyListener
from minivmm.console import NullSink
from minivmm.crashwatch import HEAD, MAX_FINDINGS, CrashWatch, Finding, scan_text
from minivmm.guest import GuestRunError

PANIC = b"[    3.141592] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n"


class Recorder(NullSink):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def writev(self, views: list[memoryview]) -> None:
        for v in views:
            self.data += v


def watch() -> tuple[CrashWatch, Recorder]:
    inner = Recorder()
    return CrashWatch(inner), inner


@pytest.mark.parametrize("cut", range(1, len(PANIC)))
def test_a_line_split_across_writes_is_found_once(cut: int) -> None:
    w, inner = watch()
    seen: list[Finding] = []
    w.on_finding(seen.append)
    w.write(b"boot line\n" + PANIC[:cut])
    w.write(PANIC[cut:] + b"---[ end trace ]---\n")
    assert bytes(inner.data) == b"boot line\n" + PANIC + b"---[ end trace ]---\n"
    assert seen == w.findings == [Finding(
        "Kernel panic", "[    3.141592] Kernel panic - not syncing: Attempted to kill init! "
        "exitcode=0x0000000b", True, "console")]


def test_byte_by_byte_and_writev() -> None:
    w, _ = watch()
    for b in b"Oops: 0002 [#1] SMP\n":
        w.write(bytes([b]))
    w.writev([memoryview(b"general protection "), memoryview(b"fault, probably for x\nok\n")])
    assert [f.kind for f in w.findings] == ["Oops", "general protection fault"]
    assert w.first is not None and str(w.first) == "Oops: 0002 [#1] SMP"


def test_ansi_and_carriage_return_noise() -> None:
    w, _ = watch()
    w.write(b"\x1b[1;31mBUG: \x1b[0mkernel NULL pointer dereference, address: 0\r\r\n")
    w.write(b"\rKernel pa\x1b[0mnic - not syncing: VFS\r\n")
    assert [(f.kind, f.line) for f in w.findings] == [
        ("BUG:", "BUG: kernel NULL pointer dereference, address: 0"),
        ("Kernel panic", "Kernel panic - not syncing: VFS")]


def test_a_warning_is_reported_but_not_fatal() -> None:
    w, _ = watch()
    w.write(b"[ 1.0] WARNING: CPU: 0 PID: 1 at mm/slab.c:42 f+0x1/0x2\n[ 1.1] still fine\n")
    assert w.first == Finding("WARNING: CPU:", "[ 1.0] WARNING: CPU: 0 PID: 1 at "
                                               "mm/slab.c:42 f+0x1/0x2", False)
    assert w.fatal is None
    w.write(PANIC)
    assert w.fatal is not None and w.fatal.kind == "Kernel panic"
    assert w.first is not None and w.first.kind == "WARNING: CPU:"


def test_only_a_line_head_is_searched_and_a_long_line_once() -> None:
    w, _ = watch()
    w.write(b"x" * HEAD + b" Kernel panic - not syncing: too far in\n")
    assert w.findings == []
    long = b"Oops: " + b"y" * (3 * HEAD)
    for i in range(0, len(long), 7):
        w.write(long[i:i + 7])
    w.write(b"\n")
    assert [f.kind for f in w.findings] == ["Oops"]
    assert len(w.findings[0].line) == HEAD


def test_innocent_output_and_a_flood_of_warnings() -> None:
    w, _ = watch()
    w.write(b"Run /init as init process\nBUGS: none\noops, lowercase\nKernel: fine\n")
    assert w.findings == []
    w.write(b"WARNING: CPU: 0 PID: 1 at x\n" * (MAX_FINDINGS + 10))
    assert len(w.findings) == MAX_FINDINGS and w.dropped == 10
    assert w.fatal is None
    # past the cap, the first fatal finding is still kept (and said); later ones counted
    w.write(b"Kernel panic - not syncing: after the flood\nOops: 0000 [#1]\n")
    assert w.fatal is not None and w.fatal.kind == "Kernel panic"
    assert len(w.findings) == MAX_FINDINGS + 1 and w.dropped == 11


def test_findings_from_how_the_vm_ended() -> None:
    w, _ = watch()
    assert w.vm_stopped("poweroff", "ACPI S5") is None
    f = w.vm_stopped("guest-error", "KVM emulation failure\n  vcpu 0\n  rax=0")
    assert f == Finding("emulation failure", "KVM emulation failure", True, "vmm")
    kinds = [w.vm_stopped("internal-error", "vCPU 0: InternalError: x"),
             w.vm_stopped("host-error", "vCPU 0: KVM_RUN: EFAULT")]
    assert [k.kind if k else None for k in kinds] == ["VMM internal error", "host error"]


def test_a_triple_fault_is_a_crash_unless_announced() -> None:
    w, _ = watch()
    tf = "triple fault on vCPU 0 (the guest rebooted)"
    assert w.vm_stopped("reboot", tf) == Finding("triple fault", tf, True, "vmm")
    w, _ = watch()
    w.write(b"[ 9.9] reboot: Restarting system\n")
    assert w.vm_stopped("reboot", tf) is None and w.findings == []
    w, _ = watch()
    w.write(PANIC)
    assert w.vm_stopped("reboot", tf) is None and [f.kind for f in w.findings] == [
        "Kernel panic"]


def test_a_last_line_without_newline_is_searched_when_the_vm_ends() -> None:
    w, _ = watch()
    w.write(b"Kernel panic - not syncing: no newline")
    assert w.findings == []
    w.vm_stopped("reboot", "triple fault on vCPU 0")
    assert [f.kind for f in w.findings] == ["Kernel panic"]


def test_scan_text() -> None:
    assert scan_text("a\nb\n") is None
    found = scan_text("boot\n\x1b[31mBUG: soft lockup - CPU#0 stuck for 22s!\nOops\n")
    assert found is not None and (found.kind, found.line, found.fatal) == (
        "BUG: soft lockup", "BUG: soft lockup - CPU#0 stuck for 22s!", False)


@pytest.mark.parametrize("line", [
    "BUG: sleeping function called from invalid context at mm/slab.h:1",
    "BUG: scheduling while atomic: swapper/0/1/0x00000002",
    "BUG: soft lockup - CPU#1 stuck for 23s! [a.out:99]"])
def test_bug_reports_that_leave_the_task_running_are_warnings(line: str) -> None:
    w, _ = watch()
    w.write(f"[   1.0] {line}\n".encode())
    assert [f.fatal for f in w.findings] == [False] and w.fatal is None
    w.write(b"[   2.0] BUG: unable to handle page fault for address: 0\n")
    assert w.fatal is not None and w.fatal.kind == "BUG:"


def test_guest_run_fails_fast_when_the_kernel_crashes_under_the_command(
        tmp_path: Path) -> None:
    # The fake agent starts the command and never ends it: a panic line on the console
    # must end run() before its timeout.
    with fake_guest(tmp_path, HEADER.pack(T_STARTED, 4) + struct.pack("<I", 42)) as (g, vm):
        vm.crash_watch.write(b"WARNING: CPU: 0 PID: 1 at x.c:1 f\n")  # before: not its crash
        threading.Timer(0.5, vm.crash_watch.write,
                        (b"[ 5.0] WARNING: CPU: 0 PID: 9 at y.c:2 g\n" + PANIC,)).start()
        with pytest.raises(GuestRunError) as e:
            g.run(["sleep", "1000"], timeout=30)  # no fail-fast: TimeoutExpired
        assert g.crash() == "WARNING: CPU: 0 PID: 1 at x.c:1 f"  # the first finding of all
    assert e.value.crash == PANIC.decode().strip()
    assert e.value.finding is not None and e.value.finding.kind == "Kernel panic"
    assert "the guest kernel crashed under the command" in str(e.value)


def test_a_callback_may_stop_the_vm() -> None:
    # vm.on_crash(lambda f: vm.stop()): the stop comes back to vm_stopped on this thread.
    w, _ = watch()
    calls: list[tuple[str, Finding | None]] = []
    w.on_finding(lambda f: calls.append((f.kind, w.vm_stopped("stopped", "by a callback"))))
    w.write(b"Oops: 0000 [#1]\nKernel panic - not syncing: Fatal exception\n")
    assert calls == [("Oops", None), ("Kernel panic", None)]
    w.on_finding(lambda f: calls.append((f.kind, None)))
    w.vm_stopped("guest-error", "KVM emulation failure")
    assert calls[2:] == [("emulation failure", None)] * 2


def boot_wait_error(tmp_path: Path, end: Callable[[FakeVm], None],
                    boot_timeout: float = 60) -> GuestRunError:
    """What Guest's boot wait raises when ``end(vm)`` runs 0.3 s into a boot whose agent
    never says it listens."""
    with fake_guest(tmp_path, b"") as (g, vm):
        listener = ReadyListener(tmp_path / "boot")
        threading.Timer(0.3, end, (vm,)).start()
        try:
            with pytest.raises(GuestRunError) as e:
                g._boot_wait(listener, boot_timeout)
        finally:
            listener.close()
    return e.value


def test_boot_wait_says_the_kernel_crashed_and_how_the_vm_ended(tmp_path: Path) -> None:
    def panic_then_reboot(vm: FakeVm) -> None:
        vm.crash_watch.write(b"[ 1.0] WARNING: CPU: 0 PID: 1 at y.c:2 g\n" + PANIC)
        time.sleep(0.2)  # Linux with panic=-1 reboots: a triple fault
        vm.stopper.request(0, "reboot", "triple fault (the guest reset the CPU)\nregs")
        vm.crash_watch.vm_stopped("reboot", "triple fault (the guest reset the CPU)")

    e = boot_wait_error(tmp_path, panic_then_reboot)
    message = re.sub(r"\d+ s into", "N s into", str(e))  # N: seconds, whatever they were
    assert message.startswith("the guest kernel crashed N s into its boot, before the "
                              "agent started; then the VM ended (reboot: triple fault "
                              "(the guest reset the CPU))"), message
    assert "did not start" not in message and "regs" not in message
    assert e.crash == PANIC.decode().strip() and message.endswith(f"({e.crash})")
    assert e.finding is not None and e.finding.kind == "Kernel panic"


def test_boot_wait_says_the_kernel_crashed_when_it_hangs_after(tmp_path: Path) -> None:
    # no panic=-1: the kernel hangs after its panic, the VM never ends by itself
    e = boot_wait_error(tmp_path, lambda vm: vm.crash_watch.write(PANIC))
    assert re.fullmatch(r"the guest kernel crashed \d+ s into its boot, before the agent "
                        rf"started \({re.escape(PANIC.decode().strip())}\)", str(e)), str(e)


def test_boot_wait_says_how_the_guest_ended(tmp_path: Path) -> None:
    def emulation_failure(vm: FakeVm) -> None:
        detail = "KVM emulation failure at RIP 0xffffffff81000000\nregisters"
        vm.stopper.request(1, "guest-error", detail)
        vm.crash_watch.vm_stopped("guest-error", detail)

    e = boot_wait_error(tmp_path, emulation_failure)
    assert re.sub(r"\d+ s into", "N s into", str(e)) == (
        "the guest ended N s into its boot, before the agent started (guest-error: KVM "
        "emulation failure at RIP 0xffffffff81000000) (KVM emulation failure at RIP "
        "0xffffffff81000000)"), str(e)
    assert e.finding is not None and e.finding.kind == "emulation failure"


def test_boot_wait_timeout_says_so(tmp_path: Path) -> None:
    e = boot_wait_error(tmp_path, lambda vm: None, boot_timeout=1)
    assert str(e) == "the agent did not start in 1 s"
