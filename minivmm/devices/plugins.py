"""Devices by name: ``--device MODULE:CLASS[,key=value...]`` and ``--device NAME[,...]``.

A device is named one of three ways, looked up in this order:

- a built-in short name (:data:`BUILTIN`: ``blk``, ``net``, ``rng``, ``vsock``);
- a name an installed package offers through the ``minivmm.devices`` entry-point group
  (``importlib.metadata``); in its ``pyproject.toml``::

      [project.entry-points."minivmm.devices"]
      ramdisk = "mypkg.ramdisk:RamDisk"

- ``MODULE:CLASS``: the module is imported (from ``sys.path``, which includes the
  current directory for ``python -m minivmm``) and CLASS taken from it.

The class must be a :class:`~minivmm.devices.base.VirtioDevice` subclass. It is built by
its :meth:`~minivmm.devices.base.VirtioDevice.from_options` classmethod from the options,
all strings. The default (:func:`options_to_kwargs`) passes each option as the keyword
argument of ``__init__`` with the same name, converted by the parameter's annotation:

=================  ==========================================================
annotation         option text
=================  ==========================================================
``str``            as written
``int``            ``4096``, ``0x1000`` or a size: ``4K``, ``1M``, ``2G``
``float``          ``0.5``
``bool``           ``true``/``false`` (also ``yes``/``no``, ``on``/``off``, ``1``/``0``);
                   a bare ``key`` means ``key=true``
``Path``           a non-empty path
``bytes``          hex digits, optionally in ``:``-separated pairs (``52:54:00:12:34:56``)
``X | None``       as X (leave the option out for None)
=================  ==========================================================

A parameter with another annotation cannot be given as an option (override
``from_options`` for it). Every failure is a one-line UsageError with field
``"devices"``: an unknown, missing or malformed option, a module that cannot be
imported, a class that is not a VirtioDevice subclass.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..errors import UsageError

if TYPE_CHECKING:
    from ..config import DeviceConfig
    from .base import VirtioDevice

#: the entry-point group through which installed packages offer devices by name
ENTRY_POINT_GROUP: Final = "minivmm.devices"
#: the built-in devices' short names
BUILTIN: Final = {
    "blk": "minivmm.devices.blk:BlockDevice",
    "net": "minivmm.devices.net:NetDevice",
    "rng": "minivmm.devices.rng:RngDevice",
    "vsock": "minivmm.devices.vsock:VsockDevice",
}
_TRUE: Final = frozenset(("true", "yes", "on", "1"))
_FALSE: Final = frozenset(("false", "no", "off", "0"))
_SIZE_RE: Final = re.compile(r"^(\d+)([KMGT])$", re.IGNORECASE)
_HEX_RE: Final = re.compile(r"^(?:[0-9a-f]{2})+$", re.IGNORECASE)


def _entry_points() -> dict[str, str]:
    from importlib import metadata  # only when a name is not built in: it takes a while

    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_names() -> list[str]:
    """Every short name a ``--device`` may use here (built-in and installed)."""
    return sorted({*BUILTIN, *_entry_points()})


def resolve(device: str) -> type[VirtioDevice]:
    """The VirtioDevice subclass ``device`` names (see the module docstring)."""
    from .base import VirtioDevice

    target = BUILTIN.get(device) or _entry_points().get(device)
    if target is None:
        if ":" not in device:
            raise UsageError(f"{device!r}: no device by that name (known: "
                             f"{', '.join(known_names())}); or give MODULE:CLASS",
                             field="devices")
        target = device
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{target!r}: write MODULE:CLASS, e.g. mypkg.ramdisk:RamDisk",
                         field="devices")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{target}: cannot import {module_name} ({e})",
                         field="devices") from None
    except Exception as e:  # the module itself failed: say how, in one line
        raise UsageError(f"{target}: importing {module_name} failed: "
                         f"{type(e).__name__}: {e}", field="devices") from None
    obj: object = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"{target}: {module_name} has no {attr}", field="devices")
    if not (isinstance(obj, type) and issubclass(obj, VirtioDevice)):
        raise UsageError(f"{target}: not a VirtioDevice subclass", field="devices")
    if inspect.isabstract(obj):
        raise UsageError(f"{target}: an abstract class (it lacks "
                         f"{', '.join(sorted(obj.__abstractmethods__))})", field="devices")
    return obj


def build(spec: DeviceConfig, *, field: str = "devices") -> VirtioDevice:
    """Resolve ``spec.device`` and build it with ``from_options``. A UsageError is about
    ``field``: for ``devices`` (``--device``) the message starts with the device's name;
    the built-in fields (``drives``, ...) keep the device's own message."""
    from .base import VirtioDevice

    cls = resolve(spec.device)
    try:
        dev = cls.from_options(dict(spec.options))
    except UsageError as e:
        if field != "devices":
            raise
        raise UsageError(f"{spec.device}: {e.message}", field=field) from None
    except (ValueError, TypeError) as e:  # a device's own check of an option's value
        raise UsageError(f"{spec.device}: {e}", field=field) from None
    if not isinstance(dev, VirtioDevice):
        raise UsageError(f"{spec.device}: from_options returned {type(dev).__name__}, not "
                         "a VirtioDevice", field=field)
    return dev


# -- the default from_options ---------------------------------------------------------


def options_to_kwargs(cls: type, options: Mapping[str, str]) -> dict[str, Any]:
    """``options`` as keyword arguments for ``cls.__init__``, each converted by its
    parameter's annotation (see the module docstring). UsageError for an unknown,
    missing or malformed option."""
    init = vars(cls).get("__init__") or next(
        vars(c)["__init__"] for c in cls.__mro__ if "__init__" in vars(c))
    params = {name: p for name, p in inspect.signature(init).parameters.items()
              if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that does not resolve: treat every option as str
        hints = {}
    kwargs: dict[str, Any] = {}
    for key, text in options.items():
        if key not in params:
            raise UsageError(f"unknown option {key!r} (known: "
                             f"{', '.join(params) or 'none'})")
        kwargs[key] = convert(key, text, hints.get(key, str))
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise UsageError(f"missing option{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(f'{m}=...' for m in missing)}")
    return kwargs


def convert(key: str, text: str, annotation: Any) -> Any:
    """One option's text as a value of ``annotation`` (see the module docstring)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    if not isinstance(text, str):
        raise UsageError(f"{key}={text!r}: an option's value is a string")
    if annotation is str or annotation is Any:
        return text
    if annotation is bool:
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise UsageError(f"{key}={text!r}: write true or false")
    if annotation is int:
        return _int(key, text)
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{key}={text!r}: not a number") from None
    if annotation is Path:
        if not text:
            raise UsageError(f"{key}=: give a path")
        return Path(text)
    if annotation is bytes:
        digits = text.replace(":", "")
        if not _HEX_RE.match(digits):
            raise UsageError(f"{key}={text!r}: write bytes as hex digits, e.g. 0a1b2c or "
                             "0a:1b:2c")
        return bytes.fromhex(digits)
    raise UsageError(f"{key}: its type ({annotation}) cannot be given as an option")


def _int(key: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        pass
    m = _SIZE_RE.match(text)
    if m:
        return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper()))
    raise UsageError(f"{key}={text!r}: not an integer (e.g. 4096, 0x1000, 4K, 1M)")
