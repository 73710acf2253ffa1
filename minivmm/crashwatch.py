"""The crash detector: watches the guest's console as it is written, and how the VM ended.

:class:`CrashWatch` wraps a console sink (minivmm.console): every write is handed on
unchanged, and the beginning of each console line (its first :data:`HEAD` bytes: the
kernel names a crash at the start of its message) is searched for what Linux prints when
it crashes or warns (:data:`CONSOLE_FINDINGS`). A write costs one ``find`` of the newline
per line it holds and one regular-expression search per complete line; bytes past a
line's head are not looked at. Escape sequences and carriage returns are taken out of a
line before it is searched.

The VMM adds what the console cannot say (:meth:`CrashWatch.vm_stopped`): KVM failed to
emulate an instruction or to enter the guest, KVM or minivmm failed, or the guest triple
faulted without a "Restarting system" or a crash line before it (Linux with ``reboot=t``
reboots through a triple fault on purpose, after saying so).

Findings are kept in order (the first one is the one to name) and handed to the
callbacks registered with :meth:`CrashWatch.on_finding`, on the thread that wrote the
console line or stopped the VM: a callback must be quick and must not block.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["CONSOLE_FINDINGS", "CrashWatch", "Finding", "clean_line", "scan_text"]

#: bytes of each console line that are searched
HEAD = 256
#: findings kept (the first ones, and past them the first fatal one); others are counted
MAX_FINDINGS = 64

#: what Linux prints, in the console line's head, and whether the kernel is done for
#: (a WARNING is reported, the kernel goes on; so do the BUG: reports that leave the task
#: running, listed before "BUG:" so that they match first)
CONSOLE_FINDINGS: dict[str, bool] = {
    "Kernel panic": True,
    "BUG: sleeping function called from invalid context": False,
    "BUG: scheduling while atomic": False,
    "BUG: soft lockup": False,
    "BUG:": True,
    "Oops": True,
    "general protection fault": True,
    "WARNING: CPU:": False,
}
_PATTERN = re.compile(b"|".join(re.escape(k.encode()) for k in CONSOLE_FINDINGS)
                      + b"|(?P<restart>reboot: Restarting system)")
_NOISE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])|\r")

#: RunResult reasons (minivmm.stop) that are a VMM-reported crash, by the detail's start
_VMM_KINDS = (("KVM emulation failure", "emulation failure"),
              ("KVM internal error", "KVM internal error"),
              ("KVM could not enter", "KVM entry failure"))


@dataclass(frozen=True)
class Finding:
    """A crash or warning: ``kind`` is what was recognised ("Kernel panic", "Oops",
    "WARNING: CPU:", ..., "triple fault", "emulation failure", "KVM entry failure",
    "KVM internal error", "host error", "VMM internal error"), ``line`` the console line
    or the VMM's first line about it, ``fatal`` False only for a warning, ``source``
    "console" or "vmm"."""

    kind: str
    line: str
    fatal: bool = True
    source: str = "console"

    def __str__(self) -> str:
        return self.line


def clean_line(raw: bytes) -> str:
    """A console line as a person reads it: escape sequences and CRs out, decoded."""
    return _NOISE.sub(b"", raw).decode(errors="replace").strip()


def _match(head: bytes) -> Finding | bool | None:
    """The finding in one line's head, True for Linux's "Restarting system", or None."""
    if b"\x1b" in head or b"\r" in head:
        head = _NOISE.sub(b"", head)
    m = _PATTERN.search(head)
    if m is None:
        return None
    if m.group("restart"):
        return True
    kind = m.group().decode()
    return Finding(kind, clean_line(head), CONSOLE_FINDINGS[kind])


def scan_text(text: str) -> Finding | None:
    """The first finding in a whole console log (a file read afterwards)."""
    for line in text.encode(errors="replace").split(b"\n"):
        found = _match(line[:HEAD])
        if isinstance(found, Finding):
            return found
    return None


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def writev(self, views: list[memoryview]) -> None: ...

    def close(self) -> None: ...


class CrashWatch:
    """A console sink that hands every byte to ``inner`` and watches the lines."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.findings: list[Finding] = []
        self.restart_announced = False
        self.dropped = 0
        self._head = bytearray()  # the current line's first HEAD bytes
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Finding], None]] = []

    @property
    def first(self) -> Finding | None:
        """The first finding (the one to name), or None."""
        return self.findings[0] if self.findings else None

    @property
    def fatal(self) -> Finding | None:
        """The first finding that means the guest kernel is done for, or None."""
        return next((f for f in self.findings if f.fatal), None)

    def on_finding(self, callback: Callable[[Finding], None]) -> None:
        """Call ``callback(finding)`` for every finding from now on (not the past ones)."""
        with self._lock:
            self._callbacks.append(callback)

    # -- the sink ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.inner.write(data)
        self._scan(data)

    def writev(self, views: list[memoryview]) -> None:
        self.inner.writev(views)
        for v in views:
            self._scan(v)

    def close(self) -> None:
        self.inner.close()

    def _scan(self, data: bytes | memoryview) -> None:
        if isinstance(data, memoryview):
            data = data.tobytes()  # console output: small, and find() needs bytes
        with self._lock:  # the UART and virtio-console may write from two threads
            new = len(self.findings)
            head = self._head
            start, end = 0, len(data)
            while start < end:
                nl = data.find(b"\n", start)
                room = HEAD - len(head)
                if room > 0:
                    head += data[start:min(end if nl < 0 else nl, start + room)]
                    if len(head) == HEAD:
                        self._line(bytes(head))  # a long line: searched once, when full
                if nl < 0:
                    break
                if len(head) < HEAD:
                    self._line(bytes(head))
                head.clear()
                start = nl + 1
            found, callbacks = self.findings[new:], list(self._callbacks)
        self._call(found, callbacks)

    def _line(self, head: bytes) -> None:
        found = _match(head)
        if found is None:
            return
        if found is True:
            self.restart_announced = True
            return
        assert isinstance(found, Finding)
        if len(self.findings) < MAX_FINDINGS or (found.fatal and self.fatal is None):
            self.findings.append(found)  # past the cap still the first fatal one
        else:  # a guest that warns without end
            self.dropped += 1

    @staticmethod
    def _call(found: list[Finding], callbacks: list[Callable[[Finding], None]]) -> None:
        """Outside the lock: a callback may stop the VM, which comes back here."""
        for finding in found:
            for callback in callbacks:
                callback(finding)

    # -- the VMM's part ------------------------------------------------------------------

    def vm_stopped(self, reason: str, detail: str) -> Finding | None:
        """Record what the VM's end says (a RunResult's ``reason`` and ``detail``, see
        minivmm.stop): the finding it makes, or None."""
        first = detail.split("\n", 1)[0]
        with self._lock:
            new = len(self.findings)
            if 0 < len(self._head) < HEAD:  # a last line the guest never ended
                self._line(bytes(self._head))
            self._head.clear()
            finding = None
            if reason == "guest-error":
                kind = next((k for start, k in _VMM_KINDS if first.startswith(start)),
                            "guest error")
            elif reason == "host-error":
                kind = "host error"
            elif reason == "internal-error":
                kind = "VMM internal error"
            elif (reason == "reboot" and first.startswith("triple fault")
                  and not self.restart_announced and self.fatal is None):
                kind = "triple fault"
            else:
                kind = ""
            if kind:
                finding = Finding(kind, first, True, "vmm")
                self.findings.append(finding)  # always kept: the VM ends once
            found, callbacks = self.findings[new:], list(self._callbacks)
        self._call(found, callbacks)
        return finding
