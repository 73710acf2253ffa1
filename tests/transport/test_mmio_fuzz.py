"""A hostile driver on the register file: random accesses of every width at every offset,
random status values, queue set-ups pointing anywhere, and kicks in between. Nothing may
escape the transport or the device (the VMM's vCPU and device threads would die), and
every register read must return as many bytes as were asked for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm.console import NullSink
from minivmm.devices.base import VirtioDevice
from minivmm.devices.blk import BlockDevice
from minivmm.devices.console import ConsoleDevice
from minivmm.devices.rng import RngDevice
from minivmm.transport.testing import DeviceHarness

# Offsets worth hitting: every register, config space, and a few odd places.
OFFSETS = st.one_of(
    st.sampled_from([0x000, 0x004, 0x008, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038,
                     0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0,
                     0x0A4, 0x0AC, 0x0B0, 0x0C0, 0x0FC, 0x100, 0x108, 0x120]),
    st.integers(0, 0xFFF),
)
VALUES = st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 3, 0xB, 0xF, 0x40,
                                                                 0x80, 256, 0x1000]))
ACCESS = st.tuples(st.sampled_from(["read", "write", "kick", "init"]), OFFSETS,
                   st.sampled_from([1, 2, 4, 8]), VALUES)


def _blk(tmp: Path) -> VirtioDevice:
    img = tmp / "fuzz.img"
    if not img.exists():
        img.write_bytes(bytes(64 * 512))
    return BlockDevice(img, serial="fuzz")


MAKERS: dict[str, Callable[[Path], VirtioDevice]] = {
    "rng": lambda tmp: RngDevice(),
    "blk": _blk,
    "console": lambda tmp: ConsoleDevice(output=NullSink(), input_fd=None),
}


@pytest.mark.parametrize("kind", list(MAKERS))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=st.lists(ACCESS, min_size=1, max_size=60))
def test_random_register_traffic_never_escapes(kind: str, tmp_path: Path,
                                               accesses: list[tuple[str, int, int, int]]
                                               ) -> None:
    h = DeviceHarness(MAKERS[kind](tmp_path))
    try:
        for op, offset, size, value in accesses:
            if op == "read":
                buf = bytearray(size)
                h.transport.read(offset, memoryview(buf))
                assert len(buf) == size
            elif op == "write":
                h.transport.write(offset, memoryview(bytearray(
                    value.to_bytes(8, "little")[:size])))
            elif op == "kick":
                for q in range(len(h.device.queues)):
                    h.device.kick(q)
            else:  # a full, valid initialisation, then garbage continues on top of it
                try:
                    h.initialise()
                except AssertionError:
                    pass  # e.g. FEATURES_OK refused after earlier garbage: a valid outcome
                drv = h.drivers[0]
                drv.push_head(value & 0xFFFF)  # an arbitrary (often invalid) head
                h.device.kick(0)
    finally:
        h.close()
