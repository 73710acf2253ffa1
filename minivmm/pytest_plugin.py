"""minivmm's pytest plugin: a ``guest`` fixture, a booted :class:`minivmm.Guest`, and
``guest_clone``, a copy-on-write clone of one for each test.

::

    def test_hello(guest):
        assert guest.run(["sh", "-c", "echo hi"]).stdout == b"hi\\n"

    def test_alone(guest_clone):        # this test's own clone: its writes are its own
        guest_clone.run(["rm", "-rf", "/etc"])

Configured by ini options (``minivmm_kernel``, ``minivmm_initrd``, ``minivmm_mem``,
``minivmm_cpus``, ``minivmm_cmdline``, ``minivmm_scope``, ``minivmm_boot_timeout``,
``minivmm_agent``, ``minivmm_console_lines``; paths relative to the inifile's directory,
else the rootdir) and overridden per module, class or test by
``@pytest.mark.minivmm(kernel=..., mem=..., ...)`` (any :class:`VmConfig` field but
``console``, and ``boot_timeout``). Registered through the ``pytest11`` entry point under
its module name, so ``-p minivmm.pytest_plugin`` beside the entry point is harmless.

How the guest is shared: the fixture's scope is ``minivmm_scope`` (session, module or
function; pytest's dynamic scope), and each test parametrizes it indirectly, with a hidden
id, by its :class:`GuestSpec` (the ini options merged with its markers). pytest reuses a
fixture instance while the parameter compares equal, so tests of one scope with the same
spec share a guest; a different spec, or a guest that died, stops it and boots another
(one guest at a time per process: one per pytest-xdist worker).

``guest_clone`` is function-scoped and parametrized the same way. The first test of a
process to ask for a spec boots a guest for it (the base), snapshots it as soon as its
agent is up and stops it (:func:`base_snapshot`); every test then gets a guest restored
from that snapshot (:meth:`minivmm.Guest.restore`: RAM and disks copy-on-write), stopped
after the test. A process keeps each spec's snapshot (or the reason there is none) until
it ends, so configurations may alternate freely: each boots once per process.

On a failing test the tail of the guest's console and the crash detector's finding are
added to the report as sections, which pytest prints with the failure (for a clone: the
base's console up to the snapshot, then the clone's).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import pytest

from .config import VmConfig
from .errors import UsageError as ConfigError

if TYPE_CHECKING:
    from .guest import Guest

Scope = Literal["session", "module", "function"]
SCOPES = get_args(Scope)
#: ini option (without the minivmm_ prefix) -> (help, default)
INI = {
    "kernel": ("the guest kernel (bzImage or vmlinux), relative to the inifile", ""),
    "initrd": ("the initramfs (the guest agent is appended to it)", ""),
    "mem": ("guest memory, e.g. 512M", ""),
    "cpus": ("vCPUs", ""),
    "cmdline": ("the kernel command line (default: minivmm's, plus quiet)", ""),
    "scope": ("how long a guest lives: session, module or function", "session"),
    "boot_timeout": ("seconds for the guest agent to come up", "300"),
    "agent": ("the guest agent binary (default: guest/out/minivmm-agent, $MINIVMM_AGENT)", ""),
    "console_lines": ("console lines attached to a failing test's report", "50"),
}
#: the marker's keywords besides VmConfig's fields
MARKER_EXTRA = ("boot_timeout",)
MARKER_KEYS = tuple(sorted({f.name for f in dataclasses.fields(VmConfig)} - {"console"}
                           | set(MARKER_EXTRA)))
PATH_FIELDS = ("kernel", "initrd")


@dataclass(frozen=True)
class GuestSpec:
    """What a test's guest is: the VM (its console aside), the boot timeout, the agent."""

    config: VmConfig
    boot_timeout: float
    agent: Path | None


class GuestBootError(Exception):
    """The guest did not come up; ``console`` is what it printed."""

    def __init__(self, message: str, console: str) -> None:
        super().__init__(message)
        self.console = console


