"""The ``minivmm`` command line: ``minivmm run`` and ``minivmm config``.

Exit status: 0 when the guest powered off or rebooted; v when the guest wrote v to the
debug-exit port; 1 for a guest, host or internal failure; 2 for bad usage; 128+N when
stopped by signal N (SIGINT, SIGTERM), from the first instruction of ``main`` on.

This module imports little at the top, so that ``minivmm --help`` and a usage error are
quick and a signal during start-up finds the handler already in place: no typing, pathlib
or logging, and nothing of minivmm but its errors until a command runs
(tests/test_startup.py keeps it so).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, NoReturn

    from .check import DriverChecker
    from .config import DeviceConfig, DriveConfig, NetConfig, VmConfig, VsockConfig
    from .vm import Vm

#: configuration field -> the option that sets it (for UsageError.field)
OPTION_NAMES = {
    "kernel": "--kernel", "initrd": "--initrd", "cmdline": "--cmdline", "mem": "--mem",
    "cpus": "--cpus", "console": "--console", "console_device": "--console-device",
    "drives": "--disk", "network_interfaces": "--net", "host_quirks": "--host-quirks",
    "config": "--config", "devices": "--device", "vsock": "--vsock", "acpi": "--acpi",
    "trace": "--trace", "check_driver": "--check-driver",
    "snapshot": "--restore",
}
#: ``--check-driver=strict`` found a violation (minivmm.check.CHECK_DRIVER_STATUS)
CHECK_DRIVER_STATUS = 120

# -- signals: one handler from start-up to the end -------------------------------------

_pending_signal: int | None = None
_on_signal: Callable[[int], None] | None = None


def _handler(signum: int, _frame: FrameType | None) -> None:
    global _pending_signal
    if _pending_signal is None:
        _pending_signal = signum
    if _on_signal is not None:
        _on_signal(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM are remembered (and, once a VM runs, stop it): never a
    KeyboardInterrupt traceback, whenever they arrive."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def _set_on_signal(f: Callable[[int], None] | None) -> None:
    global _on_signal
    _on_signal = f


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} before the guest started")
        self.status = 128 + signum


def _check_signal() -> None:
    if _pending_signal is not None:
        raise _Stopped(_pending_signal)


# -- options ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        from .errors import UsageError

        raise UsageError(f"{message} (see '{self.prog} --help')")


def _path(text: str) -> Path:
    from pathlib import Path

    return Path(text)


def _setup_logging(debug: bool) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="minivmm: %(levelname)s: %(message)s")


def _add_vm_options(r: argparse.ArgumentParser) -> None:
    # Defaults are None: a value given here overrides the --config file's.
    r.add_argument("--config", type=_path, metavar="FILE",
                   help="a Firecracker-style JSON configuration (options given here win)")
    r.add_argument("--kernel", type=_path,
                   help="bzImage, or ELF vmlinux (PVH entry used when the kernel has one)")
    r.add_argument("--initrd", type=_path, help="initramfs / initrd image")
    r.add_argument("--cmdline", help="kernel command line (default: console=ttyS0 reboot=t "
                                     "panic=-1 i8042.noaux i8042.nomux i8042.nopnp "
                                     "i8042.dumbkbd)")
    r.add_argument("--mem", help="guest memory, e.g. 256M or 1G (default 128M)")
    r.add_argument("--cpus", type=int, help="vCPUs (default 1)")
    r.add_argument("--console", help="where console output goes: stdio (default), none or "
                                     "file:PATH")
    r.add_argument("--console-device", choices=["serial", "virtio"],
                   help="the guest's console: the 8250 UART (ttyS0, default) or "
                        "virtio-console (hvc0)")
    r.add_argument("--disk", action="append", metavar="PATH[,ro][,cow][,serial=ID]",
                   help="a raw disk image as virtio-blk (repeatable; /dev/vda, vdb, ...)")
    r.add_argument("--net", action="append", metavar="tap=NAME[,mac=MAC]",
                   help="virtio-net on a Linux tap (repeatable; created if absent and "
                        "permitted, else make it with `ip tuntap add`)")
    r.add_argument("--rng", action="store_true", default=None,
                   help="a virtio-rng entropy device")
    r.add_argument("--vsock", metavar="cid=N,uds=PATH",
                   help="virtio-vsock; host programs connect through the Unix socket PATH "
                        "(Firecracker's protocol)")
    r.add_argument("--device", action="append", metavar="NAME[,key=value...]",
                   help="a virtio device by name: blk, net, rng, vsock, an installed "
                        "package's, or MODULE:CLASS (repeatable; options go to its "
                        "from_options, e.g. --device blk,path=disk.img,ro)")
    r.add_argument("--acpi", choices=["on", "off"],
                   help="on (default): ACPI tables describe the machine and the guest can "
                        "power off; off: no tables")
    r.add_argument("--trace", metavar="virtio[=FILE]",
                   help="one JSON line per virtio register access, status change, chain, "
                        "used element and interrupt, on stderr or in FILE (read it with "
                        "`minivmm trace show`)")
    r.add_argument("--check-driver", nargs="?", const="on", choices=["on", "strict", "off"],
                   help="report where the guest's virtio drivers break a virtio 1.2 rule; "
                        f"strict: and exit with status {CHECK_DRIVER_STATUS} if they did")
    r.add_argument("--host-quirks", choices=["auto", "off"],
                   help="auto (default): on a host whose KVM emulates guest kernel code, "
                        "add the command-line options a Linux guest needs there; off: never")


COMMANDS = ("run", "config", "exec", "trace")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``command`` of that one only (argparse
    builds each option's objects: building all four commands costs 3-10 ms that a
    `minivmm run` does not need; its parsing and its errors are the same)."""
    from . import __version__

    p = _Parser(prog="minivmm", description="A small, fast virtual machine monitor on KVM.")
    p.add_argument("--version", action="version", version=f"minivmm {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    if command in (None, "run"):
        _add_run_parser(sub)
    if command in (None, "config"):
        c = sub.add_parser("config", help="print the configuration a command line gives",
                           description="Print, as Firecracker-style JSON, the configuration "
                                       "that `minivmm run` with these options would use.")
        _add_vm_options(c)
        c.add_argument("--debug", action="store_true", help="tracebacks on errors")
    if command in (None, "exec"):
        from .exec_options import add_parser as add_exec_parser

        add_exec_parser(sub, _add_vm_options)
    if command in (None, "trace"):
        _add_trace_parser(sub)
    return p


def _add_run_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="boot a guest kernel",
                       description="Boot a guest kernel and run it until it ends.")
    _add_vm_options(r)
    r.add_argument("--stats", action="store_true", help="print counters at the end")
    r.add_argument("--timeline", action="store_true", help="print boot milestones at the end")
    r.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    r.add_argument("--snapshot-on-signal", type=_path, metavar="PATH",
                   help="on SIGUSR2, save a snapshot of the VM to the directory PATH and "
                        "go on running")
    r.add_argument("--restore", type=_path, metavar="PATH",
                   help="run the VM saved in the snapshot directory PATH (with it only "
                        "--console, --disk, --net, --vsock and --device may be given)")


