"""``minivmm exec``: boot a guest, run one command in it through the guest agent.

The guest gets the agent (guest/agent/, built by ``make guest`` as
guest/out/minivmm-agent) as /init of a cpio archive appended to its initramfs, and a
vsock device whose Unix socket lives in a private temporary directory. The command's
stdout and stderr are copied to ours as the agent hands them on, our stdin to its stdin.

Exit status: the command's; 128+N when a signal N killed it; 124 when --timeout passed
(counted from the command's start); 125 when the guest never ran the command or died
under it, or its kernel crashed while it ran (the live crash detector,
minivmm.crashwatch: then why, the finding and the console's last lines go to stderr);
126/127 when the command could not be executed / was not found; 128+N when minivmm
itself was stopped by signal N; 2 for bad usage. ``--check-driver=strict``: 120 in place
of any of these but 2 when the guest's drivers broke a rule (as ``minivmm run``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .check import DriverChecker
    from .config import VmConfig
    from .crashwatch import Finding
    from .vm import Vm

from .exec_options import AGENT_ENV

AGENT_CONNECT_TIMEOUT = 30.0  # seconds from the agent's "listening" to its answer
CONSOLE_TAIL = 20
#: seconds a guest whose kernel crashed under the command gets to finish printing (and
#: to end the VM itself, as Linux with panic=-1 does) before minivmm stops it
CRASH_GRACE = 5.0


def find_agent(given: Path | None) -> Path:
    if given is None and os.environ.get(AGENT_ENV):
        given = Path(os.environ[AGENT_ENV])
    if given is None:
        given = Path(__file__).resolve().parents[1] / "guest" / "out" / "minivmm-agent"
        if not given.exists():
            raise UsageError(f"no guest agent at {given}: run `make guest` in the source "
                             f"tree, or give --agent PATH (or ${AGENT_ENV})", field="agent")
    if not given.is_file():
        raise UsageError(f"{given}: no such file (the guest agent)", field="agent")
    return given


def parse_add(text: str) -> tuple[Path, str]:
    """``HOSTPATH[:GUESTPATH]``; GUESTPATH defaults to /<name of HOSTPATH>."""
    host, _, guest = text.partition(":")
    if not host:
        raise UsageError(f"--add {text!r}: expected HOSTPATH[:GUESTPATH]")
    guest = guest or "/" + Path(host).name
    parts = [p for p in guest.split("/") if p]
    if not guest.startswith("/") or not parts or ".." in parts or "." in parts:
        raise UsageError(f"--add {text!r}: GUESTPATH must be an absolute path below /, "
                         "without . or ..")
    if not os.path.lexists(host):
        raise UsageError(f"--add {text!r}: {host}: no such file or directory")
    return Path(host), "/".join(parts)


def parse_collect(text: str) -> tuple[str, Path]:
    """``GUESTPATH:HOSTPATH``: a guest file or directory copied to exactly HOSTPATH
    afterwards (minivmm.collect)."""
    guest, _, host = text.rpartition(":")
    if not guest.startswith("/") or not host:
        raise UsageError(f"--collect {text!r}: expected /GUESTPATH:HOSTPATH")
    if not Path(host).absolute().parent.is_dir():
        raise UsageError(f"--collect {text!r}: {Path(host).parent}: no such directory")
    return guest, Path(host)


def _collect(uds: Path, collects: Sequence[tuple[str, Path]],
             alive: Callable[[], bool]) -> bool:
    """Copy each guest file or tree to its host path (nothing from the guest names a host
    path: only what is under the one the user gave is written, minivmm.collect). What
    was skipped, and failures, are said on stderr; False if one failed."""
    from .agent import AgentError, Exec, wait_for_agent
    from .collect import TreeUnsupported, collect

    def connect() -> Exec:
        return Exec(wait_for_agent(uds, time.monotonic() + 30, alive))

    ok = True
    for guest, host in collects:
        def say(what: object, guest: str = guest, host: Path = host) -> None:
            print(f"minivmm: --collect {guest}:{host}: {what}", file=sys.stderr)

        try:
            ex = connect()
            try:
                done = collect(ex, guest, host, alive=alive)
            except TreeUnsupported as old:  # an agent of protocol version 1: files only
                ex.close()
                ex = connect()
                try:
                    host.write_bytes(ex.get(guest))
                except OSError as e:
                    raise OSError(e.errno, f"{e.strerror} ({old})") from None
                continue
            finally:
                ex.close()
            for note in done.notes:
                say(note)
        except (AgentError, OSError) as e:
            say(e)
            ok = False
    return ok


def agent_archive(agent: Path, adds: Sequence[tuple[Path, str]] = (),
                  limit: int | None = None,
                  modules: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """The cpio archive appended to the initramfs: the agent as /init, what it needs when
    there is no other initramfs (a /dev/console for the kernel to open), the kernel
    ``modules`` it loads first (minivmm.kmod), and the ``adds`` (host path, guest path
    without the leading /). UsageError when the added files pass ``limit`` bytes."""
    from .cpio import Archive
    from .kmod import pack

    a = Archive()
    for d in ("dev", "proc", "sys", "tmp", "root"):
        a.directory(d, 0o1777 if d == "tmp" else 0o755)
    a.char_device("dev/console", 0o600, 5, 1)
    a.file("init", agent.read_bytes(), 0o755)
    pack(a, modules)
    made = {"dev", "proc", "sys", "tmp", "root"}
    start = a.size
    for host, guest in adds:
        parents = guest.split("/")[:-1]
        for i in range(len(parents)):  # the unpacker makes no missing parent itself
            d = "/".join(parents[:i + 1])
            if d not in made:
                a.directory(d, 0o755)
                made.add(d)
        try:
            a.add_host_path(host, guest)
        except (OSError, ValueError) as e:
            raise UsageError(f"--add {host}: {e}") from None
        if limit is not None and a.size - start > limit:
            raise UsageError(f"--add: more than {limit >> 20} MiB to add (the limit is "
                             "half the guest's memory, see --mem)")
    return a.to_bytes()


def crash_line(console: str) -> str | None:
    """The first console line that says the guest kernel crashed or warned, if any (the
    crash detector, minivmm.crashwatch, on a whole console log)."""
    from .crashwatch import scan_text

    found = scan_text(console)
    return None if found is None else found.line


def _parse_env(items: list[str]) -> list[str]:
    for item in items:
        name, eq, _ = item.partition("=")
        if not eq or not name or "\0" in item:
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
    return items


@dataclass
class _Outcome:
    status: int
    why: str = ""  # set: a failure to report (with the console's tail)
    crash: Finding | None = None  # what the crash detector saw first
    check: DriverChecker | None = None  # --check-driver's checker, and the devices it
    devices: int = 0  # watched


class _Output:
    """Our stdout or stderr, written as the command's output arrives."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.fd, view):]
            except BrokenPipeError:
                self.broken = True  # nobody reads: the command still runs to its end
            except InterruptedError:
                continue


