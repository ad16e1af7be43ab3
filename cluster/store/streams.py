"""Streams: operator hang-up requests and the relays' media events, each read through a
consumer group (one helper for both: XREADGROUP, XAUTOCLAIM, XACK, the group made anew when
Redis lost it), and the CDR stream, read by id range."""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from .connection import as_text, error_code, is_nogroup
from .schema import (
    CDR_STREAM,
    HANGUP_GROUP,
    HANGUP_MAXLEN,
    HANGUP_STREAM,
    RELAY_EVENTS_KEY,
)


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
    def media_events_group(self, group: str, start: str = "0") -> None:
        self._group_create(RELAY_EVENTS_KEY, group, start)

    def read_media_events(self, group: str, consumer: str, count: int = 100,
                          block_ms: int | None = None) -> list[tuple[str, dict]]:
        return self._group_read(RELAY_EVENTS_KEY, group, consumer, count, block_ms)

    def claim_stale_media_events(self, group: str, consumer: str, min_idle_ms: int,
                                 count: int = 100) -> list[tuple[str, dict]]:
        return self._group_claim(RELAY_EVENTS_KEY, group, consumer, min_idle_ms, count)

    def ack_media_events(self, group: str, ids: Iterable[str]) -> int:
        return self._group_ack(RELAY_EVENTS_KEY, group, ids)

    # ---------------------------------------------------------------- CDRs
    def cdrs_after(self, after: str = "0-0", count: int = 10_000) -> list[dict]:
        """CDRs with a stream id above ``after`` ("<ms>-<n>"), oldest first; by default
        from the stream's beginning."""
        entries = self._call(self.redis.xrange, CDR_STREAM, min=f"({after}", count=count)
        return [{"id": as_text(eid), **{as_text(k): as_text(v) for k, v in fields.items()}}
                for eid, fields in entries]
