"""``minivmm.Guest``: boot a Linux guest once, run many commands in it through the agent.

::

    with minivmm.Guest(minivmm.VmConfig(kernel="bzImage", initrd="initramfs.cpio")) as g:
        r = g.run(["uname", "-r"], timeout=10)   # returncode, stdout, stderr (bytes)
        g.console_log()                          # everything the guest printed so far

The guest is prepared as for ``minivmm exec`` (:func:`minivmm.exec.prepare`): the agent
is appended to its initramfs as /init, a vsock device is added if the config has none,
and its console goes to a file (console_log()) unless the config names a ``file:``.

Boot once, clone many times (minivmm.snapshot)::

    base = g.snapshot()                    # a directory; g runs on
    with minivmm.Guest.restore(base) as c: # or g.clone(): snapshot + restore
        c.run(["make", "test"])            # c's RAM is copy-on-write of the snapshot's

A restored guest gets its own console file and vsock socket. Its vsock connections were
reset by the restore (the agent takes a new one per command, so nothing is lost).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import VmConfig
from .errors import GuestError

if TYPE_CHECKING:
    from .agent import Exec, ReadyListener
    from .collect import Collected
    from .crashwatch import Finding

AGENT_CONNECT_TIMEOUT = 30.0
NEWLINE = "\n"


class GuestRunError(GuestError):
    """The guest never ran the agent, or died, or its kernel crashed, or the agent
    failed. ``crash`` is the crash detector's first finding as a line (the console line,
    or what minivmm saw: "KVM emulation failure", a triple fault) and ``finding`` the
    finding itself (minivmm.crashwatch.Finding), if there is one."""

    def __init__(self, message: str, crash: str | None = None,
                 finding: Finding | None = None) -> None:
        super().__init__(message + (f" ({crash})" if crash else ""))
        self.crash = crash
        self.finding = finding


@dataclass(frozen=True)
class CompletedProcess:
    """Like :class:`subprocess.CompletedProcess`; ``returncode`` is -N when signal N
    killed the command (as subprocess has it)."""

    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    def check_returncode(self) -> None:
        if self.returncode:
            raise subprocess.CalledProcessError(self.returncode, self.args, self.stdout,
                                                self.stderr)


class Guest:
    """A booted guest (the constructor returns once its agent listens)."""

    def __init__(self, config: VmConfig, *, agent: str | os.PathLike[str] | None = None,
                 boot_timeout: float = 300.0,
                 modules: str | os.PathLike[str] | None = None,
                 _restore: Path | None = None) -> None:
        """``modules``: the kernel's module tree when its vsock driver is a module and
        /lib/modules/<its version> is not that tree (README "CI boot tests")."""
        from .agent import ReadyListener
        from .exec import find_agent, prepare
        from .vm import Vm

        self._tmp = tempfile.TemporaryDirectory(prefix="minivmm-guest-")
        self.vm: Vm | None = None
        if _restore is not None:
            try:
                self._restore(_restore)
            except BaseException:
                self.close()
                raise
            return
        try:
            keep = config.console.startswith("file:")
            cfg, log = prepare(config, Path(self._tmp.name), find_agent(
                None if agent is None else Path(agent)), keep_console=keep,
                modules=None if modules is None else Path(modules))
            self._console = log or Path(cfg.console.removeprefix("file:"))
            assert cfg.vsock is not None
            self._uds = cfg.vsock.uds_path
            listener = ReadyListener(self._uds)
            try:
                self.vm = Vm(cfg)
                self.vm.start()
                self._boot_wait(listener, boot_timeout)
            finally:
                listener.close()
        except BaseException:
            self.close()
            raise

    def _restore(self, path: Path) -> None:
        from .config import VsockConfig
        from .snapshot import load
        from .vm import Vm

        snap = load(path)
        vsock = snap.config.vsock
        if vsock is None:
            raise GuestRunError(f"{path}: the snapshot's VM has no vsock device: it was "
                                "not made by minivmm.Guest")
        tmp = Path(self._tmp.name)
        self._console = tmp / "console.log"
        self._uds = tmp / "vsock"
        snap = snap.with_overrides(console=f"file:{self._console}",
                                   vsock=VsockConfig(vsock.guest_cid, self._uds))
        self.vm = Vm(snap.config, _snapshot=snap)
        self.vm.start()

    @classmethod
    def restore(cls, path: str | os.PathLike[str]) -> Guest:
        """A guest restored from a snapshot that :meth:`snapshot` made: running, with its
        own console file and vsock socket, its RAM copy-on-write of the snapshot's (any
        number may be restored from one snapshot, in parallel). Commands may be run at
        once: the vsock device holds connections until the guest has handled the
        restore's transport reset (README "Devices in a snapshot")."""
        return cls(VmConfig(kernel=os.devnull), _restore=Path(path))

    def snapshot(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save the running guest to the directory ``path`` (default: one in this
        guest's temporary directory, removed with it) and let it run on; the path."""
        if self.vm is None or not self._alive():
            raise self._error("the guest is not running")
        target = Path(self._tmp.name) / "snapshot" if path is None else Path(path)
        self.vm.snapshot(target)
        return target

    def clone(self) -> Guest:
        """A new guest restored from a snapshot of this one taken now."""
        return Guest.restore(self.snapshot())

    @property
    def agent_socket(self) -> Path:
        """The vsock device's Unix socket: where minivmm.agent's own clients connect
        (``minivmm.agent.connect(g.agent_socket)``)."""
        return self._uds

    def _alive(self) -> bool:
        return self.vm is not None and self.vm.stopper.result is None

    def _boot_wait(self, listener: ReadyListener, boot_timeout: float) -> None:
        """Return once the agent listens; else raise what happened: the guest ended, or
        its kernel crashed (a fatal crash line ends the wait: the kernel may hang on),
        or ``boot_timeout`` seconds passed."""
        from .exec import CRASH_GRACE

        assert self.vm is not None
        watch = self.vm.crash_watch
        start = time.monotonic()

        def booting() -> bool:
            return self._alive() and watch.fatal is None

        if listener.wait(start + boot_timeout, booting):
            return
        if booting():
            raise self._error(f"the agent did not start in {boot_timeout:g} s")
        after = f"{time.monotonic() - start:.0f} s into its boot, before the agent started"
        crashed = watch.fatal is not None and watch.fatal.source == "console"
        # a crashed Linux with panic=-1 ends the VM itself: wait a little to say how
        result = self.vm.stopper.wait(CRASH_GRACE if crashed else 2)
        how = "" if result is None else (
            f"{result.reason}: {result.detail.partition(NEWLINE)[0]}")
        if crashed:
            what = f"the guest kernel crashed {after}" + (f"; then the VM ended ({how})"
                                                         if how else "")
        else:
            what = f"the guest ended {after}" + (f" ({how})" if how else "")
        found = watch.fatal or self.finding()  # what ended it, else the first warning
        raise GuestRunError(what, None if found is None else found.line, found)

    def _error(self, what: str) -> GuestRunError:
        result = None if self.vm is None else self.vm.stopper.wait(2)
        if result is not None:
            what = f"{what}; the guest ended ({result.reason}: {result.detail})"
        found = self.finding()
        return GuestRunError(what, None if found is None else found.line, found)

    def run(self, argv: Sequence[str], *, timeout: float | None = None, input: bytes = b"",
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            check: bool = False) -> CompletedProcess:
        """Run ``argv`` as root and wait for it. ``timeout`` (seconds from its start):
        :class:`subprocess.TimeoutExpired` after the command's process group is killed.
        A command that cannot be executed raises OSError (FileNotFoundError for ENOENT);
        a guest that dies raises :class:`GuestRunError`."""
        from .agent import (
            AgentError,
            Exited,
            Failed,
            Output,
            Signaled,
            Started,
        )

        args = list(argv)
        out: dict[int, list[bytes]] = {1: [], 2: []}
        ex = self._connect()
        assert self.vm is not None
        watch = self.vm.crash_watch
        seen = len(watch.findings)  # what came before this command is not its crash
        try:
            ex.start(args, env or {}, cwd)
            deadline: float | None = None
            while True:
                event = ex.next_event(0.25)
                if not self._alive():
                    raise self._error(f"{args[0]}: the guest died under the command")
                if len(watch.findings) > seen:
                    new = next((f for f in watch.findings[seen:] if f.fatal), None)
                    seen = len(watch.findings)
                    if new is not None:  # the kernel crashed: don't wait for a hang
                        with contextlib.suppress(OSError):
                            ex.kill(9)
                        raise GuestRunError(f"{args[0]}: the guest kernel crashed under "
                                            "the command", new.line, new)
                if event is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        ex.kill(9)
                        raise subprocess.TimeoutExpired(args, timeout or 0.0,
                                                        b"".join(out[1]), b"".join(out[2]))
                elif isinstance(event, Output):
                    out[event.fd].append(event.data)
                elif isinstance(event, Started):
                    if timeout is not None:
                        deadline = time.monotonic() + timeout
                    threading.Thread(target=_feed, args=(ex, input), daemon=True).start()
                elif isinstance(event, Failed):
                    failed = event
                    break
                elif isinstance(event, Exited | Signaled):
                    code = event.code if isinstance(event, Exited) else -event.signal
                    done = CompletedProcess(args, code, b"".join(out[1]), b"".join(out[2]))
                    if check:
                        done.check_returncode()
                    return done
                else:
                    raise AgentError(f"unexpected answer to a command: {event}")
        except (AgentError, OSError) as e:
            if not self._alive():
                raise self._error(f"{args[0]}: the guest died under the command") from None
            raise GuestRunError(f"{args[0]}: the agent failed: {e}") from None
        finally:
            ex.close()
        raise OSError(failed.errno, failed.message)  # FileNotFoundError for ENOENT

    def put(self, src: str | os.PathLike[str] | bytes, dest: str, *,
            mode: int | None = None) -> None:
        """Copy the host file ``src`` (or these bytes) to the guest file ``dest``; ``mode``
        defaults to the host file's permission bits (0o644 for bytes)."""
        if isinstance(src, bytes):
            data, perm = src, 0o644
        else:
            data, perm = Path(src).read_bytes(), Path(src).stat().st_mode & 0o7777
        self._file_op(lambda ex: ex.put(dest, data, perm if mode is None else mode), dest)

    def get(self, path: str) -> bytes:
        """The content of the guest file ``path`` (a directory: :meth:`collect`)."""
        out: list[bytes] = []
        self._file_op(lambda ex: out.append(ex.get(path)), path)
        return out[0]

    def collect(self, path: str, host_path: str | os.PathLike[str], *,
                limit: int | None = None) -> Collected:
        """Copy the guest file or directory ``path`` to exactly ``host_path`` (a directory
        is created, or merged into the one there). Nothing outside ``host_path`` is
        written, whatever the guest sends (minivmm.collect); ``limit`` caps the bytes.
        Returns what was written and the notes on what was skipped. OSError when the
        guest path cannot be read or the host path written;
        :class:`minivmm.collect.UnsafeTree` when the guest sends what no honest agent
        sends."""
        from .collect import collect

        out: list[Collected] = []
        self._file_op(lambda ex: out.append(collect(ex, path, host_path, limit=limit,
                                                    alive=self._alive)), path)
        return out[0]

    def _connect(self) -> Exec:
        """A fresh connection to the agent (one per request), or GuestRunError."""
        from .agent import AgentError, Exec, wait_for_agent

        if not self._alive():
            raise self._error("the guest is not running")
        try:
            return Exec(wait_for_agent(self._uds, time.monotonic() + AGENT_CONNECT_TIMEOUT,
                                       self._alive))
        except AgentError as e:
            raise self._error(str(e)) from None

    def _file_op(self, op: Callable[[Exec], None], path: str) -> None:
        from .agent import AgentError
        from .collect import TreeUnsupported, UnsafeTree

        ex = self._connect()
        try:
            op(ex)
        except (UnsafeTree, TreeUnsupported):
            raise  # the agent answered: what it said is the error
        except AgentError as e:
            if not self._alive():
                raise self._error(f"{path}: the guest died") from None
            raise GuestRunError(f"{path}: the agent failed: {e}") from None
        finally:
            ex.close()

    def console_log(self) -> str:
        """Everything the guest printed on its console so far."""
        try:
            return self._console.read_bytes().decode(errors="replace").replace("\r", "")
        except (OSError, AttributeError):
            return ""

    def crash(self) -> str | None:
        """The crash detector's first finding so far, as a line: the console line that
        says the guest kernel crashed or warned, or what minivmm saw (an emulation
        failure, a triple fault); None if nothing was seen. Watched live, as the guest
        prints."""
        found = self.finding()
        return None if found is None else found.line

    def finding(self) -> Finding | None:
        """The crash detector's first finding so far (kind, line, fatal, source)."""
        return None if self.vm is None else self.vm.crash

    def close(self) -> None:
        """Stop the guest and remove its files (idempotent)."""
        if self.vm is not None:
            self.vm.close()
        self._tmp.cleanup()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _feed(ex: object, data: bytes) -> None:
    from .agent import Exec

    assert isinstance(ex, Exec)
    try:
        if data:
            ex.send_stdin(data)
        ex.close_stdin()
    except OSError:
        pass