class _State:
    """This process's guests: the one booted last and where the consoles go."""

    def __init__(self) -> None:
        self.tmp: Path | None = None
        self.boots = 0
        self.spec: GuestSpec | None = None  # of the guest booted last
        self.guest: Guest | None = None  # that guest, while it is up
        self.console: Path | None = None
        self.errors: list[str] = []  # usage errors found while collecting
        self.bases: list[tuple[GuestSpec, Base | Exception]] = []  # guest_clone's

    def new_console(self) -> Path:
        if self.tmp is None:  # unique per process, so pytest-xdist workers never collide
            self.tmp = Path(tempfile.mkdtemp(prefix="minivmm-pytest-"))
        self.boots += 1
        return self.tmp / f"console-{self.boots}.log"

    def alive(self, spec: GuestSpec) -> bool:
        """False when the guest booted last for ``spec`` has died."""
        g = self.guest
        if self.spec != spec or g is None or g.vm is None:
            return True
        return g.vm.stopper.result is None


@dataclass(frozen=True)
class Base:
    """A spec's snapshot for ``guest_clone``: taken once the base guest's agent was up."""

    path: Path
    console: str  # what the base guest printed up to the snapshot


STATE = pytest.StashKey[_State]()
CLONE = pytest.StashKey[tuple["Guest", Base]]()  # a test's clone, while it runs


class _Param:
    """The ``guest`` fixture's parameter: equal for equal specs while their guest lives,
    which is what makes pytest reuse the fixture instance or replace it."""

    __slots__ = ("spec", "state")

    def __init__(self, spec: GuestSpec, state: _State) -> None:
        self.spec = spec
        self.state = state

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Param) and other.spec == self.spec
                and self.state.alive(self.spec))

    def __hash__(self) -> int:
        return hash((self.spec.config.kernel, self.spec.config.mem))


# --- configuration ------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    for name, (help_text, default) in INI.items():
        parser.addini(f"minivmm_{name}", help_text, default=default)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "minivmm(**options): the guest fixture's VM for these tests "
        f"(keywords: {', '.join(MARKER_KEYS)}); overrides the minivmm_* ini options")
    scope = _ini(config, "scope")
    if scope not in SCOPES:
        raise pytest.UsageError(f"ini option minivmm_scope = {scope!r}: use session, module "
                                "or function")
    lines = _ini(config, "console_lines")
    if not lines.isdigit():
        raise pytest.UsageError(f"ini option minivmm_console_lines = {lines!r}: give a "
                                "number of lines (0: none)")
    config.stash[STATE] = _State()


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None and state.tmp is not None:
        shutil.rmtree(state.tmp, ignore_errors=True)


def _ini(config: pytest.Config, name: str) -> str:
    value = config.getini(f"minivmm_{name}")
    return value.strip() if isinstance(value, str) else ""


def base_dir(config: pytest.Config) -> Path:
    """Where relative paths in the ini options and markers start: the inifile's directory,
    else the rootdir."""
    return config.inipath.parent if config.inipath is not None else config.rootpath


def guest_spec(config: pytest.Config, marks: Iterable[pytest.Mark], where: str) -> GuestSpec:
    """The ini options with ``marks`` (closest first, as ``iter_markers`` gives them)
    applied; pytest.UsageError naming the ini option or marker keyword at fault."""
    opts: dict[str, object] = {}
    source: dict[str, str] = {}
    for name in ("kernel", "initrd", "mem", "cpus", "cmdline", "boot_timeout"):
        if value := _ini(config, name):
            opts[name], source[name] = value, f"ini option minivmm_{name}"
    if "cpus" in opts:
        try:
            opts["cpus"] = int(str(opts["cpus"]))
        except ValueError:
            raise _usage(where, source["cpus"], f"{opts['cpus']!r} is not a number") from None
    for mark in reversed(list(marks)):  # the closest mark wins
        if mark.args:
            raise _usage(where, "@pytest.mark.minivmm", "takes keywords only (kernel=..., "
                         f"mem=...), not {', '.join(map(repr, mark.args))}")
        for key, value in mark.kwargs.items():
            if key not in MARKER_KEYS:
                raise _usage(where, f"@pytest.mark.minivmm({key}=...)", "unknown keyword; "
                             f"use {', '.join(MARKER_KEYS)}")
            opts[key], source[key] = value, f"@pytest.mark.minivmm({key}=...)"
    if "kernel" not in opts:
        raise _usage(where, "the guest fixture", "no kernel: set the ini option minivmm_kernel "
                     "(a path relative to the inifile) or @pytest.mark.minivmm(kernel=...)")
    base = base_dir(config)
    for name in PATH_FIELDS:
        if opts.get(name) is not None:
            given = opts[name]
            if not isinstance(given, str | os.PathLike):
                raise _usage(where, source[name], f"{given!r} is not a path")
            path = base / os.fspath(given)
            if not path.is_file():
                raise _usage(where, source[name], f"{path}: no such file")
            opts[name] = path
    timeout = opts.pop("boot_timeout", "300")
    try:
        boot_timeout = float(str(timeout))
    except ValueError:
        boot_timeout = -1.0
    if not boot_timeout > 0:
        raise _usage(where, source.get("boot_timeout", ""), f"{timeout!r}: give seconds > 0")
    try:
        vm_config = VmConfig(**opts)  # type: ignore[arg-type]
    except ConfigError as e:
        raise _usage(where, source.get(e.field or "", "the guest's configuration"),
                     e.message) from None
    except TypeError as e:  # a value of a type VmConfig cannot take
        raise _usage(where, "@pytest.mark.minivmm", str(e)) from None
    agent = _ini(config, "agent")
    return GuestSpec(vm_config, boot_timeout, base / agent if agent else None)


