"""Firecracker's JSON configuration file, for the subset of it minivmm runs.

``minivmm run --config vm.json`` reads the file Firecracker's ``--config-file`` takes, with
its field names, and ``minivmm config`` writes one. Supported::

    {
      "boot-source": {"kernel_image_path": "...", "boot_args": "...", "initrd_path": "..."},
      "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
      "drives": [{"drive_id": "rootfs", "path_on_host": "disk.img",
                  "is_root_device": true, "is_read_only": false}],
      "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                              "guest_mac": "52:54:00:12:34:56"}],
      "entropy": {},
      "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
      "minivmm": {"console": "stdio", "console_device": "serial", "host_quirks": "auto",
                  "acpi": true, "cow_drives": ["rootfs"],
                  "devices": [{"device": "mypkg.ramdisk:RamDisk", "options": {"size": "1M"}}]}
    }

``minivmm`` holds what Firecracker has no field for. ``cow_drives`` names the drives
(by ``drive_id``) that are copy-on-write (``--disk PATH,cow``). ``devices`` (``--device``: see
minivmm.config.DeviceConfig) may also be a top-level field, but only in one of the two
places. Any other field, or a supported
object with an unsupported field (a rate limiter, ``cpu_template`` ...), is a UsageError
whose ``field`` is the field's path (``drives[0].rate_limiter``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Final

from .config import DeviceConfig, DriveConfig, NetConfig, VmConfig, VsockConfig, format_mac
from .errors import UsageError

_MIB: Final = 1 << 20
#: object -> its supported fields
_FIELDS: Final = {
    "boot-source": ("kernel_image_path", "boot_args", "initrd_path"),
    "machine-config": ("vcpu_count", "mem_size_mib", "smt"),
    "drives": ("drive_id", "path_on_host", "is_root_device", "is_read_only"),
    "network-interfaces": ("iface_id", "host_dev_name", "guest_mac"),
    "entropy": (),
    "vsock": ("guest_cid", "uds_path", "vsock_id"),
    "minivmm": ("console", "console_device", "host_quirks", "acpi", "cow_drives", "devices"),
    "devices": (),
}
#: minivmm's names for the fields, for messages about a value (see UsageError.field)
FIELD_NAMES: Final = {
    "kernel": "boot-source.kernel_image_path",
    "initrd": "boot-source.initrd_path",
    "cmdline": "boot-source.boot_args",
    "mem": "machine-config.mem_size_mib",
    "cpus": "machine-config.vcpu_count",
    "drives": "drives",
    "network_interfaces": "network-interfaces",
    "console": "minivmm.console",
    "console_device": "minivmm.console_device",
    "host_quirks": "minivmm.host_quirks",
    "acpi": "minivmm.acpi",
    "vsock": "vsock",
    "devices": "minivmm.devices",
}


def _object(doc: dict[str, Any], key: str) -> dict[str, Any]:
    obj = doc.get(key, {})
    if not isinstance(obj, dict):
        raise UsageError(f"{key}: expected an object")
    _known(obj, key, _FIELDS[key])
    return obj


def _known(obj: dict[str, Any], where: str, fields: tuple[str, ...]) -> None:
    for name in obj:
        if name not in fields:
            hint = f" (supported: {', '.join(fields)})" if fields else ""
            raise UsageError(f"{where}.{name}: not supported by minivmm{hint}")


def _list(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise UsageError(f"{key}: expected a list of objects")
    for i, item in enumerate(items):
        _known(item, f"{key}[{i}]", _FIELDS[key])
    return items


def fields_from_firecracker(doc: object) -> dict[str, Any]:
    """The VmConfig keyword arguments a Firecracker-style document gives (only those it
    sets, so that command-line options can be laid over them)."""
    if not isinstance(doc, dict):
        raise UsageError("a Firecracker configuration is a JSON object")
    for key in doc:
        if key not in _FIELDS:
            raise UsageError(f"{key}: not supported by minivmm (supported: "
                             f"{', '.join(_FIELDS)})")
    kw: dict[str, Any] = {}
    boot = _object(doc, "boot-source")
    for fc, ours in (("kernel_image_path", "kernel"), ("initrd_path", "initrd"),
                     ("boot_args", "cmdline")):
        if boot.get(fc) is not None:
            kw[ours] = boot[fc]
    machine = _object(doc, "machine-config")
    if "vcpu_count" in machine:
        kw["cpus"] = machine["vcpu_count"]
    if "mem_size_mib" in machine:
        mib = machine["mem_size_mib"]
        if isinstance(mib, bool) or not isinstance(mib, int):
            raise UsageError(f"{mib!r} is not a number of MiB", field="mem")
        kw["mem"] = mib * _MIB
    if machine.get("smt", False) is not False:
        raise UsageError("machine-config.smt: minivmm has no SMT; leave it false")
    if "drives" in doc:
        kw["drives"] = tuple(
            _build(DriveConfig, f"drives[{i}]", path=d.get("path_on_host"),
                   read_only=d.get("is_read_only", False), id=d.get("drive_id"),
                   root=d.get("is_root_device", False))
            for i, d in enumerate(_list(doc, "drives")))
    if "network-interfaces" in doc:
        kw["network_interfaces"] = tuple(
            _build(NetConfig, f"network-interfaces[{i}]", tap=n.get("host_dev_name"),
                   mac=n.get("guest_mac"), id=n.get("iface_id"))
            for i, n in enumerate(_list(doc, "network-interfaces")))
    if "entropy" in doc:
        _object(doc, "entropy")
        kw["rng"] = True
    if "vsock" in doc:
        v = _object(doc, "vsock")
        kw["vsock"] = _build(VsockConfig, "vsock", guest_cid=v.get("guest_cid"),
                             uds_path=v.get("uds_path"))
    own = _object(doc, "minivmm")
    kw.update({k: v for k, v in own.items() if k not in ("devices", "cow_drives")})
    if "cow_drives" in own:
        kw["drives"] = _cow(kw.get("drives", ()), own["cow_drives"])
    if "devices" in doc and "devices" in own:
        raise UsageError("devices: give it at the top level or in minivmm, not both")
    for where, devices in (("devices", doc.get("devices")), ("minivmm.devices",
                                                              own.get("devices"))):
        if devices is not None:
            if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
                raise UsageError(f"{where}: expected a list of objects")
            for i, d in enumerate(devices):
                _known(d, f"{where}[{i}]", ("device", "options"))
            kw["devices"] = tuple(_build(DeviceConfig, f"{where}[{i}]", device=d.get("device"),
                                         options=d.get("options"))
                                  for i, d in enumerate(devices))
    return kw


def _cow(drives: tuple[DriveConfig, ...], names: object) -> tuple[DriveConfig, ...]:
    """The drives, those named in ``minivmm.cow_drives`` made copy-on-write."""
    ids = [d.id or f"drive{i}" for i, d in enumerate(drives)]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError("minivmm.cow_drives: expected a list of drive_id strings")
    for name in names:
        if name not in ids:
            raise UsageError(f"minivmm.cow_drives: no drive has drive_id {name!r} (drives: "
                             f"{', '.join(ids) or 'none'})")
    return tuple(dataclasses.replace(d, cow=True) if ids[i] in names else d
                 for i, d in enumerate(drives))


def _build(kind: type[Any], where: str, **kw: Any) -> Any:
    try:
        return kind(**kw)
    except UsageError as e:
        raise UsageError(f"{where}: {e.message}") from None


def load(path: Path) -> dict[str, Any]:
    """Read a Firecracker-style JSON file into VmConfig keyword arguments."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})", field="config") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})",
                         field="config") from None
    try:
        return fields_from_firecracker(doc)
    except UsageError as e:
        if e.field:
            raise UsageError(f"{path}: {FIELD_NAMES.get(e.field, e.field)}: {e.message}",
                             field="config") from None
        raise UsageError(f"{path}: {e.message}", field="config") from None