def _add_trace_parser(sub: Any) -> None:
    t = sub.add_parser("trace", help="read a --trace file",
                       description="Read a trace that `minivmm run --trace virtio=FILE` wrote.")
    tsub = t.add_subparsers(dest="trace_command", parser_class=_Parser)
    show = tsub.add_parser("show", help="print a trace for people",
                           description="Print a virtio trace, one event per line, with time "
                                       "from the first event, optionally filtered.")
    show.add_argument("file", metavar="FILE", help="the trace (- for stdin)")
    show.add_argument("--device", action="append", metavar="NAME",
                      help="only this device (repeatable): its name (rng), or with its "
                           "window (rng@0xd0000000)")
    show.add_argument("--kind", nargs="+", action="extend", metavar="KIND",
                      help="only these kinds of event (read, write, status, chain, used, "
                           "interrupt, violation, ...)")


def parse_disk(text: str) -> DriveConfig:
    """``PATH[,ro][,cow][,serial=ID]``"""
    from .config import DriveConfig
    from .errors import UsageError

    path, *opts = text.split(",")
    if not path:
        raise UsageError(f"{text!r}: give an image path, e.g. disk.img,ro", field="drives")
    kw: dict[str, Any] = {}
    for opt in opts:
        if opt == "ro":
            kw["read_only"] = True
        elif opt == "cow":
            kw["cow"] = True
        elif opt.startswith("serial="):
            kw["serial"] = opt.removeprefix("serial=")
        else:
            raise UsageError(f"{text!r}: unknown option {opt!r} (known: ro, cow, serial=ID)",
                             field="drives")
    drive: DriveConfig = _item(DriveConfig, "drives", text, path=path, **kw)
    return drive


