"""minivmm's layering, checked: every import inside minivmm/ against an allow-list.

The shape (minivmm/__init__.py draws it): two stacks that only minivmm.vm (and the
transport placement, which wires devices to KVM) joins, under the front ends::

    front ends   minivmm (the public API), cli, __main__, firecracker
    join         vm, transport.placement
    console      console (sinks, raw terminal, input pump: independent of KVM)
    platform     kvm -> memory -> x86 -> bus, devices.legacy -> platform, vcpu, stop
    virtio       virtio (the engine) -> devices -> transport (mmio, testing)
    leaves       errors, ratelimit, hostinfo, irq, config, eventloop: anyone may use them

A module may import its own layer, the layers its ``may_import`` names, and nothing
else. Every import counts: module-level, inside functions, under ``TYPE_CHECKING``,
relative and absolute. (``importlib.import_module`` with a computed name is not seen:
only the package's lazy re-exports use it.) Four rules are named on their own, because
they are the ones the design depends on most; a broken edge reports each rule it breaks.

Edges that break a rule today and are being fixed are listed in KNOWN_VIOLATIONS; the
test insists that they still break it, so fixing one means deleting its entry.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from guests import ROOT

PACKAGE = ROOT / "minivmm"

Graph = Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class Layer:
    name: str
    #: module names; "pkg.*" is the package and everything under it (the longest
    #: pattern that matches a module decides its layer)
    modules: tuple[str, ...]
    may_import: frozenset[str]
    what: str


def _layer(name: str, modules: Iterable[str], may_import: Iterable[str], what: str) -> Layer:
    return Layer(name, tuple(modules), frozenset(may_import), what)


LEAVES = "leaves"
PLATFORM = ("kvm", "memory", "x86", "bus", "machine")
VIRTIO = ("engine", "devices", "transport")

LAYERS = (
    _layer(LEAVES, ["minivmm.errors", "minivmm.ratelimit", "minivmm.hostinfo", "minivmm.irq",
                    "minivmm.config", "minivmm.eventloop", "minivmm.agent", "minivmm.cpio",
                    "minivmm.kmod", "minivmm.version", "minivmm.collect",
                    "minivmm.accel"],
           [],
           "helpers anybody may use; they use only each other"),
    # The platform stack, bottom up.
    _layer("kvm", ["minivmm.kvm.*"], [LEAVES], "the KVM ioctl layer (ctypes)"),
    _layer("memory", ["minivmm.memory"], [LEAVES, "kvm"], "guest memory"),
    _layer("x86", ["minivmm.x86.*"], [LEAVES, "kvm", "memory"],
           "x86 boot: loaders, vCPU set-up, firmware tables"),
    _layer("bus", ["minivmm.bus", "minivmm.devices.legacy.*"], [LEAVES, "kvm", "memory", "x86"],
           "the port I/O and MMIO buses and the legacy devices on them"),
    _layer("machine", ["minivmm.platform", "minivmm.vcpu", "minivmm.stop", "minivmm.pause"],
           [LEAVES, *PLATFORM], "the machine: platform, vCPU runners, stop controller"),
    # The virtio stack, bottom up. The engine is usable on its own: not even the leaves.
    _layer("engine", ["minivmm.virtio.*"], [], "the virtqueue engine"),
    _layer("devices", ["minivmm.devices.*"], [LEAVES, "engine"],
           "VirtioDevice and its implementations"),
    _layer("transport", ["minivmm.transport.*"], [LEAVES, "engine", "devices"],
           "the virtio-mmio transport and its test harness"),
    # minivmm/devices/ holds both stacks (virtio devices, devices/legacy): its __init__
    # would run for either, so it imports nothing.
    _layer("shared-package", ["minivmm.devices"], [],
           "a package whose modules live in both stacks"),
    # Watching the virtio stack: --trace and --check-driver (observers of the transport).
    _layer("observe", ["minivmm.trace", "minivmm.trace_show", "minivmm.check"],
           [LEAVES, *VIRTIO], "the virtio trace and the driver checker"),
    _layer("console", ["minivmm.console", "minivmm.crashwatch"], [LEAVES],
           "console sinks, the raw terminal and the input pump (independent of KVM)"),
    # What joins the stacks: the VM, and the placement of virtio-mmio devices on the
    # platform (MMIO windows from x86.layout, on the MMIO bus, with KVM ioeventfds/irqfds).
    _layer("join", ["minivmm.vm", "minivmm.transport.placement", "minivmm.snapshot"],
           [LEAVES, *PLATFORM, *VIRTIO, "console", "observe"], "what joins the two stacks"),
    _layer("front-ends", ["minivmm", "minivmm.cli", "minivmm.__main__", "minivmm.firecracker",
                          "minivmm.exec", "minivmm.exec_options", "minivmm.guest",
                          "minivmm.pytest_plugin"],
           [LEAVES, *PLATFORM, *VIRTIO, "console", "join", "shared-package", "observe"],
           "the public API package, the command line, the Firecracker config reader"),
)
BY_NAME = {layer.name: layer for layer in LAYERS}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@dataclass(frozen=True)
class Rule:
    text: str
    breaks: Callable[[str, str], bool]


#: The rules issue 10 names, checked besides the layer table.
RULES = (
    Rule("the virtqueue engine (minivmm.virtio) imports nothing from minivmm outside it",
         lambda a, b: _under(a, "minivmm.virtio") and not _under(b, "minivmm.virtio")),
    Rule("guest memory (minivmm.memory) must not import x86",
         lambda a, b: a == "minivmm.memory" and _under(b, "minivmm.x86")),
    Rule("devices must not import the console front end (minivmm.console)",
         lambda a, b: _under(a, "minivmm.devices") and b == "minivmm.console"),
    Rule("nothing imports minivmm.cli (only `python -m minivmm`, minivmm.__main__, runs it)",
         lambda a, b: b == "minivmm.cli" and a != "minivmm.__main__"),
)

#: Edges that break a rule today, each with who is fixing it. The test fails once one of
#: them no longer breaks a rule: delete its entry then.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


# --- reading the imports -----------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The minivmm modules that ``module``'s source imports, anywhere in it.

    ``from X import name`` counts as importing X.name when that is a module, else X.
    A name that is no module resolves to its longest prefix that is one.
    """
    known_set = set(known)
    package = module if is_package else module.rpartition(".")[0]

    def resolve(name: str) -> str:
        while name not in known_set and "." in name:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _under(a.name, "minivmm"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise ValueError(f"{module}: relative import beyond the top package")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not _under(target, "minivmm"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known_set else target)
    found.discard(module)
    return {resolve(name) for name in found}


def import_graph(root: Path = ROOT) -> dict[str, frozenset[str]]:
    """Every module under root/minivmm -> the minivmm modules it imports."""
    paths = {module_name(p, root): p for p in sorted((root / "minivmm").rglob("*.py"))}
    return {
        name: frozenset(imports_of(path.read_text(), name, path.name == "__init__.py", paths))
        for name, path in paths.items()
    }


# --- checking them --------------------------------------------------------------------------


def layer_of(module: str) -> Layer | None:
    best: tuple[int, Layer] | None = None
    for layer in LAYERS:
        for pattern in layer.modules:
            if pattern.endswith(".*"):
                hit = _under(module, pattern[:-2])
                rank = 2 * len(pattern[:-2])
            else:
                hit = module == pattern
                rank = 2 * len(pattern) + 1  # an exact name beats a pattern of its length
            if hit and (best is None or rank > best[0]):
                best = (rank, layer)
    return None if best is None else best[1]


@dataclass(frozen=True)
class Violation:
    importer: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported}: {self.rule}"


