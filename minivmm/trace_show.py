"""``minivmm trace show FILE [--device NAME]... [--kind KIND...]``: a --trace for people.

One line per event: seconds since the trace's first event, the device, the kind, and the
event's fields in a short form (registers as ``Status <- 0x3 ACKNOWLEDGE|DRIVER``, chains
as their descriptors). A line that is not a trace event (a truncated last line, a file that
is no trace) is reported in one line naming the file and line, and skipped; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from .errors import UsageError

__all__ = ["cmd_trace", "format_event", "read_events"]


class TraceLineError(ValueError):
    """One line of a trace file that is not a trace event."""


def parse_line(line: str) -> dict[str, Any]:
    """One JSON trace line -> its event; TraceLineError saying what is wrong."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceLineError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(event, dict):
        raise TraceLineError("not a JSON object")
    for key, kind in (("t", (int, float)), ("dev", str), ("kind", str)):
        if not isinstance(event.get(key), kind) or isinstance(event.get(key), bool):
            raise TraceLineError(f"no {key!r} field of the right type")
    return event


def read_events(lines: Iterable[str], name: str,
                errors: list[str]) -> Iterator[dict[str, Any]]:
    """The events of a trace; each bad line adds a one-line message to ``errors``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield parse_line(line)
        except TraceLineError as e:
            errors.append(f"{name}:{n}: {e}")


def _value(event: dict[str, Any]) -> str:
    value = event.get("value")
    text = f"0x{value:x}" if isinstance(value, int) else str(value)
    names = event.get("names")
    if names:
        text += " " + "|".join(str(n) for n in names)
    return text


def _desc(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    flags = "|".join(str(f) for f in d.get("flags", ()))
    where = " (indirect)" if d.get("table") else ""
    return f"{d.get('addr')}+{d.get('len')}{' ' + flags if flags else ''}{where}"


def format_event(event: dict[str, Any], t0: float) -> str:
    """One event as a line for people."""
    kind = event["kind"]
    e = event
    if kind in ("read", "write"):
        page = f"[{e['page']}]" if "page" in e else ""
        size = f" ({e['size']} bytes)" if "size" in e else ""
        arrow = "->" if kind == "read" else "<-"
        text = f"{e.get('reg')}{page} {arrow} {_value(e)}{size}"
    elif kind in ("config-read", "config-write"):
        text = f"offset {e.get('offset')} ({e.get('size')} bytes) = {_value(e)}"
    elif kind == "status":
        text = (f"{'|'.join(e.get('from', [])) or '0'} -> {'|'.join(e.get('to', [])) or '0'}")
    elif kind == "features":
        text = (f"offered {' '.join(e.get('offered', []))}; acked "
                f"{' '.join(e.get('acked', []))}; {'accepted' if e.get('accepted') else 'REFUSED'}")
    elif kind == "chain":
        text = (f"queue {e.get('queue')} head {e.get('head')}: "
                + ", ".join(_desc(d) for d in e.get("desc", [])))
    elif kind == "used":
        text = f"queue {e.get('queue')} head {e.get('head')} len {e.get('len')}"
    elif kind in ("interrupt", "interrupt-ack"):
        text = "|".join(e.get("bits", []))
    elif kind == "violation":
        text = f"{e.get('section')} {e.get('rule')}: {e.get('detail')}"
    else:
        text = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "dev", "kind"))
    return f"{e['t'] - t0:12.6f} {e['dev']:<22} {kind:<13} {text}".rstrip()


def _matches_device(dev: str, wanted: list[str]) -> bool:
    return any(dev == w or dev.split("@")[0] == w for w in wanted)


def show(stream: IO[str], name: str, devices: list[str] | None, kinds: list[str] | None,
         out: IO[str]) -> list[str]:
    """Print the trace in ``stream``; returns the bad lines' messages."""
    errors: list[str] = []
    t0: float | None = None
    for event in read_events(stream, name, errors):
        if t0 is None:
            t0 = float(event["t"])
        if devices and not _matches_device(event["dev"], devices):
            continue
        if kinds and event["kind"] not in kinds:
            continue
        print(format_event(event, t0), file=out)
    return errors


def cmd_trace(args: argparse.Namespace) -> int:
    if args.trace_command != "show":
        raise UsageError("say what to do with the trace: minivmm trace show FILE")
    if args.file == "-":
        errors = show(sys.stdin, "<stdin>", args.device, args.kind, sys.stdout)
    else:
        try:
            f = open(args.file, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"{args.file}: cannot read it ({e.strerror})") from None
        with f:
            errors = show(f, args.file, args.device, args.kind, sys.stdout)
    for message in errors:
        print(f"minivmm: error: {message}", file=sys.stderr)
    return 1 if errors else 0