def parse_net(text: str) -> NetConfig:
    """``tap=NAME[,mac=MAC]``"""
    from .config import NetConfig
    from .errors import UsageError

    kw: dict[str, Any] = {}
    for opt in text.split(","):
        key, eq, value = opt.partition("=")
        if key in ("tap", "mac") and eq and value:
            kw[key] = value
        else:
            raise UsageError(f"{text!r}: unknown option {opt!r} (known: tap=NAME, "
                             "mac=52:54:00:xx:xx:xx)", field="network_interfaces")
    if "tap" not in kw:
        raise UsageError(f"{text!r}: name a tap, e.g. tap=tap0", field="network_interfaces")
    net: NetConfig = _item(NetConfig, "network_interfaces", text, **kw)
    return net


def parse_vsock(text: str) -> VsockConfig:
    """``cid=N,uds=PATH``"""
    from .config import VsockConfig
    from .errors import UsageError

    kw: dict[str, Any] = {}
    for opt in text.split(","):
        key, eq, value = opt.partition("=")
        if key == "cid" and eq and value.isdigit():
            kw["guest_cid"] = int(value)
        elif key == "uds" and eq and value:
            kw["uds_path"] = value
        else:
            raise UsageError(f"{text!r}: bad option {opt!r} (known: cid=N with N >= 3, "
                             "uds=PATH)", field="vsock")
    if len(kw) != 2:
        raise UsageError(f"{text!r}: give both, e.g. cid=3,uds=/tmp/v.sock", field="vsock")
    vsock: VsockConfig = _item(VsockConfig, "vsock", text, **kw)
    return vsock


def _item(kind: Callable[..., Any], field: str, text: str, **kw: Any) -> Any:
    from .errors import UsageError

    try:
        return kind(**kw)
    except UsageError as e:
        raise UsageError(f"{text!r}: {e.message}", field=field) from None


def parse_devices(texts: list[str]) -> tuple[DeviceConfig, ...]:
    """``--device NAME|MODULE:CLASS[,key=value...]``, each"""
    from .config import DeviceConfig

    return tuple(DeviceConfig.parse(t) for t in texts)


def config_from_args(args: argparse.Namespace) -> VmConfig:
    """The VmConfig of a command line: the --config file, then the options over it."""
    from .errors import UsageError

    fields: dict[str, Any] = {}
    if args.config:
        from . import firecracker

        fields = firecracker.load(args.config)
    given: dict[str, Any] = {
        "kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline,
        "mem": args.mem, "cpus": args.cpus, "console": args.console,
        "console_device": args.console_device, "rng": args.rng,
        "host_quirks": args.host_quirks,
        "acpi": None if args.acpi is None else args.acpi == "on",
        "drives": None if args.disk is None else tuple(parse_disk(d) for d in args.disk),
        "network_interfaces": None if args.net is None else tuple(
            parse_net(n) for n in args.net),
        "vsock": None if args.vsock is None else parse_vsock(args.vsock),
        "devices": None if args.device is None else parse_devices(args.device),
        "trace": args.trace, "check_driver": args.check_driver,
    }
    given = {k: v for k, v in given.items() if v is not None}
    from_file = set(fields) - set(given)
    fields.update(given)
    if "kernel" not in fields:
        raise UsageError("no kernel: give --kernel PATH (or a --config file that names "
                         "one)")
    from .config import VmConfig

    try:
        return VmConfig(**fields)
    except UsageError as e:
        top = (e.field or "").split(".")[0].split("[")[0]
        if top in from_file:  # name the file's field, not an option nobody typed
            from . import firecracker

            name = firecracker.FIELD_NAMES.get(top, top)
            raise UsageError(f"{args.config}: {name}: {e.message}", field="config") from None
        raise


