"""The device thread: one epoll loop that runs device work off the vCPU thread.

Queue notifications arrive on eventfds that KVM signals (ioeventfd), so a guest's kick
never stops its vCPU; the loop wakes, clears the eventfd and calls the device. Anything
else a device waits on (a tap, a console input fd) is registered the same way.

Callbacks are expected to contain their own failures (devices do: see
VirtioDevice.contain). An exception that still reaches the loop is a bug in minivmm: it
is logged with its traceback and reported through ``on_error``, which ends the VM as an
internal error, rather than leaving a guest waiting forever for a device that died.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class EventLoop:
    """epoll on a thread; callbacks run on that thread, one at a time."""

    def __init__(self, name: str = "devices", *,
                 on_error: Callable[[str], None] | None = None) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._on_error = on_error
        self._soon: deque[Callable[[], None]] = deque()
        self.lock = threading.RLock()
        self._resume: threading.Event | None = None

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

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread and close the loop's fds (idempotent). If the thread does not
        end in time (a device blocked in I/O), its fds are left open rather than closed
        under it."""
        if self._wake < 0:
            return
        self._stopping = True
        self.resume()
        os.eventfd_write(self._wake, 1)
        t = self._thread
        if t.is_alive() and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.error("the device thread did not stop within %.0f s; leaving it", timeout)
                return
        self._epoll.close()
        os.close(self._wake)
        self._wake = -1

    def pause(self, timeout: float = 10.0) -> bool:
        """Make the thread idle: wait until the callback running now (device work in
        progress) has returned, then hold the thread until :meth:`resume`. Events that
        arrive meanwhile stay pending (an eventfd keeps its count). True once idle
        (at once if the thread does not run, or if called from it)."""
        t = self._thread
        if self._resume is not None or not t.is_alive() or t is threading.current_thread():
            return True
        idle = threading.Event()
        resume = self._resume = threading.Event()

        def hold() -> None:
            idle.set()
            resume.wait()

        self.call_soon(hold)
        if idle.wait(timeout):
            return True
        self.resume()
        return False

    @property
    def pausing(self) -> bool:
        """A pause was asked for and not yet resumed (the thread may still be busy)."""
        return self._resume is not None

    def resume(self) -> None:
        resume, self._resume = self._resume, None
        if resume is not None:
            resume.set()

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
        except Exception as e:  # a bug in minivmm: say so and end the VM
            log.error("device thread: callback for fd %d failed", fd, exc_info=True)
            if self._on_error is not None:
                self._on_error(f"device thread: {type(e).__name__}: {e}")
