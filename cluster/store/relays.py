"""RTP relays: their announcements (relay:nodes), their sessions' records and owned
indexes, and the media events they report.  Session records are text-only msgpack: the
refresh script reads their "relay" field with Lua's cmsgpack."""

from __future__ import annotations

import time
from collections.abc import Iterable

from .connection import pack, unpack
from .schema import (
    RELAY_EVENTS_MAXLEN,
    RELAY_NODES_KEY,
    RELAY_NODES_TTL,
    RELAY_OWNED_TTL_MIN,
    STREAM_SHARDS,
    proc_key,
    relay_events_key,
    relay_owned_key,
    relay_session_key,
    stream_shard,
)
from .surveys import index_process


class Relays:
    def relay_heartbeat(self, relay_id: str, info: dict, ttl: float) -> list[dict]:
        """Announce a relay and its load: in relay:nodes for workers, proc:relay:* for
        operators.  Returns every relay announced (``relay_nodes``), read in the same
        round trip: a relay looks at the others' heartbeats as often as it beats."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(RELAY_NODES_KEY, relay_id, pack(info))
        pipe.expire(RELAY_NODES_KEY, RELAY_NODES_TTL)
        key = proc_key("relay", info.get("host", ""), info.get("name", relay_id))
        pipe.set(key, pack(info), px=int(ttl * 1000))
        index_process(pipe, key, ttl)
        pipe.hgetall(RELAY_NODES_KEY)
        raw = self._call(pipe.execute)[-1]
        return [unpack(value) for value in raw.values()]

    def relay_nodes(self) -> list[dict]:
        """Every relay ever announced (live or not): callers judge liveness by its "seen"."""
        raw = self._call(self.redis.hgetall, RELAY_NODES_KEY)
        return [unpack(value) for value in raw.values()]

    def relay_forget(self, relay_ids: Iterable[str]) -> None:
        ids = list(relay_ids)
        if ids:
            self._call(self.redis.hdel, RELAY_NODES_KEY, *ids)

    def relay_save_sessions(self, relay_id: str,
                            sessions: Iterable[tuple[str, dict, float]],
                            drop: Iterable[str] = ()) -> None:
        """Create or overwrite session records (call id, record, ttl s): the relay owns them now.
        ``drop``: call ids whose sessions ended, deleted in the same round trip."""
        pipe = self.redis.pipeline(transaction=False)
        now_ms, longest = int(time.time() * 1000), 0
        for call_id, record, ttl in sessions:
            ttl_ms = int(ttl * 1000)
            pipe.set(relay_session_key(call_id), pack(record), px=ttl_ms)
            pipe.zadd(relay_owned_key(relay_id), {call_id: now_ms + ttl_ms})
            longest = max(longest, ttl_ms)
        if longest:
            # The index lives as long as the longest-lived session written through it lately.
            pipe.pexpire(relay_owned_key(relay_id), max(longest, RELAY_OWNED_TTL_MIN * 1000))
        ended = list(drop)
        for call_id in ended:
            pipe.delete(relay_session_key(call_id))
        if ended:
            pipe.zrem(relay_owned_key(relay_id), *ended)
        if longest or ended:
            self._call(pipe.execute)

    def relay_create_sessions(self, relay_id: str,
                              sessions: list[tuple[str, dict, float]]) -> None:
        """Write records of sessions whose first save failed (Redis was down when they were set
        up), unless a record exists by now: then it is newer news (another relay took the call
        over, or the first save landed after all) and the next refresh settles it."""
        if not sessions:
            return
        pipe = self.redis.pipeline(transaction=False)
        now_ms, longest = int(time.time() * 1000), 0
        for call_id, record, ttl in sessions:
            ttl_ms = int(ttl * 1000)
            pipe.set(relay_session_key(call_id), pack(record), px=ttl_ms, nx=True)
            pipe.zadd(relay_owned_key(relay_id), {call_id: now_ms + ttl_ms})
            longest = max(longest, ttl_ms)
        pipe.pexpire(relay_owned_key(relay_id), max(longest, RELAY_OWNED_TTL_MIN * 1000))
        self._call(pipe.execute)

    def relay_refresh_sessions(self, relay_id: str,
                               sessions: list[tuple[str, dict, float]]) -> list[int]:
        """Rewrite records this relay still owns; per session 1, 0 (gone) or -1 (taken over)."""
        if not sessions:
            return []
        now_ms = int(time.time() * 1000)
        longest = max(int(ttl * 1000) for _, _, ttl in sessions)

        def build(pipe) -> None:
            for call_id, record, ttl in sessions:
                self._refresh_session(pipe, relay_id, call_id, record, ttl)
                pipe.zadd(relay_owned_key(relay_id), {call_id: now_ms + int(ttl * 1000)})
            pipe.pexpire(relay_owned_key(relay_id), max(longest, RELAY_OWNED_TTL_MIN * 1000))
        replies = self._pipelined(build)
        return [int(reply) for reply in replies[0:2 * len(sessions):2]]

    def _refresh_session(self, pipe, relay_id: str, call_id: str, record: dict,
                         ttl: float) -> None:
        self._evalsha(pipe, self._relay_refresh, [relay_session_key(call_id)],
                      [relay_id, pack(record), int(ttl * 1000), record.get("version", 0)])

    def relay_drop_sessions(self, relay_id: str, call_ids: Iterable[str],
                            delete_records: bool = True) -> None:
        """Forget sessions: their records (unless another relay took them over) and index
        entries."""
        ids = list(call_ids)
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        if delete_records:
            for call_id in ids:
                pipe.delete(relay_session_key(call_id))
        pipe.zrem(relay_owned_key(relay_id), *ids)
        self._call(pipe.execute)

    def relay_session(self, call_id: str) -> dict | None:
        data = self._call(self.redis.get, relay_session_key(call_id))
        return None if data is None else unpack(data)

    def relay_owned_sessions(self, relay_id: str) -> list[dict]:
        """The live session records a relay owns, for its restart; stale index entries go."""
        key = relay_owned_key(relay_id)
        self._call(self.redis.zremrangebyscore, key, "-inf", int(time.time() * 1000))
        call_ids = [m.decode() for m in self._call(self.redis.zrange, key, 0, -1)]
        if not call_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for call_id in call_ids:
            pipe.get(relay_session_key(call_id))
        records, gone = [], []
        for call_id, data in zip(call_ids, self._call(pipe.execute), strict=True):
            record = None if data is None else unpack(data)
            if record is None or record.get("relay") != relay_id:
                gone.append(call_id)
            else:
                records.append(record)
        if gone:
            self._call(self.redis.zrem, key, *gone)
        return records

    def relay_report_event(self, event: dict,
                           sessions: Iterable[tuple[str, dict, float]] = (),
                           relay_id: str = "") -> str:
        """XADD a media event (text fields) to the stream shard of its Call-ID and, in the same
        round trip, save the session records that say it was reported, so a restarted relay
        does not report it again.  The event's id as the readers give it."""
        shard = stream_shard(str(event.get("call_id", "")))

        def build(pipe) -> None:
            pipe.xadd(relay_events_key(shard), {k: str(v) for k, v in event.items()},
                      maxlen=-(-RELAY_EVENTS_MAXLEN // STREAM_SHARDS), approximate=True)
            for call_id, record, ttl in sessions:
                self._refresh_session(pipe, relay_id, call_id, record, ttl)
        return f"{shard}/{self._pipelined(build)[0].decode()}"
