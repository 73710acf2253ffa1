"""Fixtures the device tests share."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_net import ip
from .vsockkit import Vsock


@pytest.fixture(scope="session")
def netns() -> Iterator[str]:
    name = f"minivmm-test-{os.getpid()}"
    ip("netns", "add", name)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=30)


@pytest.fixture
def v(tmp_path: Path) -> Iterator[Vsock]:
    """A vsock device behind the transport, initialised, its socket in tmp_path."""
    vs = Vsock.make(tmp_path / "v.sock")
    try:
        yield vs
    finally:
        vs.close()
