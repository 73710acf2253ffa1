"""One typed configuration for a VM: every default and every validation, in one place.

:class:`VmConfig` and the parts it holds are frozen dataclasses. Build one from keyword
arguments (sizes as ``"128M"`` or a byte count, paths as ``str`` or ``Path``)::

    VmConfig(kernel="guest/out/bzImage", mem="256M", cpus=2,
             drives=[DriveConfig("disk.img", read_only=True)], rng=True)

Values are checked when the object is made; a bad one raises
:class:`~minivmm.errors.UsageError` whose ``field`` names the field (``mem``,
``drives[0].serial``), so each front end (the command line, a JSON file, the Python API)
can say it in its own words. What can only be checked by opening something (a kernel's
format, a disk image, a tap) is checked when the VM is built, with the same kind of error.

:meth:`VmConfig.to_dict` / :meth:`VmConfig.from_dict` round-trip through JSON
(minivmm's own field names; minivmm.firecracker reads and writes Firecracker's).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from .errors import UsageError

#: The kernel command line when none is given. ``reboot=t panic=-1``: a reboot or a panic
#: ends the VM (a triple fault) even without ACPI; the i8042 options keep Linux from
#: probing a keyboard and mouse that are not there.
DEFAULT_CMDLINE: Final = (
    "console=ttyS0 reboot=t panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)
DEFAULT_MEM: Final = 128 << 20
MIN_MEM: Final = 16 << 20
#: guest RAM beyond this is refused up front, before the host is asked for it
MAX_MEM: Final = 1 << 46
PAGE_SIZE: Final = 4096
MAX_CPUS: Final = 64
CONSOLES: Final = "stdio, none or file:PATH"
CONSOLE_DEVICES: Final = ("serial", "virtio")
HOST_QUIRKS: Final = ("auto", "off")
DISK_SERIAL_BYTES: Final = 20
IFNAMSIZ: Final = 16

StrPath: TypeAlias = "str | PathLike[str]"
_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str, *, field: str = "mem") -> int:
    """'256M', '1G', '4096K', '1048576' or an int -> bytes; UsageError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UsageError(f"{value!r} is not a size: write it like 256M or 1G", field=field)
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise UsageError(f"{value!r} is not a size: write it like 256M or 1G", field=field)
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(size: int) -> str:
    """The shortest exact spelling: 134217728 -> '128M'."""
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def check_mem(size: int) -> None:
    """The rule for a guest's RAM size (minivmm.memory.GuestMemory keeps it too)."""
    if size < MIN_MEM:
        raise UsageError(f"{format_size(size)} is too small: minivmm needs at least "
                         f"{MIN_MEM >> 20}M", field="mem")
    if size % PAGE_SIZE:
        raise UsageError("the memory size must be a whole number of 4 KiB pages",
                         field="mem")
    if size > MAX_MEM:
        raise UsageError(f"{format_size(size)} is more than minivmm can map (at most "
                         f"{MAX_MEM >> 40}T)", field="mem")


def check_console(spec: str) -> None:
    """The syntax of a console spec; opening the file happens when the VM is built."""
    if spec in ("stdio", "none"):
        return
    if not spec.startswith("file:"):
        raise UsageError(f"expected {CONSOLES}, got {spec!r}", field="console")
    if not spec[len("file:"):]:
        raise UsageError("file: needs a path, e.g. file:console.log", field="console")


def parse_mac(text: str, *, field: str = "mac") -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; UsageError for anything else."""
    parts = text.replace("-", ":").split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise UsageError(f"{text!r}: write a MAC address as six hex pairs, e.g. "
                         "52:54:00:12:34:56", field=field) from None
    check_mac(mac, field=field)
    return mac


def check_mac(mac: bytes, *, field: str = "mac") -> None:
    text = ":".join(f"{b:02x}" for b in mac)
    if len(mac) != 6:
        raise UsageError(f"{mac.hex()!r}: a MAC address is 6 bytes", field=field)
    if mac[0] & 1:
        raise UsageError(f"{text} is a multicast address; the first byte must be even "
                         "(e.g. 52:54:00:...)", field=field)
    if not any(mac):
        raise UsageError("00:00:00:00:00:00: choose a non-zero address", field=field)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def check_ifname(name: str, *, field: str = "tap") -> bytes:
    """A Linux interface name as TUNSETIFF wants it; refuses names Linux would refuse or
    (``%d``) treat as a pattern."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise UsageError(f"{name!r}: an interface name is 1 to {IFNAMSIZ - 1} bytes long",
                         field=field)
    if name in (".", "..") or any(ch in name for ch in "/:%") or any(
            ch.isspace() for ch in name):
        raise UsageError(f"{name!r}: an interface name may not contain '/', ':', '%' or "
                         "spaces", field=field)
    return raw


