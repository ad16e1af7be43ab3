"""The call's side of media: the port the shell declares, and the pure views of it the
call machine sees.

Every SDP body that crosses from one leg to the other goes through ``rewrite``.  The
call never talks to a relay itself: in relay mode the shell runs the event with
``Answers``; the first rewrite it does not know stops the run (``MediaNeeded``, which
the call machine never catches); the shell asks the relay for it (the I/O, outside the
machine: workers/sip/mediastep.py) and runs the event again from the same record, now
with that answer.  In bypass mode the call gets ``PASS_THROUGH`` and runs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class MediaPort(Protocol):
    """What the shell holds (workers/sip/media.py: Bypass or Relayed): it may do I/O."""

    mode: str  # "bypass" or "relay"

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool,
                peer_ip: str) -> bytes: ...

    def end(self, tag: str) -> dict | None: ...


@dataclass(frozen=True)
class MediaRequest:
    """One SDP body of call ``tag`` from leg ``leg``, to go through the media."""

    tag: str
    leg: str
    body: bytes
    offer: bool
    peer_ip: str


class PassThrough:
    """Bypass media: SDP goes from leg to leg unchanged."""

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        return body


PASS_THROUGH = PassThrough()


class MediaNeeded(Exception):  # noqa: N818 - a request to the shell, not an error
    """The call needs this rewrite before it can go on (the shell catches it)."""

    def __init__(self, request: MediaRequest) -> None:
        super().__init__(request)
        self.request = request


@dataclass
class Answers:
    """The rewrites the shell already has from the relay, in the order it got them."""

    known: dict[MediaRequest, bytes] = field(default_factory=dict)

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        request = MediaRequest(tag, leg, body, offer, peer_ip)
        answer = self.known.get(request)
        if answer is None:
            raise MediaNeeded(request)
        return answer
