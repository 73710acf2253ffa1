"""The ``minivmm`` command line.

Exit status: 0 when the guest powered off or rebooted; v when the guest wrote v to the
debug-exit port; 1 for a VMM-side or guest failure; 2 for bad usage; 128+N when stopped
by signal N (SIGINT, SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, hostinfo
from .errors import UsageError, VmmError

log = logging.getLogger("minivmm")

DEFAULT_CMDLINE = (
    "console=ttyS0 reboot=t panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, *, option: str = "--mem") -> int:
    """'256M', '1G', '4096K' or a byte count; a UsageError naming the option otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{option} {text!r} is not a size: write it like 256M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="minivmm", description="A small, fast virtual machine monitor on KVM.")
    p.add_argument("--version", action="version", version=f"minivmm {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("run", help="boot a guest kernel",
                       description="Boot a guest kernel and run it until it ends.")
    r.add_argument("--kernel", required=True, type=Path,
                   help="bzImage, or ELF vmlinux (PVH entry used when the kernel has one)")
    r.add_argument("--initrd", type=Path, help="initramfs / initrd image")
    r.add_argument("--cmdline", help=f"kernel command line (default: {DEFAULT_CMDLINE!r})")
    r.add_argument("--mem", default="128M", help="guest memory, e.g. 256M or 1G (default 128M)")
    r.add_argument("--cpus", type=int, default=1, help="vCPUs (only 1 so far)")
    r.add_argument("--console", default="stdio",
                   help="where the serial console goes: stdio, none or file:PATH")
    r.add_argument("--console-device", default="serial", choices=["serial", "virtio"],
                   help="the guest's console: the 8250 UART (ttyS0, default) or "
                        "virtio-console (hvc0)")
    r.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,serial=ID]",
                   help="a raw disk image as virtio-blk (repeatable; /dev/vda, vdb, ...)")
    r.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                   help="virtio-net on a Linux tap (repeatable; created if absent and "
                        "permitted, else make it with `ip tuntap add`)")
    r.add_argument("--rng", action="store_true", help="a virtio-rng entropy device")
    r.add_argument("--acpi", default="on", choices=["on", "off"],
                   help="on (default): ACPI tables describing the machine, and poweroff "
                        "through ACPI S5; off: none (MP table and command-line devices only)")
    r.add_argument("--host-quirks", default="auto", choices=["auto", "off"],
                   help="auto (default): on a host whose KVM emulates guest kernel code, "
                        "add the command-line options a Linux guest needs there; off: never")
    r.add_argument("--stats", action="store_true", help="print exit counters at the end")
    r.add_argument("--timeline", action="store_true", help="print boot milestones at the end")
    r.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    return p


def _process_start_monotonic() -> float:
    """When this process started, on the monotonic clock (10 ms resolution)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        offset = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
        return start_boot - offset
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def run(args: argparse.Namespace) -> int:
    from .launch import DiskSpec, LaunchConfig, NetSpec, device_hints, launch

    default = DEFAULT_CMDLINE
    if args.console_device == "virtio":
        default = default.replace("console=ttyS0", "console=hvc0")
    cmdline = default if args.cmdline is None else args.cmdline
    quirks = hostinfo.host_quirks_cmdline(args.host_quirks, args.kernel, cmdline)
    cfg = LaunchConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=f"{cmdline} {quirks}".strip(),
        mem_size=parse_size(args.mem),
        cpus=args.cpus,
        console=args.console,
        console_device=args.console_device,
        disks=[DiskSpec.parse(d) for d in args.disk],
        nets=[NetSpec.parse(n) for n in args.net],
        rng=args.rng,
        acpi=args.acpi == "on",
    )
    if args.cpus < 1:
        raise UsageError("--cpus must be at least 1")
    if hostinfo.looks_like_linux(args.kernel) and hostinfo.kvm_emulates_guest_kernel():
        print(f"minivmm: note: {hostinfo.EMULATED_HOST_HINT}", file=sys.stderr)
    result, machine = launch(cfg, process_start=_process_start_monotonic())
    if result.reason == "error":
        print(f"minivmm: guest failed: {result.detail}", file=sys.stderr)
    elif result.reason == "signal":
        print(f"minivmm: {result.detail}", file=sys.stderr)
    for hint in device_hints(machine, args.kernel):
        print(f"minivmm: note: {hint}", file=sys.stderr)
    if args.stats:
        for line in machine.stats_lines():
            print(line, file=sys.stderr)
    if args.timeline:
        for line in machine.timeline.lines():
            print(line, file=sys.stderr)
        print(f"timeline: host-quirks {args.host_quirks}: "
              f"{'added ' + repr(quirks) if quirks else 'nothing added'}", file=sys.stderr)
    return result.status


class Stopped(VmmError):
    """SIGINT or SIGTERM before the guest started: stop with status 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} before the guest started")
        self.exit_status = 128 + signum


def _stop_early(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_early)  # launch() installs the VM's own handlers
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="minivmm: %(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("no command given: try 'minivmm run --kernel PATH'")
        return run(args)
    except VmmError as e:
        if debug:
            raise
        print(f"minivmm: error: {e}", file=sys.stderr)
        return e.exit_status
    except OSError as e:
        if debug:
            raise
        print(f"minivmm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as e:  # a bug in minivmm: still one line, unless --debug
        if debug:
            raise
        print(f"minivmm: internal error: {type(e).__name__}: {e} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