def _process_start_monotonic() -> float:
    """When this process started, on the monotonic clock (10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        offset = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
        return start_boot - offset
    except (OSError, ValueError, IndexError):
        return time.monotonic()


# -- commands ---------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    import json

    from . import firecracker

    _setup_logging(args.debug)
    print(json.dumps(firecracker.to_firecracker(config_from_args(args)), indent=2))
    return 0


def restore_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What ``run --restore`` changes in the snapshot's configuration: the host side
    only. Options that would change the machine are usage errors."""
    from .errors import UsageError

    fixed = [name for name, value in (
        ("--config", args.config), ("--kernel", args.kernel), ("--initrd", args.initrd),
        ("--cmdline", args.cmdline), ("--mem", args.mem), ("--cpus", args.cpus),
        ("--console-device", args.console_device), ("--rng", args.rng),
        ("--acpi", args.acpi), ("--host-quirks", args.host_quirks)) if value is not None]
    if fixed:
        raise UsageError(f"{fixed[0]} cannot be given with --restore: the snapshot fixes "
                         "the machine (only --console, --disk, --net, --vsock and --device "
                         "may change)")
    given: dict[str, Any] = {
        "console": args.console,
        "drives": None if args.disk is None else tuple(parse_disk(d) for d in args.disk),
        "network_interfaces": None if args.net is None else tuple(
            parse_net(n) for n in args.net),
        "vsock": None if args.vsock is None else parse_vsock(args.vsock),
        "devices": None if args.device is None else parse_devices(args.device),
    }
    return {k: v for k, v in given.items() if v is not None}


def cmd_run(args: argparse.Namespace) -> int:
    global _on_signal
    # usage errors before the machine is imported
    overrides = restore_overrides(args) if args.restore else None
    cfg = config_from_args(args) if overrides is None else None
    _check_signal()
    _setup_logging(args.debug)
    from . import hostinfo
    from .console import attach_stdin
    from .vm import Timeline, Vm

    if cfg is not None and hostinfo.looks_like_linux(cfg.kernel) and (
            hostinfo.kvm_emulates_guest_kernel()):
        print(f"minivmm: note: {hostinfo.EMULATED_HOST_HINT}", file=sys.stderr)
    timeline = Timeline()
    timeline.mark("process start", _process_start_monotonic())
    if args.snapshot_on_signal is not None:  # until the VM runs, not a reason to die
        signal.signal(signal.SIGUSR2, _too_early)
    if overrides is not None:
        vm = Vm.restore(args.restore, timeline=timeline, **overrides)
    else:
        assert cfg is not None
        vm = Vm(cfg, timeline=timeline)
    with vm:
        def stop_on(signum: int) -> None:
            vm.request_stop(128 + signum, "signal",
                            f"stopped by {signal.Signals(signum).name}")

        _on_signal = stop_on
        if args.snapshot_on_signal is not None:
            _snapshot_on_sigusr2(vm, args.snapshot_on_signal)
        try:
            _check_signal()
            with attach_stdin(vm.config.console, vm):
                result = vm.run()
        finally:
            _on_signal = None
            if args.snapshot_on_signal is not None:
                signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        _report(vm, args, result.reason, result.detail)
        return _check_driver_end(vm.driver_check, len(vm.virtio.transports), result.status)