def _pump_stdin(ex: Any) -> None:
    try:
        while data := os.read(0, 65536):
            ex.send_stdin(data)
    except OSError:
        pass
    try:
        ex.close_stdin()
    except OSError:
        pass


def prepare(cfg: VmConfig, tmp: Path, agent: Path, *, keep_console: bool = False,
            adds: Sequence[tuple[Path, str]] = (),
            modules: Path | None = None) -> tuple[VmConfig, Path | None]:
    """``cfg`` made ready for the agent, with its files in the directory ``tmp``: the
    initramfs with the agent's archive appended, a vsock device if it has none, ``quiet``
    on a default command line, and (unless ``keep_console``) the console in a file.
    ``adds`` go into the archive too, and the vsock modules of the kernel's module tree
    (``modules``, else /lib/modules/<its version>) when it needs them. Returns the new
    config and that console file (None when kept)."""
    from .config import VsockConfig
    from .cpio import append_to
    from .kmod import vsock_modules

    changes: dict[str, Any] = {}
    console_log = None
    if not keep_console:
        console_log = tmp / "console.log"
        changes["console"] = f"file:{console_log}"
    if cfg.vsock is None:
        changes["vsock"] = VsockConfig(guest_cid=3, uds_path=tmp / "vsock")
    if cfg.cmdline is None:  # the console is a file nobody watches: keep it short
        changes["cmdline"] = cfg.base_cmdline() + " quiet"
    initrd = tmp / "initrd"
    append_to(initrd, cfg.initrd, agent_archive(agent, adds, limit=cfg.mem // 2,
                                                modules=vsock_modules(cfg.kernel, modules)))
    changes["initrd"] = initrd
    return cfg.replace(**changes), console_log


