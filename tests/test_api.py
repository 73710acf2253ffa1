"""The Python API (minivmm.Vm) on real KVM: threads, several VMs, ownership, failures.

Regression tests for issue 10's defects 1 (stopping from another thread), 4 (descriptor
leaks when building fails), 6 (minivmm's own bugs are internal errors) and the API
example of README.
"""

from __future__ import annotations

import gc
import os
import resource
import threading
from pathlib import Path

import pytest
from guests import ProbeRun, guest_artifact, tiny_elf

import minivmm
from minivmm.errors import UsageError
from minivmm.kvm import release

pytestmark = pytest.mark.kvm
HANG = 60.0  # only a hang reaches this


def probe_config(cmdline: str, **kw: object) -> minivmm.VmConfig:
    return minivmm.VmConfig(kernel=guest_artifact("probe.elf"), cmdline=cmdline,
                            console="none", **kw)  # type: ignore[arg-type]


def test_readme_example() -> None:
    cfg = minivmm.VmConfig(kernel=guest_artifact("probe.elf"), mem="128M",
                           cmdline="probe.check=cpl3", console="none")
    with minivmm.Vm(cfg) as vm:
        vm.start()
        result = vm.wait(timeout=30)
        vm.stop()
    assert result == minivmm.RunResult(0, "debug-exit", "debug-exit 0")


def test_two_vms_in_two_threads(tmp_path: Path) -> None:
    results: dict[int, minivmm.RunResult | None] = {}

    def one(i: int) -> None:
        log = tmp_path / f"console{i}.txt"
        cfg = minivmm.VmConfig(kernel=guest_artifact("probe.elf"), console=f"file:{log}",
                               cmdline=f"probe.check=cpl3,rng vm={i}", rng=True)
        with minivmm.Vm(cfg) as vm:
            vm.start()
            results[i] = vm.wait(timeout=HANG)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert results == {i: minivmm.RunResult(0, "debug-exit", "debug-exit 0") for i in (0, 1)}
    for i in (0, 1):
        ProbeRun(0, (tmp_path / f"console{i}.txt").read_text()).assert_pass()


SPIN = "1: pause\njmp 1b"


def test_stop_from_a_worker_thread(tmp_path: Path) -> None:
    """Defect 1: the VM runs on a worker thread and another thread stops it; the process
    lives on (before the fix, SIGUSR1's default action killed it)."""
    elf = tiny_elf(tmp_path, "spin", SPIN)
    cfg = minivmm.VmConfig(kernel=elf, mem="32M", console="none", cpus=2)
    box: dict[str, object] = {}
    started = threading.Event()

    def run() -> None:
        with minivmm.Vm(cfg) as vm:
            box["vm"] = vm
            vm.start()
            started.set()
            box["result"] = vm.wait(HANG)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(HANG)
    assert vm_wait_none(box["vm"])  # still running
    stopper = threading.Thread(target=box["vm"].stop)  # type: ignore[attr-defined]
    stopper.start()
    stopper.join(HANG)
    worker.join(HANG)
    assert not worker.is_alive()
    assert box["result"] == minivmm.RunResult(0, "stopped", "stopped by the embedding program")


def vm_wait_none(vm: object) -> bool:
    return vm.wait(0) is None  # type: ignore[attr-defined]


class BuggyPort:
    """A port-I/O device with a bug (stands for any VMM-side bug in an exit handler)."""

    def read(self, offset: int, data: memoryview) -> None:
        raise AssertionError("bug in a device model")

    def write(self, offset: int, data: memoryview) -> None:
        raise AssertionError("bug in a device model")


def test_a_vmm_bug_in_an_exit_handler_is_an_internal_error(tmp_path: Path) -> None:
    """Defect 6: reported as minivmm's bug, not the guest's failure."""
    elf = tiny_elf(tmp_path, "poke", "mov $0x700, %dx\nout %al, %dx\nhlt")
    cfg = minivmm.VmConfig(kernel=elf, mem="32M", console="none")

    def hook(vm: minivmm.Vm) -> None:
        vm.platform.pio_bus.register(0x700, 1, BuggyPort())

    with minivmm.Vm(cfg, setup_hooks=[hook]) as vm:
        result = vm.run()
    assert result.status == 1 and result.reason == "internal-error", result
    assert "AssertionError: bug in a device model" in result.detail


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


@pytest.mark.slow
def test_failed_builds_and_many_runs_leak_nothing(tmp_path: Path) -> None:
    """Defect 4: 100 failed builds and 30 complete runs in one process leave the fd count
    unchanged and RSS within 20 MiB."""
    probe = guest_artifact("probe.elf")
    bad = [
        dict(kernel=tmp_path / "missing-kernel"),
        dict(kernel=probe, drives=[minivmm.DriveConfig(tmp_path / "missing.img")]),
        dict(kernel=tmp_path),  # a directory
        dict(kernel=probe, mem="60T"),  # KVM refuses the memory slot
    ]
    # one warm-up run: caches, lazily imported modules, thread-local state
    with minivmm.Vm(probe_config("probe.check=cpl3", rng=True)) as vm:
        assert vm.run().status == 0
    gc.collect()
    release.wait()  # the VM's own descriptor and RAM go on the releaser thread
    fds, rss = _fds(), _rss_mib()
    for i in range(100):
        kw = bad[i % len(bad)]
        with pytest.raises(UsageError):
            minivmm.Vm(minivmm.VmConfig(console="none", **kw))  # type: ignore[arg-type]
    for _ in range(30):
        with minivmm.Vm(probe_config("probe.check=cpl3,rng", rng=True)) as vm:
            assert vm.run().status == 0
    gc.collect()
    release.wait()
    assert _fds() == fds, os.listdir("/proc/self/fd")
    assert _rss_mib() - rss < 20, (rss, _rss_mib())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
