"""uring: io_uring for the block device, through cffi; an accelerator, never the only path.

:func:`open_ring` gives a :class:`Ring` or None. None (the synchronous path) when:

- ``MINIVMM_IO_URING=off`` (or ``0``/``no``) is set, or ``MINIVMM_ACCEL=0`` (every C
  accelerator off), or the drive says ``io_uring=off``;
- the C half (minivmm.devices.uring_build, built and loaded by minivmm.accel, linked with
  liburing) cannot be had: no cffi, no compiler, no liburing-dev, not an x86-64 host;
- the kernel refuses io_uring (``io_uring_queue_init`` fails: EPERM/ENOSYS when the
  sysctl kernel.io_uring_disabled or a seccomp filter forbids it; EOPNOTSUPP for a
  kernel older than 5.6).

Each reason is said once per process by minivmm.accel's rule (:func:`minivmm.accel.say_off`:
DEBUG when switched off, INFO when this host cannot have it, WARNING only for a build
that should have worked), the cache and its ``.failed`` marker are minivmm.accel's too.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

from .. import accel

ENV: Final = "MINIVMM_IO_URING"
#: submission queue entries: the most requests in flight at once (completion queue: 2x)
ENTRIES: Final = 256
NAME: Final = "uring"
FALLBACK: Final = "blk uses synchronous I/O"


def forced_off() -> str | None:
    """The variable that forces the synchronous path, if the environment sets one."""
    for name in (ENV, accel.ENV):
        if os.environ.get(name, "").strip().lower() in accel.OFF_VALUES:
            return name
    return None


def accelerator() -> tuple[Any, Any] | None:
    """The compiled (ffi, lib), or None (the reason said once)."""
    machine = os.uname().machine
    if machine != "x86_64":
        accel.say_off(NAME, f"built for x86-64 only, not {machine}", fallback=FALLBACK)
        return None
    from . import uring_build

    module = accel.load(NAME, uring_build.CDEF, uring_build.SOURCE,
                        libraries=("uring",), fallback=FALLBACK)
    return None if module is None else (module.ffi, module.lib)


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
        accel.say_off(NAME, "io_uring=off on the drive", logging.DEBUG, FALLBACK)
        return None
    forced = forced_off()
    if forced:
        accel.say_off(NAME, f"{forced}={os.environ[forced]}", logging.DEBUG, FALLBACK)
        return None
    acc = accelerator()
    if acc is None:
        return None
    ffi, lib = acc
    out = ffi.new("struct mv_ring **")
    err = lib.mv_ring_new(ENTRIES, out)
    if err < 0:
        accel.say_off(NAME, f"the kernel refused io_uring: {os.strerror(-err)}; see sysctl "
                            "kernel.io_uring_disabled and seccomp", logging.INFO, FALLBACK)
        return None
    return Ring(ffi, lib, ffi.gc(out[0], lib.mv_ring_free))
