"""Streams: operator hang-up requests and the relays' media events, each read through a
consumer group (XREADGROUP, XAUTOCLAIM, XACK, the group made anew when Redis lost it), and
the CDR streams, read by id range.  The CDRs and media events are sharded (schema.py,
"Stream shards"): their readers read every shard in one pipeline and merge."""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from .connection import as_text, error_code, is_nogroup
from .schema import (
    CDR_LEGACY,
    CDR_STREAMS,
    HANGUP_GROUP,
    HANGUP_MAXLEN,
    HANGUP_STREAM,
    RELAY_EVENTS_LEGACY,
    RELAY_EVENTS_STREAMS,
)

# The CDR streams in merge order: the legacy stream first (position -1), then shard k
# (position k); see ``cdr_position``.
CDR_READ = ((-1, CDR_LEGACY), *enumerate(CDR_STREAMS))
# The media-event streams read, each with the name its events' ids carry.
EVENT_READ = ((*((str(k), key) for k, key in enumerate(RELAY_EVENTS_STREAMS)),
               ("l", RELAY_EVENTS_LEGACY)))
_EVENT_STREAM = dict(EVENT_READ)


def cdr_id(position: int, entry_id: str) -> str:
    """A CDR's id as readers see it: the entry id, and the shard unless it is the legacy
    stream's (whose ids stay what they were)."""
    return entry_id if position < 0 else f"{entry_id}-{position}"


def cdr_position(cdr: str) -> tuple[int, int, int]:
    """(ms, sequence, shard) of a CDR id: the merge order (time, then shard).  A plain
    "<ms>-<seq>" (the legacy stream's ids, a time bound) is shard -1."""
    ms, seq, *shard = cdr.split("-")
    return int(ms), int(seq), int(shard[0]) if shard else -1


def merge_pages(pages: list[tuple[int, list[tuple[str, dict]]]],
                count: int) -> list[tuple[str, dict]]:
    """The first ``count`` entries, in (id, shard) order, of shards read ``count`` each:
    ``pages`` holds (shard position, entries in id order).  A shard whose page is full may
    hold more past its last entry, so nothing beyond the lowest such last entry is taken
    (the entries up to it are all there: at least ``count`` of them)."""
    merged, bound = [], None
    for at, entries in pages:
        ids = [(cdr_id(at, eid), fields) for eid, fields in entries]
        merged += ids
        if len(entries) >= count and ids:
            last = cdr_position(ids[-1][0])
            bound = last if bound is None else min(bound, last)
    merged.sort(key=lambda entry: cdr_position(entry[0]))
    if bound is not None:
        merged = [entry for entry in merged if cdr_position(entry[0]) <= bound]
    return merged[:count]


def _entries(items) -> list[tuple[str, dict]]:
    """(id, fields as text) of stream entries; an entry deleted meanwhile has no fields."""
    return [(as_text(entry_id), {as_text(k): as_text(v) for k, v in fields.items()})
            for entry_id, fields in items if fields is not None]


