"""Rate-limited logging: a hostile guest must not be able to flood the host's log."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs at most ``burst`` messages per ``interval`` seconds, then counts the rest and
    says how many were suppressed when logging resumes."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval: float = 5.0,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.level = level
        self._window_start = 0.0
        self._count = 0
        self.suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.interval:
            if self.suppressed:
                self.logger.log(self.level, "(%d similar messages suppressed)", self.suppressed)
            self._window_start = now
            self._count = 0
            self.suppressed = 0
        if self._count < self.burst:
            self._count += 1
            self.logger.log(self.level, msg, *args)
        else:
            self.suppressed += 1
