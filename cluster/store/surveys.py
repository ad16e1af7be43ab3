"""Operator surveys: the process and host announcements, and what sipctl and the metrics
endpoint read across the cluster (counts from the counting indexes, or surveyed by SCAN on
a Redis Cluster; live calls; processes), with pipelines so a listing costs few round trips."""

from __future__ import annotations

import time
from collections.abc import Iterable

from .calls import counted_state
from .connection import PIPELINE_BATCH, as_text, batches, pack, unpack
from .schema import (
    CALLS_INDEX,
    COUNTED_CALL_STATES,
    HOSTS_KEY,
    HOSTS_TTL,
    PROCS_INDEX,
    REG_AORS_INDEX,
    REG_CONTACTS_INDEX,
    call_key,
    host_key,
    proc_key,
    streams_key,
)


def index_process(pipe, key: str, ttl: float) -> None:
    """Add a heartbeat to the process index (in the heartbeat's own pipeline)."""
    now_ms = int(time.time() * 1000)
    pipe.zadd(PROCS_INDEX, {key: now_ms + int(ttl * 1000)})
    pipe.zremrangebyscore(PROCS_INDEX, "-inf", now_ms)


class Surveys:
    # ---------------------------------------------------------------- processes, hosts
    def heartbeat(self, role: str, host: str, name: str, info: dict, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(proc_key(role, host, name), pack(info), px=int(ttl * 1000))
        index_process(pipe, proc_key(role, host, name), ttl)
        self._call(pipe.execute)

    def announce_host(self, host: str, info: dict, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(host_key(host), pack(info), px=int(ttl * 1000))
        pipe.hset(HOSTS_KEY, host, pack({**info, "seen": time.time()}))
        pipe.expire(HOSTS_KEY, HOSTS_TTL)
        self._call(pipe.execute)

    # ---------------------------------------------------------------- SIP connections
    def streams_reset(self, host: str) -> None:
        self._call(self.redis.delete, streams_key(host))

    def stream_opened(self, host: str, conn: int, info: dict) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(streams_key(host), str(conn), pack(info))
        pipe.expire(streams_key(host), HOSTS_TTL)
        self._call(pipe.execute)

    def stream_closed(self, host: str, conn: int) -> None:
        self._call(self.redis.hdel, streams_key(host), str(conn))

    def stream_open(self, host: str, conn: int) -> bool:
        """Whether connection ``conn`` of ``host``'s dispatcher is still open."""
        return bool(self._call(self.redis.hexists, streams_key(host), str(conn)))

    def hosts(self) -> dict[str, dict]:
        """Every host announced (live or not: callers judge by "seen")."""
        raw = self._call(self.redis.hgetall, HOSTS_KEY)
        return {key.decode(): unpack(value) for key, value in raw.items()}

    def host_info(self, host: str) -> dict | None:
        data = self._call(self.redis.get, host_key(host))
        return None if data is None else unpack(data)

    def processes(self, role: str | None = None) -> list[dict]:
        found = [unpack(data) for data in self.indexed_processes(role) if data is not None]
        return sorted(found, key=lambda p: (p.get("role", ""), p.get("host", ""),
                                            p.get("name", "")))

    def indexed_processes(self, role: str | None = None) -> list[bytes | None]:
        """The packed heartbeats of the live processes (of one role): two commands, no SCAN."""
        now_ms = int(time.time() * 1000)
        keys = [as_text(k) for k in self._call(self.redis.zrangebyscore, PROCS_INDEX,
                                              f"({now_ms}", "+inf")]
        if role:
            keys = [k for k in keys if k.startswith(f"proc:{role}:")]
        if not keys:
            return []
        if self.indexed:
            return self._call(self.redis.mget, keys)
        pipe = self.redis.pipeline(transaction=False)  # one GET per slot's node, one round trip
        for key in keys:
            pipe.get(key)
        return self._call(pipe.execute)

    def indexed_aors(self, now: float | None = None) -> list[str]:
        """AORs with a binding that has not expired (from the index: no SCAN)."""
        now_ms = int((time.time() if now is None else now) * 1000)
        return [as_text(a) for a in self._call(self.redis.zrangebyscore, REG_AORS_INDEX,
                                              f"({now_ms}", "+inf")]

    def live_counts(self, now: float | None = None) -> dict:
        """Registrations and calls by state, from the indexes in one round trip:
        {"aors", "contacts", "calls": {state: n}, "calls_last_minute"}."""
        if not self.indexed:
            return self.surveyed_counts(now)
        now_ms = int((time.time() if now is None else now) * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcount(REG_AORS_INDEX, f"({now_ms}", "+inf")
        pipe.zcount(REG_CONTACTS_INDEX, f"({now_ms}", "+inf")
        pipe.zcount(CALLS_INDEX, now_ms - 60_000, "+inf")
        for state in COUNTED_CALL_STATES:
            pipe.zcount(f"{CALLS_INDEX}:{state}", f"({now_ms}", "+inf")
        aors, contacts, created, *states = self._call(pipe.execute)
        return {"aors": int(aors), "contacts": int(contacts), "calls_last_minute": int(created),
                "calls": {s: int(n) for s, n in zip(COUNTED_CALL_STATES, states, strict=True)}}

    def surveyed_counts(self, now: float | None = None) -> dict:
        """live_counts by SCAN over every primary (a Redis Cluster, where the scripts keep no
        index): its cost grows with the registrations and calls."""
        now = time.time() if now is None else now
        aors = contacts = 0
        for keys in batches(self._scan("reg:*"), PIPELINE_BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.hvals(key)
            for values in self._call(pipe.execute):
                live = sum(1 for v in values if unpack(v).get("expires_at", 0) > now * 1000)
                aors += bool(live)
                contacts += live
        calls = dict.fromkeys(COUNTED_CALL_STATES, 0)
        last_minute = 0
        for _tag, record in self.call_records():
            state = counted_state(record)
            if state in calls:
                calls[state] += 1
            last_minute += record.get("created", 0) >= now - 60
        return {"aors": aors, "contacts": contacts, "calls_last_minute": last_minute,
                "calls": calls}

    def call_records(self) -> list[tuple[str, dict]]:
        """(tag, record) of every call in Redis: live ones and those ended lately (a SCAN)."""
        return self._call_records_of(key[len("call:{"):-1] for key in self._scan("call:*"))

    def live_call_records(self, now: float | None = None) -> list[tuple[str, dict]]:
        """(tag, record) of the calls not ended, found through the state indexes (no SCAN):
        what ``sipctl calls`` lists.  On a Redis Cluster the scripts keep no index (see
        Connection.indexed): there the calls are surveyed, the same list by SCAN."""
        if not self.indexed:
            return [(tag, record) for tag, record in self.call_records()
                    if counted_state(record) in COUNTED_CALL_STATES]
        now_ms = int((time.time() if now is None else now) * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for state in COUNTED_CALL_STATES:
            pipe.zrangebyscore(f"{CALLS_INDEX}:{state}", f"({now_ms}", "+inf")
        tags = sorted({as_text(t) for found in self._call(pipe.execute) for t in found})
        return self._call_records_of(tags)

    def _call_records_of(self, tags: Iterable[str]) -> list[tuple[str, dict]]:
        """(tag, record) of the calls among ``tags`` that still have a record, pipelined."""
        records = []
        for batch in batches(tags, PIPELINE_BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for tag in batch:
                pipe.hget(call_key(tag), "d")
            for tag, data in zip(batch, self._call(pipe.execute), strict=True):
                if data is not None:
                    records.append((tag, unpack(data)))
        return records
