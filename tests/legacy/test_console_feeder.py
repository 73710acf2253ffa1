"""Console input for virtio-console (PipeFeeder) never blocks the pump (issue 10, defect 7).

A guest that stops reading its console must not take the escape keys away: Ctrl-A x
still ends the VM however much input is waiting.
"""

from __future__ import annotations

import os
import select
import threading
import tty
from collections.abc import Iterator

import pytest

from minivmm.console import InputPump, PipeFeeder

WAIT = 30.0  # a bound only a hang reaches


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, slave
    os.close(master)
    os.close(slave)


def test_ctrl_a_x_works_while_the_guest_reads_nothing(pty: tuple[int, int]) -> None:
    master, slave = pty
    feeder = PipeFeeder(limit=256 << 10)
    quit_ = threading.Event()
    pump = InputPump(feeder.feed, quit_.set, fd=slave, escape=True)
    assert pump.start()
    try:
        chunk = b"y" * 4096
        for _ in range(100):  # 400 KiB: more than the pipe (64 KiB) and the backlog hold
            os.write(master, chunk)
        os.write(master, b"\x01x")
        assert quit_.wait(WAIT), "Ctrl-A x was not seen: the pump is blocked"
        assert feeder.backlog > 0 and feeder.dropped > 0
    finally:
        pump.stop()
        feeder.close()


def test_pipe_input_keeps_its_back_pressure() -> None:
    """From a pipe (no escape keys) nothing is dropped: the pump waits for the guest."""
    r, w = os.pipe()
    feeder = PipeFeeder(limit=1024)
    pump = InputPump(feeder.feed, lambda: None, fd=r, escape=False)
    payload = bytes(range(256)) * 1024  # 256 KiB
    got = bytearray()
    def write_all() -> None:
        os.write(w, payload)
        os.close(w)

    writer = threading.Thread(target=write_all)
    assert pump.start()
    writer.start()
    try:
        while len(got) < len(payload):
            ready, _, _ = select.select([feeder.read_fd], [], [], WAIT)
            assert ready, f"input stalled after {len(got)} bytes"
            got += os.read(feeder.read_fd, 65536)
        assert bytes(got) == payload and feeder.dropped == 0
    finally:
        writer.join(WAIT)
        pump.stop()
        feeder.close()
        os.close(r)
