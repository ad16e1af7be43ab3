"""Periodic work on one grid of the monotonic clock, shared by a process's loops.

An idle cluster's CPU is its wake-ups: on the machines measured here a process waking
from a sleep costs 60-180 us of CPU whatever it then does (a gevent loop woken ten
times a second used 1.8 ms of CPU a second doing nothing else), against ~20 us for the
heartbeat or poll it woke for.  Each periodic loop kept its own phase, so an idle host
woke ~70 times a second (bench_idle).  A loop that sleeps until the next multiple of its
period on CLOCK_MONOTONIC instead shares its
wake-ups with every other loop of its process on that grid: a worker's heartbeats, its
timer claim and its stream reads run in one wake-up.

Periods meant to share a grid divide one another (0.25, 0.5, 1, 2, 5 s: every multiple
of the longer is one of the shorter).  Work with a deadline of its own (a timer due, a
packet, a retransmission) does not wait for the grid; only "every so often" work does.

Each process shifts the grid by a phase of its own (``set_phase``, from its name), so
the loops of one process share their wake-ups but processes do not all wake at once:
workers reading the same consumer group (hang-up requests, media events) or claiming
timers would otherwise ask at the same instant, the first would take everything every
time, and a request would wait for the one shared point instead of the next worker's
(tests/integration/test_multihost.py, test_operator.py caught both).
"""

from __future__ import annotations

import math
import re
import time
import zlib

# A wake-up this much before a grid point counts as on it: timers fire a little early
# or late (a loop's cached clock), and one that woke 1 ms before its point must not
# sleep 1 ms more for it.
EARLY = 0.01


# This process's shift of the grid, in seconds (``set_phase``); 0 until it is set.
_phase = 0.0
PHASE_SPAN = 0.5  # phases are spread over this (the shortest period on the grid)


# Processes of one kind ("h1/worker-0", "h1/worker-1") are spread by their index in
# steps of the golden ratio's fraction: any n consecutive indexes then sit at least
# ~SPAN/(2n) apart.  A hash of the whole name put two workers of a host 45 ms apart
# (0.39 and 0.345 s), so a request shared through a consumer group waited for nearly
# one period instead of about half of one.
_GOLDEN = (math.sqrt(5) - 1) / 2


def phase_of(name: str) -> float:
    """A process's phase from its name (unique on the host: "h1/worker-1", "h1/relay-0").

    A trailing number is an index: the rest of the name places the kind, the index
    spreads its processes evenly."""
    match = _INDEXED.fullmatch(name)
    kind, index = (match[1], int(match[2])) if match else (name, 0)
    return math.fmod(zlib.crc32(kind.encode()) / 2**32 + index * _GOLDEN, 1.0) * PHASE_SPAN


_INDEXED = re.compile(r"(.*?)(\d+)")


def set_phase(seconds: float) -> None:
    """Shift this process's grid (once, at start)."""
    global _phase
    _phase = seconds


def set_phase_for(name: str) -> None:
    """Shift this process's grid by the phase of its name (``phase_of``)."""
    set_phase(phase_of(name))


def next_tick(now: float, period: float, phase: float | None = None) -> float:
    """The first point of ``period``'s grid (shifted by ``phase``, this process's by
    default) after ``now``, at least EARLY after it."""
    if phase is None:
        phase = _phase
    return (math.floor((now - phase + EARLY) / period) + 1) * period + phase


def until_next_tick(period: float, now: float | None = None) -> float:
    """Seconds from ``now`` (the monotonic clock's now by default) to ``next_tick``."""
    if now is None:
        now = time.monotonic()
    return next_tick(now, period) - now
