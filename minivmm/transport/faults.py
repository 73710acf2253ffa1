"""Host-side failures for device tests: I/O errors, slow I/O and a tap that disappears.

A :class:`FaultInjector` (``DeviceHarness.faults``) acts on file descriptors, below the
device, so a device needs no hook to be tested against them:

- :meth:`~FaultInjector.io_error`: the Nth read, write or sync on a file (the device's
  disk image, given by path, or any fd) fails with an errno (EIO by default), as a
  failing disk's does;
- :meth:`~FaultInjector.delay`: those calls sleep first (a slow backend: an NFS image, a
  congested link), which is what the harness's watchdog is for;
- :meth:`~FaultInjector.detach_tap`: the fd is replaced, under the device, by a tun fd
  with no interface: reads, writes and TUNGETIFF fail with EBADFD, exactly as on a tap
  whose interface was deleted (``ip link del``); the device's own tap file closes, so a
  tap it created goes away.

How: while a fault is armed, the ``os`` functions that move data on a descriptor
(read, readv, pread, preadv, write, writev, pwrite, pwritev, fsync, fdatasync) are
wrapped, process-wide, by a check of the descriptor against the armed faults; the
originals are put back when the last fault is cleared. So the faults reach code that
calls ``os.<function>`` at call time (every Python I/O path in minivmm's devices), not
I/O done in C (the io_uring and accelerator paths: turn those off in such a test) nor
``fallocate`` (discard, write zeroes).
"""

from __future__ import annotations

import errno as errnos
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: the wrapped ``os`` functions, by the kind of I/O they do
OPS: Final = {
    "read": ("read", "readv", "pread", "preadv"),
    "write": ("write", "writev", "pwrite", "pwritev"),
    "sync": ("fsync", "fdatasync"),
}
ALL_OPS: Final = frozenset(OPS)

_lock = threading.Lock()
_armed: list[Fault] = []
_originals: dict[str, Callable[..., Any]] = {}


@dataclass
class Fault:
    """One armed fault: which descriptors and calls it hits, and what it does to them."""

    fds: frozenset[int]
    ops: frozenset[str]
    #: the first call it hits (1: the first matching call) and how many (0: every one
    #: from there)
    nth: int
    count: int
    errno: int | None  # raise OSError(errno): None for a delay only
    seconds: float = 0.0
    #: matching calls seen so far, and how many of them the fault hit
    calls: int = 0
    hits: int = 0
    what: str = field(default="", repr=False)

    def _hit(self, fd: int, op: str) -> bool:
        if fd not in self.fds or op not in self.ops:
            return False
        self.calls += 1
        if self.calls < self.nth or (self.count and self.calls >= self.nth + self.count):
            return False
        self.hits += 1
        return True


def _check(fd: object, op: str) -> None:
    if not isinstance(fd, int):  # fsync(file object)
        fileno = getattr(fd, "fileno", None)
        fd = fileno() if callable(fileno) else -1
    delay, error = 0.0, None
    with _lock:
        for fault in _armed:
            if fault._hit(fd, op):
                delay += fault.seconds
                if fault.errno is not None and error is None:
                    error = fault
    if delay:
        time.sleep(delay)
    if error is not None:
        assert error.errno is not None
        raise OSError(error.errno, f"{os.strerror(error.errno)} (injected: {error.what})")


def _wrap(name: str, op: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(fd: Any, *args: Any, **kwargs: Any) -> Any:
        _check(fd, op)
        return original(fd, *args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = original.__doc__
    return wrapper


def _arm(fault: Fault) -> None:
    with _lock:
        if not _originals:
            for op, names in OPS.items():
                for name in names:
                    _originals[name] = getattr(os, name)
                    setattr(os, name, _wrap(name, op, _originals[name]))
        _armed.append(fault)


def _disarm(fault: Fault) -> None:
    with _lock:
        if fault in _armed:
            _armed.remove(fault)
        if not _armed and _originals:
            for name, original in _originals.items():
                setattr(os, name, original)
            _originals.clear()


def fds_open_on(path: str | os.PathLike[str]) -> frozenset[int]:
    """This process's descriptors open on the file ``path`` (same device and inode)."""
    want = os.stat(path)
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(int(name))
        except OSError:
            continue  # the listing's own descriptor, already closed
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            found.add(int(name))
    return frozenset(found)


Target = int | str | os.PathLike[str]


class FaultInjector:
    """The faults one test arms; :meth:`clear` (DeviceHarness.close) disarms them all."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def _targets(self, target: Target) -> tuple[frozenset[int], str]:
        if isinstance(target, int):
            return frozenset((target,)), f"fd {target}"
        fds = fds_open_on(target)
        if not fds:
            raise ValueError(f"{target}: no descriptor of this process is open on it")
        return fds, str(Path(target))

    def _add(self, target: Target, ops: Iterable[str], nth: int, count: int,
             errno: int | None, seconds: float) -> Fault:
        kinds = frozenset(ops)
        if not kinds or kinds - ALL_OPS:
            raise ValueError(f"ops {sorted(kinds)}: use some of {sorted(ALL_OPS)}")
        if nth < 1 or count < 0 or seconds < 0:
            raise ValueError(f"nth={nth}, count={count}, seconds={seconds}: nth is 1 or "
                             "more, count and seconds 0 or more")
        fds, name = self._targets(target)
        fault = Fault(fds, kinds, nth, count, errno, seconds, what=f"{'/'.join(sorted(kinds))} "
                      f"on {name}")
        self.faults.append(fault)
        _arm(fault)
        return fault

    def io_error(self, target: Target, *, nth: int = 1, count: int = 1,
                 ops: Iterable[str] = ALL_OPS, errno: int = errnos.EIO) -> Fault:
        """From the ``nth`` matching call on ``target`` (a path: every descriptor open on
        that file now; or an fd), ``count`` calls (0: all) fail with OSError(errno)."""
        return self._add(target, ops, nth, count, errno, 0.0)

    def delay(self, target: Target, seconds: float, *, nth: int = 1, count: int = 0,
              ops: Iterable[str] = ALL_OPS) -> Fault:
        """Matching calls on ``target`` sleep ``seconds`` before they run (a slow
        backend); every one by default (``count`` 0)."""
        return self._add(target, ops, nth, count, None, seconds)

    @staticmethod
    def detach_tap(fd: int) -> None:
        """The tap behind ``fd`` disappears: ``fd`` now refers to a tun descriptor with no
        interface (EBADFD for reads, writes and TUNGETIFF; poll reports an error), as
        after ``ip link del``. The device's old tap file is closed by the replacement."""
        dead = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.dup2(dead, fd, inheritable=False)
        finally:
            os.close(dead)

    def clear(self) -> None:
        """Disarm every fault this injector armed."""
        for fault in self.faults:
            _disarm(fault)
        self.faults.clear()
