"""Pausing a VM: every vCPU out of KVM_RUN and waiting, resumed where it stopped.

:class:`PauseGate` is shared by the vCPU runners of one VM. :meth:`PauseGate.pause` sets
``requested`` and kicks every runner (minivmm.vcpu: the kick makes KVM_RUN return
EINTR); a runner that sees ``requested`` after such a return parks in
:meth:`PauseGate.park` instead of re-entering the guest, and pause() returns once every
running vCPU has parked. :meth:`PauseGate.resume` lets them go. A stop request (the VM
ending) wakes parked runners too, so a paused VM can always be stopped.

The check costs nothing on the hot path: runners look at ``requested`` only when
KVM_RUN was interrupted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from .errors import MinivmmError
from .stop import StopController


class PauseError(MinivmmError):
    """The VM could not be paused (it ended, or a vCPU did not stop in time)."""


class PauseGate:
    """Where the vCPU threads of one VM wait while it is paused."""

    def __init__(self, stop: StopController) -> None:
        self._cond = threading.Condition()
        self._stop = stop
        self._parked = 0
        #: a pause was asked for: read by a runner after KVM_RUN returned EINTR
        self.requested = False
        stop.add_kick(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def park(self) -> None:
        """Called by a runner's thread: wait here until resumed or stopped."""
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self.requested and not self._stop.stopping:
                self._cond.wait()
            self._parked -= 1
            self._cond.notify_all()

    def pause(self, kicks: Sequence[Callable[[], None]], running: Callable[[], int],
              timeout: float) -> None:
        """Kick every vCPU and wait until ``running()`` of them are parked."""
        with self._cond:
            self.requested = True
        for kick in kicks:
            kick()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._parked < running():
                if self._stop.stopping:
                    self.requested = False
                    raise PauseError("the VM has ended: nothing to pause")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.requested = False
                    self._cond.notify_all()
                    raise PauseError(f"the vCPUs did not stop within {timeout:.0f} s")
                self._cond.wait(min(left, 0.05))

    def resume(self) -> None:
        with self._cond:
            self.requested = False
            self._cond.notify_all()