def _path(value: object, field: str) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value)
    raise UsageError(f"{value!r} is not a path", field=field)


def _check_bools(obj: object) -> None:
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.type == "bool" and not isinstance(getattr(obj, f.name), bool):
            raise UsageError(f"{getattr(obj, f.name)!r} is not true or false", field=f.name)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


@dataclass(frozen=True)
class DriveConfig:
    """A raw disk image as virtio-blk (/dev/vda, vdb, ... in order)."""

    path: Path
    read_only: bool = False
    #: the disk's ID (/sys/block/vda/serial), at most 20 bytes
    serial: str | None = None
    #: a name for the drive (Firecracker's drive_id); "drive<N>" if not given
    id: str | None = None
    #: the guest's root filesystem: adds ``root=/dev/vdX`` (and ``ro``) to the command line
    root: bool = False
    #: copy-on-write: the image is never written; the guest's writes go to a private
    #: overlay that disappears with the VM
    cow: bool = False

    if TYPE_CHECKING:
        def __init__(self, path: StrPath, read_only: bool = False, serial: str | None = None,
                     id: str | None = None, root: bool = False, cow: bool = False) -> None: ...

    def __post_init__(self) -> None:
        _set(self, "path", _path(self.path, "path"))
        _check_bools(self)
        if self.serial is not None and len(self.serial.encode()) > DISK_SERIAL_BYTES:
            raise UsageError(f"serial {self.serial!r} is {len(self.serial.encode())} bytes; "
                             f"use at most {DISK_SERIAL_BYTES}", field="serial")


@dataclass(frozen=True)
class NetConfig:
    """virtio-net on a Linux tap."""

    tap: str
    #: the guest's MAC address (6 bytes or "52:54:00:..."); stable per tap name if None
    mac: bytes | None = None
    #: a name for the interface (Firecracker's iface_id)
    id: str | None = None

    if TYPE_CHECKING:
        def __init__(self, tap: str, mac: bytes | str | None = None,
                     id: str | None = None) -> None: ...

    def __post_init__(self) -> None:
        if not isinstance(self.tap, str):
            raise UsageError(f"{self.tap!r} is not an interface name", field="tap")
        check_ifname(self.tap)
        mac: Any = self.mac
        if isinstance(mac, str):
            _set(self, "mac", parse_mac(mac))
        elif mac is not None:
            check_mac(bytes(mac))
            _set(self, "mac", bytes(mac))


@dataclass(frozen=True)
class VsockConfig:
    """virtio-vsock with a Firecracker-compatible host side on the Unix socket
    ``uds_path`` (see minivmm.devices.vsock)."""

    guest_cid: int
    uds_path: Path

    if TYPE_CHECKING:
        def __init__(self, guest_cid: int, uds_path: StrPath) -> None: ...

    def __post_init__(self) -> None:
        if isinstance(self.guest_cid, bool) or not isinstance(self.guest_cid, int) or not (
                3 <= self.guest_cid < 0xFFFF_FFFF):
            raise UsageError(f"cid={self.guest_cid!r}: a guest CID is 3 to 4294967294 "
                             "(0-2 are reserved, 2^32-1 is 'any')", field="guest_cid")
        _set(self, "uds_path", _path(self.uds_path, "uds_path"))


@dataclass(frozen=True)
class DeviceConfig:
    """A virtio device by name, built when the VM is: ``device`` is a built-in name
    (``blk``, ``net``, ``rng``, ``vsock``), a name an installed package offers, or
    ``MODULE:CLASS``; ``options`` go to the class's ``from_options`` (see
    minivmm.devices.plugins). JSON: ``{"device": "blk", "options": {"path": "d.img"}}``;
    option values may be written as strings, numbers or true/false (kept as strings)."""

    device: str
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    if TYPE_CHECKING:
        def __init__(self, device: str,
                     options: Mapping[str, str | int | bool] | None = None) -> None: ...

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device or "," in self.device:
            raise UsageError(f"{self.device!r}: name a device, e.g. blk or "
                             "mypkg.ramdisk:RamDisk", field="device")
        opts: object = {} if self.options is None else self.options
        if not isinstance(opts, Mapping):
            raise UsageError(f"{opts!r}: options are an object of key: value",
                             field="options")
        norm: dict[str, str] = {}
        for key, value in opts.items():
            if not isinstance(key, str) or not key or "=" in key or "," in key:
                raise UsageError(f"{key!r} is not an option name", field="options")
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int):
                value = str(value)
            elif not isinstance(value, str):
                raise UsageError(f"{key}: {value!r} is not a string, number or true/false",
                                 field="options")
            norm[key] = value
        _set(self, "options", norm)

    def __hash__(self) -> int:
        return hash((self.device, tuple(self.options.items())))

    @classmethod
    def parse(cls, text: str) -> DeviceConfig:
        """``NAME[,key=value...]`` (``--device``); a bare ``key`` means ``key=true``."""
        device, *opts = text.split(",")
        options: dict[str, str] = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not key or key in options:
                raise UsageError(f"{text!r}: {'empty' if not key else 'repeated'} option "
                                 f"{opt!r}; write NAME,key=value,...", field="devices")
            options[key] = value if eq else "true"
        try:
            return cls(device, options)
        except UsageError as e:
            raise UsageError(f"{text!r}: {e.message}", field="devices") from None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "options": dict(self.options)}


