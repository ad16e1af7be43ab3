"""Media I/O around the pure call, the way h11's callers do I/O around ``send()``.

``decide`` runs one event of a call.  With a relay it runs the event once to learn
which SDP bodies the call sends through the media (``Answers.missing``), asks the relay
for each, in that order (offer or answer: a Redis read and a UDP exchange that may take
seconds), and runs the event again from the same record with the answers; the second
run's call and actions are the decision.  The relay is asked under the call's lock, as
before: its offer/answer order must follow the call's events.  Without a relay, or when
the event carries no SDP, the event runs once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .call.media import PASS_THROUGH, Answers, MediaPort

T = TypeVar("T")
ROUNDS = 3  # the bodies an event rewrites come from its input, so one round of asking does


def decide(event: Callable[[object], T], port: MediaPort) -> T:
    """``event(media)`` is the whole event on a fresh call (from the record, or a new
    one): it must build the call anew each time it is run."""
    if port.mode != "relay":
        return event(PASS_THROUGH)
    answers = Answers()
    for _ in range(ROUNDS):
        result = event(answers)
        if not answers.missing:
            return result
        for request in answers.missing:
            answers.known[request] = port.rewrite(
                request.tag, request.leg, request.body, offer=request.offer,
                peer_ip=request.peer_ip)
        answers.missing = []
    raise RuntimeError("a call kept asking for new media rewrites")
