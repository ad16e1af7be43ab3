"""Operator requests the workers carry out: `sipctl hangup` posts to the ``hangup``
stream in Redis, and one live worker (whichever the consumer group hands the
request to) ends the call with a BYE on both legs.

A request is acknowledged once the call is ended or found gone, so a worker
that dies in between leaves it pending and another one claims it after
``CLAIM_AFTER`` seconds.  Requests older than ``MAX_AGE`` (posted while no
worker ran) are dropped: an operator who asked a minute ago has moved on.
"""

from __future__ import annotations

import contextlib
import logging
import time

import gevent

from cluster.backoff import Backoff
from cluster.cadence import until_next_tick
from cluster.logsetup import call_log
from cluster.store import StoreUnavailable

log = logging.getLogger("operator")
# Seconds between reads of the requests when none came: a `sipctl hangup` is carried out
# at most this much later.  A blocking read, capped at half the Redis timeout, kept an idle
# worker at ~7 reads a second.  The reads run on the worker's 0.5 s grid
# (cluster/cadence.py), in the wake-up of its timer claim: a round trip more, no wake-up
# more.  At 1 s the workers of a host, whose phases may lie close together, picked a
# request up as late as 1.1 s after it was made (test_operator).
POLL_SECONDS = 0.5
CLAIM_AFTER = 5.0  # seconds a request may stay read but unacknowledged before others take it
MAX_AGE = 60.0
SIDE = "operator"  # the CDR's hangup side


def hangup_loop(b2bua, store, consumer: str, spawn, counters) -> None:
    """Read hangup requests and carry them out (run in its own greenlet) as ``consumer``
    of the stream's group; ``spawn``: runs each request in the worker's pool."""
    grouped, next_claim = False, 0.0
    backoff = Backoff(log, "hangup requests")
    while b2bua.running:
        try:
            if not grouped:  # (the store makes it anew too, should Redis lose it later)
                store.hangup_group()
                grouped = True
            requests = store.read_hangups(consumer)
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + CLAIM_AFTER
                requests += store.claim_stale_hangups(consumer, int(CLAIM_AFTER * 1000))
        except Exception as exc:  # whatever it is, hangup requests go on being read
            gevent.sleep(backoff.failed(exc))
            continue
        backoff.ok()
        for entry_id, request in requests:
            spawn(carry_out, b2bua, store, counters, entry_id, request)
        if not requests:
            gevent.sleep(until_next_tick(POLL_SECONDS))


def carry_out(b2bua, store, counters, entry_id: str, request: dict) -> None:
    tag, call_id = request.get("tag", ""), request.get("call_id", "") or "-"
    clog = call_log(log, call_id)
    try:
        age = time.time() - float(request.get("at") or 0)
        if age > MAX_AGE:
            clog.info("call %s: hangup request from %s dropped, %.0f s old", tag,
                      request.get("by", "?"), age)
        elif b2bua.hangup(tag, side=SIDE):
            counters["operator_hangups"] += 1
            clog.info("call %s: hung up at the request of %s", tag, request.get("by", "?"))
        else:
            clog.info("call %s: hangup requested by %s, but the call is gone", tag,
                      request.get("by", "?"))
        store.ack_hangups([entry_id])
    except StoreUnavailable as exc:  # left pending: claimed again after CLAIM_AFTER
        clog.warning("call %s: hangup request not carried out yet: %s", tag, exc)
    except Exception:
        clog.exception("call %s: hangup request %s failed", tag, entry_id)
        with contextlib.suppress(StoreUnavailable):
            store.ack_hangups([entry_id])  # a request that fails would fail again
