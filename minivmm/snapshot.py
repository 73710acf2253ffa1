"""Snapshots: a paused VM saved to a directory, and a VM rebuilt from one.

A snapshot is a directory::

    manifest.json   what the snapshot is: format and minivmm versions, the host facts a
                    restore must find again, the VmConfig, the legacy devices' and the
                    virtio transports' (and devices') state, and each blob's size and
                    SHA-256
    memory.bin      guest RAM, regions back to back (sparse: never-touched RAM is holes)
    vm.bin          KVM's in-kernel devices: PICs, IOAPIC, PIT, kvmclock (x86.vcpustate)
    vcpuN.bin       vCPU N: registers, FPU/XSAVE, XCRs, MSRs, LAPIC, MP state, ...

A directory, not one file: the RAM file is mapped as it is (MAP_PRIVATE, at offset 0,
page-aligned, holes kept), so restoring reads nothing but the small files, and the
manifest stays readable with any JSON tool. It is written next to its final path and
renamed into place when complete, so a reader never sees half a snapshot, and VMs
restored from an older snapshot at the same path keep the files they mapped.

Every file is checked before anything is built: the manifest's format, the versions,
each blob's size and hash (not the RAM's hash: reading it would cost what a
copy-on-write restore saves; its size is checked), the host's CPU and KVM. Whatever does
not fit is a :class:`SnapshotError` (a UsageError, ``field="snapshot"``) with one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .config import VmConfig
from .errors import UsageError
from .x86 import vcpustate

if TYPE_CHECKING:
    from .vm import Vm

FORMAT: Final = "minivmm-snapshot"
#: the layout this minivmm writes and the only one it reads
FORMAT_VERSION: Final = 1
MANIFEST: Final = "manifest.json"
RAM_FILE: Final = "memory.bin"
VM_FILE: Final = "vm.bin"
_MAX_MANIFEST: Final = 16 << 20
_MAX_BLOB: Final = 64 << 20
#: the VmConfig fields Vm.restore lets the caller change: how the machine reaches the
#: host (console, disk images, taps, the vsock socket), not what the guest sees
OVERRIDABLE: Final = ("console", "drives", "network_interfaces", "vsock", "devices")


class SnapshotError(UsageError):
    """A snapshot that cannot be read, or cannot be restored on this host (exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="snapshot")


def _version() -> str:
    from .version import __version__

    return __version__


def vcpu_file(index: int) -> str:
    return f"vcpu{index}.bin"


# -- host facts ---------------------------------------------------------------------------


def host_facts(vm: Vm) -> dict[str, Any]:
    """What a host must give again for the snapshot's guest to run on it."""
    platform = vm.platform
    caps = vcpustate.vcpu_caps(platform.vcpus[0])
    return {
        "cpu": platform.host_cpu,
        "guest_cpuid_sha256": platform.cpuid_digest,
        "kvm": {"xsave_size": caps.xsave_size, "xcrs": caps.xcrs,
                "vcpu_events": caps.vcpu_events, "debugregs": caps.debugregs,
                "msrs": [f"0x{m:x}" for m in caps.msrs]},
    }


def check_host(saved: Mapping[str, Any], vm: Vm) -> None:
    """SnapshotError unless this host gives the guest what the saving host gave."""
    here = host_facts(vm)
    if saved.get("cpu") != here["cpu"]:
        raise SnapshotError(f"made on a {saved.get('cpu')} CPU, this host has "
                            f"{here['cpu']}: restore it on the same kind of host")
    if saved.get("guest_cpuid_sha256") != here["guest_cpuid_sha256"]:
        raise SnapshotError("this host's KVM gives the guest a different CPUID than the "
                            "host that made the snapshot (another kernel or CPU microcode?)")
    theirs, ours = saved.get("kvm"), here["kvm"]
    if not isinstance(theirs, dict):
        raise SnapshotError("the manifest's host.kvm is not an object")
    for key in ("xsave_size", "xcrs", "vcpu_events", "debugregs"):
        if theirs.get(key) != ours[key]:
            raise SnapshotError(f"KVM differs from the saving host's: {key} was "
                                f"{theirs.get(key)!r}, here {ours[key]!r}")
    msrs = theirs.get("msrs")
    if not isinstance(msrs, list) or not all(isinstance(m, str) for m in msrs):
        raise SnapshotError("the manifest's host.kvm.msrs is not a list of MSR numbers")
    missing = sorted(set(msrs) - set(ours["msrs"]))
    if missing:
        raise SnapshotError(f"this host's KVM does not save MSRs {', '.join(missing[:4])} "
                            "that the snapshot holds")


