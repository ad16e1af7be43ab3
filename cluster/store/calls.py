"""Calls: the call records (compare-and-set), their timers, their SIP traces and the
CDRs they end in."""

from __future__ import annotations

import random
import time
from typing import NamedTuple

from .connection import PIPELINE_BATCH, VERSION_STEP, StoreUnavailable, batches, pack, unpack
from .registrations import NonceAsk
from .schema import (
    CALLS_INDEX,
    CDR_MAXLEN,
    COUNTED_CALL_STATES,
    STREAM_SHARDS,
    TIMER_LEASE,
    TIMER_SHARDS,
    aor_of,
    call_key,
    cdr_key,
    parse_timer_member,
    relay_session_key,
    stream_shard,
    timer_key,
    timer_member,
    timer_shard,
    trace_key,
    user_key,
)


class Arrival(NamedTuple):
    """``load_call_and_answer``'s reads."""

    call: tuple[int, dict] | None
    answer: bytes | None
    session: dict | None
    user: dict | None
    # (accepted, callee's record, callee's live bindings) when a NonceAsk was given
    nonce: tuple | None = None


class TimerClaim(NamedTuple):
    """``claim_due_timers``'s answer: the timers claimed, (call tag, timer name, due), and
    the earliest due time left in any shard after the claim (None: no timer at all), so
    that the claimant can sleep until then instead of polling."""

    due: list[tuple[str, str, float]]
    next_due: float | None


def counted_state(record: dict) -> str:
    """The state a call counts under; '' for a relayed MESSAGE, which is no call."""
    if record.get("method", "INVITE") != "INVITE":
        return ""
    return str(record.get("state", ""))