@dataclass(frozen=True)
class Hooks:
    """What the command line gives ``exec`` (this module does not import minivmm.cli):
    the config of its options, a check that raises if a signal arrived, a setter for
    the function a signal calls (None: just remember the signal), and the end of a run
    under --check-driver (its summary and exit status, as ``minivmm run`` has them)."""

    config_from_args: Callable[[argparse.Namespace], VmConfig]
    check_signal: Callable[[], None]
    on_signal: Callable[[Callable[[int], None] | None], None]
    #: --check-driver's end of the run: (checker, devices watched, status) -> status
    check_driver_end: Callable[[DriverChecker | None, int, int], int]


def cmd_exec(args: argparse.Namespace, hooks: Hooks) -> int:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise UsageError("no command: minivmm exec [options] -- CMD [ARGS...]")
    env = _parse_env(args.env)
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("--timeout: give a number of seconds > 0")
    adds = [parse_add(a) for a in args.add]
    collects = [parse_collect(c) for c in args.collect]
    agent = find_agent(None if args.agent is None else Path(args.agent))
    cfg = hooks.config_from_args(args)
    hooks.check_signal()
    with tempfile.TemporaryDirectory(prefix="minivmm-exec-") as tmp:
        console_log: Path | None = None
        if args.console is not None and cfg.console.startswith("file:"):
            console_log = Path(cfg.console.removeprefix("file:"))
        cfg, own_log = prepare(cfg, Path(tmp), agent, keep_console=args.console is not None,
                               adds=adds,
                               modules=None if args.modules is None else Path(args.modules))
        console_log = own_log or console_log
        assert cfg.vsock is not None
        outcome = _run(cfg, cfg.vsock.uds_path, argv, env, args, hooks, collects)
        if outcome.why:
            _report(outcome, console_log)
        return hooks.check_driver_end(outcome.check, outcome.devices, outcome.status)


def _run(cfg: VmConfig, uds: Path, argv: list[str], env: list[str],
         args: argparse.Namespace, hooks: Hooks,
         collects: Sequence[tuple[str, Path]] = ()) -> _Outcome:
    """Boot, run the command, stop the VM; the VM is closed (its console flushed) when
    this returns."""
    import signal

    from .vm import Vm

    with Vm(cfg) as vm:
        def stop_on(signum: int) -> None:
            vm.request_stop(128 + signum, "signal", f"stopped by {signal.Signals(signum).name}")

        hooks.on_signal(stop_on)
        try:
            hooks.check_signal()
            vm.start()
            outcome = _drive(vm, uds, argv, env, args, collects)
        finally:
            hooks.on_signal(None)
            vm.stop()
        outcome.crash = vm.crash_watch.fatal or vm.crash
        outcome.check, outcome.devices = vm.driver_check, len(vm.virtio.transports)
        return outcome


