"""One leg of a call: the caller's ("a") or one fork towards a contact of the callee
("b0", "b1"...), with its dialog and progress, as stored in the call record."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum


class LegState(StrEnum):
    """Where one leg is.  Values are what the record stores (text)."""

    CALLING = "calling"  # its INVITE is out (B) or in (A), no provisional yet beyond 100
    EARLY = "early"  # a provisional came (B) or went to the caller (A)
    ANSWERED = "answered"  # a 2xx came (B) or went to the caller (A)
    FAILED = "failed"  # a final failure (or Timer B, 408); or cancelled after its final
    # Another fork won or the caller gave up before this fork answered: our CANCEL is out,
    # or held until its first provisional (RFC 3261 9.1: no CANCEL before one).  It no
    # longer counts as ringing; its 487 leaves it here, a 1xx makes it early again (and
    # sends the held CANCEL), a crossing 2xx gets ACK and BYE.
    CANCELLING = "cancelling"
    ENDED = "ended"  # we sent its BYE (or the BYE's transaction answered)


RINGING = (LegState.CALLING, LegState.EARLY)  # a fork that may still answer


@dataclass
class Leg:
    name: str
    call_id: bytes
    peer: tuple[str, int]
    host: str
    sock_index: int
    local_tag: str
    user: str
    state: LegState = LegState.CALLING
    dialog: dict | None = None
    invite_key: str = ""
    target: bytes = b""
    final: int = 0
    provisional: bool = False
    cancel_pending: bool = False
    reason_phrase: str = ""
    route: int = -1
    auth_tried: bool = False
    cancel_reason: list | None = None  # the Reason a CANCEL held back for a 1xx will carry
    last_ack: bytes = b""  # our ACK for this leg's 2xx, sent again for a repeated 2xx
    # Further dialogs of this leg's INVITE: a forking proxy downstream let more than one
    # phone answer it (RFC 3261 13.2.2.4).  Each got our ACK and BYE at once; remote tag
    # -> that ACK, sent again for a repeated 2xx.  Replaced, never changed in place (the
    # record is a shallow copy).
    stray: dict[str, bytes] = field(default_factory=dict)

    def to_record(self) -> dict:
        # Shallow on purpose: every field is a plain value or an already plain record
        # (dataclasses.asdict deep-copies, and was the costliest step of a call event).
        record = {f.name: getattr(self, f.name) for f in _LEG_FIELDS}
        record["peer"] = list(self.peer)
        stray = record.pop("stray")
        if stray:  # left out when empty (nearly always): the record stays as it was
            record["stray"] = dict(stray)
        return record

    @classmethod
    def from_record(cls, record: dict) -> Leg:
        record = dict(record)
        record["peer"] = tuple(record["peer"])
        record["state"] = LegState(record["state"])
        record["stray"] = dict(record.get("stray") or {})
        return cls(**record)

    @property
    def held_reason(self) -> tuple[str, int] | None:
        """The Reason a CANCEL held for this leg's first provisional carries."""
        return tuple(self.cancel_reason) if self.cancel_reason else None


_LEG_FIELDS = fields(Leg)
