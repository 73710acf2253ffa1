"""How a VM ends: the first request to stop wins, every vCPU is kicked out of KVM_RUN.

Anything may ask a VM to end, from any thread: the guest (a power-off, a reboot, the
debug-exit port), the user (a signal, Ctrl-A x, :meth:`minivmm.Vm.stop`), or a failure.
:class:`StopController` keeps the first :class:`RunResult`, kicks every registered vCPU
runner so each leaves KVM_RUN at once, and wakes whoever waits for the result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RunResult:
    """How the guest ended. ``status`` is minivmm's exit status.

    ``reason`` is one of "poweroff", "reboot", "debug-exit", "signal", "console" (Ctrl-A x),
    "stopped" (:meth:`minivmm.Vm.stop`), "guest-error" (the guest failed, e.g. an
    instruction KVM could not emulate), "host-error" (KVM failed) or "internal-error" (a
    bug in minivmm). ``detail`` says more, for a person."""

    status: int
    reason: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.reason in ("guest-error", "host-error", "internal-error")


class StopController:
    """The first result wins; every kick function registered is called on a stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._result: RunResult | None = None
        self._kicks: list[Callable[[], None]] = []
        #: True once a stop was requested: a plain attribute, read once per vCPU exit
        self.stopping = False

    @property
    def result(self) -> RunResult | None:
        return self._result

    def add_kick(self, kick: Callable[[], None]) -> None:
        """``kick()`` is called (from the stopping thread) when the VM must stop."""
        with self._lock:
            self._kicks.append(kick)
            stopped = self._result is not None
        if stopped:
            kick()

    def request(self, status: int, reason: str, detail: str = "") -> bool:
        """End the VM with this result unless another came first; True if this one won."""
        with self._lock:
            if self._result is not None:
                return False
            self._result = RunResult(status, reason, detail)
            self.stopping = True
            kicks = list(self._kicks)
        for kick in kicks:
            kick()
        self._done.set()
        return True

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """The result once a stop was requested, or None after ``timeout`` seconds."""
        self._done.wait(timeout)
        return self._result