def _usage(where: str, what: str, message: str) -> pytest.UsageError:
    return pytest.UsageError(f"{where}: {what}: {message}")


# --- the fixture ----------------------------------------------------------------------------


def _scope(fixture_name: str, config: pytest.Config) -> Scope:
    scope = _ini(config, "scope")
    for known in get_args(Scope):
        if scope == known:
            return known  # type: ignore[no-any-return]
    return "session"  # pytest_configure rejected the others


def _uses_ours(name: str, defs: Iterable[object]) -> bool:
    """Whether the fixture ``name`` a test gets comes from this plugin: the last
    definition is ours, or overrides that request ``name`` lead down to ours."""
    for fixturedef in reversed(list(defs)):
        func = getattr(fixturedef, "func", None)
        if getattr(func, "__module__", None) == __name__:
            return True
        if name not in getattr(fixturedef, "argnames", ()):
            return False
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name in ("guest", "guest_clone"):
        if name not in metafunc.fixturenames:
            continue
        defs = getattr(metafunc, "_arg2fixturedefs", {}).get(name)
        if defs is not None and not _uses_ours(name, defs):
            continue
        state = metafunc.config.stash[STATE]
        try:
            spec = guest_spec(metafunc.config, metafunc.definition.iter_markers("minivmm"),
                              metafunc.definition.nodeid)
        except pytest.UsageError as e:  # reported once collection is over: one line each
            state.errors.append(str(e))
            return
        hidden = getattr(pytest, "HIDDEN_PARAM", "minivmm")  # pytest >= 8.4 hides the id
        metafunc.parametrize(name, [_Param(spec, state)], indirect=True, ids=[hidden],
                             scope=_scope(name, metafunc.config) if name == "guest"
                             else "function")


def pytest_collection_modifyitems(config: pytest.Config) -> None:
    errors = config.stash[STATE].errors
    if errors:
        raise pytest.UsageError("\n".join(dict.fromkeys(errors)))


def boot(config: pytest.Config, spec: GuestSpec) -> Guest:
    """A guest for ``spec``, its console in this process's temporary directory (read for
    failure reports); GuestBootError with the console when it does not come up."""
    state = config.stash[STATE]
    console = state.new_console()
    state.spec, state.guest, state.console = spec, None, console
    g = _start(spec, console)
    state.guest = g
    return g


def _start(spec: GuestSpec, console: Path) -> Guest:
    from .errors import MinivmmError
    from .guest import Guest

    try:
        return Guest(dataclasses.replace(spec.config, console=f"file:{console}"),
                     agent=spec.agent, boot_timeout=spec.boot_timeout)
    except MinivmmError as e:
        raise GuestBootError(f"minivmm: the guest did not boot: {e}", _read(console)) from None


def base_snapshot(config: pytest.Config, spec: GuestSpec) -> Base:
    """The snapshot ``guest_clone`` restores for ``spec``: the first call in this process
    boots a guest for it, snapshots it once its agent is up and stops it; later calls
    return the same snapshot, or raise the same error (GuestBootError with the console
    when the guest did not boot or could not be saved), without booting again. The
    snapshots are removed when the pytest run ends."""
    state = config.stash[STATE]
    found = next((base for known, base in state.bases if known == spec), None)
    if found is None:
        try:
            found = _make_base(state, spec)
        except Exception as e:  # kept: the next test of this spec gets it, not a boot
            found = e
        state.bases.append((spec, found))
    if isinstance(found, Exception):
        raise found
    return found