# -- saving -------------------------------------------------------------------------------


def _blob(directory: Path, name: str, data: bytes) -> dict[str, Any]:
    (directory / name).write_bytes(data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save(vm: Vm, path: str | os.PathLike[str]) -> dict[str, float]:
    """Write the snapshot of ``vm`` (paused by the caller) to the directory ``path``
    (replaced if it exists). Returns timings (seconds) and sizes, for reports."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{parent}: no such directory for the snapshot", field="snapshot")
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        blobs: dict[str, Any] = {}
        for i, vcpu in enumerate(vm.platform.vcpus):
            blobs[vcpu_file(i)] = _blob(tmp, vcpu_file(i),
                                        vcpustate.save_vcpu(vcpu).to_bytes())
        blobs[VM_FILE] = _blob(tmp, VM_FILE, vcpustate.save_vm(vm.platform.vm).to_bytes())
        legacy = {name: dev.save_state() for name, dev in vm.legacy_devices().items()}
        from .transport.state import save_transport

        virtio = [save_transport(t) for _, t in vm.virtio.transports]
        t1 = time.monotonic()
        fd = os.open(tmp / RAM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            ram_written = vm.memory.save(fd)
        finally:
            os.close(fd)
        t2 = time.monotonic()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "minivmm_version": _version(), "created": time.time(),
            "host": host_facts(vm),
            "config": vm.config.to_dict(), "cmdline": vm.cmdline,
            "extra_devices": [t.device.name for t in vm.extra_transports()],
            "memory": {"file": RAM_FILE, "size": vm.memory.size},
            "blobs": blobs, "legacy": legacy, "virtio": virtio,
        }
        try:
            text = json.dumps(manifest, indent=1, sort_keys=True)
        except (TypeError, ValueError) as e:  # a device's save_state() returned non-JSON
            raise UsageError(f"a device's saved state is not JSON-serialisable: {e}",
                             field="snapshot") from None
        (tmp / MANIFEST).write_text(text)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"state_s": t1 - t0, "ram_s": t2 - t1, "total_s": time.monotonic() - t0,
            "ram_written": float(ram_written)}


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an old snapshot there is moved aside and deleted
    (files a restored VM maps stay alive until it unmaps them)."""
    old: Path | None = None
    if target.exists() or target.is_symlink():
        if not (target / MANIFEST).is_file():
            raise UsageError(f"{target} exists and is not a snapshot: choose another path",
                             field="snapshot")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        try:
            os.rename(target, old / "snapshot")
        except OSError:
            old.rmdir()
            raise
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:  # the old snapshot goes back where it was
            os.rename(old / "snapshot", target)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read and checked (files, versions): what Vm.restore builds from."""

    path: Path
    manifest: dict[str, Any]
    config: VmConfig
    vcpus: tuple[vcpustate.VcpuState, ...]
    vm_state: vcpustate.VmState

    @property
    def ram_file(self) -> Path:
        return self.path / RAM_FILE

    @property
    def cmdline(self) -> str:
        return str(self.manifest["cmdline"])

    def with_overrides(self, **overrides: Any) -> Snapshot:
        """The same snapshot with its VmConfig's fields in :data:`OVERRIDABLE` changed
        (how the machine reaches the host); any other field is a UsageError."""
        if not overrides:
            return self
        bad = sorted(set(overrides) - set(OVERRIDABLE))
        if bad:
            raise UsageError(f"{', '.join(bad)} cannot change on restore (only "
                             f"{', '.join(OVERRIDABLE)} can)", field=bad[0])
        return dataclasses.replace(self, config=self.config.replace(**overrides))


def _read_blob(directory: Path, name: str, meta: object) -> bytes:
    if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
        raise SnapshotError(f"the manifest does not describe {name}")
    size = meta["size"]
    try:
        with open(directory / name, "rb") as f:
            data = f.read(_MAX_BLOB + 1)
    except OSError as e:
        raise SnapshotError(f"{directory / name}: {e.strerror}") from None
    if len(data) != size:
        raise SnapshotError(f"{name} is {len(data)} bytes, the manifest says {size} "
                            "(truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise SnapshotError(f"{name} does not match its SHA-256 in the manifest (corrupt)")
    return data


def _manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise SnapshotError(f"{directory}: not a snapshot directory (no such directory)")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_MANIFEST + 1)
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror}") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SnapshotError(f"{path}: not a readable manifest ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:80]}): truncated or corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a minivmm snapshot manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format version {version!r}; this minivmm reads "
                            f"version {FORMAT_VERSION} only")
    if manifest.get("minivmm_version") != _version():
        raise SnapshotError(f"made by minivmm {manifest.get('minivmm_version')!r}; this is "
                            f"{_version()}: restore it with the same version")
    for key, kind in (("config", dict), ("memory", dict), ("blobs", dict), ("legacy", dict),
                      ("virtio", list), ("host", dict), ("cmdline", str),
                      ("extra_devices", list)):
        if not isinstance(manifest.get(key), kind):
            raise SnapshotError(f"{path}: {key} is missing or not a {kind.__name__}")
    return manifest


def load(path: str | os.PathLike[str]) -> Snapshot:
    """Read and check the snapshot at ``path`` (SnapshotError if it is not one this
    minivmm reads)."""
    directory = Path(path)
    manifest = _manifest(directory)
    try:
        config = VmConfig.from_dict(manifest["config"])
    except UsageError as e:
        raise SnapshotError(f"the manifest's configuration: {e.for_option({})}") from None
    mem = manifest["memory"]
    if mem.get("size") != config.mem or mem.get("file") != RAM_FILE:
        raise SnapshotError("the manifest's memory does not match its configuration")
    try:
        ram_size = os.stat(directory / RAM_FILE).st_size
    except OSError as e:
        raise SnapshotError(f"{directory / RAM_FILE}: {e.strerror}") from None
    if ram_size != config.mem:
        raise SnapshotError(f"{RAM_FILE} is {ram_size} bytes, the guest has {config.mem} "
                            "(truncated)")
    blobs = manifest["blobs"]
    vcpus = tuple(vcpustate.VcpuState.from_bytes(
        _read_blob(directory, vcpu_file(i), blobs.get(vcpu_file(i))))
        for i in range(config.cpus))
    vm_state = vcpustate.VmState.from_bytes(_read_blob(directory, VM_FILE,
                                                       blobs.get(VM_FILE)))
    return Snapshot(directory, manifest, config, vcpus, vm_state)


# -- restoring ----------------------------------------------------------------------------


def restore_into(vm: Vm, snap: Snapshot) -> None:
    """Load the saved state into ``vm``, built from ``snap`` (its RAM mapped, its
    devices made, no kernel loaded) and not started."""
    m = snap.manifest
    check_host(m["host"], vm)
    from .kvm import KvmError

    try:
        for vcpu, state in zip(vm.platform.vcpus, snap.vcpus, strict=True):
            vcpustate.restore_vcpu(vcpu, state)
        vcpustate.restore_vm(vm.platform.vm, snap.vm_state)
    except KvmError as e:  # state that passed its checks but not KVM's
        raise SnapshotError(f"KVM refused the saved machine state: {e}") from None
    legacy = vm.legacy_devices()
    saved = m["legacy"]
    if set(saved) != set(legacy):
        raise SnapshotError(f"the snapshot has legacy devices {sorted(saved)}, this VM "
                            f"{sorted(legacy)}")
    transports = vm.virtio.transports
    if len(m["virtio"]) != len(transports):
        raise SnapshotError(f"the snapshot has {len(m['virtio'])} virtio devices, this VM "
                            f"{len(transports)}: give the same devices")
    from .transport.state import restore_transport

    try:
        for name, dev in legacy.items():
            dev.restore_state(saved[name])
        for (_, t), state in zip(transports, m["virtio"], strict=True):
            restore_transport(t, state)
    except ValueError as e:
        raise SnapshotError(str(e)) from None
