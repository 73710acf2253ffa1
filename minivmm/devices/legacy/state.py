"""Saving and restoring a legacy device's registers (snapshots), written once.

A device lists its state as ``{attribute: kind}``; :func:`save_fields` turns those
attributes into a JSON-ready dict and :func:`restore_fields` checks a dict from a
snapshot (untrusted: exactly the listed keys, each of its kind and range) before it sets
any attribute. Kinds: ``"u8"`` (a register, 0-255), ``"bool"``, ``"int"`` (any integer),
``"bytes"`` (a bytearray, as hex), ``"u8deque"`` (a deque of bytes, as hex).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Literal

Kind = Literal["u8", "bool", "int", "bytes", "u8deque"]


def check_mapping(device: str, state: object) -> None:
    """ValueError unless ``state`` is a mapping (a JSON object)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{device}: saved state {str(state)[:40]!r} is not an object")


def save_fields(obj: object, fields: Mapping[str, Kind]) -> dict[str, object]:
    out: dict[str, object] = {}
    for attr, kind in fields.items():
        value = getattr(obj, attr)
        out[attr.lstrip("_")] = bytes(value).hex() if kind in ("bytes", "u8deque") else value
    return out


def restore_fields(obj: object, device: str, state: Mapping[str, object],
                   fields: Mapping[str, Kind], *, max_bytes: int = 1 << 20) -> None:
    """Set the attributes from ``state``; ValueError (one line naming the device and the
    field) if a key is missing or unknown or a value is not of its kind."""
    names = {attr.lstrip("_"): (attr, kind) for attr, kind in fields.items()}
    check_mapping(device, state)
    if set(state) != set(names):
        missing, extra = set(names) - set(state), set(state) - set(names)
        raise ValueError(f"{device}: saved state has "
                         + "; ".join(f"{what} {', '.join(sorted(keys))}" for what, keys in
                                     (("no", missing), ("unknown", extra)) if keys))
    values: dict[str, object] = {}
    for name, (attr, kind) in names.items():
        value = state[name]
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind in ("u8", "int"):
            ok = isinstance(value, int) and not isinstance(value, bool) and (
                kind == "int" or 0 <= value <= 0xFF)
        else:
            ok = isinstance(value, str) and len(value) <= 2 * max_bytes
            if ok:
                try:
                    raw = bytes.fromhex(str(value))
                except ValueError:
                    ok = False
                else:
                    value = bytearray(raw) if kind == "bytes" else deque(raw)
        if not ok:
            raise ValueError(f"{device}: saved {name} {str(state[name])[:40]!r} is not "
                             f"a valid {kind}")
        values[attr] = value
    for attr, value in values.items():
        setattr(obj, attr, value)
