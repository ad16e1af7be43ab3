"""Keeps a background loop alive through trouble (design invariant 11).

Every background loop (heartbeats, timers, stream readers, pub/sub) catches every
exception of one iteration and hands it to a ``Backoff``, which logs it once per
streak (a loop that runs every 50 ms must not write a line each time Redis is
away), says how long to wait before the next try (bounded exponential, so a
Redis that is back is used again within ``limit`` seconds) and, on the first
iteration that works again, logs that the loop resumed.  The caller sleeps
(gevent or thread) and carries on, recreating what a fresh Redis lacks.
"""

from __future__ import annotations

import logging
import time

from .store import StoreUnavailable

FIRST = 0.1
LIMIT = 2.0


class Backoff:
    def __init__(self, log: logging.Logger, what: str, first: float = FIRST,
                 limit: float = LIMIT):
        self.log = log
        self.what = what
        self.first = first
        self.limit = limit
        self.delay = first
        self.failures = 0
        self.since = 0.0
        self._logged: type | None = None

    def failed(self, exc: BaseException) -> float:
        """Note a failed iteration; the seconds to wait before the next."""
        if not self.failures:
            self.since = time.monotonic()
        self.failures += 1
        if type(exc) is not self._logged:  # once per streak, and again if the trouble changes
            self._logged = type(exc)
            if isinstance(exc, StoreUnavailable):
                self.log.warning("%s: Redis unavailable (%s); retrying", self.what, exc)
            else:
                self.log.error("%s failed; retrying", self.what, exc_info=exc)
        delay = self.delay
        self.delay = min(self.delay * 2, self.limit)
        return delay

    def ok(self) -> None:
        """Note an iteration that worked: the end of a streak, if there was one."""
        if self.failures:
            self.log.info("%s: resumed after %d failed attempt(s) in %.1f s", self.what,
                          self.failures, time.monotonic() - self.since)
            self.failures = 0
            self.delay = self.first
            self._logged = None
