"""Optional C accelerators: a few hot loops with a C twin, compiled with cffi on first use.

minivmm is complete in pure Python. Where one Python step per item is the measured wall
(the network device's per-frame walk and readv/writev, the block device's requests
through io_uring), a C function may do a whole batch instead; the Python path stays the
reference, and every accelerated path is tested against it. Their C shares one walk of
the virtqueue (minivmm.virtio.cwalk).

:func:`load` is the one loader: it compiles a module's C source with cffi (API mode,
linked with the ``libraries`` it names) into ``~/.cache/minivmm/accel/`` (see
:func:`cache_dir`), named by a hash of the source, the libraries, cffi's version and the
interpreter, and imports it; later runs import the cached library (about a millisecond).
The first build takes about a second with gcc, its output captured (a failure is one
line naming its first error, not a screenful). A failed build leaves a ``.failed``
marker with its reason next to where the library would be, so later runs don't try
again until the source changes (delete it after installing what was missing).

When an accelerator is off, :func:`load` returns None and the caller runs its Python
path; :func:`say_off` says so, once per process for each accelerator and reason, at a
level that tells without nagging:

- DEBUG: turned off on purpose (``MINIVMM_ACCEL=0``, or a device's own switch);
- INFO: this host cannot have it, the normal case on a machine without build tools:
  cffi is not installed, there is no working C compiler, a header or library is missing
  (liburing-dev), the kernel refuses io_uring, or the marker of an earlier failure;
- WARNING: a build that was expected to work failed (a compiler ran and rejected the
  source for another reason, or the built library would not load): once per machine,
  since the marker turns later runs' line into INFO.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Final

log = logging.getLogger(__name__)

ENV: Final = "MINIVMM_ACCEL"
"""Set to 0 to turn every accelerator off (the pure-Python paths run)."""
OFF_VALUES: Final = frozenset(("0", "off", "no", "false"))
COMPILE_ARGS: Final = ("-O2", "-Wall")

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_said: set[tuple[str, str]] = set()


class BuildFailed(Exception):
    """A build that failed; ``expected``: whether it should have worked here (then it
    is a warning, else this host lacks what it needs)."""

    def __init__(self, reason: str, expected: bool) -> None:
        super().__init__(reason)
        self.expected = expected


def enabled() -> bool:
    """False when the environment turns the accelerators off (``MINIVMM_ACCEL=0``)."""
    return os.environ.get(ENV, "1").strip().lower() not in OFF_VALUES


def cache_dir() -> Path:
    """Where built accelerators live: ``$MINIVMM_ACCEL_DIR``, else
    ``$XDG_CACHE_HOME/minivmm/accel`` (``~/.cache/minivmm/accel``)."""
    explicit = os.environ.get("MINIVMM_ACCEL_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minivmm" / "accel"


def say_off(name: str, why: str, level: int = logging.INFO,
            fallback: str = "the pure-Python path runs") -> None:
    """Log that accelerator ``name`` is off and why, once per process for each reason
    (the levels: the module docstring)."""
    with _lock:
        if (name, why) in _said:
            return
        _said.add((name, why))
    log.log(level, "minivmm: %s accelerator off (%s); %s", name, why, fallback)


def load(name: str, cdef: str, source: str, *, libraries: tuple[str, ...] = (),
         fallback: str = "the pure-Python path runs") -> Any | None:
    """The compiled module ``name`` (its ``ffi`` and ``lib``), or None when accelerators
    are off or it cannot be built here (said once: :func:`say_off`; ``fallback`` says
    what runs instead). Thread-safe; built once per process, and once per machine for a
    given source."""
    if not enabled():
        say_off(name, f"{ENV}={os.environ.get(ENV, '')}", logging.DEBUG, fallback)
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        module, why, level = _load(name, cdef, source, libraries)
        _loaded[name] = module
    if module is None:
        say_off(name, why, level, fallback)
    return module


def _load(name: str, cdef: str, source: str,
          libraries: tuple[str, ...]) -> tuple[ModuleType | None, str, int]:
    """(the module, "", 0), or (None, why it is off, the level to say it at)."""
    import hashlib

    try:
        import cffi  # type: ignore[import-untyped]
    except ImportError:
        return None, "cffi is not installed", logging.INFO
    key = hashlib.sha256("\0".join(
        (cdef, source, *libraries, *COMPILE_ARGS, cffi.__version__, sys.version,
         sys.platform)).encode()).hexdigest()[:16]
    modname = f"_minivmm_{name}_{key}"
    where = cache_dir()
    failed = where / f"{modname}.failed"
    try:
        lib = _find(where, modname)
        if lib is None:
            if failed.exists():
                return None, (f"its build failed before: {_first_line(failed)}; delete "
                              f"{failed} to try again"), logging.INFO
            lib = _build(where, modname, cdef, source, libraries)
        return _import(modname, lib), "", 0
    except Exception as e:  # no compiler, a failed build, an unwritable cache
        expected = e.expected if isinstance(e, BuildFailed) else not isinstance(e, OSError)
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        try:
            where.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{why}\n")
        except OSError:
            pass
        return None, why, logging.WARNING if expected else logging.INFO


def _first_line(path: Path) -> str:
    try:
        return path.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return "no reason recorded"


def _find(where: Path, modname: str) -> Path | None:
    for p in where.glob(f"{modname}.*.so"):
        return p
    return None


def _build(where: Path, modname: str, cdef: str, source: str,
           libraries: tuple[str, ...]) -> Path:
    import tempfile

    import cffi

    where.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(modname, source, libraries=list(libraries),
                   extra_compile_args=list(COMPILE_ARGS))
    with tempfile.TemporaryDirectory(dir=where, prefix=".build-") as tmp:
        built = Path(_quietly(lambda: ffi.compile(tmpdir=tmp, verbose=False)))
        final = where / built.name
        os.replace(built, final)  # atomic: a concurrent build of the same source is alike
    return final


#: what a compiler or linker says when the host lacks a header, a library or itself
_MISSING = ("No such file or directory", "cannot find -l", "not found")


def _quietly(build: Callable[[], str]) -> str:
    """Run a build with file descriptor 2 (the compiler's messages) captured; a failure
    raises BuildFailed naming its first error (expected unless the host lacks a compiler,
    a header or a library)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as err:
            os.dup2(err.fileno(), 2)
            try:
                return build()
            except Exception as e:
                os.dup2(saved, 2)
                err.seek(0)
                lines = [ln.strip() for ln in err.read().decode(errors="replace").splitlines()
                         if "error" in ln or "cannot find" in ln]
                lines.append(f"{type(e).__name__}: {e}")
                missing = [ln for ln in lines if any(m in ln for m in _MISSING)]
                # a "compiler" that fails without a diagnostic is no working compiler
                raise BuildFailed((missing or lines)[0],
                                  expected=len(lines) > 1 and not missing) from e
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import(modname: str, path: Path) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
