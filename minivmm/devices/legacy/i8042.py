"""The i8042 keyboard controller, as far as a Linux guest needs it: probing, and reset.

Ports (register the device over ``I8042_PORT``..+``SIZE``, i.e. 0x60-0x64):

    0x60  data: read the output buffer; write a command's parameter (or a byte for the
          keyboard, which is absent and ignores it)
    0x64  read: status register; write: controller command

Commands (the controller's own, not the keyboard's):

    0x20        read the command byte (CTR)       0x60 p   write the command byte
    0xA7/0xA8   disable/enable the aux port       0xA9     aux interface test -> 0x00
    0xAA        self-test -> 0x55                 0xAB     kbd interface test -> 0x00
    0xAD/0xAE   disable/enable the keyboard       0xD0     read the output port
    0xD1 p      write the output port (bit 0 clear: reset)
    0xD2/0xD3 p echo p as keyboard/aux data       0xD4 p   byte for the mouse (absent)
    0xDD/0xDF   A20 off/on                        0xF0-0xFF pulse output lines; bit 0
                                                           clear (0xFE) pulses reset
    0x21-0x3F read controller RAM -> 0; 0x61-0x7F p write it (ignored); others: ignored.

A pulse of the reset line calls ``on_reset()``: the VMM ends the VM as a reboot. There is
no keyboard and no mouse and the device raises no interrupt (IRQ 1): Linux's controller
probe and self-test pass, and its keyboard probe times out harmlessly. Guests that need
no keyboard can skip that wait with ``i8042.nokbd`` (or ``i8042.noaux i8042.nomux
i8042.dumbkbd``, as Firecracker passes). Ports 0x61-0x63 in the range read as all ones.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from .state import Kind, check_mapping, restore_fields, save_fields

log = logging.getLogger(__name__)

DATA_OFFSET: Final = 0  # port 0x60
COMMAND_OFFSET: Final = 4  # port 0x64

STATUS_OBF: Final = 0x01  # output buffer full: a byte waits at port 0x60
STATUS_SYS: Final = 0x04  # system flag (self-test passed)
STATUS_CMD: Final = 0x08  # the last write was to the command port
STATUS_UNLOCKED: Final = 0x10  # keyboard not inhibited
STATUS_AUX_OBF: Final = 0x20  # the waiting byte is from the aux port

CTR_KBD_INT: Final = 0x01
CTR_SYS: Final = 0x04
CTR_KBD_DISABLED: Final = 0x10
CTR_AUX_DISABLED: Final = 0x20
CTR_XLATE: Final = 0x40

OUTPORT_RESET: Final = 0x01  # active low: 0 holds the CPU in reset
OUTPORT_A20: Final = 0x02

SELF_TEST_OK: Final = 0x55
INTERFACE_TEST_OK: Final = 0x00
_OUTPUT_QUEUE_MAX: Final = 16
_ONES: Final = b"\xff" * 8


class I8042:
    """The controller; ``on_reset`` is called on the vCPU thread when the guest resets."""

    SIZE: Final = 5

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._ctr = CTR_KBD_INT | CTR_SYS | CTR_XLATE
        self._outport = OUTPORT_RESET | OUTPORT_A20
        self._status = STATUS_UNLOCKED | STATUS_SYS
        self._output: deque[tuple[int, bool]] = deque()  # (byte, from aux port)
        self._last = 0
        self._pending: int | None = None  # a command waiting for its parameter
        self.resets = 0
        self.ignored = 0
        self._lock = threading.Lock()  # two vCPUs may poke the controller at once

    #: the registers; the output queue and the pending command are saved beside them
    _STATE: Final[dict[str, Kind]] = {"_ctr": "u8", "_outport": "u8", "_status": "u8",
                                      "_last": "u8"}

    def save_state(self) -> dict[str, object]:
        """The controller's registers and output queue (snapshots)."""
        with self._lock:
            return {**save_fields(self, self._STATE),
                    "pending": -1 if self._pending is None else self._pending,
                    "output": [[b, aux] for b, aux in self._output]}

    def restore_state(self, state: Mapping[str, object]) -> None:
        """ValueError (one line) for state that does not fit."""
        check_mapping("i8042", state)
        output = state.get("output")
        if not isinstance(output, list) or len(output) > _OUTPUT_QUEUE_MAX or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], int)
                and 0 <= e[0] <= 0xFF and isinstance(e[1], bool) for e in output):
            raise ValueError("i8042: saved output queue is not a list of [byte, aux]")
        pending = state.get("pending")
        if not isinstance(pending, int) or not -1 <= pending <= 0xFF:
            raise ValueError(f"i8042: saved pending command {pending!r} is not -1..255")
        with self._lock:
            restore_fields(self, "i8042", {k: v for k, v in state.items()
                                           if k not in ("output", "pending")}, self._STATE)
            self._pending = None if pending < 0 else pending
            self._output = deque((b, aux) for b, aux in output)

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            self._read(offset, data)

    def write(self, offset: int, data: memoryview) -> None:
        with self._lock:
            self._write(offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        if n > 1:
            data[1:] = _ONES[: n - 1]
        if offset == DATA_OFFSET:
            if self._output:
                self._last = self._output.popleft()[0]
            data[0] = self._last
        elif offset == COMMAND_OFFSET:
            status = self._status
            if self._output:
                status |= STATUS_OBF | (STATUS_AUX_OBF if self._output[0][1] else 0)
            data[0] = status
        else:
            data[0] = 0xFF

    def _write(self, offset: int, data: memoryview) -> None:
        if len(data) == 0:
            return
        value = data[0]
        if offset == DATA_OFFSET:
            self._status &= ~STATUS_CMD
            self._data(value)
        elif offset == COMMAND_OFFSET:
            self._status |= STATUS_CMD
            self._command(value)
        else:
            self.ignored += 1

    def _push(self, value: int, aux: bool = False) -> None:
        if len(self._output) < _OUTPUT_QUEUE_MAX:
            self._output.append((value, aux))

    def _command(self, cmd: int) -> None:
        self._pending = None
        if cmd == 0x20:
            self._push(self._ctr)
        elif 0x21 <= cmd <= 0x3F:
            self._push(0)
        elif 0x60 <= cmd <= 0x7F or cmd in (0xD1, 0xD2, 0xD3, 0xD4):
            self._pending = cmd
        elif cmd == 0xA7:
            self._ctr |= CTR_AUX_DISABLED
        elif cmd == 0xA8:
            self._ctr &= ~CTR_AUX_DISABLED
        elif cmd in (0xA9, 0xAB):
            self._push(INTERFACE_TEST_OK)
        elif cmd == 0xAA:
            self._status |= STATUS_SYS
            self._push(SELF_TEST_OK)
        elif cmd == 0xAD:
            self._ctr |= CTR_KBD_DISABLED
        elif cmd == 0xAE:
            self._ctr &= ~CTR_KBD_DISABLED
        elif cmd == 0xD0:
            self._push(self._outport)
        elif cmd == 0xDD:
            self._outport &= ~OUTPORT_A20
        elif cmd == 0xDF:
            self._outport |= OUTPORT_A20
        elif cmd >= 0xF0:
            if not cmd & OUTPORT_RESET:  # low bits name the lines pulsed low
                self._reset()
        else:
            self.ignored += 1
            log.debug("i8042: command 0x%02x ignored", cmd)

    def _data(self, value: int) -> None:
        cmd, self._pending = self._pending, None
        if cmd is None or cmd == 0xD4:
            self.ignored += 1  # a byte for the absent keyboard or mouse
        elif cmd == 0x60:
            self._ctr = value
            self._status = (self._status & ~STATUS_SYS) | (value & CTR_SYS)
        elif cmd == 0xD1:
            self._outport = value
            if not value & OUTPORT_RESET:
                self._reset()
        elif cmd == 0xD2:
            self._push(value)
        elif cmd == 0xD3:
            self._push(value, aux=True)
        # 0x61-0x7F: controller RAM, not kept.

    def _reset(self) -> None:
        self.resets += 1
        self._outport |= OUTPORT_RESET  # a pulse: the line comes back up
        self._on_reset()