class Streams:
    # ---------------------------------------------------------------- consumer groups
    def _group_create(self, stream: str, group: str, start: str = "0") -> None:
        """Create the consumer group (and the stream) unless it exists."""
        def create() -> None:
            try:
                self.redis.xgroup_create(stream, group, id=start, mkstream=True)
            except redis.ResponseError as exc:
                if error_code(exc) != "BUSYGROUP":  # (not BUSY: Redis running a long script)
                    raise

        self._call(create)

    def _grouped(self, stream: str, group: str, fn, *args, **kwargs):
        """A consumer-group command; when the group or its stream is gone (NOGROUP: Redis
        restarted empty, or someone deleted it), make the group anew from the stream's
        beginning and run it once more."""
        try:
            return self._call(fn, *args, **kwargs)
        except redis.ResponseError as exc:
            if not is_nogroup(exc):
                raise
        self._group_create(stream, group)
        return self._call(fn, *args, **kwargs)

    def _group_read(self, stream: str, group: str, consumer: str, count: int,
                    block_ms: int | None) -> list[tuple[str, dict]]:
        """New entries for this consumer (XREADGROUP >).  A blocking read must stay shorter
        than the store's socket timeout."""
        reply = self._grouped(stream, group, self.redis.xreadgroup, group, consumer,
                              {stream: ">"}, count=count, block=block_ms)
        return [entry for _stream, items in reply or [] for entry in _entries(items)]

    def _group_claim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                     count: int) -> list[tuple[str, dict]]:
        """Take over entries a dead consumer read but never acknowledged (XAUTOCLAIM)."""
        reply = self._grouped(stream, group, self.redis.xautoclaim, stream, group, consumer,
                              min_idle_ms, start_id="0-0", count=count)
        return _entries(reply[1])

    def _group_ack(self, stream: str, group: str, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        return int(self._call(self.redis.xack, stream, group, *ids))

    # ---------------------------------------------------------------- hang-ups
    # Requests that one live worker carries out: a dead worker's unacknowledged requests
    # are claimed by another.

    def post_hangup(self, tag: str, call_id: str, by: str, at: float | None = None) -> str:
        """Ask the workers to end call ``tag`` (BYE on both legs); the request's stream id."""
        fields = {"tag": tag, "call_id": call_id, "by": by,
                  "at": f"{time.time() if at is None else at:.3f}"}
        return as_text(self._call(self.redis.xadd, HANGUP_STREAM, fields,
                                  maxlen=HANGUP_MAXLEN, approximate=True))

    def hangup_group(self) -> None:
        """Create the workers' consumer group (and the stream) unless it exists.  It starts
        at the stream's beginning, so requests posted before any worker ran are not lost."""
        self._group_create(HANGUP_STREAM, HANGUP_GROUP)

    def read_hangups(self, consumer: str, count: int = 10,
                     block_ms: int | None = None) -> list[tuple[str, dict]]:
        return self._group_read(HANGUP_STREAM, HANGUP_GROUP, consumer, count, block_ms)

    def claim_stale_hangups(self, consumer: str, min_idle_ms: int,
                            count: int = 10) -> list[tuple[str, dict]]:
        return self._group_claim(HANGUP_STREAM, HANGUP_GROUP, consumer, min_idle_ms, count)

    def ack_hangups(self, ids: Iterable[str]) -> int:
        return self._group_ack(HANGUP_STREAM, HANGUP_GROUP, ids)

    # ---------------------------------------------------------------- media events
    # One group per shard (same name); ids carry their shard ("<shard>/<entry id>").
    _events_turn = 0  # the shard a blocking read waits on next

    def media_events_group(self, group: str, start: str = "0") -> None:
        for _name, stream in EVENT_READ:
            self._group_create(stream, group, start)

    def _each_shard(self, group: str, queue) -> list:
        """``queue(pipe, stream)`` for every media-event shard, in one pipeline; a shard
        whose group is gone (NOGROUP) gets it made again and its command run once more."""
        pipe = self.redis.pipeline(transaction=False)
        for _name, stream in EVENT_READ:
            queue(pipe, stream)
        replies = self._call(pipe.execute, raise_on_error=False)
        for index, reply in enumerate(replies):
            if isinstance(reply, Exception):
                stream = EVENT_READ[index][1]
                if not (isinstance(reply, redis.ResponseError) and is_nogroup(reply)):
                    self._raise_unavailable(reply)
                self._group_create(stream, group)
                again = self.redis.pipeline(transaction=False)
                queue(again, stream)
                replies[index] = self._call(again.execute)[0]
        return replies

    def read_media_events(self, group: str, consumer: str, count: int = 100,
                          block_ms: int | None = None) -> list[tuple[str, dict]]:
        """New events for this consumer from every shard (one pipeline); when there are none
        and ``block_ms`` is given, a blocking read of one shard, a different one each time
        (an event on another waits for the next call: the worker reads again at once)."""
        replies = self._each_shard(group, lambda pipe, stream: pipe.xreadgroup(
            group, consumer, {stream: ">"}, count=count))
        events = [(f"{name}/{eid}", fields)
                  for (name, _stream), reply in zip(EVENT_READ, replies, strict=True)
                  for _key, items in reply or [] for eid, fields in _entries(items)]
        if events or not block_ms:
            return events
        name, stream = EVENT_READ[self._events_turn % len(EVENT_READ)]
        self._events_turn += 1
        return [(f"{name}/{eid}", fields)
                for eid, fields in self._group_read(stream, group, consumer, count, block_ms)]

    def claim_stale_media_events(self, group: str, consumer: str, min_idle_ms: int,
                                 count: int = 100) -> list[tuple[str, dict]]:
        replies = self._each_shard(group, lambda pipe, stream: pipe.xautoclaim(
            stream, group, consumer, min_idle_ms, start_id="0-0", count=count))
        return [(f"{name}/{eid}", fields)
                for (name, _stream), reply in zip(EVENT_READ, replies, strict=True)
                for eid, fields in _entries(reply[1])]

    def ack_media_events(self, group: str, ids: Iterable[str]) -> int:
        by_stream: dict[str, list[str]] = {}
        for event_id in ids:
            name, _, entry_id = event_id.partition("/")
            by_stream.setdefault(_EVENT_STREAM[name], []).append(entry_id)
        if not by_stream:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_ids in by_stream.items():
            pipe.xack(stream, group, *entry_ids)
        return sum(int(n) for n in self._call(pipe.execute))

    # ---------------------------------------------------------------- CDRs
    def cdrs_after(self, after: str = "0-0", count: int = 10_000) -> list[dict]:
        """CDRs after ``after`` (a CDR's id, or "<ms>-<seq>" for a time), oldest first, at
        most ``count``; by default from the beginning.  Every shard is read (one pipeline),
        the pages merged by time, then shard (``cdr_position``)."""
        ms, seq, shard = cdr_position(after)
        pipe = self.redis.pipeline(transaction=False)
        for position, stream in CDR_READ:
            # Past the cursor: in a later shard an entry of the cursor's own id is; in this
            # one or an earlier one it is not.
            pipe.xrange(stream, min=f"{ms}-{seq}" if position > shard else f"({ms}-{seq}",
                        count=count)
        pages = [(position, [(as_text(eid), fields) for eid, fields in entries])
                 for (position, _stream), entries in zip(CDR_READ, self._call(pipe.execute),
                                                          strict=True)]
        return [{"id": cdr, **{as_text(k): as_text(v) for k, v in fields.items()}}
                for cdr, fields in merge_pages(pages, count)]
