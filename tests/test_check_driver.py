"""--check-driver: every rule the probe's bad_driver check breaks on purpose is reported
(through the real transport and queue engine, in a real VM), nothing is reported for
drivers that keep the rules, and --check-driver=strict fails the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from guests import ProbeRun, guest_artifact, run_minivmm

from minivmm.check import RULES, DriverChecker
from minivmm.cli import CHECK_DRIVER_STATUS
from minivmm.devices.base import VirtioDevice
from minivmm.devices.rng import RngDevice
from minivmm.trace import Tracer
from minivmm.transport.mmio import IrqfdInterrupt, MmioTransport
from minivmm.transport.observe import ObservedTransport, Observers
from minivmm.transport.testing import DeviceHarness
from minivmm.virtio.chain import DescriptorChain
from minivmm.virtio.observe import ObservedQueue
from minivmm.virtio.queue import Queue

#: guest/probe/badrv.c's steps, each the rule it breaks (README "The bad_driver check")
BAD_DRIVER_STEPS = {
    "width": "register-width", "read_only": "read-only-register",
    "write_only": "write-only-register", "unknown_register": "unknown-register",
    "status_order": "status-order", "features_select": "features-select",
    "config_write_early": "config-write-before-features-ok",
    "feature_not_offered": "feature-not-offered", "no_version_1": "features-without-version-1",
    "features_late": "features-out-of-step", "queue_while_ready": "queue-register-while-ready",
    "notify_early": "notify-before-driver-ok", "features_ok_unread": "features-ok-not-reread",
    "ack_bits": "interrupt-ack-bits", "chain_reused": "chain-reused",
    "indirect_unnegotiated": "indirect-not-negotiated",
    "status_after_failed": "status-after-failed", "loop": "chain-loop",
    "next_oob": "descriptor-index", "head_oob": "descriptor-index",
    "nested_indirect": "indirect-nested", "readable_after_writable": "writable-before-readable",
    "indirect_next": "indirect-with-next", "avail_jump": "avail-idx",
    "ring_misaligned": "ring-alignment", "queue_size": "queue-size",
}
SUMMARY = re.compile(r"^minivmm: check-driver: (§[\d.]+(?:, §[\d.]+)*) ([a-z0-9-]+): (\d+) "
                     r"\(first: (\S+) at ", re.M)
CLEAN = "minivmm: check-driver: no violations of the virtio 1.2 driver rules"


def probe(checks: str, *extra: str, check: str = "--check-driver=strict") -> ProbeRun:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--rng", check,
                    *extra, "--cmdline", f"probe.strict=1 probe.check={checks}")
    return ProbeRun(p.returncode, p.stdout, p.stderr)


def reported(run: ProbeRun) -> dict[str, int]:
    found = {rule: int(n) for section, rule, n, _ in SUMMARY.findall(run.err)}
    for section, rule, _, _ in SUMMARY.findall(run.err):
        assert RULES[rule].section == section
    return found


@pytest.mark.kvm
def test_every_rule_the_bad_driver_breaks_is_reported() -> None:
    run = probe("bad_driver")
    assert "result pass" in run.lines, run.out + run.err
    steps = run.fields("check bad_driver ok")["steps"].split(",")
    assert sorted(steps) == sorted(BAD_DRIVER_STEPS)
    want: dict[str, int] = {}
    for step in steps:
        want[BAD_DRIVER_STEPS[step]] = want.get(BAD_DRIVER_STEPS[step], 0) + 1
    assert reported(run) == want
    total = sum(want.values())
    assert f"minivmm: check-driver: {total} violations of {len(want)} rules" in run.err
    # Each one was also logged as it happened, naming the device, the rule and its section.
    assert ("check-driver: rng@0xd0000000: MagicValue written (§4.2.2.2 read-only-register)"
            in run.err)
    assert run.status == CHECK_DRIVER_STATUS
    assert f"exit status {CHECK_DRIVER_STATUS} (the run's own was 0)" in run.err


@pytest.mark.kvm
def test_without_strict_violations_are_reported_and_the_guest_decides_the_status() -> None:
    run = probe("bad_driver", check="--check-driver")
    assert run.status == 0 and reported(run)["chain-loop"] == 1


@pytest.mark.kvm
@pytest.mark.parametrize("checks", ["virtio,rng,rng_irq,reset", "console"])
def test_the_probes_correct_drivers_break_no_rule(checks: str) -> None:
    extra = ("--console-device", "virtio") if checks == "console" else ()
    run = probe(checks, *extra)
    run.assert_pass()
    devices = 2 if checks == "console" else 1  # --rng, and the virtio console
    assert CLEAN in run.err and f"({devices} device{'s' * (devices > 1)} watched)" in run.err


@pytest.mark.kvm
def test_the_blk_driver_breaks_no_rule(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(64 << 10))
    run = probe("blk,rng", "--disk", str(disk))
    run.assert_pass()
    assert CLEAN in run.err and "(2 devices watched)" in run.err


@pytest.mark.kvm
def test_the_probes_device_tests_of_bad_drivers_are_reported_as_such() -> None:
    # features_refused and bad_chain test how a device answers a bad driver: they break
    # rules on purpose too, and the checker names exactly those.
    run = probe("features_refused,bad_chain", check="--check-driver")
    run.assert_pass()
    assert reported(run) == {"feature-not-offered": 1, "features-without-version-1": 1,
                             "descriptor-index": 1, "buffer-outside-ram": 1,
                             "chain-loop": 1}


@pytest.mark.parametrize("option", ["--check-driver=sometimes", "--check-driver=yes"])
def test_bad_check_driver_value_is_a_usage_error(option: str) -> None:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), option)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_the_config_file_takes_trace_and_check_driver(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text('{"boot-source": {"kernel_image_path": "k"}, "minivmm": '
                   '{"trace": "virtio=t.jsonl", "check_driver": "strict"}}')
    p = run_minivmm("config", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert '"trace": "virtio=t.jsonl"' in p.stdout and '"check_driver": "strict"' in p.stdout
    cfg.write_text('{"boot-source": {"kernel_image_path": "k"}, "minivmm": '
                   '{"check_driver": "loud"}}')
    p = run_minivmm("config", "--config", str(cfg))
    assert p.returncode == 2 and "minivmm.check_driver" in p.stderr


# -- through DeviceHarness (no VM): rules a probe can't provoke -------------------------


class Ticking(VirtioDevice):
    """A device whose 8-byte configuration the test changes between two driver reads."""

    device_type = 42
    name = "ticking"

    def __init__(self) -> None:
        super().__init__(0, queue_sizes=[8])
        self.value = 0

    def config(self) -> bytes:
        return self.value.to_bytes(8, "little")

    def process_queue(self, index: int) -> None:
        self.drain(self.queues[index], lambda chain: None)

    def tick(self) -> None:
        self.value += 0x1_0000_0001
        self.config_changed()


def harness(device: VirtioDevice) -> tuple[DeviceHarness, DriverChecker]:
    checker = DriverChecker()
    h = DeviceHarness(device, observer=checker)
    h.initialise()
    return h, checker


def test_a_config_read_torn_by_a_generation_change_is_reported() -> None:
    dev = Ticking()
    h, checker = harness(dev)
    assert checker.found == {}
    h.read_config(0, 4)
    dev.tick()  # the device changes its configuration between the two halves
    h.read_config(4, 4)
    h.read32(0x070)  # the driver goes on without reading ConfigGeneration again
    assert checker.found["config-generation"].count == 1
    assert checker.total == 1


def test_the_generation_loop_of_2_5_1_is_not_reported() -> None:
    dev = Ticking()
    h, checker = harness(dev)
    before = h.read32(0x0FC)
    h.read_config(0, 4)
    dev.tick()
    h.read_config(4, 4)
    assert h.read32(0x0FC) != before  # the driver sees the change and reads again
    h.read_config(0, 4)
    h.read_config(4, 4)
    assert h.read32(0x0FC) == before + 1
    h.read32(0x070)
    assert checker.found == {}


def test_fake_driver_traffic_is_clean_and_traced_once_per_event(tmp_path: Path) -> None:
    checker = DriverChecker()
    out = (tmp_path / "t.jsonl").open("w")
    h = DeviceHarness(RngDevice(), observer=Observers([Tracer(out), checker]))
    h.initialise()
    drv = h.drivers[0]
    head = drv.publish(writable=[16])
    h.kick(0)
    (used,) = drv.used()
    assert used.id == head
    out.close()
    kinds = [line.split('"kind":"')[1].split('"')[0]
             for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert kinds.count("chain") == 1 and kinds.count("used") == 1
    assert kinds.count("interrupt") == 1 and "features" in kinds
    assert checker.summary(1) == [
        "check-driver: no violations of the virtio 1.2 driver rules (1 device watched)"]


def test_a_chain_made_available_twice_while_held_is_reported() -> None:
    h, checker = harness(Ticking())
    drv = h.drivers[0]
    head = drv.publish(writable=[16], kick=False)
    drv.push_head(head)  # the same head once more, before the device used it
    h.kick(0)
    assert checker.found["chain-reused"].count == 1


def test_nothing_is_watched_unless_asked_and_a_failing_observer_is_contained() -> None:
    plain = DeviceHarness(RngDevice())
    assert type(plain.transport) is MmioTransport
    assert type(plain.transport.interrupt) is IrqfdInterrupt
    assert all(type(q) is Queue for q in plain.device.queues)

    class Broken(DriverChecker):
        def chain_popped(self, t: ObservedTransport, queue: Queue,
                         chain: DescriptorChain) -> None:
            raise RuntimeError("observer bug")

    watched = DeviceHarness(RngDevice(), observer=Broken())
    assert type(watched.transport) is ObservedTransport
    assert all(type(q) is ObservedQueue for q in watched.device.queues)
    watched.initialise()
    drv = watched.drivers[0]
    head = drv.publish(writable=[16])
    (used,) = drv.used()  # the device served the chain: the observer's failure is not its
    assert used.id == head and not watched.status & 64


def test_with_trace_on_a_violation_is_an_event_right_after_the_access(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path.open("w"), close=True)
    checker = DriverChecker()
    checker.listeners = [tracer]
    h = DeviceHarness(RngDevice(), observer=Observers([tracer, checker]))
    h.write32(0x000, 0)  # MagicValue is read-only
    tracer.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["kind"] for e in events] == ["write", "violation"]
    assert events[0]["reg"] == "MagicValue"
    assert events[1] == {**events[1], "rule": "read-only-register", "section": "§4.2.2.2",
                         "detail": "MagicValue written", "dev": "rng"}


def test_the_readme_lists_every_rule_as_the_checker_states_it() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (§[^|]+?) \| ([^|]+?) \|$", readme, re.M)
    assert {rule: (section, text) for rule, section, text in rows} == {
        rule: (r.section, r.text) for rule, r in RULES.items()}


def test_a_stopped_queue_is_reported_once_however_often_it_is_popped() -> None:
    h, checker = harness(Ticking())
    drv = h.drivers[0]
    drv.set_avail_idx(drv.avail_idx + 9)  # more than the queue size (8)
    h.kick(0)
    q = h.device.queues[0]
    assert q.broken is not None
    for _ in range(3):
        with pytest.raises(type(q.broken)):
            q.pop()
    assert checker.found["avail-idx"].count == 1
