"""Optional C accelerators: a few hot loops with a C twin, compiled with cffi on first use.

minivmm is complete in pure Python. Where one Python step per item is the measured wall
(the network device's per-frame walk and readv/writev), a C function may do a whole
batch instead; the Python path stays the reference, and every accelerated path is
tested against it. :func:`load` compiles a module's C source with cffi (API mode) into
``~/.cache/minivmm/accel/`` (see :func:`cache_dir`), named by a hash of the
source, cffi's version and the interpreter, and imports it; later runs import the cached
library (about a millisecond). The first build takes under a second with gcc.

When the accelerator cannot be had (cffi not installed, no C compiler, the build fails,
or ``MINIVMM_ACCEL=0`` in the environment) :func:`load` returns None and the caller uses
its Python path. It says so once: a warning the first time a build fails (a marker file
in the cache keeps later runs quiet until the source changes), otherwise a debug line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

ENV: str = "MINIVMM_ACCEL"
"""Set to 0 to turn every accelerator off (the pure-Python paths run)."""

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """False when the environment turns the accelerators off (``MINIVMM_ACCEL=0``)."""
    return os.environ.get(ENV, "1").strip() not in ("0", "off", "no", "false")


def cache_dir() -> Path:
    """Where built accelerators live: ``$MINIVMM_ACCEL_DIR``, else
    ``$XDG_CACHE_HOME/minivmm/accel`` (``~/.cache/minivmm/accel``)."""
    explicit = os.environ.get("MINIVMM_ACCEL_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minivmm" / "accel"


def load(name: str, cdef: str, source: str) -> Any | None:
    """The compiled module ``name`` (its ``ffi`` and ``lib``), or None when accelerators
    are off or cannot be built here (see the module docstring). Thread-safe; built once
    per process, and once per machine for a given source."""
    if not enabled():
        return None
    with _lock:
        if name not in _loaded:
            _loaded[name] = _load(name, cdef, source)
        return _loaded[name]


def _load(name: str, cdef: str, source: str) -> ModuleType | None:
    import hashlib

    try:
        import cffi  # type: ignore[import-untyped]
    except ImportError:
        log.debug("accelerator %s off: cffi is not installed (pure Python)", name)
        return None
    key = hashlib.sha256("\0".join(
        (cdef, source, cffi.__version__, sys.version, sys.platform)).encode()).hexdigest()[:16]
    modname = f"_minivmm_{name}_{key}"
    where = cache_dir()
    failed = where / f"{modname}.failed"
    try:
        lib = _find(where, modname)
        if lib is None:
            if failed.exists():
                log.debug("accelerator %s off: its build failed before (%s)", name, failed)
                return None
            lib = _build(where, modname, cdef, source)
        return _import(modname, lib)
    except Exception as e:  # no compiler, a failed build, an unwritable cache
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        try:
            where.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{why}\n")
        except OSError:
            pass
        log.warning("minivmm: C accelerator %s is off (%s); the pure-Python path runs "
                    "(install cffi and a C compiler to turn it on)", name, why)
        return None


def _find(where: Path, modname: str) -> Path | None:
    for p in where.glob(f"{modname}.*.so"):
        return p
    return None


def _build(where: Path, modname: str, cdef: str, source: str) -> Path:
    import tempfile

    import cffi

    where.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(modname, source, extra_compile_args=["-O2", "-Wall", "-Werror"])
    with tempfile.TemporaryDirectory(dir=where, prefix=".build-") as tmp:
        built = Path(_quietly(lambda: ffi.compile(tmpdir=tmp, verbose=False)))
        final = where / built.name
        os.replace(built, final)  # atomic: a concurrent build of the same source is alike
    return final


def _quietly(build: Callable[[], str]) -> str:
    """Run a build with file descriptor 2 (the compiler's messages) captured: a failure
    is one line naming its first error, not a screenful."""
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
                lines = [ln for ln in err.read().decode(errors="replace").splitlines()
                         if "error" in ln]
                raise RuntimeError(lines[0].strip() if lines else f"{type(e).__name__}: {e}"
                                   ) from e
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