def violations(graph: Graph) -> list[Violation]:
    """Each rule each edge breaks (a module without a layer is a violation of its own)."""
    out: list[Violation] = []
    for importer, targets in sorted(graph.items()):
        src = layer_of(importer)
        for imported in sorted(targets):
            dst = layer_of(imported)
            out.extend(Violation(importer, imported, rule.text)
                       for rule in RULES if rule.breaks(importer, imported))
            if src is None or dst is None:
                continue  # test_every_module_has_a_layer names it
            if dst.name != src.name and dst.name not in src.may_import:
                allowed = ", ".join(sorted(src.may_import)) or "nothing outside itself"
                out.append(Violation(
                    importer, imported,
                    f"layer {src.name!r} ({src.what}) may import {allowed}; "
                    f"not layer {dst.name!r} ({dst.what})"))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, frozenset[str]]:
    return import_graph()


def test_imports_follow_the_layers(graph: dict[str, frozenset[str]]) -> None:
    unexpected = [v for v in violations(graph)
                  if (v.importer, v.imported) not in KNOWN_VIOLATIONS]
    assert not unexpected, "layering violations:\n" + "\n".join(map(str, unexpected))


def test_known_violations_are_still_there(graph: dict[str, frozenset[str]]) -> None:
    found = {(v.importer, v.imported) for v in violations(graph)}
    fixed = sorted(KNOWN_VIOLATIONS - found)
    assert not fixed, f"fixed, so delete them from KNOWN_VIOLATIONS: {fixed}"


def test_every_module_has_a_layer(graph: dict[str, frozenset[str]]) -> None:
    assert len(graph) > 40  # the walk really found the package
    homeless = sorted(m for m in graph if layer_of(m) is None)
    assert not homeless, f"give these modules a layer in LAYERS: {homeless}"


