"""Fixtures the device tests share."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from .test_net import ip


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
