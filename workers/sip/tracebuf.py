"""Call traces written in batches: a worker's traced messages wait here a short tick, then
every call's pending entries go to Redis together in one pipeline.

Written one event at a time (an RPUSH, LTRIM and EXPIRE pair each), traces took 60 of a
call's 128 Redis commands.  Batched, a call's entries of one tick take one RPUSH, one LTRIM
and one EXPIRE pair, and the worker one round trip per tick for all its calls.  Measured
(shipped configuration, 2 workers, 40 calls/s for 10 s, bench_scale.py's helpers, four
runs each, interleaved, same machine): Redis commands per call 128 -> 89 (rpush and ltrim
12 -> 2.3, expire 24 -> 4.5: a call's entries go out in ~2.3 batches, one of them the
CDR's), round trips per call 39 -> 29, CPU per call 18.4-22.4 -> 12.9-18.7 ms (workers
13.6-16.7 -> 9.6-13.8, redis-server 2.1-2.6 -> 1.4-2.0; noisy on 2 shared cores).

Order: entries of a call are appended in the order this worker traced them; flushes do
not overlap (a lock), so an earlier tick's entries land before a later one's.  Entries of
one call traced by two workers within one tick may interleave by worker, as they could
before by a few milliseconds.
"""

from __future__ import annotations

import logging

import gevent
import gevent.event
import gevent.lock

from cluster.backoff import Backoff

log = logging.getLogger("trace")
FLUSH_EVERY = 0.05  # seconds an entry may wait; `sipctl call` right after a call may lag this
FLUSH_AT = 200  # pending entries that start a flush before the tick
MAX_PENDING = 20_000  # entries held while Redis does not take them; beyond, dropped (counted)


class TraceBuffer:
    def __init__(self, store, limit: int, counters):
        self.store = store
        self.limit = limit
        self.counters = counters
        # call tag -> [entries in order, TTL (the longest asked for)]
        self._pending: dict[str, list] = {}
        self._count = 0
        self._lock = gevent.lock.Semaphore()
        self._wake = gevent.event.Event()  # flush now: FLUSH_AT entries wait, or closing
        # Something waits: an idle worker's loop sleeps on this instead of ticking (at 20
        # ticks a second, the tick was a third of an idle worker's CPU: bench_idle).
        self._waiting = gevent.event.Event()
        self.running = True

    def add(self, tag: str, entries: list[dict], ttl: float) -> None:
        if not entries:
            return
        if self._count + len(entries) > MAX_PENDING:
            self.counters["trace_lost"] += len(entries)
            return
        slot = self._pending.get(tag)
        if slot is None:
            self._pending[tag] = [list(entries), ttl]
        else:
            slot[0].extend(entries)
            slot[1] = max(slot[1], ttl)
        self._count += len(entries)
        self._waiting.set()
        if self._count >= FLUSH_AT:
            self._wake.set()

    def flush(self) -> None:
        """Write what is pending; raises what the store raised (StoreUnavailable) after
        counting the entries lost."""
        with self._lock:  # after any flush in flight, so a call's entries keep their order
            batch, self._pending = self._pending, {}
            lost = sum(len(entries) for entries, _ in batch.values())
            self._count -= lost
            if not batch:
                return
            try:
                self.store.add_traces({t: (e, ttl) for t, (e, ttl) in batch.items()},
                                      self.limit)
            except Exception:  # the trace is for people; a call never waits on it
                self.counters["trace_lost"] += lost
                raise

    def loop(self) -> None:
        backoff = Backoff(log, "call traces")
        while self.running:
            self._waiting.wait()
            self._wake.wait(FLUSH_EVERY)  # the tick: entries of other calls gather
            self._wake.clear()
            self._waiting.clear()  # before the flush: what comes during it sets it again
            try:
                self.flush()
            except Exception as exc:  # whatever it is, the next tick tries again
                gevent.sleep(backoff.failed(exc))
                continue
            backoff.ok()

    def close(self) -> None:
        """Shutdown: write what is pending (best effort), stop the loop."""
        self.running = False
        self._wake.set()
        self._waiting.set()
        try:
            self.flush()
        except Exception as exc:
            log.warning("call trace entries lost at exit: %s", exc)
