"""util: opinionated helpers on top of a Queue.

* :class:`BufferedNotify` batches used-buffer interrupts: complete any number of chains,
  then ``flush()`` once; it interrupts only if chains were returned since the last flush
  and the driver wants to hear about them (``Queue.needs_notification``: EVENT_IDX or the
  NO_INTERRUPT flag).
* :class:`ChainStream` is an async iterator of chains for devices written with asyncio,
  woken by an ``asyncio.Event`` or a kick eventfd (ioeventfd). Before sleeping it
  re-enables notifications and re-checks the ring, so a kick is never lost.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from types import TracebackType

from .chain import DescriptorChain
from .queue import Queue

__all__ = ["BufferedNotify", "ChainStream"]


class BufferedNotify:
    """Batched used-buffer interrupts for one queue; ``interrupt`` raises one (an irqfd
    write, or the transport's InterruptStatus update). Use ``with`` or call ``flush``."""

    def __init__(self, queue: Queue, interrupt: Callable[[], None]) -> None:
        self._queue = queue
        self._interrupt = interrupt
        self._flushed = queue.next_used
        self.interrupts = 0
        """How many interrupts ``flush`` has raised."""

    @property
    def pending(self) -> bool:
        """True when chains were returned since the last flush."""
        return self._queue.next_used != self._flushed

    def flush(self) -> bool:
        """Interrupt the driver if it should hear about the chains returned since the last
        flush. Returns whether it interrupted."""
        q = self._queue
        used = q.next_used
        if used == self._flushed:
            return False
        self._flushed = used
        if not q.needs_notification():
            return False
        self.interrupts += 1
        self._interrupt()
        return True

    def __enter__(self) -> BufferedNotify:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.flush()


class ChainStream:
    """``async for chain in ChainStream(queue, kick)``: the queue's chains as they come.

    ``kick`` is an ``asyncio.Event`` the transport sets on QueueNotify, or the file
    descriptor of a kick eventfd (the stream reads it; it should be non-blocking).
    Errors from ``Queue.pop`` propagate; iteration ends after :meth:`close`.
    """

    def __init__(self, queue: Queue, kick: asyncio.Event | int) -> None:
        self._queue = queue
        self._fd = kick if isinstance(kick, int) else None
        self._event = kick if isinstance(kick, asyncio.Event) else asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __aiter__(self) -> ChainStream:
        return self

    async def __anext__(self) -> DescriptorChain:
        q = self._queue
        while not self._closed:
            chain = q.pop()
            if chain is not None:
                return chain
            if q.enable_notification():
                continue  # buffers arrived while notifications were off
            self._watch_fd()
            await self._event.wait()
            self._event.clear()
            if not self._closed:
                q.disable_notification()
        raise StopAsyncIteration

    def _watch_fd(self) -> None:
        if self._fd is not None and self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._on_kick)

    def _on_kick(self) -> None:
        assert self._fd is not None
        try:
            os.read(self._fd, 8)  # consume the eventfd counter
        except BlockingIOError:
            return
        self._event.set()

    def close(self) -> None:
        """End the iteration (a pending ``__anext__`` returns StopAsyncIteration)."""
        self._closed = True
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None
        self._event.set()