def _check_driver_end(check: DriverChecker | None, devices: int, status: int) -> int:
    """--check-driver's end of a run (``run`` and ``exec``): its summary on stderr; the
    exit status, CHECK_DRIVER_STATUS in place of ``status`` when ``strict`` found any
    violation (the last line names ``status``)."""
    if check is None:
        return status
    for line in check.summary(devices):
        print(f"minivmm: {line}", file=sys.stderr)
    if check.strict and check.total:
        print(f"minivmm: check-driver=strict: exit status {CHECK_DRIVER_STATUS} (the run's "
              f"own was {status})", file=sys.stderr)
        return CHECK_DRIVER_STATUS
    return status


def _snapshot_on_sigusr2(vm: Vm, path: Path) -> None:
    """SIGUSR2: save a snapshot of ``vm`` to ``path`` and go on (in the main thread,
    between the waits of Vm.run). A failure is one line; the VM runs on."""
    from .errors import MinivmmError

    saving = False

    def save(_signum: int, _frame: FrameType | None) -> None:
        nonlocal saving
        if saving:  # a second SIGUSR2 while this one saves (the handler runs nested)
            print(f"minivmm: a snapshot to {path} is being saved: SIGUSR2 ignored",
                  file=sys.stderr)
            return
        saving = True
        try:
            info = vm.snapshot(path)
        except (MinivmmError, OSError) as e:
            print(f"minivmm: snapshot to {path} failed: {e}", file=sys.stderr)
            return
        finally:
            saving = False
        print(f"minivmm: snapshot saved to {path} ({1000 * info['total_s']:.1f} ms)",
              file=sys.stderr)

    signal.signal(signal.SIGUSR2, save)


def _too_early(_signum: int, _frame: FrameType | None) -> None:
    print("minivmm: SIGUSR2 before the VM runs: no snapshot (send it again later)",
          file=sys.stderr)


def _report(vm: Vm, args: argparse.Namespace, reason: str, detail: str) -> None:
    from .errors import InternalError

    def say(line: str) -> None:
        print(f"minivmm: {line}", file=sys.stderr)

    if reason == "guest-error":
        say(f"guest failed: {detail}")
    elif reason == "host-error":
        say(f"error: {detail}")
    elif reason == "internal-error":
        say(f"internal error: {detail} ({InternalError.REPORT})")
    elif reason == "signal":
        say(detail)
    for hint in vm.device_hints():
        say(f"note: {hint}")
    if args.stats:
        for line in vm.stats_lines():
            print(line, file=sys.stderr)
    if args.timeline:
        for line in vm.timeline.lines():
            print(line, file=sys.stderr)
        quirks = vm.config.host_quirks_cmdline()
        print(f"timeline: host-quirks {vm.config.host_quirks}: "
              f"{'added ' + repr(quirks) if quirks else 'nothing added'}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    install_signal_handlers()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        from .errors import InternalError, MinivmmError, UsageError

        _check_signal()
    except _Stopped as e:
        print(f"minivmm: {e}", file=sys.stderr)
        return e.status
    try:
        # The command is the first word (the top level's own options take no value).
        args = build_parser(argv[0] if argv[:1] and argv[0] in COMMANDS else None
                            ).parse_args(argv)
        if args.command is None:
            raise UsageError("no command given: try 'minivmm run --kernel PATH'")
        if args.command == "trace":
            from .trace_show import cmd_trace

            return cmd_trace(args)
        if args.command == "exec":
            from .exec import Hooks, cmd_exec

            return cmd_exec(args, Hooks(config_from_args, _check_signal, _set_on_signal,
                                         _check_driver_end))
        return cmd_config(args) if args.command == "config" else cmd_run(args)
    except _Stopped as e:
        print(f"minivmm: {e}", file=sys.stderr)
        return e.status
    except UsageError as e:
        if debug:
            raise
        print(f"minivmm: error: {e.for_option(OPTION_NAMES)}", file=sys.stderr)
        return e.exit_status
    except (MinivmmError, OSError) as e:
        if debug:
            raise
        print(f"minivmm: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug in minivmm: the traceback goes to the log
        import logging

        _setup_logging(debug)
        logging.getLogger("minivmm").error("internal error", exc_info=True)
        print(f"minivmm: internal error: {type(e).__name__}: {e} ({InternalError.REPORT})",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
