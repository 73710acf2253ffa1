"""The options of ``minivmm exec`` (see minivmm.exec): only argparse, so that the command
line's help and usage errors stay as cheap as ``minivmm run``'s."""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

DEFAULT_BOOT_TIMEOUT = 300.0  # seconds from start until the agent answers
AGENT_ENV = "MINIVMM_AGENT"

__all__ = ["AGENT_ENV", "DEFAULT_BOOT_TIMEOUT", "add_parser"]


def add_parser(sub: Any, add_vm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``exec`` on the command line's subcommand parsers (``sub``), with the
    options of ``minivmm run`` (``add_vm_options``)."""
    e = sub.add_parser(
        "exec", help="boot a guest and run one command in it",
        description="Boot the guest with the guest agent as its /init, run CMD in it as "
                    "root, stream its stdout and stderr to ours, forward our stdin, and "
                    "exit with its status (124: --timeout; 125: the guest never ran CMD "
                    "or died under it; 120: --check-driver=strict found a violation, "
                    "whatever CMD's status).")
    add_vm_options(e)
    e.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop CMD and exit 124 after this long (from CMD's start)")
    e.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="an environment variable for CMD (repeatable)")
    e.add_argument("--cwd", metavar="DIR", help="CMD's working directory (default /)")
    e.add_argument("--add", action="append", default=[], metavar="HOSTPATH[:GUESTPATH]",
                   help="put a host file or directory into the guest (repeatable; default "
                        "GUESTPATH /NAME; at most half the guest memory in all)")
    e.add_argument("--collect", action="append", default=[], metavar="GUESTPATH:HOSTPATH",
                   help="copy a guest file or directory to exactly HOSTPATH after CMD ends "
                        "(repeatable; nothing outside HOSTPATH is written; a failed copy "
                        "turns status 0 into 1)")
    e.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT,
                   metavar="SECONDS",
                   help=f"give up (125) if the agent has not answered after this long "
                        f"(default {DEFAULT_BOOT_TIMEOUT:.0f})")
    e.add_argument("--agent", metavar="PATH",
                   help=f"the guest agent binary (default: ${AGENT_ENV}, else "
                        "guest/out/minivmm-agent of this source tree)")
    e.add_argument("--modules", metavar="DIR",
                   help="the kernel's module tree, for a vsock driver built as modules "
                        "(default /lib/modules/VERSION of the kernel's version)")
    e.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    e.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
