"""The worker's call trace buffer (workers/sip/tracebuf.py): what one flush hands the store.
The store's side (one RPUSH, LTRIM and EXPIRE pair per call against a real redis-server)
is exercised by every integration test that reads a trace."""

from __future__ import annotations

from collections import Counter

import gevent
import pytest

from cluster.store import StoreUnavailable
from workers.sip import tracebuf
from workers.sip.tracebuf import TraceBuffer


class Recorder:
    """Keeps what each add_traces call was given; fails while ``down``."""

    def __init__(self):
        self.batches: list[dict] = []
        self.down = False

    def add_traces(self, pending, limit):
        if self.down:
            raise StoreUnavailable("down")
        self.batches.append({tag: (list(entries), ttl) for tag, (entries, ttl) in pending.items()})


def entry(n: int) -> dict:
    return {"first": f"m{n}"}


def test_one_flush_carries_every_call_in_order_with_its_longest_ttl():
    store, counters = Recorder(), Counter()
    buf = TraceBuffer(store, 200, counters)
    buf.add("a", [entry(1)], 32.0)  # an attempt's challenge: brief
    buf.add("b", [entry(2), entry(3)], 3600.0)
    buf.add("a", [entry(4), entry(5)], 3600.0)
    buf.add("a", [], 5.0)
    buf.flush()
    assert store.batches == [{"a": ([entry(1), entry(4), entry(5)], 3600.0),
                              "b": ([entry(2), entry(3)], 3600.0)}]
    buf.flush()  # nothing pending: no round trip
    assert len(store.batches) == 1 and not counters


def test_brief_entries_alone_keep_the_brief_ttl():
    store = Recorder()
    buf = TraceBuffer(store, 200, Counter())
    buf.add("a", [entry(1)], 32.0)
    buf.flush()
    assert store.batches == [{"a": ([entry(1)], 32.0)}]


def test_a_failed_flush_counts_its_entries_lost_and_a_full_buffer_drops(monkeypatch):
    monkeypatch.setattr(tracebuf, "MAX_PENDING", 3)
    store, counters = Recorder(), Counter()
    buf = TraceBuffer(store, 200, counters)
    buf.add("a", [entry(1), entry(2)], 60.0)
    buf.add("b", [entry(3), entry(4)], 60.0)  # would make 4 > 3: dropped
    assert counters["trace_lost"] == 2
    store.down = True
    with pytest.raises(StoreUnavailable):
        buf.flush()
    assert counters["trace_lost"] == 4
    store.down = False
    buf.add("c", [entry(5), entry(6), entry(7)], 60.0)  # room again after the failed flush
    buf.flush()
    assert store.batches == [{"c": ([entry(5), entry(6), entry(7)], 60.0)}]
    assert counters["trace_lost"] == 4


def test_close_writes_what_is_pending_and_stops_the_loop():
    store = Recorder()
    buf = TraceBuffer(store, 200, Counter())
    buf.add("a", [entry(1)], 60.0)
    buf.close()
    assert store.batches == [{"a": ([entry(1)], 60.0)}] and not buf.running
    buf.loop()  # returns at once


def test_an_idle_buffer_sleeps_until_an_entry_comes():
    store = Recorder()
    buf = TraceBuffer(store, 200, Counter())
    flushes = []
    flush = buf.flush
    buf.flush = lambda *args, **kwargs: flushes.append(1) or flush(*args, **kwargs)
    loop = gevent.spawn(buf.loop)
    gevent.sleep(10 * tracebuf.FLUSH_EVERY)
    assert flushes == []  # no tick while nothing waits
    buf.add("a", [entry(1)], 60.0)
    gevent.sleep(4 * tracebuf.FLUSH_EVERY)
    assert store.batches == [{"a": ([entry(1)], 60.0)}] and len(flushes) == 1
    buf.add("b", [entry(2)], 60.0)  # and again after a flush
    gevent.sleep(4 * tracebuf.FLUSH_EVERY)
    assert store.batches[1:] == [{"b": ([entry(2)], 60.0)}] and len(flushes) == 2
    buf.close()
    loop.join(1.0)
    assert loop.dead
