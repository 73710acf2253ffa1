"""Devices by name (minivmm.devices.plugins): from_options' conversions and errors, the
look-up of built-in names, MODULE:CLASS and entry points, --device on the command line and
devices in the configuration files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from guests import ROOT, guest_artifact, run_minivmm

from minivmm import firecracker
from minivmm.config import DeviceConfig, DriveConfig, NetConfig, VmConfig, VsockConfig
from minivmm.devices import plugins
from minivmm.devices.base import VirtioDevice
from minivmm.devices.blk import BlockDevice
from minivmm.devices.rng import RngDevice
from minivmm.errors import UsageError


class Toy(VirtioDevice):
    """Every convertible annotation, for from_options' default."""

    device_type = 42
    name = "toy"

    def __init__(self, count: int, *, ratio: float = 1.0, on: bool = False,
                 path: Path | None = None, key: bytes = b"", label: str = "",
                 anything: Any = None) -> None:
        super().__init__(0, [8])
        self.got = {"count": count, "ratio": ratio, "on": on, "path": path, "key": key,
                    "label": label, "anything": anything}

    def config(self) -> bytes:
        return b""

    def process_queue(self, index: int) -> None:
        pass


class Complex(Toy):
    def __init__(self, count: int, pair: tuple[int, int] = (0, 0)) -> None:
        super().__init__(count)


class Abstract(VirtioDevice):
    device_type = 43


def toy(**options: str) -> dict[str, Any]:
    dev = Toy.from_options(options)
    try:
        return dev.got
    finally:
        dev.close()


def test_options_converted_by_annotation() -> None:
    got = toy(count="4K", ratio="0.5", on="yes", path="a/b", key="52:54:00:0a:0b:0c",
              label="x=y", anything="as is")
    assert got == {"count": 4096, "ratio": 0.5, "on": True, "path": Path("a/b"),
                   "key": bytes.fromhex("5254000a0b0c"), "label": "x=y",
                   "anything": "as is"}
    assert toy(count="0x10", on="OFF", key="00ff")["count"] == 16
    assert toy(count="7", on="0")["on"] is False
    assert toy(count="2M")["path"] is None


@pytest.mark.parametrize(("options", "want"), [
    ({"count": "many"}, "count='many': not an integer"),
    ({"count": "1", "on": "maybe"}, "on='maybe': write true or false"),
    ({"count": "1", "ratio": "x"}, "ratio='x': not a number"),
    ({"count": "1", "path": ""}, "path=: give a path"),
    ({"count": "1", "key": "zz"}, "key='zz': write bytes as hex"),
    ({"count": "1", "colour": "red"}, "unknown option 'colour' (known: count, ratio, on, "
                                      "path, key, label, anything)"),
    ({}, "missing option count=..."),
])
def test_bad_options_are_usage_errors(options: dict[str, str], want: str) -> None:
    with pytest.raises(UsageError) as e:
        Toy.from_options(options)
    assert want in e.value.message
    assert "\n" not in e.value.message


def test_an_unconvertible_annotation_is_named() -> None:
    with pytest.raises(UsageError, match="pair: its type"):
        Complex.from_options({"count": "1", "pair": "1,2"})


def test_builtin_names_and_module_class() -> None:
    assert plugins.resolve("rng") is RngDevice
    assert plugins.resolve("blk") is BlockDevice
    assert plugins.resolve("minivmm.devices.rng:RngDevice") is RngDevice
    assert plugins.resolve(f"{__name__}:Toy") is Toy
    assert {"blk", "net", "rng", "vsock"} <= set(plugins.known_names())


@pytest.mark.parametrize(("device", "want"), [
    ("nosuch", "'nosuch': no device by that name (known: blk, "),
    ("no_such_module_xyz:Dev", "cannot import no_such_module_xyz"),
    ("os:path", "os:path: not a VirtioDevice subclass"),
    ("json:nothing_here", "json has no nothing_here"),
    (f"{__name__}:Abstract", "an abstract class (it lacks config, process_queue)"),
    (":Dev", "write MODULE:CLASS"),
])
def test_resolve_errors(device: str, want: str) -> None:
    with pytest.raises(UsageError) as e:
        plugins.build(DeviceConfig(device))
    assert want in e.value.message
    assert e.value.field == "devices"


