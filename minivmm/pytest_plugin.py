"""minivmm's pytest plugin: a ``guest`` fixture, a booted :class:`minivmm.Guest`.

::

    def test_hello(guest):
        assert guest.run(["sh", "-c", "echo hi"]).stdout == b"hi\\n"

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
(one guest at a time per process: one per pytest-xdist worker). A future fixture (a
clone per test, say) can do the same with :func:`guest_spec` and :func:`boot`.

On a failing test the tail of the guest's console and the crash detector's finding are
added to the report as sections, which pytest prints with the failure.
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


STATE = pytest.StashKey[_State]()


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


def _uses_our_guest(defs: Iterable[object]) -> bool:
    """Whether the ``guest`` a test gets comes from this plugin: the last definition is
    ours, or overrides that request ``guest`` lead down to ours."""
    for fixturedef in reversed(list(defs)):
        func = getattr(fixturedef, "func", None)
        if getattr(func, "__module__", None) == __name__:
            return True
        if "guest" not in getattr(fixturedef, "argnames", ()):
            return False
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "guest" not in metafunc.fixturenames:
        return
    defs = getattr(metafunc, "_arg2fixturedefs", {}).get("guest")
    if defs is not None and not _uses_our_guest(defs):
        return
    state = metafunc.config.stash[STATE]
    try:
        spec = guest_spec(metafunc.config, metafunc.definition.iter_markers("minivmm"),
                          metafunc.definition.nodeid)
    except pytest.UsageError as e:  # reported once collection is over: one line each
        state.errors.append(str(e))
        return
    hidden = getattr(pytest, "HIDDEN_PARAM", "minivmm")  # pytest >= 8.4 hides the id
    metafunc.parametrize("guest", [_Param(spec, state)],
                         indirect=True, ids=[hidden],
                         scope=_scope("guest", metafunc.config))


def pytest_collection_modifyitems(config: pytest.Config) -> None:
    errors = config.stash[STATE].errors
    if errors:
        raise pytest.UsageError("\n".join(dict.fromkeys(errors)))


def boot(config: pytest.Config, spec: GuestSpec) -> Guest:
    """A guest for ``spec``, its console in this process's temporary directory (read for
    failure reports); GuestBootError with the console when it does not come up."""
    from .errors import MinivmmError
    from .guest import Guest

    state = config.stash[STATE]
    console = state.new_console()
    state.spec, state.guest, state.console = spec, None, console
    try:
        g = Guest(dataclasses.replace(spec.config, console=f"file:{console}"),
                  agent=spec.agent, boot_timeout=spec.boot_timeout)
    except MinivmmError as e:
        raise GuestBootError(f"minivmm: the guest did not boot: {e}", _read(console)) from None
    state.guest = g
    return g


@pytest.fixture(scope=_scope)
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A booted minivmm.Guest (see the module docstring for its configuration)."""
    param = getattr(request, "param", None)
    if isinstance(param, _Param):
        spec = param.spec
    else:  # requested with getfixturevalue(): the markers of the scope's node
        spec = guest_spec(request.config, request.node.iter_markers("minivmm"),
                          request.node.nodeid)
    g = boot(request.config, spec)
    try:
        yield g
    finally:
        g.close()
        state = request.config.stash[STATE]
        if state.guest is g:
            state.guest = None


# --- the failure report ---------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        report.sections.extend(_failure_sections(item, call))
    return report


def _failure_sections(item: pytest.Item, call: pytest.CallInfo[None]) -> list[tuple[str, str]]:
    callspec = getattr(item, "callspec", None)
    param = callspec.params.get("guest") if callspec is not None else None
    state = item.config.stash.get(STATE, None)
    if not isinstance(param, _Param) or state is None or state.spec != param.spec:
        return []
    exc = call.excinfo.value if call.excinfo is not None else None
    console = exc.console if isinstance(exc, GuestBootError) else _read(state.console)
    lines = int(_ini(item.config, "console_lines"))
    tail = "\n".join(console.splitlines()[-lines:]) if lines > 0 else ""
    from .exec import crash_line

    finding = crash_line(console) or "no crash line on the console"
    g = state.guest
    if g is not None and g.vm is not None and (end := g.vm.stopper.result) is not None:
        finding += f"\nthe guest ended: {end.reason}: {end.detail}"
    sections = [("minivmm crash", finding)]
    if tail:
        sections.insert(0, (f"minivmm console (last {lines} lines)", tail))
    return sections


def _read(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""
