"""The typed configuration (VmConfig), its JSON forms, and the command line's usage errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from guests import ProbeRun, guest_artifact, run_minivmm
from hypothesis import given
from hypothesis import strategies as st

from minivmm import firecracker
from minivmm.config import DriveConfig, NetConfig, VmConfig, parse_size
from minivmm.errors import UsageError

MiB = 1 << 20


def test_defaults_and_normal_forms() -> None:
    cfg = VmConfig(kernel="k", mem="256M", drives=[DriveConfig("d.img")])
    assert cfg.kernel == Path("k") and cfg.mem == 256 * MiB and cfg.cpus == 1
    assert cfg.drives == (DriveConfig(Path("d.img")),)
    assert cfg.base_cmdline().startswith("console=ttyS0 reboot=t")
    assert cfg.replace(console_device="virtio").base_cmdline().startswith("console=hvc0")
    assert VmConfig(kernel="k", cmdline="x=1").base_cmdline() == "x=1"


def test_root_drive_adds_root_to_the_command_line() -> None:
    cfg = VmConfig(kernel="k", cmdline="quiet",
                   drives=[DriveConfig("a"), DriveConfig("b", read_only=True, root=True)])
    assert cfg.base_cmdline() == "quiet root=/dev/vdb ro"


@pytest.mark.parametrize(("kw", "field", "words"), [
    ({"mem": "lots"}, "mem", "not a size"),
    ({"mem": "1M"}, "mem", "too small"),
    ({"mem": "300T"}, "mem", "more than minivmm can map"),
    ({"mem": "100000000T"}, "mem", "more than minivmm can map"),
    ({"mem": 16 * MiB + 1}, "mem", "4 KiB pages"),
    ({"cpus": 0}, "cpus", "1 to 64"),
    ({"cpus": 65}, "cpus", "1 to 64"),
    ({"cpus": True}, "cpus", "1 to 64"),
    ({"console": "tty9"}, "console", "expected stdio"),
    ({"console_device": "pci"}, "console_device", "serial or virtio"),
    ({"host_quirks": "maybe"}, "host_quirks", "auto or off"),
    ({"rng": "yes"}, "rng", "true or false"),
    ({"drives": [DriveConfig("a", root=True), DriveConfig("b", root=True)]}, "drives",
     "more than one"),
])
def test_bad_values_name_their_field(kw: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(UsageError) as info:
        VmConfig(kernel="k", **kw)
    assert info.value.field == field and words in info.value.message


def test_item_errors() -> None:
    with pytest.raises(UsageError, match="at most 20"):
        DriveConfig("d", serial="x" * 21)
    with pytest.raises(UsageError, match="multicast"):
        NetConfig("tap0", mac="01:00:00:00:00:01")
    with pytest.raises(UsageError, match="may not contain"):
        NetConfig("a/b")


_names = st.text("abcdefgh", min_size=1, max_size=8)
_configs = st.builds(
    VmConfig, kernel=_names, initrd=st.none() | _names, cmdline=st.none() | st.text(max_size=20),
    mem=st.integers(16, 4096).map(lambda m: m * MiB), cpus=st.integers(1, 64),
    console=st.sampled_from(["stdio", "none", "file:x.log"]),
    console_device=st.sampled_from(["serial", "virtio"]),
    drives=st.lists(st.builds(DriveConfig, path=_names, read_only=st.booleans(),
                              serial=st.none() | _names, id=st.none() | _names,
                              cow=st.booleans()),
                    max_size=3),
    network_interfaces=st.lists(st.builds(NetConfig, tap=_names, mac=st.none() | st.just(
        "52:54:00:12:34:56")), max_size=2),
    rng=st.booleans(), host_quirks=st.sampled_from(["auto", "off"]), prefer_pvh=st.booleans())


@given(_configs)
def test_to_dict_round_trips_through_json(cfg: VmConfig) -> None:
    assert VmConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_refuses_unknown_fields() -> None:
    with pytest.raises(UsageError, match="unknown field 'memory'"):
        VmConfig.from_dict({"kernel": "k", "memory": 1})
    with pytest.raises(UsageError) as info:
        VmConfig.from_dict({"kernel": "k", "drives": [{"path": "d", "cache": "none"}]})
    assert info.value.field == "drives"


def test_firecracker_fields() -> None:
    kw = firecracker.fields_from_firecracker({
        "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "quiet"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": False},
        "drives": [{"drive_id": "rootfs", "path_on_host": "r.img", "is_root_device": True,
                    "is_read_only": True}, {"path_on_host": "scratch.img", "drive_id": "scratch"}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "guest_mac": "52:54:00:12:34:56"}],
        "entropy": {},
        "minivmm": {"cow_drives": ["scratch"]},
    })
    cfg = VmConfig(**kw)
    assert cfg.mem == 256 * MiB and cfg.cpus == 2 and cfg.rng
    assert cfg.drives == (DriveConfig("r.img", read_only=True, id="rootfs", root=True),
                          DriveConfig("scratch.img", id="scratch", cow=True))
    assert cfg.virtio_devices()[1][1].options["cow"]
    assert cfg.network_interfaces[0].mac == bytes.fromhex("525400123456")
    assert VmConfig(**firecracker.fields_from_firecracker(
        firecracker.to_firecracker(cfg))) == cfg.replace(cmdline=cfg.base_cmdline())


@pytest.mark.parametrize(("doc", "words"), [
    ({"logger": {}}, "logger: not supported"),
    ({"drives": [{"path_on_host": "a", "rate_limiter": {}}]}, "drives[0].rate_limiter"),
    ({"machine-config": {"smt": True}}, "smt"),
    ({"machine-config": {"mem_size_mib": "lots"}}, "not a number of MiB"),
    ({"boot-source": {"kernel_image_path": "k", "initrd": "x"}}, "boot-source.initrd"),
    ({"drives": [{"path_on_host": "a"}], "minivmm": {"cow_drives": ["a"]}},
     "no drive has drive_id 'a' .drives: drive0."),
    ({"minivmm": {"cow_drives": "drive0"}}, "expected a list of drive_id strings"),
])
def test_firecracker_errors_name_the_field(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("]", r"\]")):
        firecracker.fields_from_firecracker(doc)


def test_parse_size() -> None:
    assert parse_size("4096K") == 4 * MiB and parse_size("1G") == 1024 * MiB
    assert parse_size(12345) == 12345


# -- the command line -------------------------------------------------------------------------


def _one_line_usage_error(args: list[str], *words: str) -> None:
    p = run_minivmm(*args, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize(("option", "words"), [
    (["--cpus", "65"], ("--cpus", "1 to 64")),
    (["--cpus", "0"], ("--cpus",)),
    (["--mem", "300T"], ("--mem", "more than")),
    (["--mem", "100000000T"], ("--mem", "more than")),
])
def test_usage_errors_name_the_option(option: list[str], words: tuple[str, ...]) -> None:
    """Issue 10, defect 9: these were exit 1 (or an OverflowError) before."""
    _one_line_usage_error(["run", "--kernel", str(guest_artifact("probe.elf")), *option],
                          *words)


@pytest.mark.kvm
def test_memory_kvm_refuses_is_a_usage_error() -> None:
    _one_line_usage_error(["run", "--kernel", str(guest_artifact("probe.elf")), "--mem",
                           "60T"], "--mem")


def test_config_file_errors(tmp_path: Path) -> None:
    f = tmp_path / "vm.json"
    f.write_text('{"boot-source": {"kernel_image_path": "k"}, "balloon": {}}')
    _one_line_usage_error(["run", "--config", str(f)], "--config", "balloon")
    f.write_text("{not json")
    _one_line_usage_error(["run", "--config", str(f)], "--config", "not JSON")
    f.write_text('{"machine-config": {"vcpu_count": 99}, "boot-source": '
                 '{"kernel_image_path": "k"}}')
    _one_line_usage_error(["run", "--config", str(f)], "machine-config.vcpu_count")


def test_minivmm_config_prints_what_run_would_use(tmp_path: Path) -> None:
    p = run_minivmm("config", "--kernel", "vmlinux", "--mem", "256M", "--cpus", "2", "--rng",
                    "--disk", "d.img,ro,serial=abc", "--cmdline", "quiet")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256, "smt": False}
    assert doc["boot-source"] == {"kernel_image_path": "vmlinux", "boot_args": "quiet"}
    assert doc["drives"][0]["is_read_only"] is True and doc["entropy"] == {}
    f = tmp_path / "vm.json"
    f.write_text(p.stdout)
    again = run_minivmm("config", "--config", str(f))
    assert json.loads(again.stdout) == {**doc, "drives": [{**doc["drives"][0]}]}


def test_cow_disk_through_the_command_line_and_the_config_file(tmp_path: Path) -> None:
    p = run_minivmm("config", "--kernel", "vmlinux", "--disk", "a.img", "--disk", "b.img,cow")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["minivmm"]["cow_drives"] == ["drive1"]
    f = tmp_path / "vm.json"
    f.write_text(p.stdout)
    again = json.loads(run_minivmm("config", "--config", str(f)).stdout)
    assert again["minivmm"]["cow_drives"] == ["drive1"]
    _one_line_usage_error(["config", "--kernel", "k", "--disk", "a.img,cw"],
                          "unknown option 'cw' (known: ro, cow, serial=ID)")


@pytest.mark.kvm
def test_run_boots_the_probe_from_a_firecracker_file(tmp_path: Path) -> None:
    f = tmp_path / "vm.json"
    f.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(guest_artifact("probe.elf")),
                        "boot_args": "probe.check=rng probe.expect_mem=64M"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
        "entropy": {},
    }))
    p = run_minivmm("run", "--config", str(f))
    ProbeRun(p.returncode, p.stdout, p.stderr).assert_pass()
    # an option given on the command line wins over the file
    p = run_minivmm("run", "--config", str(f), "--mem", "96M", "--cmdline",
                    "probe.check=rng probe.expect_mem=96M")
    ProbeRun(p.returncode, p.stdout, p.stderr).assert_pass()
