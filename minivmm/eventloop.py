"""The device thread: one epoll loop that runs device work off the vCPU thread.

Queue notifications arrive on eventfds that KVM signals (ioeventfd), so a guest's kick
never stops its vCPU; the loop wakes, clears the eventfd and calls the device. Anything
else a device waits on (a tap, a console input fd) is registered the same way.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable

from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class EventLoop:
    """epoll on a thread; callbacks run on that thread, one at a time."""

    def __init__(self, name: str = "devices") -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._error_log = RateLimitedLog(log)
        self._soon: deque[Callable[[], None]] = deque()
        self.lock = threading.RLock()

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once on the loop thread (thread-safe)."""
        self._soon.append(callback)
        os.eventfd_write(self._wake, 1)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop thread whenever ``fd`` is readable."""
        with self.lock:
            if fd in self._callbacks:
                self._epoll.modify(fd, select.EPOLLIN)
            else:
                self._epoll.register(fd, select.EPOLLIN)
            self._callbacks[fd] = callback

    def remove_reader(self, fd: int) -> None:
        with self.lock:
            if self._callbacks.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._epoll.close()
        os.close(self._wake)

    def _run(self) -> None:
        poll = self._epoll.poll
        callbacks = self._callbacks
        while not self._stopping:
            try:
                events = poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    while self._soon:
                        self._call(self._soon.popleft(), fd)
                    continue
                cb = callbacks.get(fd)
                if cb is not None:
                    self._call(cb, fd)

    def _call(self, cb: Callable[[], None], fd: int) -> None:
        try:
            cb()
        except Exception as e:  # a device bug must not kill every device
            self._error_log("device callback for fd %d failed: %r", fd, e)
            log.debug("device callback failed", exc_info=True)
