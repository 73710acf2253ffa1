"""The releaser: where a closed VM's KVM file descriptor is closed, off the caller's thread.

Closing the last descriptor of a KVM VM destroys it, and the kernel's destruction waits
for RCU grace periods: on the development host that close took 11.6 ms of wall time and
0.3 ms of CPU time (``bench/vmrate.py``; the other descriptors of a VM close in
microseconds). A process that builds and closes VMs in a loop (a test suite with a VM per
test) would spend most of each tear-down asleep in that close. So :meth:`Vm.close
<minivmm.kvm.api.Vm.close>` hands the descriptor to one releaser thread per process and
returns; guest RAM, which must stay mapped until KVM is done with it, is handed over
behind it (:func:`defer`, first in, first out), so it is unmapped after the VM is gone.

Ownership moves with the hand-over: what is handed over is released by the releaser, on
every path (an exception from one release is logged as an internal error and the rest go
on). At most :data:`MAX_PENDING` releases wait at a time: a caller handing over more
waits for the oldest, so a loop of VMs cannot pile up descriptors and RAM. At interpreter
exit the releaser is a daemon thread: whatever it had not released yet is released by the
process's exit, as a process that exits with VMs open is; where no thread can start any
more (interpreter shutdown) the caller releases in place. :func:`wait` blocks until
everything handed over so far is released (tests that count descriptors use it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_PENDING", "defer", "wait"]

#: releases that may wait at a time; a caller handing over one more waits for the oldest
MAX_PENDING: Final = 8

log = logging.getLogger(__name__)


class _Releaser:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.items: deque[Callable[[], None]] = deque()
        self.busy = False
        self.thread: threading.Thread | None = None

    def defer(self, release: Callable[[], None]) -> None:
        if threading.current_thread() is self.thread:  # a release handing over another
            release()  # (it would wait for itself when MAX_PENDING wait): run it now
            return
        try:
            with self.cond:
                while len(self.items) + self.busy >= MAX_PENDING:
                    self.cond.wait()
                if self.thread is None:
                    thread = threading.Thread(target=self._run, name="minivmm-release",
                                              daemon=True)
                    try:
                        thread.start()
                    except RuntimeError:
                        pass  # no new threads now (interpreter shutdown): released below
                    else:
                        self.thread = thread
                if self.thread is not None:
                    self.items.append(release)
                    self.cond.notify_all()
                    return
        except BaseException:  # interrupted while waiting (Ctrl-C): released all the same
            release()
            raise
        release()  # no releaser thread could start: released here, outside the lock

    def wait(self) -> None:
        with self.cond:
            while self.items or self.busy:
                self.cond.wait()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                release = self.items.popleft()
                self.busy = True
            try:
                release()
            except Exception:  # minivmm's own bug: say so, and release the rest
                log.error("internal error while releasing %r", release, exc_info=True)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()


_releaser = _Releaser()


def _after_fork() -> None:
    # The child has no releaser thread; what the parent had handed over is the parent's.
    global _releaser
    _releaser = _Releaser()


os.register_at_fork(after_in_child=_after_fork)


def defer(release: Callable[[], None]) -> None:
    """Run ``release`` on the releaser thread, after everything handed over before it.
    Blocks while :data:`MAX_PENDING` releases wait."""
    _releaser.defer(release)


def wait() -> None:
    """Block until everything handed over so far has been released."""
    _releaser.wait()
