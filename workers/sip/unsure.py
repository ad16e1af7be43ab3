"""Call writes whose reply was lost: Redis may hold them all the same.

A write that raised (a read timeout, a node of a Redis Cluster gone, memory refused half
way through its pipeline) may still have reached Redis: a paused server runs it when it
resumes, a timeout may fire with the reply already on its way, and the pipeline's timer
entries may be refused while the record's compare-and-set, after them, is taken.  The
shell sent nothing of such a write, so a landed one leaves a record that says "sent" for
messages nobody sent and, when its timer entries were refused, no retransmission timer
to send them later: a BYE that never reaches the callee, an INVITE that never rings.

So each one is remembered with the record it wrote and what it would have done, and
looked at again (``Outcome``): when Redis holds exactly that record, the write landed and
the shell carries it out late (its timers armed again, its sends and CDRs done); when only
its end landed and the call moved on since, its CDR is written; while the call is still
at the version the write was based on, it may land yet; otherwise it never will.
Pure bookkeeping: the shell (b2bua.py) reads Redis and acts."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.store import pack, unpack

from .call import Cdr, Out

# Seconds an unsure end is watched for (its CDR is at stake); any other write is watched
# as long as a retransmission could still depend on it (64 x T1).
KEEP_END = 600.0
KEEP = 32.0
MAX_CALLS = 10_000
PER_CALL = 8  # each repetition of a request that keeps failing tries a write of its own


@dataclass(frozen=True)
class Unsure:
    base: int  # the version the write was based on
    record: dict  # what it wrote, as Redis gives it back
    actions: tuple  # what it would have done: its sends and CDRs
    ended: float | None  # the end it wrote ("ended" is the write's own clock), if any
    until: float  # watched until (time.monotonic())


@dataclass(frozen=True)
class Outcome:
    actions: list  # to carry out now
    rearm: bool  # Redis holds this very write: arm its timers again
    left: list[Unsure]  # still to watch


class UnsureWrites:
    def __init__(self) -> None:
        self._calls: dict[str, list[Unsure]] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def tags(self) -> list[str]:
        return list(self._calls)

    def note(self, tag: str, base: int, record: dict, actions: list,
             ended: float | None, now: float) -> None:
        redo = tuple(a for a in actions if isinstance(a, (Out, Cdr)))
        cdrs = any(isinstance(a, Cdr) for a in redo)
        tries = self._calls.setdefault(tag, [])
        tries.append(Unsure(base, unpack(pack(record)), redo, ended if cdrs else None,
                            now + (KEEP_END if cdrs else KEEP)))
        del tries[:-PER_CALL]
        while len(self._calls) > MAX_CALLS:
            self._calls.pop(next(iter(self._calls)))

    def waiting(self, tag: str, version: int, now: float) -> bool:
        """Whether every write of ``tag`` may still land and none can have (the call is
        still at their base version): nothing to read but the version."""
        return all(t.base == version and now < t.until for t in self._calls.get(tag, ()))

    def look(self, tag: str, version: int, record: dict | None, now: float) -> Outcome:
        """What of ``tag``'s writes landed, given the call as Redis now holds it."""
        record = record or {}
        for t in self._calls.get(tag, ()):
            if record and t.record == record:
                return Outcome(list(t.actions), True, [])  # the others lost to it
        ended = record.get("ended")
        for t in self._calls.get(tag, ()):
            if t.ended is not None and t.ended == ended:
                # Its end landed and the call moved on since (its timers fired): only its
                # CDR was never written.
                return Outcome([a for a in t.actions if isinstance(a, Cdr)], False, [])
        left = [t for t in self._calls.get(tag, ()) if t.base == version and now < t.until]
        return Outcome([], False, left)

    def keep(self, tag: str, left: list[Unsure]) -> None:
        if left:
            self._calls[tag] = left
        else:
            self._calls.pop(tag, None)