def test_every_name_in_the_table_exists(graph: dict[str, frozenset[str]]) -> None:
    stale = [p for layer in LAYERS for p in layer.modules
             if p.removesuffix(".*") not in graph]
    assert not stale, f"LAYERS names modules that are gone: {stale}"
    assert all(name in BY_NAME for layer in LAYERS for name in layer.may_import)
    assert {a for a, _ in KNOWN_VIOLATIONS} <= graph.keys()


# --- the checker itself can fail ---------------------------------------------------------


MODULES = ["minivmm", "minivmm.memory", "minivmm.errors", "minivmm.x86", "minivmm.x86.layout",
           "minivmm.virtio", "minivmm.virtio.ring", "minivmm.virtio.queue", "minivmm.cli"]


def test_every_kind_of_import_is_seen() -> None:
    source = """
from __future__ import annotations
import os
import minivmm.x86.layout as lay
from typing import TYPE_CHECKING
from .ring import RING
from . import ring
from .. import errors
from ..memory import GuestMemory
if TYPE_CHECKING:
    from minivmm.cli import main
def late():
    from ..x86 import layout
    import minivmm.errors
"""
    found = imports_of(source, "minivmm.virtio.queue", False, MODULES)
    assert found == {"minivmm.x86.layout", "minivmm.virtio.ring", "minivmm.errors",
                     "minivmm.memory", "minivmm.cli"}
    # in a package's __init__, "." is the package itself
    assert imports_of("from . import ring\nfrom .queue import Q\n", "minivmm.virtio", True,
                      MODULES) == {"minivmm.virtio.ring", "minivmm.virtio.queue"}
    with pytest.raises(ValueError):
        imports_of("from ... import x\n", "minivmm.memory", False, MODULES)


def test_a_violation_names_both_modules_and_the_rule() -> None:
    bad = {
        "minivmm.devices.rng": frozenset({"minivmm.console", "minivmm.virtio.chain"}),
        "minivmm.memory": frozenset({"minivmm.x86.layout"}),
        "minivmm.vm": frozenset({"minivmm.cli"}),
        "minivmm.virtio.ring": frozenset({"minivmm.errors"}),
        "minivmm.kvm.api": frozenset({"minivmm.memory"}),
        "minivmm.__main__": frozenset({"minivmm.cli"}),
    }
    found = [str(v) for v in violations(bad)]
    assert found == [
        "minivmm.devices.rng imports minivmm.console: devices must not import the console "
        "front end (minivmm.console)",
        "minivmm.devices.rng imports minivmm.console: layer 'devices' (VirtioDevice and its "
        "implementations) may import engine, leaves; not layer 'console' (console sinks, the "
        "raw terminal and the input pump (independent of KVM))",
        "minivmm.kvm.api imports minivmm.memory: layer 'kvm' (the KVM ioctl layer (ctypes)) "
        "may import leaves; not layer 'memory' (guest memory)",
        "minivmm.memory imports minivmm.x86.layout: guest memory (minivmm.memory) must not "
        "import x86",
        "minivmm.memory imports minivmm.x86.layout: layer 'memory' (guest memory) may import "
        "kvm, leaves; not layer 'x86' (x86 boot: loaders, vCPU set-up, firmware tables)",
        "minivmm.virtio.ring imports minivmm.errors: the virtqueue engine (minivmm.virtio) "
        "imports nothing from minivmm outside it",
        "minivmm.virtio.ring imports minivmm.errors: layer 'engine' (the virtqueue engine) "
        "may import nothing outside itself; not layer 'leaves' (helpers anybody may use; "
        "they use only each other)",
        "minivmm.vm imports minivmm.cli: nothing imports minivmm.cli (only `python -m "
        "minivmm`, minivmm.__main__, runs it)",
        "minivmm.vm imports minivmm.cli: layer 'join' (what joins the two stacks) may import "
        "bus, console, devices, engine, kvm, leaves, machine, memory, observe, transport, x86; "
        "not layer 'front-ends' (the public API package, the command line, the Firecracker "
        "config reader)",
    ]


def test_layers_resolve_to_the_most_specific_entry() -> None:
    assert BY_NAME["bus"] is layer_of("minivmm.devices.legacy.serial")
    assert BY_NAME["devices"] is layer_of("minivmm.devices.rng")
    assert BY_NAME["shared-package"] is layer_of("minivmm.devices")
    assert BY_NAME["join"] is layer_of("minivmm.transport.placement")
    assert BY_NAME["transport"] is layer_of("minivmm.transport.mmio")
    assert layer_of("minivmm.nowhere") is None