def to_firecracker(cfg: VmConfig) -> dict[str, Any]:
    """``cfg`` as a Firecracker-style document (what ``minivmm config`` prints)."""
    boot: dict[str, Any] = {"kernel_image_path": str(cfg.kernel),
                            "boot_args": cfg.base_cmdline()}
    if cfg.initrd is not None:
        boot["initrd_path"] = str(cfg.initrd)
    doc: dict[str, Any] = {
        "boot-source": boot,
        "machine-config": {"vcpu_count": cfg.cpus, "mem_size_mib": cfg.mem // _MIB,
                           "smt": False},
        "drives": [{"drive_id": d.id or f"drive{i}", "path_on_host": str(d.path),
                    "is_root_device": d.root, "is_read_only": d.read_only}
                   for i, d in enumerate(cfg.drives)],
        "network-interfaces": [
            {"iface_id": n.id or f"net{i}", "host_dev_name": n.tap,
             **({"guest_mac": format_mac(n.mac)} if n.mac else {})}
            for i, n in enumerate(cfg.network_interfaces)],
    }
    if cfg.rng:
        doc["entropy"] = {}
    if cfg.vsock is not None:
        doc["vsock"] = {"guest_cid": cfg.vsock.guest_cid, "uds_path": str(cfg.vsock.uds_path)}
    doc["minivmm"] = {"console": cfg.console, "console_device": cfg.console_device,
                      "host_quirks": cfg.host_quirks, "acpi": cfg.acpi}
    if any(d.cow for d in cfg.drives):
        doc["minivmm"]["cow_drives"] = [d.id or f"drive{i}" for i, d in enumerate(cfg.drives)
                                        if d.cow]
    if cfg.devices:
        doc["minivmm"]["devices"] = [d.to_dict() for d in cfg.devices]
    return doc