@dataclass(frozen=True)
class VmConfig:
    """Everything that describes one VM. See the module docstring."""

    kernel: Path
    initrd: Path | None = None
    #: the kernel command line; None means DEFAULT_CMDLINE (with console=hvc0 for a
    #: virtio console)
    cmdline: str | None = None
    mem: int = DEFAULT_MEM
    cpus: int = 1
    #: where console output goes: "stdio", "none" or "file:PATH"
    console: str = "stdio"
    #: the guest's console: "serial" (8250, ttyS0) or "virtio" (virtio-console, hvc0)
    console_device: str = "serial"
    drives: tuple[DriveConfig, ...] = ()
    network_interfaces: tuple[NetConfig, ...] = ()
    rng: bool = False
    vsock: VsockConfig | None = None
    #: more virtio devices, by name (``--device``), after the ones above
    devices: tuple[DeviceConfig, ...] = ()
    #: ACPI tables (and power-off through ACPI S5); False: the MP table and the command
    #: line's virtio_mmio.device= alone describe the machine
    acpi: bool = True
    #: "auto": on hosts whose KVM emulates guest kernel code, add what Linux needs there
    host_quirks: str = "auto"
    #: boot an ELF with a PVH note through PVH (False: its 64-bit entry)
    prefer_pvh: bool = True

    if TYPE_CHECKING:  # what the constructor accepts; the fields hold the normal forms
        def __init__(self, kernel: StrPath, initrd: StrPath | None = None,
                     cmdline: str | None = None, mem: int | str = DEFAULT_MEM,
                     cpus: int = 1, console: str = "stdio", console_device: str = "serial",
                     drives: Iterable[DriveConfig] = (),
                     network_interfaces: Iterable[NetConfig] = (), rng: bool = False,
                     vsock: VsockConfig | None = None,
                     devices: Iterable[DeviceConfig] = (), acpi: bool = True,
                     host_quirks: str = "auto", prefer_pvh: bool = True) -> None: ...

    def __post_init__(self) -> None:
        _set(self, "kernel", _path(self.kernel, "kernel"))
        _check_bools(self)
        if self.initrd is not None:
            _set(self, "initrd", _path(self.initrd, "initrd"))
        if self.cmdline is not None and not isinstance(self.cmdline, str):
            raise UsageError(f"{self.cmdline!r} is not a string", field="cmdline")
        mem = parse_size(self.mem)
        check_mem(mem)
        _set(self, "mem", mem)
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or not (
                1 <= self.cpus <= MAX_CPUS):
            raise UsageError(f"{self.cpus!r} vCPUs: give 1 to {MAX_CPUS}", field="cpus")
        check_console(self.console)
        if self.console_device not in CONSOLE_DEVICES:
            raise UsageError(f"{self.console_device!r}: use serial or virtio",
                             field="console_device")
        if self.host_quirks not in HOST_QUIRKS:
            raise UsageError(f"{self.host_quirks!r}: use auto or off", field="host_quirks")
        drives = tuple(self.drives)
        nets = tuple(self.network_interfaces)
        devices = tuple(self.devices)
        for name, items, kind in (("drives", drives, DriveConfig),
                                  ("network_interfaces", nets, NetConfig),
                                  ("devices", devices, DeviceConfig)):
            for i, item in enumerate(items):
                if not isinstance(item, kind):
                    raise UsageError(f"item {i} is not a {kind.__name__}", field=name)
        if self.vsock is not None and not isinstance(self.vsock, VsockConfig):
            raise UsageError(f"{self.vsock!r} is not a VsockConfig", field="vsock")
        if sum(d.root for d in drives) > 1:
            raise UsageError("more than one drive is the root device", field="drives")
        _set(self, "drives", drives)
        _set(self, "network_interfaces", nets)
        _set(self, "devices", devices)

    # -- what the guest is given ----------------------------------------------------------

    def virtio_devices(self) -> list[tuple[str, DeviceConfig]]:
        """Every configured virtio device as (the field it comes from, its DeviceConfig),
        in the order the guest sees them: the Firecracker-style fields (drives, network
        interfaces, rng, vsock) as the built-in devices, then ``devices``."""
        out = [("drives", DeviceConfig("blk", {
            "path": str(d.path), "read_only": d.read_only,
            **({"serial": d.serial} if d.serial is not None else {}),
            **({"cow": True} if d.cow else {})})) for d in self.drives]
        out += [("network_interfaces", DeviceConfig("net", {
            "tap": n.tap, **({"mac": format_mac(n.mac)} if n.mac else {})}))
            for n in self.network_interfaces]
        if self.rng:
            out.append(("rng", DeviceConfig("rng")))
        if self.vsock is not None:
            out.append(("vsock", DeviceConfig("vsock", {
                "cid": self.vsock.guest_cid, "uds": str(self.vsock.uds_path)})))
        return out + [("devices", d) for d in self.devices]

    def base_cmdline(self) -> str:
        """The command line before host quirks and virtio devices are added."""
        if self.cmdline is not None:
            line = self.cmdline
        elif self.console_device == "virtio":
            line = DEFAULT_CMDLINE.replace("console=ttyS0", "console=hvc0")
        else:
            line = DEFAULT_CMDLINE
        have = {opt.split("=", 1)[0] for opt in line.split()}
        for i, d in enumerate(self.drives):
            if d.root and "root" not in have:
                line += f" root=/dev/vd{chr(ord('a') + i)} {'ro' if d.read_only else 'rw'}"
        return line

    def host_quirks_cmdline(self) -> str:
        """The options ``host_quirks`` adds for this kernel on this host ('' if none)."""
        from . import hostinfo

        return hostinfo.host_quirks_cmdline(self.host_quirks, self.kernel, self.base_cmdline())

    # -- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "drives":
                value = [_drive_dict(d) for d in value]
            elif f.name == "network_interfaces":
                value = [{"tap": n.tap, "mac": format_mac(n.mac) if n.mac else None,
                          "id": n.id} for n in value]
            elif f.name == "devices":
                value = [d.to_dict() for d in value]
            elif isinstance(value, VsockConfig):
                value = {"guest_cid": value.guest_cid, "uds_path": str(value.uds_path)}
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmConfig:
        """The inverse of :meth:`to_dict`; unknown fields are UsageErrors naming them."""
        if not isinstance(data, dict):
            raise UsageError("a VM configuration is a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise UsageError(f"unknown field {key!r} (known: {', '.join(sorted(known))})",
                                 field=key)
        kw = dict(data)
        if "kernel" not in kw:
            raise UsageError("the kernel is missing", field="kernel")
        kw["drives"] = tuple(_from_items(DriveConfig, kw.get("drives", []), "drives"))
        kw["network_interfaces"] = tuple(
            _from_items(NetConfig, kw.get("network_interfaces", []), "network_interfaces"))
        if kw.get("vsock") is not None:
            kw["vsock"] = _from_items(VsockConfig, [kw["vsock"]], "vsock")[0]
        kw["devices"] = tuple(_from_items(DeviceConfig, kw.get("devices", []), "devices"))
        return cls(**kw)

    def replace(self, **changes: Any) -> VmConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _drive_dict(d: DriveConfig) -> dict[str, Any]:
    return {"path": str(d.path), "read_only": d.read_only, "serial": d.serial, "id": d.id,
            "root": d.root, "cow": d.cow}


def _from_items(kind: type[Any], items: object, name: str) -> list[Any]:
    if not isinstance(items, list):
        raise UsageError("expected a list", field=name)
    known = {f.name for f in dataclasses.fields(kind)}
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"item {i} is not an object", field=name)
        for key in item:
            if key not in known:
                raise UsageError(f"item {i}: unknown field {key!r} (known: "
                                 f"{', '.join(sorted(known))})", field=name)
        try:
            out.append(kind(**item))
        except TypeError as e:
            raise UsageError(f"item {i}: {e}", field=name) from None
        except UsageError as e:
            raise UsageError(f"item {i}: {e.message}", field=f"{name}.{e.field}") from None
    return out