class Calls:
    # ---------------------------------------------------------------- calls
    def load_call(self, tag: str) -> tuple[int, dict] | None:
        """(version, record) of a call, or None."""
        version, data = self._call(self.redis.hmget, call_key(tag), "v", "d")
        if data is None:
            return None
        return int(version), unpack(data)

    def load_call_and_answer(self, tag: str, tx: str, relayed: bool = False,
                             user: tuple[str, str] | None = None,
                             nonce: NonceAsk | None = None) -> Arrival:
        """What a request that may start a call needs first, in one round trip: the call
        (``load_call``), the answer kept under ``tx`` (``stored_answer``), when ``relayed``
        its relay session (``relay_session``), and the record of ``user`` (user, realm),
        when given (``get_user``); with ``nonce``, what ``nonce_count_and_user`` answers
        for it too (a caller whose credentials the worker could check before any read)."""
        def build(pipe):
            pipe.hmget(call_key(tag), "v", "d")
            pipe.get(tx)
            if relayed:
                pipe.get(relay_session_key(tag))
            if user is not None:
                pipe.get(user_key(aor_of(*user)))
            if nonce is not None:
                self._queue_nonce(pipe, nonce)
        replies = self._pipelined(build)
        counted = None
        if nonce is not None:
            counted, replies = self._nonce_replies(replies[-3:]), replies[:-3]
        (version, data), answer = replies[0], replies[1]
        session = unpack(replies[2]) if relayed and replies[2] is not None else None
        record = replies[-1] if user is not None else None
        return Arrival(None if data is None else (int(version), unpack(data)), answer or None,
                       session, None if record is None else unpack(record), counted)

    def save_call(self, tag: str, version: int, record: dict, ttl: float,
                  arm: list[tuple[str, str, float]] = (),
                  disarm: list[tuple[str, str, float]] = (),
                  packed: bytes | None = None) -> int | None:
        """Write a call record if it is still at ``version``; the new version, or None.
        ``packed``: the record already packed (``pack(record)``), when the caller has it.

        ``arm``: timers (tag, name, due) to add first, in the same round trip (their keys
        are in other slots, so not in the same script: arming first is the safe order).
        ``disarm``: timer entries (of any call) to remove, in that round trip too: removals
        waiting for their batch ride along instead of taking a round trip of their own.
        """
        def build(pipe):
            for timer_tag, name, due in arm:
                pipe.zadd(timer_key(timer_shard(timer_tag)),
                          {timer_member(timer_tag, name, due): due})
            for timer_tag, name, due in disarm:
                pipe.zrem(timer_key(timer_shard(timer_tag)), timer_member(timer_tag, name, due))
            self._evalsha(pipe, self._call_cas, [call_key(tag), *self.call_index_keys()],
                          [version, pack(record) if packed is None else packed,
                           int(ttl * 1000),
                           version + random.randrange(1, VERSION_STEP), counted_state(record),
                           tag, int(time.time() * 1000)])
            self._wait_replicas(pipe)  # right after the write: on a cluster, at its node
        replies = self._pipelined(build)
        self._waited(replies)
        new = replies[len(arm) + len(disarm)]
        return None if new < 0 else int(new)

    def call_version(self, tag: str) -> int:
        return int(self._call(self.redis.hget, call_key(tag), "v") or 0)

    def remove_timers(self, entries: list[tuple[str, str, float]]) -> None:
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for tag, name, due in entries:
            pipe.zrem(timer_key(timer_shard(tag)), timer_member(tag, name, due))
        self._call(pipe.execute)

    def claim_due_timers(self, now: float, lease: float = TIMER_LEASE,
                         limit: int = 100) -> TimerClaim:
        """Claim the due timers of every shard, and learn the next due time.  Each timer
        claimed comes due again ``lease`` seconds after ``now`` unless ``remove_timers``
        takes it out."""
        keys = [timer_key(shard) for shard in range(TIMER_SHARDS)]

        def build(pipe):
            # One run over every shard, but one per shard on a Redis Cluster (their slots).
            for group in ([[key] for key in keys] if self.on_cluster else [keys]):
                self._evalsha(pipe, self._pop_timers, group, [now, limit, lease])
        replies = self._pipelined(build)
        due = [parse_timer_member(m) for members, _ in replies for m in members]
        after = [float(first) for _, first in replies if first]
        return TimerClaim(due, min(after) if after else None)

    def call_index_keys(self) -> list[str]:
        if not self.indexed:
            return []
        return [CALLS_INDEX, *(f"{CALLS_INDEX}:{state}" for state in COUNTED_CALL_STATES)]

    # ---------------------------------------------------------------- traces, CDRs
    def add_trace(self, tag: str, entries: list[dict], limit: int, ttl: float) -> None:
        self.add_traces({tag: (entries, ttl)}, limit)

    def add_traces(self, pending: dict[str, tuple[list[dict], float]], limit: int) -> None:
        """Append the entries of several calls' traces (tag -> (entries in order, TTL))
        in one pipeline: per call one RPUSH, one LTRIM and the two EXPIREs below."""
        pipe = self.redis.pipeline(transaction=False)
        for tag, (entries, ttl) in pending.items():
            if not entries:
                continue
            key = trace_key(tag)
            pipe.rpush(key, *(pack(e) for e in entries))
            pipe.ltrim(key, -limit, -1)
            # Extend, never shorten: a short-lived entry (an attempt's challenge) written
            # after the call's own must not cut the call's trace short (EXPIRE GT leaves a
            # key without a TTL alone, hence NX first).
            pipe.expire(key, int(ttl), nx=True)
            pipe.expire(key, int(ttl), gt=True)
        if len(pipe):
            self._call(pipe.execute)

    def trace(self, tag: str) -> list[dict]:
        return [unpack(e) for e in self._call(self.redis.lrange, trace_key(tag), 0, -1)]

    def add_cdr(self, record: dict) -> None:
        """XADD a CDR (text fields) to the stream shard of its A-leg Call-ID.

        On a Redis Cluster the shards sit on different primaries: when the CDR's own shard
        cannot take it (its primary died and its replica is not promoted yet: several
        seconds), the next shard, on another node, does, so the CDR of a call whose record
        was written elsewhere is not lost with the failing node (the fault matrix lost 3 of
        200 that way).  The readers merge every shard, so a CDR is found wherever it went.
        On one Redis the shards share one server: there is no other to try."""
        fields = {k: ("" if v is None else str(v)) for k, v in record.items()}
        first = stream_shard(fields.get("a_call_id", ""))
        tries = STREAM_SHARDS if self.on_cluster else 1
        for n in range(tries):
            try:
                self._add_cdr_to(cdr_key((first + n) % STREAM_SHARDS), fields)
                return
            except StoreUnavailable:
                if n == tries - 1:
                    raise

    def _add_cdr_to(self, stream: str, fields: dict) -> None:
        maxlen = -(-CDR_MAXLEN // STREAM_SHARDS)
        if self.replica_wait[0] <= 0:
            self._call(self.redis.xadd, stream, fields, maxlen=maxlen, approximate=True)
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
        self._wait_replicas(pipe)
        self._waited(self._call(pipe.execute))

    def trace_heads(self, tags: list[str], count: int) -> dict[str, list[dict]]:
        """The first ``count`` trace entries of each call (the offer and answer are there)."""
        heads: dict[str, list[dict]] = {}
        for batch in batches(tags, PIPELINE_BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for tag in batch:
                pipe.lrange(trace_key(tag), 0, count - 1)
            for tag, entries in zip(batch, self._call(pipe.execute), strict=True):
                heads[tag] = [unpack(e) for e in entries]
        return heads
