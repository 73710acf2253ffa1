"""--trace virtio: the events of a real driver (the probe) through the real transport, and
`minivmm trace show` (filters, one-line errors for lines that are not events)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from guests import ProbeRun, guest_artifact, run_minivmm

from minivmm.trace_show import format_event, parse_line

RNG = "rng@0xd0000000"


def traced_probe(tmp_path: Path, checks: str, *extra: str) -> tuple[ProbeRun, list[dict[str, Any]]]:
    trace = tmp_path / "trace.jsonl"
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--rng",
                    "--trace", f"virtio={trace}", *extra,
                    "--cmdline", f"probe.strict=1 probe.check={checks}")
    run = ProbeRun(p.returncode, p.stdout, p.stderr)
    run.assert_pass()
    return run, [json.loads(line) for line in trace.read_text().splitlines()]


def brief(e: dict[str, Any]) -> tuple[Any, ...]:
    """An event without its time stamp, as compact as the assertions need."""
    kind = e["kind"]
    if kind in ("read", "write"):
        return (kind, e["reg"], e["value"])
    if kind == "status":
        return (kind, "|".join(e["to"]))
    if kind == "features":
        return (kind, tuple(e["offered"]), tuple(e["acked"]), e["accepted"])
    if kind == "chain":
        return (kind, e["queue"], e["head"], tuple((d["len"], tuple(d["flags"]))
                                                   for d in e["desc"]))
    if kind == "used":
        return (kind, e["queue"], e["head"], e["len"])
    if kind in ("interrupt", "interrupt-ack"):
        return (kind, tuple(e["bits"]))
    if kind == "queue":
        return (kind, e["queue"], e["size"])
    if kind == "notify":
        return (kind, e["queue"])
    return (kind,)


@pytest.mark.kvm
def test_initialisation_and_a_chain_through_the_real_transport(tmp_path: Path) -> None:
    _, events = traced_probe(tmp_path, "rng_irq")
    assert all(e["dev"] == RNG for e in events)
    times = [e["t"] for e in events]
    assert times == sorted(times)
    seq = [brief(e) for e in events]
    # The probe's vdrv_init (guest/probe/virtio.c) after the ID scan, then one request
    # completed by an interrupt that the CPL0 handler acknowledges.
    init = [
        ("read", "MagicValue", 0x74726976), ("read", "Version", 2), ("read", "DeviceID", 4),
        ("read", "VendorID", 0x4D564D4D),
        ("reset",), ("read", "Status", 0),
        ("read", "Status", 0), ("write", "Status", 1), ("status", "ACKNOWLEDGE"),
        ("read", "Status", 1), ("write", "Status", 3), ("status", "ACKNOWLEDGE|DRIVER"),
        ("write", "DeviceFeaturesSel", 0), ("read", "DeviceFeatures", 0x3000_0000),
        ("write", "DeviceFeaturesSel", 1), ("read", "DeviceFeatures", 1),
        ("write", "DriverFeaturesSel", 0), ("write", "DriverFeatures", 0x3000_0000),
        ("write", "DriverFeaturesSel", 1), ("write", "DriverFeatures", 1),
        ("read", "Status", 3), ("write", "Status", 0xB),
        ("features", ("INDIRECT_DESC", "EVENT_IDX", "VERSION_1"),
         ("INDIRECT_DESC", "EVENT_IDX", "VERSION_1"), True),
        ("status", "ACKNOWLEDGE|DRIVER|FEATURES_OK"), ("read", "Status", 0xB),
        ("write", "QueueSel", 0), ("read", "QueueReady", 0), ("read", "QueueNumMax", 256),
        ("write", "QueueNum", 16),
    ]
    assert seq[:len(init)] == init
    live = seq.index(("status", "ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK"))
    assert ("queue", 0, 16) in seq[len(init):live]
    # After DRIVER_OK: the request. The device thread may serve it before the guest's
    # kick arrives (minivmm looks at every queue once at DRIVER_OK), so the kick's place
    # is not fixed; the rest is cause before effect.
    request = seq[live:]
    assert ("notify", 0) in request
    first_chain = request.index(("chain", 0, 0, ((64, ("WRITE",)),)))
    assert request[first_chain + 1:first_chain + 3] == [
        ("used", 0, 0, 64), ("interrupt", ("VRING",))]
    handler = request[first_chain + 3:]  # the CPL0 handler: InterruptStatus, ACK, again
    isr = handler.index(("read", "InterruptStatus", 1))
    assert handler[isr + 1] == ("interrupt-ack", ("VRING",))
    assert handler[isr + 2] == ("read", "InterruptStatus", 0)
    # Feature words are decoded with their page; chain descriptors carry their address.
    (offered,) = [e for e in events if e["kind"] == "read" and e["reg"] == "DeviceFeatures"
                  and e["page"] == 1]
    assert offered["names"] == ["VERSION_1"]
    (chain,) = [e for e in events if e["kind"] == "chain"]
    assert int(chain["desc"][0]["addr"], 16) > 0x100000 and chain["desc"][0]["next"] == 0


@pytest.mark.kvm
def test_reset_indirect_chains_and_needs_reset_are_traced(tmp_path: Path) -> None:
    _, events = traced_probe(tmp_path, "rng,bad_chain")
    chains = [e for e in events if e["kind"] == "chain"]
    indirect = [c for c in chains if c["desc"][0]["flags"] == ["INDIRECT"]]
    assert indirect and indirect[0]["desc"][1] == {**indirect[0]["desc"][1],
                                                   "table": "indirect", "len": 64}
    errors = [e["error"] for e in events if e["kind"] == "chain-error"]
    assert errors == ["InvalidNextIndex", "DescriptorOutOfMemory", "DescriptorChainTooLong"]
    reasons = [e["reason"] for e in events if e["kind"] == "needs-reset"]
    assert len(reasons) == 3 and "next=16" in reasons[0]
    assert sum(e["kind"] == "reset" for e in events) >= 4
    assert ("interrupt", ("CONFIG",)) in [brief(e) for e in events]


@pytest.mark.kvm
def test_trace_goes_to_stderr_by_default_and_show_reads_it(tmp_path: Path) -> None:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--rng",
                    "--trace", "virtio", "--cmdline", "probe.check=rng")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("{")]
    assert lines and all(json.loads(ln)["dev"] == RNG for ln in lines)
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    shown = run_minivmm("trace", "show", str(trace), "--kind", "used", "chain")
    assert shown.returncode == 0 and shown.stderr == ""
    out = shown.stdout.splitlines()
    assert len(out) == 8 and all(("chain" in ln) != ("used" in ln) for ln in out)
    assert "queue 0 head 0 len 64" in out[1]


EVENTS = [
    {"t": 5.0, "dev": "rng@0xd0000000", "kind": "write", "reg": "Status", "value": 1,
     "names": ["ACKNOWLEDGE"]},
    {"t": 5.5, "dev": "blk@0xd0001000", "kind": "read", "reg": "DeviceFeatures", "value": 1,
     "page": 1, "names": ["VERSION_1"]},
    {"t": 6.25, "dev": "rng@0xd0000000", "kind": "chain", "queue": 0, "head": 3,
     "desc": [{"addr": "0x1000", "len": 16, "flags": ["NEXT"], "next": 4},
              {"addr": "0x2000", "len": 64, "flags": ["WRITE"], "next": 0}]},
    {"t": 6.5, "dev": "rng@0xd0000000", "kind": "used", "queue": 0, "head": 3, "len": 64},
]


def write_trace(path: Path, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in EVENTS) + extra)
    return path


def test_show_formats_each_kind_relative_to_the_first_event() -> None:
    assert format_event(EVENTS[0], 5.0) == (
        "    0.000000 rng@0xd0000000         write         Status <- 0x1 ACKNOWLEDGE")
    assert format_event(EVENTS[1], 5.0).endswith("DeviceFeatures[1] -> 0x1 VERSION_1")
    assert format_event(EVENTS[2], 5.0).endswith(
        "queue 0 head 3: 0x1000+16 NEXT, 0x2000+64 WRITE")
    assert format_event(EVENTS[3], 5.0).startswith("    1.500000 ")


def test_show_filters_by_device_and_kind(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    by_dev = run_minivmm("trace", "show", str(trace), "--device", "blk")
    assert by_dev.returncode == 0 and len(by_dev.stdout.splitlines()) == 1
    assert "blk@0xd0001000" in by_dev.stdout
    by_window = run_minivmm("trace", "show", str(trace), "--device", "rng@0xd0000000",
                            "--kind", "used", "write")
    kinds = [ln.split()[2] for ln in by_window.stdout.splitlines()]
    assert kinds == ["write", "used"]
    assert run_minivmm("trace", "show", str(trace), "--kind", "interrupt").stdout == ""


@pytest.mark.parametrize(("line", "why"), [
    ('{"t": 1.0, "dev": "rng", "ki', "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"t": "soon", "dev": "rng", "kind": "read"}', "no 't' field"),
    ('{"t": 1.0, "kind": "read"}', "no 'dev' field"),
])
def test_corrupt_lines_are_one_line_errors(tmp_path: Path, line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_line(line)
    trace = write_trace(tmp_path / "t.jsonl", line + "\n")
    p = run_minivmm("trace", "show", str(trace))
    assert p.returncode == 1
    assert len(p.stdout.splitlines()) == len(EVENTS)  # the good lines are still shown
    (err,) = p.stderr.splitlines()
    assert err.startswith(f"minivmm: error: {trace}:5: {why}")


def test_show_usage_errors(tmp_path: Path) -> None:
    p = run_minivmm("trace", "show", str(tmp_path / "absent.jsonl"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot read it" in p.stderr
    p = run_minivmm("trace")
    assert p.returncode == 2 and "trace show FILE" in p.stderr


@pytest.mark.parametrize("spec", ["virtio=", "pci", "virtio,blk"])
def test_bad_trace_option_is_a_usage_error(spec: str) -> None:
    p = run_minivmm("run", "--kernel", str(guest_artifact("probe.elf")), "--trace", spec)
    assert p.returncode == 2
    assert p.stderr.startswith("minivmm: error: --trace: ") and p.stderr.count("\n") == 1


def test_a_traced_blk_is_served_in_python_so_every_chain_is_seen(tmp_path: Path) -> None:
    """blk's io_uring path walks its ring in C: a traced (or checked) queue is left to
    the Python path, so each of the probe's requests shows up as a chain and its used
    element (the probe: 6 reads and a flush at least)."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(64 << 10))
    run, events = traced_probe(tmp_path, "blk", "--disk", str(disk))
    assert "reads=6" in run.out
    blk = [e for e in events if e["dev"].startswith("blk@")]
    chains = [e["head"] for e in blk if e["kind"] == "chain"]
    used = [e["head"] for e in blk if e["kind"] == "used"]
    assert len(chains) >= 7 and sorted(chains) == sorted(used)
