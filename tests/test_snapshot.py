"""Snapshots in real VMs: the probe's counting loop (probe.check=snapshot) is saved part
way and the restored VM prints exactly what the original printed after that point, its
devices working on the restored rings; clones run in parallel and diverge; pause holds
the guest; the command line saves on SIGUSR2 and restores; broken snapshots are one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from guests import ROOT, guest_artifact, run_minivmm
from test_dev_blk import make_image, pattern

import minivmm
from minivmm.kvm.structs import kvm_sregs
from minivmm.x86.vcpustate import VcpuState

pytestmark = pytest.mark.kvm
SNAP_SECTOR = 16  # guest/probe/snap.c
STEP = re.compile(rb"probe: snapshot step \d+/\d+ h=0x[0-9a-f]+\r?\n")


def wait_for(log: Path, text: bytes, vm: minivmm.Vm, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_bytes() if log.exists() else b""):
        assert vm.stopper.result is None, (vm.stopper.result, log.read_bytes()[-2000:])
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.01)


def probe_config(log: Path, checks: str, steps: int, **kw: object) -> minivmm.VmConfig:
    return minivmm.VmConfig(
        kernel=guest_artifact("probe.elf"), console=f"file:{log}",
        cmdline=f"console=ttyS0 probe.check={checks} probe.snap_steps={steps} "
                + str(kw.pop("extra", "")), **kw)  # type: ignore[arg-type]


def blk_traffic(tmp_path: Path, steps: int) -> tuple[Path, Path, minivmm.VmConfig]:
    """The image, the console log and the config of a probe whose loop writes (seed 5)."""
    img = make_image(tmp_path / "disk.img", seed=5)
    log = tmp_path / "orig.log"
    return img, log, probe_config(log, "snapshot", steps, drives=[minivmm.DriveConfig(img)],
                                  extra="probe.blk_pattern=5")


def restore_run(snap: Path, log: Path, disk: Path) -> tuple[int, bytes]:
    """Restore ``snap`` with ``disk`` and the console in ``log``; run it to its end."""
    with minivmm.Vm.restore(snap, console=f"file:{log}",
                            drives=[minivmm.DriveConfig(disk)]) as r:
        status = r.run().status
    return status, log.read_bytes()


def steps_of(data: bytes) -> list[bytes]:
    return STEP.findall(data)


def check_line(data: bytes, name: str) -> str:
    m = re.search(rb"probe: check " + name.encode() + rb" (.*?)\r?\n", data)
    assert m, data[-1500:]
    return m.group(1).decode()


def test_restored_vm_continues_exactly_and_its_devices_work(tmp_path: Path) -> None:
    """rng, blk and virtio-console before and after; the blk write acknowledged before
    the snapshot is in the image as it was at the snapshot."""
    img = make_image(tmp_path / "disk.img", seed=5)
    log = tmp_path / "orig.log"
    cfg = probe_config(log, "snapshot,rng,blk,console", 16, rng=True,
                       drives=[minivmm.DriveConfig(img)], console_device="virtio",
                       extra="probe.blk_pattern=5 probe.strict=1")
    with minivmm.Vm(cfg) as vm:
        vm.start()
        wait_for(log, b"step 3/", vm)
        vm.snapshot(tmp_path / "snap", resume=False)
        at_snapshot = log.read_bytes()
        shutil.copy(img, tmp_path / "at-snapshot.img")  # the image as the snapshot has it
        vm.resume()
        result = vm.wait(120)
    assert result is not None and result.status == 0, log.read_bytes()[-1500:]
    orig = log.read_bytes()
    after = orig[len(at_snapshot):]
    assert steps_of(after), "the snapshot was taken after the loop"
    # the write before the loop reached the image before the snapshot was complete
    copy = (tmp_path / "at-snapshot.img").read_bytes()
    assert copy[SNAP_SECTOR * 512:(SNAP_SECTOR + 1) * 512] == pattern(7, SNAP_SECTOR)

    status, restored = restore_run(tmp_path / "snap", tmp_path / "restored.log",
                                   tmp_path / "at-snapshot.img")
    assert status == 0, restored[-1500:]
    assert steps_of(restored) == steps_of(after)  # the identical continuation
    assert not restored.startswith(b"probe: boot=")  # no reboot: it went on
    assert "blk=ok" in check_line(restored, "snapshot")
    for name in ("rng", "blk", "console"):
        assert check_line(restored, name).startswith("ok"), restored[-1500:]
    assert b"probe: result pass" in restored


def test_snapshots_during_heavy_blk_traffic_lose_and_repeat_no_request(
        tmp_path: Path) -> None:
    """The loop writes 32 sectors a step (one request each, spread over the step, a few
    ms each): eight snapshots, one a step, land anywhere in that traffic. Each restored
    VM finishes the loop and reads every sector back: a request lost at the snapshot
    would time out, one completed twice would break the probe's used-index check."""
    img, log, cfg = blk_traffic(tmp_path, 12)
    with minivmm.Vm(cfg) as vm:
        vm.start()
        for step in range(2, 10):
            wait_for(log, f"step {step}/".encode(), vm)
            vm.snapshot(tmp_path / f"snap{step}", resume=False)
            shutil.copy(img, tmp_path / f"disk{step}.img")  # the disk of that snapshot
            vm.resume()
        result = vm.wait(120)
    assert result is not None and result.status == 0, log.read_bytes()[-1500:]
    results: dict[int, tuple[int, bytes]] = {}

    def restore(step: int) -> None:
        results[step] = restore_run(tmp_path / f"snap{step}", tmp_path / f"r{step}.log",
                                    tmp_path / f"disk{step}.img")

    threads = [threading.Thread(target=restore, args=(step,)) for step in range(2, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(2, 10))
    for status, out in results.values():
        assert status == 0, out[-1500:]
        assert "blk=ok" in check_line(out, "snapshot")


def test_a_request_the_device_had_not_taken_yet_is_served_after_restore(
        tmp_path: Path) -> None:
    """The device thread is held while the guest publishes a blk request and kicks; the
    snapshot then holds a request the device never saw (the kick lived only in the
    source VM's eventfd): the restored device looks at its queues once when it starts,
    and serves it."""
    img, log, cfg = blk_traffic(tmp_path, 6)
    with minivmm.Vm(cfg) as vm:
        vm.start()
        wait_for(log, b"step 2/", vm)
        held = threading.Event()

        def hold() -> None:
            held.wait(60)

        vm.loop.call_soon(hold)  # the device thread waits here
        time.sleep(0.2)  # a write every few ms: the guest is waiting on one now
        saver = threading.Thread(target=vm.snapshot, args=(tmp_path / "snap",),
                                 kwargs={"resume": False})
        saver.start()
        while not vm.loop.pausing:  # vCPUs paused; the device thread's pause is queued
            time.sleep(0.001)
        held.set()
        saver.join(60)
        shutil.copy(img, tmp_path / "at-snapshot.img")
        vm.resume()
        result = vm.wait(120)
    assert result is not None and result.status == 0, log.read_bytes()[-1500:]
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    queue = manifest["virtio"][0]["queues"][0]
    with open(tmp_path / "snap" / "memory.bin", "rb") as ram:
        ram.seek(queue["avail"] + 2)
        avail_idx = int.from_bytes(ram.read(2), "little")
    assert avail_idx == (queue["next_avail"] + 1) & 0xFFFF  # one request not taken
    status, out = restore_run(tmp_path / "snap", tmp_path / "r.log",
                              tmp_path / "at-snapshot.img")
    assert status == 0, out[-1500:]
    assert "blk=ok" in check_line(out, "snapshot")


def test_ten_clones_run_in_parallel_and_diverge(tmp_path: Path) -> None:
    log = tmp_path / "orig.log"
    with minivmm.Vm(probe_config(log, "snapshot,rng", 10, rng=True)) as vm:
        vm.start()
        wait_for(log, b"step 2/", vm)
        vm.snapshot(tmp_path / "snap")
        at_snapshot = len(log.read_bytes())
        assert vm.wait(120) is not None
    after = log.read_bytes()[at_snapshot:]
    results: dict[int, tuple[int, bytes]] = {}

    def clone(i: int) -> None:
        clog = tmp_path / f"clone{i}.log"
        with minivmm.Vm.restore(tmp_path / "snap", console=f"file:{clog}") as c:
            status = c.run().status
        results[i] = (status, clog.read_bytes())

    threads = [threading.Thread(target=clone, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(10))
    digests = set()
    for status, out in results.values():
        assert status == 0, out[-1500:]
        assert steps_of(out) == steps_of(after)
        assert check_line(out, "rng").startswith("ok")
        digests.add(re.search(r"rng=(\w+)", check_line(out, "snapshot")).group(1))  # type: ignore[union-attr]
    assert len(digests) == 10  # each clone's entropy device and RAM are its own


def test_pause_holds_the_guest_and_a_restored_vm_snapshots_again(tmp_path: Path) -> None:
    """With two vCPUs: the application processor, parked by the smp check in HLT, is
    paused, saved and restored too."""
    log = tmp_path / "orig.log"
    with minivmm.Vm(probe_config(log, "smp,snapshot", 12, cpus=2,
                                 extra="probe.cpus=2")) as vm:
        vm.start()
        wait_for(log, b"step 2/", vm)
        vm.pause()
        vm.pause()  # idempotent
        held = log.read_bytes()
        time.sleep(0.5)  # a step takes a few tens of ms when running
        assert log.read_bytes() == held and vm.paused
        vm.snapshot(tmp_path / "snap", resume=False)
        assert vm.paused
        vm.resume()
        result = vm.wait(120)
        with pytest.raises(minivmm.MinivmmError, match="the VM has ended"):
            vm.snapshot(tmp_path / "late")
    assert result is not None and result.status == 0
    assert not (tmp_path / "late").exists()
    rlog = tmp_path / "r.log"
    with minivmm.Vm.restore(tmp_path / "snap", console=f"file:{rlog}") as r:
        r.start()
        wait_for(rlog, b"step 6/", r)
        r.snapshot(tmp_path / "snap")  # over the snapshot it was restored from
        assert r.wait(120) is not None
    r2log = tmp_path / "r2.log"
    with minivmm.Vm.restore(tmp_path / "snap", console=f"file:{r2log}") as r2:
        assert r2.run().status == 0
    assert steps_of(r2log.read_bytes()) and steps_of(r2log.read_bytes())[-1] == \
        steps_of(log.read_bytes())[-1]


def test_cli_saves_on_sigusr2_and_restores(tmp_path: Path) -> None:
    log = tmp_path / "o.log"
    snap = tmp_path / "s"
    p = subprocess.Popen(
        [sys.executable, "-m", "minivmm", "run", "--kernel", str(guest_artifact("probe.elf")),
         "--rng", "--console", f"file:{log}", "--snapshot-on-signal", str(snap),
         "--cmdline", "console=ttyS0 probe.check=snapshot,rng probe.snap_steps=12"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while b"step 2/" not in (log.read_bytes() if log.exists() else b""):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGUSR2)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert f"snapshot saved to {snap}" in err
    r = run_minivmm("run", "--restore", str(snap), "--console", "stdio")
    assert r.returncode == 0, r.stderr
    assert "probe: result pass" in r.stdout and "probe: boot=" not in r.stdout
    bad = run_minivmm("run", "--restore", str(snap), "--mem", "1G")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--mem cannot be given with --restore" in bad.stderr


def test_a_sigusr2_during_a_save_is_ignored(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The handler runs again, nested, when a second SIGUSR2 comes during a save: that
    one must not save (its end would resume the guest under the first save)."""
    from typing import Any, cast

    from minivmm import cli

    saves: list[Path] = []

    class OneVm:
        def snapshot(self, path: Path) -> dict[str, float]:
            saves.append(path)
            if len(saves) == 1:  # the second signal arrives while this one saves
                handler = signal.getsignal(signal.SIGUSR2)
                assert callable(handler)
                handler(signal.SIGUSR2, None)
            return {"total_s": 0.001}

    old = signal.getsignal(signal.SIGUSR2)
    try:
        cli._snapshot_on_sigusr2(cast(Any, OneVm()), tmp_path / "s")
        handler = signal.getsignal(signal.SIGUSR2)
        assert callable(handler)
        handler(signal.SIGUSR2, None)
        handler(signal.SIGUSR2, None)  # after the first: saved again
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert saves == [tmp_path / "s"] * 2
    err = capsys.readouterr().err
    assert err.count("is being saved: SIGUSR2 ignored") == 1
    assert err.count("snapshot saved to") == 2


def _corrupt(snap: Path, how: str) -> None:
    manifest = snap / "manifest.json"
    if how == "truncated memory":
        os.truncate(snap / "memory.bin", 4096)
    elif how == "corrupt vcpu state":
        data = bytearray((snap / "vcpu0.bin").read_bytes())
        data[100] ^= 0xFF
        (snap / "vcpu0.bin").write_bytes(bytes(data))
    elif how == "truncated vm state":
        os.truncate(snap / "vm.bin", 10)
    elif how == "truncated manifest":
        os.truncate(manifest, 100)
    elif how in ("format version", "minivmm version"):
        m = json.loads(manifest.read_text())
        m["format_version" if how == "format version" else "minivmm_version"] = 99
        manifest.write_text(json.dumps(m))
    elif how == "wrong device":
        m = json.loads(manifest.read_text())
        m["virtio"][0]["name"] = "blk"
        manifest.write_text(json.dumps(m))
    elif how == "state KVM refuses":  # consistent files, CR0.PG without CR0.PE
        state = VcpuState.from_bytes((snap / "vcpu0.bin").read_bytes())
        sregs = bytearray(state.pieces["sregs"])
        struct.pack_into("<Q", sregs, kvm_sregs.cr0.offset, 1 << 31)
        state.pieces["sregs"] = bytes(sregs)
        blob = state.to_bytes()
        (snap / "vcpu0.bin").write_bytes(blob)
        m = json.loads(manifest.read_text())
        m["blobs"]["vcpu0.bin"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        manifest.write_text(json.dumps(m))
    elif how == "missing":
        shutil.rmtree(snap)


BROKEN = {
    "truncated memory": "memory.bin is 4096 bytes",
    "corrupt vcpu state": "vcpu0.bin does not match its SHA-256",
    "truncated vm state": "vm.bin is 10 bytes",
    "truncated manifest": "not a readable manifest",
    "format version": "format version 99",
    "minivmm version": "made by minivmm 99",
    "wrong device": "the snapshot has device 'blk'",
    "missing": "not a snapshot directory",
    "state KVM refuses": "KVM refused the saved machine state",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("saved")
    with minivmm.Vm(probe_config(d / "o.log", "snapshot,rng", 4, rng=True)) as vm:
        vm.start()
        wait_for(d / "o.log", b"step 1/", vm)
        vm.snapshot(d / "snap", resume=False)
    return d / "snap"


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_a_broken_snapshot_is_one_line(saved: Path, tmp_path: Path, how: str) -> None:
    snap = tmp_path / "snap"
    shutil.copytree(saved, snap)
    _corrupt(snap, how)
    with pytest.raises(minivmm.UsageError) as e:
        minivmm.Vm.restore(snap, console="none")
    assert e.value.field == "snapshot" and BROKEN[how] in e.value.message
    r = run_minivmm("run", "--restore", str(snap), "--console", "none")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("minivmm: error: --restore: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_bench_prints_the_restore_time() -> None:
    p = subprocess.run([sys.executable, "-m", "bench.snapshot", "--smoke", "--mem", "64M"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert re.search(r"^restore time \(64 MiB\): [\d.]+ ms$", p.stdout, re.MULTILINE), p.stdout


def _mutations(manifest: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    """The manifest with one value replaced by a value of another type, everywhere a
    restore reads one: top level, host facts, each legacy device, each transport."""
    out = []
    bads: tuple[object, ...] = (5, "x", [], {}, None)
    for bad in bads:
        for key in manifest:
            out.append((f"{key}={bad!r}", {**manifest, key: bad}))
        for section in ("host", "legacy"):
            part = manifest[section]
            assert isinstance(part, dict)
            for key in part:
                out.append((f"{section}.{key}={bad!r}",
                            {**manifest, section: {**part, key: bad}}))
        virtio = manifest["virtio"]
        assert isinstance(virtio, list)
        for key in virtio[0]:
            out.append((f"virtio[0].{key}={bad!r}",
                        {**manifest, "virtio": [{**virtio[0], key: bad}]}))
    return out


def test_a_manifest_with_values_of_the_wrong_type_is_a_usage_error(saved: Path,
                                                                    tmp_path: Path) -> None:
    """Never a traceback: every field a restore reads, replaced by 5, "x", [], {} or
    None, is a UsageError (field "snapshot", or the configuration's own field), or a
    restore that works when the field is one it does not need."""
    snap = tmp_path / "snap"
    shutil.copytree(saved, snap)
    manifest = json.loads((snap / "manifest.json").read_text())
    for what, mutated in _mutations(manifest):
        (snap / "manifest.json").write_text(json.dumps(mutated))
        try:
            minivmm.Vm.restore(snap, console="none").close()
        except minivmm.UsageError:
            pass
        except Exception as e:  # the point of the test: nothing else
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
