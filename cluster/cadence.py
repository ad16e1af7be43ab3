"""Periodic work on one grid of the monotonic clock, shared by every process of a host.

An idle cluster's CPU is its wake-ups: on the machines measured here a process waking
from a sleep costs 60-180 us of CPU whatever it then does (a gevent loop woken ten
times a second used 1.8 ms of CPU a second doing nothing else), against ~20 us for the
heartbeat or poll it woke for.  Each periodic loop kept its own phase, so an idle host
woke ~70 times a second (bench_idle).  A loop that sleeps until the next multiple of its
period on CLOCK_MONOTONIC (one clock for every process of the host) instead shares its
wake-ups with every other loop on that grid, in its process and in the others: a
worker's heartbeat, its timer claim and its stream reads run in one wake-up, and their
round trips reach Redis together.

Periods meant to share a grid divide one another (0.25, 0.5, 1, 2, 5 s: every multiple
of the longer is one of the shorter).  Work with a deadline of its own (a timer due, a
packet, a retransmission) does not wait for the grid; only "every so often" work does.
"""

from __future__ import annotations

import math
import time

# A wake-up this much before a grid point counts as on it: timers fire a little early
# or late (a loop's cached clock), and one that woke 1 ms before its point must not
# sleep 1 ms more for it.
EARLY = 0.01


def next_tick(now: float, period: float) -> float:
    """The first point of ``period``'s grid after ``now`` (at least EARLY after it)."""
    return (math.floor((now + EARLY) / period) + 1) * period


def until_next_tick(period: float, now: float | None = None) -> float:
    """Seconds from ``now`` (the monotonic clock's now by default) to ``next_tick``."""
    if now is None:
        now = time.monotonic()
    return next_tick(now, period) - now
