"""uring: io_uring for the block device, through cffi; an accelerator, never the only path.

:func:`open_ring` gives a :class:`Ring` or None. None (the synchronous path) when:

- ``MINIVMM_IO_URING=off`` (or ``0``/``no``) is set, or ``MINIVMM_ACCEL=0`` (every C
  accelerator off), or the drive says ``io_uring=off``;
- the C half (minivmm.devices.uring_build) cannot be built or loaded: no cffi, no
  compiler, no liburing-dev;
- the kernel refuses io_uring (``io_uring_queue_init`` fails: EPERM/ENOSYS when the
  sysctl kernel.io_uring_disabled or a seccomp filter forbids it; EOPNOTSUPP for a
  kernel older than 5.6).

Each reason is logged once per process, at INFO (a refused kernel) or DEBUG (no build
tools: the common case on a machine without a compiler), never as a warning: the
synchronous path is complete.

The extension is compiled at first use into ``$XDG_CACHE_HOME/minivmm/accel`` (default
``~/.cache/minivmm/accel``; ``MINIVMM_ACCEL_DIR`` overrides it), one file per source
version and interpreter, written under a temporary name and renamed into place, so
concurrent first runs cannot see half a file. A failed compile leaves a ``.failed``
marker with its reason next to it, so later starts don't try again (delete it after
installing what was missing).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

ENV: Final = "MINIVMM_IO_URING"
OFF_VALUES: Final = frozenset(("0", "off", "no", "false"))
#: submission queue entries: the most requests in flight at once (completion queue: 2x)
ENTRIES: Final = 256

_lock = threading.Lock()
_loaded: tuple[Any, Any] | None = None
_unavailable = False  # the extension could not be had: not tried again in this process
_said: set[str] = set()


#: turns every C accelerator off (minivmm.accel's switch), this one included
ALL_ENV: Final = "MINIVMM_ACCEL"


def forced_off() -> str | None:
    """The variable that forces the synchronous path, if the environment sets one."""
    for name in (ENV, ALL_ENV):
        if os.environ.get(name, "").strip().lower() in OFF_VALUES:
            return name
    return None


def _say_once(level: int, reason: str) -> None:
    with _lock:
        if reason in _said:
            return
        _said.add(reason)
    log.log(level, "blk: io_uring accelerator off (%s); using synchronous I/O", reason)


def cache_dir() -> Path:
    explicit = os.environ.get("MINIVMM_ACCEL_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minivmm" / "accel"


def _load_extension() -> tuple[Any, Any]:
    """(ffi, lib) of the compiled extension, building it first if the cache lacks it.
    Raises ImportError/OSError/any compile error (the caller turns them into a reason)."""
    from . import uring_build

    name = uring_build.module_name()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    where = cache_dir()
    path = where / f"{name}{suffix}"
    failed = where / f"{name}.failed"
    if not path.exists():
        if failed.exists():  # tried before: don't pay for a failing compile every start
            raise ImportError(f"its build failed before ({failed}: "
                              f"{failed.read_text().strip()}; delete it to try again)")
        importlib.import_module("cffi")  # a missing cffi is its own, clear reason
        where.mkdir(parents=True, exist_ok=True)
        log.debug("blk: building the io_uring accelerator into %s (once)", where)
        try:
            with tempfile.TemporaryDirectory(dir=where) as tmp:
                built = _quietly(uring_build.build, tmp)
                os.replace(built, path)
        except ImportError as e:  # the compile failed (a missing cffi raised above)
            try:
                failed.write_text(f"{e}\n")
            except OSError:
                pass
            raise
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib


def _quietly(fn: Any, *args: Any) -> str:
    """Run a compile with the process's stderr (the compiler's messages) captured: a
    missing header is a reason in one log line, not a screenful."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err:
        os.dup2(err.fileno(), 2)
        try:
            return str(fn(*args))
        except Exception as e:
            os.dup2(saved, 2)
            err.seek(0)
            lines = [ln for ln in err.read().decode(errors="replace").splitlines()
                     if "error" in ln]
            raise ImportError(lines[0].strip() if lines else f"{type(e).__name__}: {e}") from e
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def accelerator() -> tuple[Any, Any] | None:
    """The compiled (ffi, lib), or None (the reason logged once)."""
    global _loaded, _unavailable
    if _loaded is not None or _unavailable:
        return _loaded
    try:
        loaded = _load_extension()
    except Exception as e:  # no cffi, no compiler, no liburing, a broken cache file
        _unavailable = True
        _say_once(logging.DEBUG, f"cannot build or load it: {e}")
        return None
    with _lock:
        _loaded = loaded
    return loaded


class Ring:
    """One io_uring (ENTRIES deep) with the C side's batch state."""

    def __init__(self, ffi: Any, lib: Any, ring: Any) -> None:
        self.ffi = ffi
        self.lib = lib
        self.ptr = ring

    def close(self) -> None:
        """Free the ring now (else when it is garbage: ``ffi.gc``). Nothing is in
        flight between calls of the C side."""
        if self.ptr is not None:
            self.ffi.release(self.ptr)
            self.ptr = None


def open_ring(enabled: bool = True) -> Ring | None:
    """A new Ring, or None for the synchronous path (see the module docstring)."""
    if not enabled:
        _say_once(logging.DEBUG, "io_uring=off on the drive")
        return None
    forced = forced_off()
    if forced:
        _say_once(logging.DEBUG, f"{forced}={os.environ[forced]}")
        return None
    acc = accelerator()
    if acc is None:
        return None
    ffi, lib = acc
    out = ffi.new("struct mv_ring **")
    err = lib.mv_ring_new(ENTRIES, out)
    if err < 0:
        _say_once(logging.INFO, f"the kernel refused io_uring: {os.strerror(-err)}; see "
                                "sysctl kernel.io_uring_disabled and seccomp")
        return None
    return Ring(ffi, lib, ffi.gc(out[0], lib.mv_ring_free))
