"""virtio-console (virtio 1.2 §5.3): the guest's hvc0, port 0 only (no MULTIPORT).

Queue 0 (receiveq0) carries input to the guest, queue 1 (transmitq0) its output.

Output: each transmit chain's readable views go to the output (:class:`Output`); one
with a file descriptor (minivmm.console's stdio and file sinks) gets them with
``os.writev`` straight from guest memory, any other one ``write`` per buffer.

Input comes from a file descriptor and is read with ``readv`` straight into the guest's
receive buffers, never more than the buffers hold, so nothing is read that the guest
can't take and nothing is dropped. How the fd is watched:

* A pollable fd (terminal, pipe, socket) is in :meth:`extra_fds` with :meth:`on_input`;
  the VMM registers it on the device thread when the device activates. When input is
  ready but the guest has posted no receive buffer, the device stops watching the fd by
  calling ``fd_watch(fd, None)`` (so a level-triggered epoll does not spin) and asks the
  driver for a kick; the next receive-queue kick calls ``fd_watch(fd, on_input)`` again.
  The VMM must set ``fd_watch`` (e.g. to the event loop's add_reader/remove_reader)
  before activation; activation fails otherwise.
* A regular file (epoll refuses those; they are always readable) is read whenever
  receive buffers arrive, until its end.

End of input (a hang-up, the end of the file) stops the watching for good.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import stat
import struct
import termios
from collections.abc import Callable
from typing import Final, Protocol

from ..virtio.chain import DescriptorChain
from .base import (
    IOV_MAX,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_ID_CONSOLE,
    ActivationError,
    VirtioDevice,
    bit,
)

log = logging.getLogger(__name__)

# Feature bits (§5.3.3)
VIRTIO_CONSOLE_F_SIZE: Final = 0
VIRTIO_CONSOLE_F_MULTIPORT: Final = 1
VIRTIO_CONSOLE_F_EMERG_WRITE: Final = 2

#: struct virtio_console_config (§5.3.4): cols, rows, max_nr_ports, emerg_wr
CONSOLE_CONFIG: Final = struct.Struct("<HHII")
EMERG_WR_OFFSET: Final = 8
RECEIVEQ: Final = 0
TRANSMITQ: Final = 1
QUEUE_SIZE: Final = 256


class Output(Protocol):
    """Where the guest's output goes (minivmm.console's sinks are such objects). If it
    also has ``writev(views)``, that gets the guest's buffers themselves (no copy)."""

    def write(self, data: bytes) -> None: ...


def _pollable(fd: int) -> bool:
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return False
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
        return True
    except PermissionError:  # epoll refuses fds that are always ready (e.g. /dev/null)
        return False
    finally:
        ep.close()


def _pending(fd: int) -> int:
    """Bytes ready to read on fd (FIONREAD), or -1 if the fd can't say."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return -1
    return int.from_bytes(buf, "little", signed=True)


class ConsoleDevice(VirtioDevice):
    device_type = VIRTIO_ID_CONSOLE
    name = "console"
    kernel_option = "CONFIG_VIRTIO_CONSOLE"

    def __init__(self, output: Output, input_fd: int | None = None, *,
                 cols: int = 0, rows: int = 0) -> None:
        features = bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC) | bit(
            VIRTIO_CONSOLE_F_EMERG_WRITE)
        if cols and rows:
            features |= bit(VIRTIO_CONSOLE_F_SIZE)
        super().__init__(features, [QUEUE_SIZE, QUEUE_SIZE])
        self.output = output
        self.input_fd = input_fd
        self._config = CONSOLE_CONFIG.pack(cols & 0xFFFF, rows & 0xFFFF, 1, 0)
        self._pollable = input_fd is not None and _pollable(input_fd)
        self._watching = False
        self.input_ended = input_fd is None

    def config(self) -> bytes:
        return self._config

    def write_config(self, offset: int, data: memoryview) -> None:
        """emerg_wr (§5.3.4): the driver writes one character to the output, early."""
        if offset <= EMERG_WR_OFFSET < offset + len(data):
            self._emit([data[EMERG_WR_OFFSET - offset : EMERG_WR_OFFSET - offset + 1]])
        else:
            super().write_config(offset, data)

    # -- life cycle -------------------------------------------------------------------

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        if self.input_fd is None or not self._pollable or self.input_ended:
            return []
        return [(self.input_fd, self.on_input)]

    def on_activate(self) -> None:
        if self._pollable and not self.input_ended:
            if self.fd_watch is None:
                raise ActivationError("console: input fd is pollable but fd_watch is unset")
            self._watching = True  # the VMM registers extra_fds() now
        elif not self.input_ended:
            self._pump(polled=False)

    def on_reset(self) -> None:
        self._stop_watching()

    def _stop_watching(self) -> None:
        if self._watching and self.fd_watch is not None and self.input_fd is not None:
            self.fd_watch(self.input_fd, None)
        self._watching = False

    # -- queues -----------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if index == TRANSMITQ:
            self._transmit()
        elif self.input_ended or self.input_fd is None:
            return
        elif not self._pollable:
            self._pump(polled=False)
        elif not self._watching and self.fd_watch is not None:
            self._watching = True  # the guest posted buffers: resume watching the fd
            self.queues[RECEIVEQ].disable_notification()
            self.fd_watch(self.input_fd, self.on_input)

    def _transmit(self) -> None:
        self.drain(self.queues[TRANSMITQ], self._emit_chain)

    def _emit_chain(self, chain: DescriptorChain) -> None:
        self._emit(chain.reader.views())

    def _emit(self, views: list[memoryview]) -> None:
        out = self.output
        writev: Callable[[list[memoryview]], None] | None = getattr(out, "writev", None)
        try:
            if writev is not None:
                writev(views)
            else:
                for v in views:
                    out.write(v.tobytes())
        except OSError as e:
            self.log("console: output failed, %d buffers lost: %s", len(views), e)

    def on_input(self) -> None:
        """The input fd is readable (called on the device thread)."""
        with self.lock:
            if self.is_activated and self._watching:
                self._pump(polled=True)

    def _pump(self, *, polled: bool) -> None:
        """Move input into receive buffers until either runs out."""
        q = self.queues[RECEIVEQ]
        fd = self.input_fd
        if fd is None or not q.is_active():
            return
        delivered = False
        first = True
        try:
            while True:
                pending = _pending(fd)
                if pending == 0:
                    if (first and polled) or not self._pollable:  # hang-up, end of file
                        self._end_input()
                    return
                first = False
                chain = q.pop()
                if chain is None:
                    if q.enable_notification():
                        continue  # buffers arrived meanwhile
                    if self._pollable:
                        self._stop_watching()  # until the driver kicks receiveq0
                    return
                with chain:
                    w = chain.writer
                    if w.total == 0:
                        self.log("console: receive chain %d has no writable buffer", chain.head)
                        continue
                    try:
                        n = os.readv(fd, w.views()[:IOV_MAX])
                    except BlockingIOError:
                        return
                    except OSError as e:
                        self.log("console: reading input fd %d failed: %s", fd, e)
                        n = 0
                    w.advance(n)
                    delivered = True
                if n == 0:
                    self._end_input()
                    return
                if pending < 0:
                    return  # the fd can't say how much is left: one read per wake-up
        finally:
            if delivered:
                self.signal_used(q)

    def _end_input(self) -> None:
        log.info("console: input fd %s ended", self.input_fd)
        self._stop_watching()
        self.input_ended = True
