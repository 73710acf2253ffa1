"""The debug-exit port: how a test guest ends the VM and reports a status.

One port at ``layout.DEBUG_EXIT_PORT`` (0x501). A write of ``v`` calls ``on_exit(v)``;
the VMM ends the VM and ``minivmm run`` exits with status ``v`` (0 = success). A 2- or
4-byte write uses its low byte, so the status is always 0-255.

Compared with QEMU's ``isa-debug-exit`` (same default port, iosize 2): QEMU exits with
``(v << 1) | 1``, so a guest can never make it exit 0 and the status is odd; minivmm
exits with ``v`` itself. A guest that must run under both should treat QEMU's status
``2*v+1`` as minivmm's ``v`` (the probe's tests do). Reads return 0, as QEMU's do (a
port with nothing behind it reads 0xff), so a guest can tell the device is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final


class DebugExit:
    """``on_exit(status)`` is called on the vCPU thread, inside the port write."""

    SIZE: Final = 1

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self.status: int | None = None  # the last status written

    def read(self, offset: int, data: memoryview) -> None:
        for i in range(len(data)):
            data[i] = 0

    def write(self, offset: int, data: memoryview) -> None:
        if len(data) == 0:
            return
        self.status = data[0]
        self._on_exit(self.status)
