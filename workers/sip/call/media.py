"""The call's side of media: the port the shell declares, and the pure views of it the
call machine sees.

Every SDP body that crosses from one leg to the other goes through ``rewrite``.  The
call never talks to a relay itself: in relay mode the shell runs the event once with
``Answers`` that know no rewrite yet, which notes each one the call asks for (and lets
the body through unchanged); the shell then asks the relay for those (the I/O, outside
the machine: workers/sip/mediastep.py) and runs the event again from the same record
with the relay's answers.  In bypass mode the call gets ``PASS_THROUGH`` and runs once.
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


@dataclass
class Answers:
    """Rewrites the shell already has from the relay; the ones it lacks are noted in
    ``missing`` (in the order the call asked) and their bodies pass unchanged meanwhile."""

    known: dict[MediaRequest, bytes] = field(default_factory=dict)
    missing: list[MediaRequest] = field(default_factory=list)

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        request = MediaRequest(tag, leg, body, offer, peer_ip)
        answer = self.known.get(request)
        if answer is None:
            if request not in self.missing:
                self.missing.append(request)
            return body
        return answer