def _make_base(state: _State, spec: GuestSpec) -> Base:
    from .errors import MinivmmError

    console = state.new_console()
    assert state.tmp is not None  # made by new_console()
    g = _start(spec, console)
    try:
        path = g.snapshot(state.tmp / f"snapshot-{state.boots}")
    except MinivmmError as e:
        raise GuestBootError(f"minivmm: the guest could not be saved: {e}",
                             _read(console)) from None
    finally:
        g.close()
    return Base(path, _read(console))


def _spec(request: pytest.FixtureRequest) -> GuestSpec:
    param = getattr(request, "param", None)
    if isinstance(param, _Param):
        return param.spec
    # requested with getfixturevalue(): the markers of the scope's node
    return guest_spec(request.config, request.node.iter_markers("minivmm"),
                      request.node.nodeid)


@pytest.fixture(scope=_scope)
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A booted minivmm.Guest (see the module docstring for its configuration)."""
    g = boot(request.config, _spec(request))
    try:
        yield g
    finally:
        g.close()
        state = request.config.stash[STATE]
        if state.guest is g:
            state.guest = None


@pytest.fixture
def guest_clone(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """This test's own minivmm.Guest: a copy-on-write clone of a guest booted once per
    configuration and process, saved as soon as its agent was up; stopped after the
    test (see the module docstring)."""
    from .guest import Guest

    base = base_snapshot(request.config, _spec(request))
    clone = Guest.restore(base.path)
    request.node.stash[CLONE] = (clone, base)
    try:
        yield clone
    finally:
        del request.node.stash[CLONE]
        clone.close()


# --- the failure report ---------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        report.sections.extend(_failure_sections(item, call))
        report.sections.extend(_clone_sections(item, call))
    return report


def _failure_sections(item: pytest.Item, call: pytest.CallInfo[None]) -> list[tuple[str, str]]:
    callspec = getattr(item, "callspec", None)
    param = callspec.params.get("guest") if callspec is not None else None
    state = item.config.stash.get(STATE, None)
    if not isinstance(param, _Param) or state is None or state.spec != param.spec:
        return []
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, GuestBootError) and not _is_base_error(state, exc):
        console = exc.console
    else:
        console = _read(state.console)
    return _sections(item.config, "", console, None, state.guest)


def _clone_sections(item: pytest.Item, call: pytest.CallInfo[None]) -> list[tuple[str, str]]:
    state = item.config.stash.get(STATE, None)
    if state is None:
        return []
    held = item.stash.get(CLONE, None)
    if held is not None:
        clone, base = held
        own = clone.console_log()
        console = "\n".join((base.console.rstrip("\n"), CLONE_STARTS, own))
        return _sections(item.config, "clone ", console, own, clone)
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, GuestBootError) and _is_base_error(state, exc):
        return _sections(item.config, "clone ", exc.console, None, None)
    return []


#: the line between the base guest's console and the clone's in a failure's report
CLONE_STARTS = "----- minivmm: the snapshot; this test's clone from here on -----"


def _is_base_error(state: _State, exc: BaseException) -> bool:
    return any(found is exc for _, found in state.bases)


def _sections(config: pytest.Config, which: str, console: str, own: str | None,
              g: Guest | None) -> list[tuple[str, str]]:
    """The report's sections for a guest's ``console``; the crash line is looked for in
    ``own`` (a clone's console since its restore) before the rest."""
    from .exec import crash_line

    lines = int(_ini(config, "console_lines"))
    tail = "\n".join(console.splitlines()[-lines:]) if lines > 0 else ""
    finding = ((own is not None and crash_line(own)) or crash_line(console)
               or "no crash line on the console")
    if g is not None and g.vm is not None and (end := g.vm.stopper.result) is not None:
        finding += f"\nthe guest ended: {end.reason}: {end.detail}"
    sections = [(f"minivmm {which}crash", finding)]
    if tail:
        sections.insert(0, (f"minivmm {which}console (last {lines} lines)", tail))
    return sections


def _read(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""
