"""Answers sent outside any transaction, and the retransmission absorber over them.

Every stateless answer of a worker (the registrar's, the B2BUA's refusals, the
worker's 4xx/5xx from the parser or the store, the 503 of admission control) is
built here, with a fresh To tag and the Server header.  What a copy of an
answered request finds again lives here too, in three places, cheapest first:

  - ``working``: requests being handled by this worker (a copy is dropped);
  - ``recent``: final answers this worker sent, kept for Timer J (a copy gets the
    same bytes again, not a second challenge or failure count);
  - ``pending``: answers to keep in Redis under their transaction key, written in
    batches (``keep``); a copy finds them here until the batch is written.

Affinity brings a request's copies to the worker that got the first one.
"""

from __future__ import annotations

import logging
import time

import gevent

from cluster.bounded import BoundedCache
from cluster.sip import scan
from cluster.sip.errors import SipError
from cluster.sip.message import Request, Response, build_response, error_response
from cluster.sip.transaction import response_dest
from cluster.store import StoreUnavailable

log = logging.getLogger("worker")
RECENT_ANSWERS = 50_000  # stateless answers remembered for retransmissions
# ... and the bytes they may take.  A typical entry (key ~100 B, a 401 or 200 of ~500 B, ~200 B
# of objects) costs ~800 B: 16 MB keeps ~20,000, the answers of the last ~6 s at 3,500
# REGISTERs/s on one worker (more than the prototype's whole-cluster peak), and copies come
# within T2 (4 s) but for the last of Timer J's.  Junk with large Call-IDs (remembered twice:
# in the key and in the answer that echoes it) grew a worker by ~350 MB when only the count
# bounded it.
RECENT_ANSWERS_BYTES = 16 * 1024 * 1024
ANSWER_BATCH_SECONDS = 0.002


class Answers:
    """``transport``: sends (``send(data, dest, sock_index=...)``); ``store``: where kept
    answers are written; ``new_tag``: the To tag of each answer; ``server``: the Server
    header's value; ``tx_ttl``: how long an answer is kept (Timer J, 64*T1)."""

    def __init__(self, transport, store, *, new_tag, server: bytes, tx_ttl: float,
                 counters):
        self.transport = transport
        self.store = store
        self.new_tag = new_tag
        self.server = server
        self.tx_ttl = tx_ttl
        self.counters = counters
        self.working: set[bytes] = set()  # marks of the requests being handled here
        # Request mark -> (until, answer, destination).
        self.recent = BoundedCache(RECENT_ANSWERS, RECENT_ANSWERS_BYTES)
        self.pending: dict[str, bytes] = {}  # answers waiting for the next batch write

    # ---------------------------------------------------------------- the absorber
    def absorb(self, mark: bytes | None, sock_index: int) -> bool:
        """Whether a request with ``mark`` is a copy of one in hand here (dropped) or
        answered here (its answer sent again); otherwise it is taken as in hand."""
        if mark is None:
            return False
        if mark in self.working:
            self.counters["retransmissions_absorbed"] += 1
            return True
        answered = self.recent.get(mark)
        if answered is not None and answered[0] > time.monotonic():
            self.counters["retransmissions_answered"] += 1
            self.transport.send(answered[1], answered[2], sock_index=sock_index)
            return True
        self.working.add(mark)
        return False

    def done(self, mark: bytes | None) -> None:
        """The request ``mark`` is no longer in hand here."""
        self.working.discard(mark)

    def remember(self, req: Request, data: bytes, dest: tuple[str, int],
                 made_tag: str | None = None) -> None:
        """A final answer sent outside any transaction (a 401, 403, 404...): a copy of the
        request gets the same bytes again, not a new challenge or a second failure count
        (affinity brings the copies to this worker).  Kept for Timer J (64*T1)."""
        if req.method == "ACK":
            return
        mark = request_mark(req.call_id, (req.via.branch or "").encode(), req.method)
        recent, now = self.recent, time.monotonic()
        # ``made_tag``: the To tag this answer made for a request outside any dialog; its
        # ACK carries it (``acks_stateless``).
        recent.put(mark, (now + self.tx_ttl, data, dest, made_tag), len(mark) + len(data))
        while (oldest := recent.oldest()) is not None and oldest[1][0] < now:
            recent.pop_oldest()

    def acks_stateless(self, ack: Request) -> bool:
        """Whether ``ack`` acknowledges a final answer given here outside any dialog (a
        challenge, a 404): same Call-ID and branch as that INVITE (RFC 3261 17.1.1.3) and
        the To tag the answer made, which no call's dialog has.  No call needs it then;
        one that came to another worker is looked up as any other."""
        tag = ack.to.tag
        if tag is None:
            return False
        answered = self.recent.get(
            request_mark(ack.call_id, (ack.via.branch or "").encode(), "INVITE"))
        return answered is not None and answered[3] == tag

    def keep(self, tx: str, data: bytes) -> None:
        """Store an answer for retransmissions, batched with others.  Until the batch is
        written a retransmission finds the answer in ``pending``."""
        self.pending[tx] = data
        if len(self.pending) == 1:
            gevent.spawn_later(ANSWER_BATCH_SECONDS, self.write_pending)

    def write_pending(self) -> None:
        answers, self.pending = self.pending, {}
        if not answers:
            return
        try:
            self.store.store_answers([(tx, data, self.tx_ttl) for tx, data in answers.items()])
        except StoreUnavailable as exc:
            log.warning("could not keep %d answer(s): %s", len(answers), exc)

    # ---------------------------------------------------------------- answers
    def build(self, req: Request, status: int, reason: str | None = None, *,
              headers=()) -> Response:
        """An answer to ``req`` outside any transaction: a new To tag, our Server."""
        return build_response(req, status, reason, to_tag=self.new_tag(),
                              headers=[*headers, (b"Server", self.server)])

    def reply(self, req: Request, source, status: int, reason: str | None = None, *,
              headers=()) -> bytes:
        """Answer ``req`` outside any transaction (to where its Via says) and, when final,
        remember the answer for its copies; the bytes sent."""
        answer = self.build(req, status, reason, headers=headers)
        data = answer.to_bytes()
        dest = response_dest(req, source.addr)
        self.transport.send(data, dest, sock_index=source.sock_index)
        if status >= 200:
            source.answered = True
            self.remember(req, data, dest, answer.to.tag if req.to.tag is None else None)
        return data

    def raw(self, data: bytes, addr: tuple[str, int], sock_index: int, error: SipError,
            extra: tuple[bytes, ...] = ()) -> None:
        """Answer a datagram that was not (or could not be) parsed, from its raw headers;
        nothing when it is a response or too broken to answer."""
        answer = error_response(data, error, extra, to_tag=self.new_tag())
        if answer is not None:
            self.transport.send(answer, addr, sock_index=sock_index)


def mark_of(data: bytes) -> bytes | None:
    """The mark of a request datagram (None for a response or one without Call-ID or
    branch), read without parsing it."""
    if scan.is_response(data):
        return None
    branch = scan.top_branch(data)
    call_id = scan.call_id(data)
    if branch is None or call_id is None:
        return None
    return request_mark(call_id, branch, data.split(b" ", 1)[0].decode("latin-1"))


def request_mark(call_id: bytes, branch: bytes, method: str) -> bytes:
    """What identifies a request and its retransmissions here: Call-ID, branch, method."""
    return b"\x00".join((call_id, branch, method.encode("latin-1")))