def _drive(vm: Vm, uds: Path, argv: list[str], env: list[str], args: argparse.Namespace,
           collects: Sequence[tuple[str, Path]]) -> _Outcome:
    """Wait for the agent, run the command, copy its output; the outcome."""
    from .agent import (
        AgentError,
        Exec,
        Exited,
        Failed,
        Output,
        ReadyListener,
        Signaled,
        Started,
        failed_status,
        wait_for_agent,
    )

    outputs = {1: _Output(1), 2: _Output(2)}

    watch = vm.crash_watch

    def alive() -> bool:  # a fatal crash line counts as the end: the guest may hang on
        return vm.stopper.result is None and watch.fatal is None

    def ended(while_: str) -> _Outcome:
        crash = watch.fatal
        result = vm.stopper.wait(CRASH_GRACE if crash is not None else 5)
        if result is not None and result.reason == "signal":
            print(f"minivmm: {result.detail}", file=sys.stderr)
            return _Outcome(result.status)
        if crash is not None and crash.source == "console":
            then = "" if result is None else (
                f"; then the VM ended ({result.reason}: {result.detail.splitlines()[0]})")
            return _Outcome(125, f"the guest kernel crashed {while_}{then}")
        if result is None:
            return _Outcome(125, f"the agent's connection ended {while_}")
        return _Outcome(125, f"the guest ended {while_} ({result.reason}: "
                             f"{result.detail})")

    listener = ReadyListener(uds)
    try:
        if not listener.wait(time.monotonic() + args.boot_timeout, alive):
            if not alive():
                return ended("before the command ran")
            return _Outcome(125, f"the guest never ran the command: the agent did "
                                 f"not start in {args.boot_timeout:g} s")
        sock = wait_for_agent(uds, time.monotonic() + AGENT_CONNECT_TIMEOUT, alive)
    except AgentError as e:
        if not alive():
            return ended("before the command ran")
        return _Outcome(125, f"the guest never ran the command: {e}")
    finally:
        listener.close()
    ex = Exec(sock)
    try:
        ex.start(argv, env, args.cwd)
        deadline: float | None = None
        while True:
            event = ex.next_event(0.25)
            if not alive():
                return ended("while the command ran" if ex.pid else
                             "before the command ran")
            if event is None:
                if deadline is not None and time.monotonic() >= deadline:
                    print(f"minivmm: {argv[0]}: timed out after {args.timeout:g} s",
                          file=sys.stderr)
                    return _Outcome(124)
                continue
            if isinstance(event, Output):
                outputs[event.fd].write(event.data)
            elif isinstance(event, Started):
                if args.timeout is not None:
                    deadline = time.monotonic() + args.timeout
                threading.Thread(target=_pump_stdin, args=(ex,), daemon=True,
                                 name="minivmm-stdin").start()
            elif isinstance(event, Exited | Signaled):
                status = (event.code if isinstance(event, Exited)
                          else 128 + event.signal)
                if not _collect(uds, collects, alive) and status == 0:
                    status = 1
                return _Outcome(status)
            elif isinstance(event, Failed):
                print(f"minivmm: cannot run {argv[0]!r} in the guest: "
                      f"{event.message}", file=sys.stderr)
                return _Outcome(failed_status(event))
    except (AgentError, OSError) as e:
        if not alive():
            return ended("while the command ran" if ex.pid else
                         "before the command ran")
        return _Outcome(125, f"the agent failed: {e}")
    finally:
        ex.close()


def _report(outcome: _Outcome, console_log: Path | None) -> None:
    def say(line: str) -> None:
        print(f"minivmm: {line}", file=sys.stderr)

    say(outcome.why)
    crash = outcome.crash
    if crash is not None and crash.source == "console":
        say(f"the guest kernel {'crashed' if crash.fatal else 'warned'}: {crash.line}")
    elif crash is not None:
        say(f"the guest crashed: {crash.kind} (seen by minivmm: {crash.line})")
    if console_log is None:
        return
    try:
        text = console_log.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError as e:
        say(f"(console log {console_log}: {e.strerror})")
        return
    lines = text.splitlines()[-CONSOLE_TAIL:]
    say(f"the console's last {len(lines)} lines:")
    for line in lines:
        print(f"  | {line}", file=sys.stderr)
