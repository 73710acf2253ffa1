"""A private network namespace with one TAP interface, for end-to-end network tests.

The guest's peer is the host's own Linux network stack, seen through a tap that lives
in a namespace made for the test: the host's real interfaces are never touched (every
command is ``ip -n NS ...`` or runs under ``ip netns exec NS``), and the namespace, with
the tap in it, is deleted on exit, even when the test fails.

    with NetNamespace() as ns:                 # tap0, host side 10.0.2.1/24, up
        p = subprocess.run(ns.exec_prefix() + ["qemu-system-x86_64", ...])
        ns.tap_stats()                         # frames the host counted on the tap

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN), ``ip`` (iproute2) and /dev/net/tun;
:func:`missing` names what is absent, for a skip reason.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from types import TracebackType

IP = shutil.which("ip")
_serial = itertools.count()


def missing() -> str | None:
    """Why network namespace tests cannot run here, or None if they can."""
    if IP is None:
        return "`ip` (iproute2) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    return None


def _run(cmd: list[str]) -> str:
    """Run cmd; its stdout, or RuntimeError naming the command and its stderr."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


class NetNamespace:
    """A network namespace holding loopback and one tap, both up.

    ``name``: the namespace (unique per process and instance unless given);
    ``tap``: the tap's name inside it; ``host_cidr``: the address the host stack
    answers on (``host_ip`` without the prefix); ``mtu``: the tap's MTU if given.
    """

    def __init__(
        self,
        *,
        tap: str = "tap0",
        host_cidr: str = "10.0.2.1/24",
        mtu: int | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or f"minivmm-test-{os.getpid()}-{next(_serial)}"
        self.tap = tap
        self.host_cidr = host_cidr
        self.host_ip = host_cidr.split("/")[0]
        self.mtu = mtu
        self._created = False

    def ip(self, *args: str) -> str:
        """``ip -n NS ARGS...``; its stdout. Raises CalledProcessError with stderr."""
        assert IP is not None, missing()
        return _run([IP, "-n", self.name, *args])

    def exec_prefix(self) -> list[str]:
        """Put this in front of a command to run it inside the namespace."""
        assert IP is not None, missing()
        return [IP, "netns", "exec", self.name]

    def tap_mac(self) -> str:
        """The tap's own MAC address (the host side of the link), lower case."""
        m = re.search(r"link/ether ([0-9a-f:]{17})", self.ip("link", "show", "dev", self.tap))
        assert m, f"no MAC address for {self.tap} in {self.name}"
        return m.group(1)

    def tap_stats(self) -> dict[str, int]:
        """rx_packets / tx_packets of the tap, as the host counts them."""
        base = f"/sys/class/net/{self.tap}/statistics"
        out = _run([*self.exec_prefix(), "cat", f"{base}/rx_packets", f"{base}/tx_packets"]).split()
        return {"rx_packets": int(out[0]), "tx_packets": int(out[1])}

    def create(self) -> None:
        assert IP is not None, missing()
        _run([IP, "netns", "add", self.name])
        self._created = True
        try:
            self.ip("tuntap", "add", "dev", self.tap, "mode", "tap")
            if self.mtu is not None:
                self.ip("link", "set", "dev", self.tap, "mtu", str(self.mtu))
            self.ip("addr", "add", self.host_cidr, "dev", self.tap)
            self.ip("link", "set", "dev", self.tap, "up")
            self.ip("link", "set", "dev", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        """Delete the namespace (and the tap inside it). Idempotent."""
        if self._created and IP is not None:
            subprocess.run([IP, "netns", "delete", self.name], capture_output=True, timeout=30)
            self._created = False

    def __enter__(self) -> NetNamespace:
        self.create()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()
