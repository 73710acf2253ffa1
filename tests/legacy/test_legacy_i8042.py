"""The i8042 controller: Linux's probe sequence and the reset line."""

from __future__ import annotations

import pytest

from minivmm.bus import Bus
from minivmm.devices.legacy.i8042 import I8042
from minivmm.x86 import layout

from .helpers_legacy import rd, wr

DATA, STATUS = 0, 4
OBF, CMD = 0x01, 0x08


class Resets:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def command(dev: I8042, cmd: int, *params: int) -> list[int]:
    """Send a command (and its parameters); return what it put in the output buffer."""
    wr(dev, STATUS, cmd)
    for p in params:
        wr(dev, DATA, p)
    out = []
    while rd(dev, STATUS) & OBF:
        out.append(rd(dev, DATA))
    return out


def test_pulse_reset_command_calls_on_reset() -> None:
    resets = Resets()
    dev = I8042(resets)
    assert command(dev, 0xFE) == []
    assert resets.count == 1
    assert dev.resets == 1


@pytest.mark.parametrize("cmd", [0xF0, 0xF2, 0xFC, 0xFE])
def test_any_pulse_including_bit0_resets(cmd: int) -> None:
    resets = Resets()
    command(I8042(resets), cmd)
    assert resets.count == 1


@pytest.mark.parametrize("cmd", [0xF1, 0xFF, 0xFD])
def test_pulses_leaving_bit0_alone_do_not_reset(cmd: int) -> None:
    resets = Resets()
    command(I8042(resets), cmd)
    assert resets.count == 0


def test_writing_the_output_port_with_reset_low_resets() -> None:
    resets = Resets()
    dev = I8042(resets)
    command(dev, 0xD1, 0x03)  # reset line high, A20 on: no reset
    assert resets.count == 0
    assert command(dev, 0xD0) == [0x03]
    command(dev, 0xD1, 0x02)
    assert resets.count == 1


def test_linux_probe_sequence() -> None:
    resets = Resets()
    dev = I8042(resets)
    assert not rd(dev, STATUS) & OBF  # i8042_flush finds an empty buffer
    ctr = command(dev, 0x20)
    assert len(ctr) == 1
    assert command(dev, 0x20) == ctr  # read twice, must agree
    assert command(dev, 0xAA) == [0x55]  # self-test
    assert command(dev, 0x60, 0x61) == []  # write CTR
    assert command(dev, 0x20) == [0x61]
    command(dev, 0xA7)
    assert command(dev, 0x20)[0] & 0x20  # aux disabled shows in the CTR
    command(dev, 0xA8)
    assert not command(dev, 0x20)[0] & 0x20
    command(dev, 0xAD)
    assert command(dev, 0x20)[0] & 0x10
    command(dev, 0xAE)
    assert not command(dev, 0x20)[0] & 0x10
    assert command(dev, 0xA9) == [0x00]
    assert command(dev, 0xAB) == [0x00]
    assert resets.count == 0


def test_echo_commands_and_aux_flag() -> None:
    dev = I8042(Resets())
    wr(dev, STATUS, 0xD3)
    wr(dev, DATA, 0x5A)
    assert rd(dev, STATUS) & (OBF | 0x20) == OBF | 0x20
    assert rd(dev, DATA) == 0x5A
    assert command(dev, 0xD2, 0xA5) == [0xA5]


def test_status_tracks_command_or_data_write() -> None:
    dev = I8042(Resets())
    wr(dev, STATUS, 0xAE)
    assert rd(dev, STATUS) & CMD
    wr(dev, DATA, 0xF4)  # a keyboard command: nobody there, ignored
    assert not rd(dev, STATUS) & CMD
    assert not rd(dev, STATUS) & OBF
    assert dev.ignored == 1


def test_unknown_commands_and_ports_are_harmless() -> None:
    resets = Resets()
    dev = I8042(resets)
    for cmd in (0x00, 0x10, 0x90, 0xC0, 0xE0):
        command(dev, cmd)
    assert rd(dev, 1) == 0xFF
    wr(dev, 2, 0)
    assert rd(dev, DATA, 4) >> 8 == 0xFFFFFF
    assert resets.count == 0


def test_data_read_with_empty_buffer_repeats_the_last_byte() -> None:
    dev = I8042(Resets())
    command(dev, 0xAA)
    assert rd(dev, DATA) == 0x55


def test_registers_on_the_port_bus_over_0x60_to_0x64() -> None:
    resets = Resets()
    bus = Bus("pio")
    bus.register(layout.I8042_PORT, I8042.SIZE, I8042(resets))
    bus.write(0x64, memoryview(bytearray([0xFE])))
    assert resets.count == 1