def test_build_names_the_device_in_option_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        plugins.build(DeviceConfig("blk", {"path": str(tmp_path / "none.img")}))
    assert e.value.field == "devices"
    assert e.value.message.startswith("blk: ") and "none.img: no such file" in e.value.message
    # from the drives field, the device's own message and field stay
    with pytest.raises(UsageError) as e:
        plugins.build(DeviceConfig("blk", {"path": str(tmp_path / "none.img")}),
                      field="drives")
    assert e.value.field == "drives" and not e.value.message.startswith("blk: ")
    with pytest.raises(UsageError, match=r"^vsock: .*buf_alloc=1"):
        plugins.build(DeviceConfig("vsock", {"cid": "3", "uds": str(tmp_path / "v"),
                                             "buf_alloc": "1"}))


def test_disk_is_a_shorthand_for_the_blk_device(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    cfg = VmConfig(kernel="k", drives=[DriveConfig(img, read_only=True, serial="s1")],
                   network_interfaces=[NetConfig("tap9", mac="52:54:00:00:00:01")],
                   rng=True, vsock=VsockConfig(3, tmp_path / "v.sock"),
                   devices=[DeviceConfig.parse(f"blk,path={img},ro,serial=s1")])
    specs = cfg.virtio_devices()
    assert [(f, d.device) for f, d in specs] == [
        ("drives", "blk"), ("network_interfaces", "net"), ("rng", "rng"),
        ("vsock", "vsock"), ("devices", "blk")]
    assert specs[1][1].options == {"tap": "tap9", "mac": "52:54:00:00:00:01"}
    a, b = (plugins.build(specs[i][1], field=specs[i][0]) for i in (0, 4))
    try:
        assert isinstance(a, BlockDevice) and isinstance(b, BlockDevice)
        assert (a.read_only, a.capacity, a.config()) == (b.read_only, b.capacity, b.config())
        assert a.avail_features == b.avail_features
    finally:
        a.close()
        b.close()


def test_device_config_parse_and_validation() -> None:
    d = DeviceConfig.parse("mypkg.mod:Dev,size=1M,ro,label=a=b")
    assert (d.device, d.options) == ("mypkg.mod:Dev", {"size": "1M", "ro": "true",
                                                        "label": "a=b"})
    assert DeviceConfig("x", {"n": 3, "on": False}).options == {"n": "3", "on": "false"}
    assert hash(d) == hash(DeviceConfig.parse("mypkg.mod:Dev,size=1M,ro,label=a=b"))
    for text, want in (("dev,,x=1", "empty option"), ("dev,a=1,a=2", "repeated option"),
                       (",a=1", "name a device")):
        with pytest.raises(UsageError, match=want) as e:
            DeviceConfig.parse(text)
        assert e.value.field == "devices"
    with pytest.raises(UsageError, match="is not a string, number or true/false"):
        DeviceConfig("x", {"a": [1]})  # type: ignore[dict-item]


def test_config_round_trip_with_devices() -> None:
    cfg = VmConfig(kernel="k", devices=[DeviceConfig("rng"),
                                        DeviceConfig("m:C", {"size": "1M", "ro": "true"})])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["devices"] == [{"device": "rng", "options": {}},
                               {"device": "m:C", "options": {"size": "1M", "ro": "true"}}]
    assert VmConfig.from_dict(data) == cfg
    with pytest.raises(UsageError) as e:
        VmConfig.from_dict({"kernel": "k", "devices": [{"device": "x", "opts": {}}]})
    assert e.value.field == "devices" and "unknown field 'opts'" in e.value.message


def test_firecracker_file_devices(tmp_path: Path) -> None:
    cfg = VmConfig(kernel="k", rng=True, devices=[DeviceConfig("m:C", {"size": "1M"})])
    doc = firecracker.to_firecracker(cfg)
    assert doc["minivmm"]["devices"] == [{"device": "m:C", "options": {"size": "1M"}}]
    assert VmConfig(**firecracker.fields_from_firecracker(doc)).devices == cfg.devices
    top = {"boot-source": {"kernel_image_path": "k"},
           "devices": [{"device": "m:C", "options": {"size": 1048576}}]}
    assert firecracker.fields_from_firecracker(top)["devices"] == (
        DeviceConfig("m:C", {"size": "1048576"}),)
    both = {**top, "minivmm": {"devices": []}}
    for doc, want in ((both, "not both"),
                      ({"devices": [{"device": "x", "colour": 1}]}, "devices[0].colour"),
                      ({"minivmm": {"devices": {}}}, "minivmm.devices: expected a list"),
                      ({"devices": [{"options": {}}]}, "devices[0]: None: name a device")):
        path = tmp_path / "vm.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(UsageError, match=want.replace("[", r"\[").replace("]", r"\]")):
            firecracker.load(path)


# -- the command line ----------------------------------------------------------------


def _one_line_error(args: list[str], want: str) -> None:
    p = run_minivmm(*args, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert want in lines[0], lines[0]


@pytest.mark.parametrize(("device", "want"), [
    ("nosuch", "--device: 'nosuch': no device by that name"),
    ("no_such_module_xyz:Dev", "--device: no_such_module_xyz:Dev: cannot import"),
    ("os:path", "--device: os:path: not a VirtioDevice subclass"),
    ("examples.ramdisk:RamDisk,size=1M,colour=red",
     "--device: examples.ramdisk:RamDisk: unknown option 'colour' (known: size, image, ro, "
     "serial)"),
    ("examples.ramdisk:RamDisk,size=lots", "size='lots': not an integer"),
    ("examples.ramdisk:RamDisk,size=1000", "size=1000: give a size in bytes, a multiple"),
    ("rng,,", "--device: 'rng,,': empty option"),
    ("blk", "--device: blk: missing option path=..."),
])
def test_device_usage_errors(device: str, want: str) -> None:
    _one_line_error(["run", "--kernel", str(guest_artifact("probe.elf")), "--device", device],
                    want)


def test_config_command_round_trips_devices(tmp_path: Path) -> None:
    args = ["--kernel", "k", "--rng", "--device", "examples.ramdisk:RamDisk,size=1M,ro"]
    p = run_minivmm("config", *args, timeout=60)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["minivmm"]["devices"] == [
        {"device": "examples.ramdisk:RamDisk", "options": {"size": "1M", "ro": "true"}}]
    path = tmp_path / "vm.json"
    path.write_text(p.stdout)
    again = run_minivmm("config", "--config", str(path), timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout) == doc


# -- entry points: an installed distribution offers --device NAME --------------------


def make_distribution(site: Path) -> Path:
    """A distribution as pip would install it: a module and its dist-info, whose
    entry_points.txt offers the example RAM disk as ``ramdisk``."""
    (site / "ramdisk_plugin.py").write_text(textwrap.dedent("""\
        from examples.ramdisk import RamDisk

        class ScratchDisk(RamDisk):
            name = "scratch"
        """))
    info = site / "ramdisk_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ramdisk-plugin\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[minivmm.devices]\nscratch = ramdisk_plugin:ScratchDisk\n")
    return site


def test_entry_point_names_a_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(make_distribution(tmp_path)))
    monkeypatch.syspath_prepend(str(ROOT))
    assert "scratch" in plugins.known_names()
    dev = plugins.build(DeviceConfig("scratch", {"size": "64K"}))
    try:
        assert type(dev).__name__ == "ScratchDisk" and dev.name == "scratch"
    finally:
        dev.close()
