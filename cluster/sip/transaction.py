"""SIP transactions (RFC 3261 section 17, with the Accepted states of RFC 6026), sans-IO.

A transaction lives in Redis between events.  A worker loads its record, feeds it one
event, persists the new record, then performs the actions it got back; any worker may
handle the next event or the next timer.  So every machine here is a plain record
(``to_record`` / ``transaction_from_record``) with an explicit state table, and:

* events in: client ``start``, ``on_response``, ``on_timer``; server ``on_request``,
  ``send_response``, ``on_timer`` and, for the INVITE server in Accepted, ``ack_received``;
* actions out: ``Send``, ``SetTimer``, ``CancelTimer``, ``Deliver``, ``TimedOut``, ``NoAck``,
  ``Terminated``;
* times are float seconds passed in by the caller; nothing here reads a clock or does I/O.

Each transaction keeps its pending timers (name -> due time).  ``on_timer`` for a timer
that is not pending, not yet due, or whose due time differs from the one the timer store
recorded does nothing: that is how a timer that fires twice, late, or on a worker that
lost a race stays harmless.

Each transaction knows whether its transport is reliable (``reliable``: TCP, TLS, WS, WSS)
or not (UDP).  Over a reliable transport the transport does the retransmitting, so
(RFC 3261 17.1.1.2, 17.1.2.2, 17.2.1, 17.2.2) timers A, E and G are never started and
timers D, I, J and K are zero seconds: the state that only absorbs retransmissions ends at
once when its timer fires, at the time it was entered.  Timers B, F, H and RFC 6026's L and
M run over any transport, and so does the retransmission of a 2xx to an INVITE (RFC 3261
13.3.1.4: "This is independent of whatever transport protocols are used to send the
response": there may be UDP hops between us and the UAC).

Matching (17.1.3, 17.2.3, 9.2): ``client_key``, ``server_key``, ``cancel_target_key`` and
``ServerTransaction.matches``; all keys are strings without spaces, fit for a Redis key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields
from functools import cache, cached_property
from typing import ClassVar

from .ids import MAGIC_COOKIE
from .message import Request, Response, build_request, parse, parse_shared

RFC2543_PREFIX = "s|2543|"
TERMINATED = "Terminated"
_PLAIN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~@:\[\]]{0,128}\Z")


# --------------------------------------------------------------------------- timers and actions


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 timer values (seconds); the defaults are the RFC's for UDP."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    d: float = 32.0  # Timer D: at least 32 s over UDP (zero over a reliable transport)

    @property
    def long(self) -> float:
        """64*T1: timers B, F, H, J and RFC 6026's L and M."""
        return 64 * self.t1


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    dest: tuple[str, int]


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Arm (or re-arm: one entry per name) the transaction's timer ``name`` for time ``at``."""

    name: str
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Pass a message to the transaction user (the core)."""

    msg: Request | Response


@dataclass(frozen=True, slots=True)
class TimedOut:
    """Timer B or F fired: the TU acts as if a 408 had come."""


@dataclass(frozen=True, slots=True)
class NoAck:
    """The INVITE server sent a final response and no ACK came (Timer H, or Timer L while
    the 2xx was still unacknowledged): after a 2xx the TU should end the dialog with a BYE."""


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction is over: its record may be deleted."""


Action = Send | SetTimer | CancelTimer | Deliver | TimedOut | NoAck | Terminated


# --------------------------------------------------------------------------- matching


def key_part(value: str | bytes) -> str:
    """``value`` as a piece of a key: kept when it is plain text, else ``#`` and a hash.

    Plain means token characters, ``@``, ``:`` and brackets, at most 128 of them: never a
    space, a ``|`` (the separator), a ``{`` (a Redis Cluster hash tag) or a control byte.
    """
    raw = value.encode("utf-8") if isinstance(value, str) else value
    text = raw.decode("latin-1")
    if _PLAIN.match(text):
        return text
    return "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()


def client_key(msg: Request | Response) -> str:
    """RFC 3261 17.1.3: the top Via branch and the CSeq method.

    A response matches the client transaction whose request gives the same key; the
    transaction computes its own key from its request with this function.
    """
    return f"c|{key_part(msg.via.branch or '')}|{key_part(msg.cseq.method)}"


def server_key(req: Request) -> str:
    """RFC 3261 17.2.3: the server transaction ``req`` belongs to (ACK maps to INVITE).

    With a magic-cookie branch: branch, sent-by and method.  Without one (RFC 2543):
    a hash of Request-URI, From tag, Call-ID, CSeq number, method and top Via, plus the
    To tag for methods other than INVITE.  The To tag is left out for INVITE and ACK
    because the ACK for a non-2xx final carries the tag of that response, not the
    INVITE's; so a caller looks the record up under this key, then asks
    ``ServerTransaction.matches(req)``, which checks the To tag.
    """
    return _server_key(req, "INVITE" if req.method == "ACK" else req.method)


def cancel_target_key(cancel: Request) -> str:
    """RFC 3261 9.2: the key of the INVITE server transaction a CANCEL refers to."""
    return _server_key(cancel, "INVITE")


def _server_key(req: Request, method: str) -> str:
    via = req.via
    branch = via.branch
    if branch and branch.startswith(MAGIC_COOKIE):
        host, port = via.sent_by
        return f"s|{key_part(branch)}|{key_part(host)}:{port}|{key_part(method)}"
    to_tag = "" if method == "INVITE" else (req.to.tag or "")
    host, port = via.sent_by
    parts = [req.uri_raw, to_tag.encode(), (req.from_.tag or "").encode(), req.call_id,
             b"%d" % req.cseq.number, method.encode(), via.transport.encode(),
             f"{host}:{port}".encode(), (branch or "").encode()]
    digest = hashlib.blake2b(b"\x00".join(parts), digest_size=20).hexdigest()
    return RFC2543_PREFIX + digest


def response_dest(req: Request, source: tuple[str, int]) -> tuple[str, int]:
    """Where responses to ``req``, received from ``source``, go (RFC 3261 18.2.2, RFC 3581).

    With ``rport`` in the top Via: back to the source address and port.  Without it: the
    source address (the ``received`` value) and the port of the Via's sent-by.
    """
    via = req.via
    if via.has_rport:
        return source
    return source[0], via.port or 5060


def ack_for_final(invite: Request, final: Response) -> Request:
    """RFC 3261 17.1.1.3: the ACK the INVITE client transaction sends for a non-2xx final.

    Same Request-URI, Call-ID, From and CSeq number as the INVITE, method ACK; the To of
    the response (with its tag); only the INVITE's top Via; the INVITE's Route headers.
    """
    headers = [(b"Via", bytes(invite.via)), (b"Max-Forwards", b"70"),
               (b"To", final.header("to") or b""), (b"From", invite.header("from") or b""),
               (b"Call-ID", invite.call_id), (b"CSeq", b"%d ACK" % invite.cseq.number)]
    headers += [(b"Route", route) for route in invite.header_lines("route")]
    return build_request("ACK", invite.uri_raw, headers)


def status_class(status: int) -> str:
    """The event a response status is for the state tables: 1xx, 2xx or 3xx-6xx."""
    if status < 200:
        return "1xx"
    return "2xx" if status < 300 else "3xx-6xx"


# --------------------------------------------------------------------------- the machinery


# (state, event) -> (next state, handler method name)
Table = dict[tuple[str, str], tuple[str, str]]


@dataclass
class Transaction:
    """What all four machines share: identity, the request, timers, and the table driver.

    ``request`` is the request as bytes (parsed again lazily as ``request_msg``);
    ``dest`` is where this transaction sends (the request for a client, the responses
    for a server); ``interval`` is the current retransmission interval; ``reliable``
    says the transport is a connection (no retransmissions of its own, zero wait
    timers: see the module's docstring).
    """

    KIND: ClassVar[str] = ""
    INITIAL: ClassVar[str] = ""
    TABLE: ClassVar[Table] = {}

    key: str
    request: bytes
    dest: tuple[str, int]
    state: str
    config: TimerConfig = field(default_factory=TimerConfig)
    timers: dict[str, float] = field(default_factory=dict)
    interval: float = 0.0
    reliable: bool = False

    @cached_property
    def request_msg(self) -> Request:
        """The request, parsed (read-only: shared with every other transaction object of
        the same request in this process)."""
        return parse_shared(self.request)

    def on_timer(self, name: str, now: float, due: float | None = None) -> list[Action]:
        """Timer ``name`` fired at ``now``.  ``due``, when the timer store gives it, is the
        time the entry was set for; an entry that is not the pending one does nothing."""
        pending = self.timers.get(name)
        if pending is None or (now < pending if due is None else due != pending):
            return []
        del self.timers[name]
        return self._run("timer " + name, now)

    @property
    def terminated(self) -> bool:
        return self.state == TERMINATED

    # ---------------------------------------------------------------- driver
    def _run(self, event: str, now: float, msg: Request | Response | None = None
             ) -> list[Action]:
        row = self.TABLE.get((self.state, event))
        if row is None:
            return []  # not in the table: the event means nothing in this state
        next_state, handler = row
        actions = getattr(self, handler)(now, msg)
        self.state = next_state
        if next_state == TERMINATED:
            actions += self._cancel(*self.timers)
            actions.append(Terminated())
        return actions

    def _set(self, name: str, at: float) -> SetTimer:
        self.timers[name] = at
        return SetTimer(name, at)

    def _cancel(self, *names: str) -> list[Action]:
        return [CancelTimer(name) for name in list(names)
                if self.timers.pop(name, None) is not None]

    def _nothing(self, now: float, msg: object) -> list[Action]:
        return []

    def _wait(self, seconds: float) -> float:
        """Timers D, I, J and K: ``seconds`` over UDP, zero over a reliable transport, where
        no retransmission is left to absorb."""
        return 0.0 if self.reliable else seconds

    # ---------------------------------------------------------------- records
    def to_record(self) -> dict:
        """The transaction as msgpack-friendly values (see ``transaction_from_record``)."""
        record: dict = {"kind": self.KIND}
        for name in _field_names(type(self)):
            record[name] = getattr(self, name)
        c = self.config
        record.update(dest=list(self.dest), config=[c.t1, c.t2, c.t4, c.d],
                      timers=dict(self.timers))
        if not self.reliable:
            # Left out over UDP: the record stays what it was before the field existed, so
            # workers of the previous release read it (they ignore the field when present).
            del record["reliable"]
        return record

    @classmethod
    def from_record(cls, record: dict) -> Transaction:
        # A record without "reliable" (UDP, or written before the field existed) is UDP.
        values = {name: record[name] for name in _field_names(cls) if name != "reliable"}
        values.update(dest=tuple(values["dest"]), config=TimerConfig(*values["config"]),
                      timers=dict(values["timers"]), reliable=bool(record.get("reliable")))
        return cls(**values)


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    """A transaction class's fields, in order (``fields`` walks them anew on every call:
    1.5% of a loaded worker's CPU went to it for records)."""
    return tuple(f.name for f in fields(cls))


# --------------------------------------------------------------------------- client side


@dataclass
class ClientTransaction(Transaction):
    RETRANSMIT: ClassVar[str] = ""  # Timer A or E
    TIMEOUT: ClassVar[str] = ""  # Timer B or F

    def start(self, now: float) -> list[Action]:
        """Send the request for the first time and arm the timers."""
        return self._run("start", now)

    def on_response(self, resp: Response, now: float) -> list[Action]:
        return self._run(status_class(resp.status), now, resp)

    def _start(self, now: float, _: object) -> list[Action]:
        self.interval = self.config.t1
        actions: list[Action] = [self._send_request()]
        if not self.reliable:  # 17.1.1.2, 17.1.2.2: the connection retransmits, not us
            actions.append(self._set(self.RETRANSMIT, now + self.interval))
        return actions + [self._set(self.TIMEOUT, now + self.config.long)]

    def _send_request(self) -> Send:
        return Send(self.request, self.dest)

    def _resend(self, now: float, interval: float) -> list[Action]:
        self.interval = interval
        return [self._send_request(), self._set(self.RETRANSMIT, now + interval)]

    def _time_out(self, now: float, _: object) -> list[Action]:
        return [TimedOut()]

    def _deliver(self, now: float, resp: Response) -> list[Action]:
        return [Deliver(resp)]


@dataclass
class InviteClientTransaction(ClientTransaction):
    """RFC 3261 17.1.1 with RFC 6026's Accepted state.

    ==========  ========  ==========  ==================================================
    state       event     next        actions
    ==========  ========  ==========  ==================================================
    Calling     start     Calling     Send INVITE, SetTimer A (T1), SetTimer B (64*T1)
    Calling     timer A   Calling     Send INVITE, SetTimer A (interval doubled, no cap)
    Calling     timer B   Terminated  TimedOut, CancelTimer A, Terminated
    Calling     1xx       Proceeding  CancelTimer A and B, Deliver
    Calling     2xx       Accepted    CancelTimer A and B, Deliver, SetTimer M (64*T1)
    Calling     3xx-6xx   Completed   CancelTimer A and B, Deliver, Send ACK, SetTimer D
    Proceeding  1xx       Proceeding  Deliver
    Proceeding  2xx       Accepted    Deliver, SetTimer M
    Proceeding  3xx-6xx   Completed   Deliver, Send ACK, SetTimer D
    Completed   3xx-6xx   Completed   Send ACK again (the retransmitted final is absorbed)
    Completed   timer D   Terminated  Terminated
    Accepted    2xx       Accepted    Deliver (the TU ACKs each 2xx from its dialog)
    Accepted    timer M   Terminated  Terminated
    ==========  ========  ==========  ==================================================

    The ACK (``ack_for_final``) is kept in ``ack`` so that every copy sent is the same.

    Over a reliable transport (17.1.1.2): ``start`` sets no Timer A (so no "timer A" row
    ever runs), and Timer D is zero, set for the time Completed was entered.
    """

    KIND: ClassVar[str] = "ict"
    INITIAL: ClassVar[str] = "Calling"
    RETRANSMIT: ClassVar[str] = "A"
    TIMEOUT: ClassVar[str] = "B"
    TABLE: ClassVar[Table] = {
        ("Calling", "start"): ("Calling", "_start"),
        ("Calling", "timer A"): ("Calling", "_timer_a"),
        ("Calling", "timer B"): (TERMINATED, "_time_out"),
        ("Calling", "1xx"): ("Proceeding", "_stop_and_deliver"),
        ("Calling", "2xx"): ("Accepted", "_accept"),
        ("Calling", "3xx-6xx"): ("Completed", "_acknowledge"),
        ("Proceeding", "1xx"): ("Proceeding", "_deliver"),
        ("Proceeding", "2xx"): ("Accepted", "_accept"),
        ("Proceeding", "3xx-6xx"): ("Completed", "_acknowledge"),
        ("Completed", "3xx-6xx"): ("Completed", "_resend_ack"),
        ("Completed", "timer D"): (TERMINATED, "_nothing"),
        ("Accepted", "2xx"): ("Accepted", "_deliver"),
        ("Accepted", "timer M"): (TERMINATED, "_nothing"),
    }

    ack: bytes | None = None

    def _timer_a(self, now: float, _: object) -> list[Action]:
        return self._resend(now, self.interval * 2)

    def _stop_and_deliver(self, now: float, resp: Response) -> list[Action]:
        return self._cancel("A", "B") + [Deliver(resp)]

    def _accept(self, now: float, resp: Response) -> list[Action]:
        return self._stop_and_deliver(now, resp) + [self._set("M", now + self.config.long)]

    def _acknowledge(self, now: float, resp: Response) -> list[Action]:
        self.ack = ack_for_final(self.request_msg, resp).to_bytes()
        return self._stop_and_deliver(now, resp) + [
            Send(self.ack, self.dest), self._set("D", now + self._wait(self.config.d))]

    def _resend_ack(self, now: float, _: object) -> list[Action]:
        return [Send(self.ack, self.dest)] if self.ack else []


@dataclass
class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 17.1.2.

    ==========  ========  ==========  ==================================================
    state       event     next        actions
    ==========  ========  ==========  ==================================================
    Trying      start     Trying      Send request, SetTimer E (T1), SetTimer F (64*T1)
    Trying      timer E   Trying      Send request, SetTimer E (min(2*interval, T2))
    Trying      timer F   Terminated  TimedOut, CancelTimer E, Terminated
    Trying      1xx       Proceeding  Deliver
    Trying      2xx       Completed   CancelTimer E and F, Deliver, SetTimer K (T4)
    Trying      3xx-6xx   Completed   CancelTimer E and F, Deliver, SetTimer K (T4)
    Proceeding  timer E   Proceeding  Send request, SetTimer E (T2)
    Proceeding  timer F   Terminated  TimedOut, CancelTimer E, Terminated
    Proceeding  1xx       Proceeding  Deliver
    Proceeding  2xx       Completed   CancelTimer E and F, Deliver, SetTimer K
    Proceeding  3xx-6xx   Completed   CancelTimer E and F, Deliver, SetTimer K
    Completed   2xx       Completed   nothing (a retransmitted final is absorbed)
    Completed   3xx-6xx   Completed   nothing
    Completed   timer K   Terminated  Terminated
    ==========  ========  ==========  ==================================================

    Over a reliable transport (17.1.2.2): ``start`` sets no Timer E (so no "timer E" row
    ever runs), and Timer K is zero, set for the time Completed was entered.
    """

    KIND: ClassVar[str] = "nict"
    INITIAL: ClassVar[str] = "Trying"
    RETRANSMIT: ClassVar[str] = "E"
    TIMEOUT: ClassVar[str] = "F"
    TABLE: ClassVar[Table] = {
        ("Trying", "start"): ("Trying", "_start"),
        ("Trying", "timer E"): ("Trying", "_timer_e_trying"),
        ("Trying", "timer F"): (TERMINATED, "_time_out"),
        ("Trying", "1xx"): ("Proceeding", "_deliver"),
        ("Trying", "2xx"): ("Completed", "_complete"),
        ("Trying", "3xx-6xx"): ("Completed", "_complete"),
        ("Proceeding", "timer E"): ("Proceeding", "_timer_e_proceeding"),
        ("Proceeding", "timer F"): (TERMINATED, "_time_out"),
        ("Proceeding", "1xx"): ("Proceeding", "_deliver"),
        ("Proceeding", "2xx"): ("Completed", "_complete"),
        ("Proceeding", "3xx-6xx"): ("Completed", "_complete"),
        ("Completed", "2xx"): ("Completed", "_nothing"),
        ("Completed", "3xx-6xx"): ("Completed", "_nothing"),
        ("Completed", "timer K"): (TERMINATED, "_nothing"),
    }

    def _timer_e_trying(self, now: float, _: object) -> list[Action]:
        return self._resend(now, min(self.interval * 2, self.config.t2))

    def _timer_e_proceeding(self, now: float, _: object) -> list[Action]:
        return self._resend(now, self.config.t2)

    def _complete(self, now: float, resp: Response) -> list[Action]:
        return self._cancel("E", "F") + [Deliver(resp),
                                         self._set("K", now + self._wait(self.config.t4))]


# --------------------------------------------------------------------------- server side


@dataclass
class ServerTransaction(Transaction):
    """``last_response`` is the last response sent, answered again to retransmissions;
    ``delivered`` says the request went to the TU already (the next copy is a retransmission).
    """

    last_response: bytes | None = None
    delivered: bool = False

    def on_request(self, req: Request, now: float) -> list[Action]:
        """The request that created the transaction, a retransmission of it, or an ACK."""
        if req.method == "ACK":
            event = "ACK"
        else:
            event = "retransmission" if self.delivered else "request"
        return self._run(event, now, req)

    def send_response(self, resp: Response, now: float) -> list[Action]:
        """The TU answers through the transaction."""
        return self._run("send " + status_class(resp.status), now, resp)

    def matches(self, req: Request) -> bool:
        """Whether ``req``, found under this transaction's key, belongs to it (17.2.3).

        Branch keys say it all.  RFC 2543 keys of INVITE transactions leave the To tag out
        (see ``server_key``): an INVITE must carry the original's To tag, an ACK the tag of
        the response this transaction sent.
        """
        if not self.key.startswith(RFC2543_PREFIX) or req.method not in ("INVITE", "ACK"):
            return True
        if req.method == "INVITE":
            return req.to.tag == self.request_msg.to.tag
        return self.last_response is not None and req.to.tag == parse(self.last_response).to.tag

    def _deliver_request(self, now: float, req: Request) -> list[Action]:
        self.delivered = True
        return [Deliver(req)]

    def _send_response(self, now: float, resp: Response) -> list[Action]:
        self.last_response = resp.to_bytes()
        return [Send(self.last_response, self.dest)]

    def _resend_response(self, now: float, _: object) -> list[Action]:
        return [Send(self.last_response, self.dest)] if self.last_response else []

    def _resend_capped(self, name: str, now: float) -> list[Action]:
        """Timers G and 2xx: send the response again, the interval doubling up to T2."""
        self.interval = min(self.interval * 2, self.config.t2)
        return self._resend_response(now, None) + [self._set(name, now + self.interval)]


@dataclass
class InviteServerTransaction(ServerTransaction):
    """RFC 3261 17.2.1 with RFC 6026's Accepted state, which here also retransmits the 2xx
    (RFC 3261 13.3.1.4) until the TU reports the ACK (``ack_received``).

    ==========  ==============  ==========  ============================================
    state       event           next        actions
    ==========  ==============  ==========  ============================================
    Proceeding  request         Proceeding  Deliver (the TU sends 100 Trying itself)
    Proceeding  retransmission  Proceeding  Send the last provisional response, if any
    Proceeding  send 1xx        Proceeding  Send
    Proceeding  send 2xx        Accepted    Send, SetTimer 2xx (T1), SetTimer L (64*T1)
    Proceeding  send 3xx-6xx    Completed   Send, SetTimer G (T1), SetTimer H (64*T1)
    Completed   retransmission  Completed   Send the final response again
    Completed   ACK             Confirmed   CancelTimer G and H, SetTimer I (T4)
    Completed   timer G         Completed   Send the final again, SetTimer G (min(2x, T2))
    Completed   timer H         Terminated  NoAck, CancelTimer G, Terminated
    Confirmed   retransmission  Confirmed   nothing (absorbed)
    Confirmed   ACK             Confirmed   nothing (absorbed)
    Confirmed   timer I         Terminated  Terminated
    Accepted    retransmission  Accepted    Send the 2xx again
    Accepted    ACK             Accepted    CancelTimer 2xx, Deliver (an ACK on our branch)
    Accepted    ack_received    Accepted    CancelTimer 2xx
    Accepted    send 2xx        Accepted    Send (the TU's own 2xx retransmission)
    Accepted    timer 2xx       Accepted    Send the 2xx again, SetTimer 2xx (min(2x, T2))
    Accepted    timer L         Terminated  NoAck unless the ACK came, Terminated
    ==========  ==============  ==========  ============================================

    An ACK for a 2xx normally carries a new branch, so it reaches the TU through the
    dialog, not through this transaction: the TU then calls ``ack_received``.

    Over a reliable transport (17.2.1): a 3xx-6xx sets no Timer G (Timer H still runs),
    and Timer I is zero.  Timers 2xx and L stay: RFC 3261 13.3.1.4 retransmits the 2xx
    whatever the transport, for the UDP hops there may be further on.
    """

    KIND: ClassVar[str] = "ist"
    INITIAL: ClassVar[str] = "Proceeding"
    TABLE: ClassVar[Table] = {
        ("Proceeding", "request"): ("Proceeding", "_deliver_request"),
        ("Proceeding", "retransmission"): ("Proceeding", "_resend_response"),
        ("Proceeding", "send 1xx"): ("Proceeding", "_send_response"),
        ("Proceeding", "send 2xx"): ("Accepted", "_send_2xx"),
        ("Proceeding", "send 3xx-6xx"): ("Completed", "_send_final"),
        ("Completed", "retransmission"): ("Completed", "_resend_response"),
        ("Completed", "ACK"): ("Confirmed", "_confirm"),
        ("Completed", "timer G"): ("Completed", "_timer_g"),
        ("Completed", "timer H"): (TERMINATED, "_no_ack"),
        ("Confirmed", "retransmission"): ("Confirmed", "_nothing"),
        ("Confirmed", "ACK"): ("Confirmed", "_nothing"),
        ("Confirmed", "timer I"): (TERMINATED, "_nothing"),
        ("Accepted", "retransmission"): ("Accepted", "_resend_response"),
        ("Accepted", "ACK"): ("Accepted", "_deliver_ack"),
        ("Accepted", "ack_received"): ("Accepted", "_stop_2xx"),
        ("Accepted", "send 2xx"): ("Accepted", "_send_response"),
        ("Accepted", "timer 2xx"): ("Accepted", "_timer_2xx"),
        ("Accepted", "timer L"): (TERMINATED, "_end_accepted"),
    }

    acked: bool = False

    def ack_received(self, now: float) -> list[Action]:
        """The TU saw the ACK for its 2xx: stop retransmitting it."""
        return self._run("ack_received", now)

    def _send_2xx(self, now: float, resp: Response) -> list[Action]:
        self.interval = self.config.t1
        return self._send_response(now, resp) + [
            self._set("2xx", now + self.interval), self._set("L", now + self.config.long)]

    def _send_final(self, now: float, resp: Response) -> list[Action]:
        self.interval = self.config.t1
        actions = self._send_response(now, resp)
        if not self.reliable:  # 17.2.1: the connection delivers the final, no Timer G
            actions.append(self._set("G", now + self.interval))
        return actions + [self._set("H", now + self.config.long)]

    def _confirm(self, now: float, _: object) -> list[Action]:
        return self._cancel("G", "H") + [self._set("I", now + self._wait(self.config.t4))]

    def _timer_g(self, now: float, _: object) -> list[Action]:
        return self._resend_capped("G", now)

    def _timer_2xx(self, now: float, _: object) -> list[Action]:
        return self._resend_capped("2xx", now)

    def _no_ack(self, now: float, _: object) -> list[Action]:
        return [NoAck()]

    def _stop_2xx(self, now: float, _: object) -> list[Action]:
        self.acked = True
        return self._cancel("2xx")

    def _deliver_ack(self, now: float, ack: Request) -> list[Action]:
        return self._stop_2xx(now, ack) + [Deliver(ack)]

    def _end_accepted(self, now: float, _: object) -> list[Action]:
        return [] if self.acked else [NoAck()]


@dataclass
class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 17.2.2.

    ==========  ==============  ==========  ============================================
    state       event           next        actions
    ==========  ==============  ==========  ============================================
    Trying      request         Trying      Deliver
    Trying      retransmission  Trying      nothing (no response to repeat yet)
    Trying      send 1xx        Proceeding  Send
    Trying      send 2xx        Completed   Send, SetTimer J (64*T1)
    Trying      send 3xx-6xx    Completed   Send, SetTimer J
    Proceeding  retransmission  Proceeding  Send the last provisional again
    Proceeding  send 1xx        Proceeding  Send
    Proceeding  send 2xx        Completed   Send, SetTimer J
    Proceeding  send 3xx-6xx    Completed   Send, SetTimer J
    Completed   retransmission  Completed   Send the final again (not delivered)
    Completed   timer J         Terminated  Terminated
    ==========  ==============  ==========  ============================================

    Over a reliable transport (17.2.2): Timer J is zero, set for the time Completed was
    entered (a request repeated before it fires still gets the final again).
    """

    KIND: ClassVar[str] = "nist"
    INITIAL: ClassVar[str] = "Trying"
    TABLE: ClassVar[Table] = {
        ("Trying", "request"): ("Trying", "_deliver_request"),
        ("Trying", "retransmission"): ("Trying", "_nothing"),
        ("Trying", "send 1xx"): ("Proceeding", "_send_response"),
        ("Trying", "send 2xx"): ("Completed", "_send_final"),
        ("Trying", "send 3xx-6xx"): ("Completed", "_send_final"),
        ("Proceeding", "retransmission"): ("Proceeding", "_resend_response"),
        ("Proceeding", "send 1xx"): ("Proceeding", "_send_response"),
        ("Proceeding", "send 2xx"): ("Completed", "_send_final"),
        ("Proceeding", "send 3xx-6xx"): ("Completed", "_send_final"),
        ("Completed", "retransmission"): ("Completed", "_resend_response"),
        ("Completed", "timer J"): (TERMINATED, "_nothing"),
    }

    def _send_final(self, now: float, resp: Response) -> list[Action]:
        return self._send_response(now, resp) + [
            self._set("J", now + self._wait(self.config.long))]


# --------------------------------------------------------------------------- constructors


KINDS: dict[str, type[Transaction]] = {cls.KIND: cls for cls in (
    InviteClientTransaction, NonInviteClientTransaction,
    InviteServerTransaction, NonInviteServerTransaction)}


def client_transaction(req: Request, dest: tuple[str, int],
                       config: TimerConfig = TimerConfig(), *,
                       reliable: bool = False) -> ClientTransaction:
    """A client transaction for ``req`` (not yet sent: call ``start``), sending to ``dest``
    over a reliable transport (a connection) or not (UDP)."""
    if req.method == "ACK":
        raise ValueError("an ACK is sent on its own, not in a client transaction")
    cls = InviteClientTransaction if req.method == "INVITE" else NonInviteClientTransaction
    return cls(client_key(req), req.to_bytes(), tuple(dest), cls.INITIAL, config,
               reliable=reliable)


def server_transaction(req: Request, dest: tuple[str, int],
                       config: TimerConfig = TimerConfig(), *,
                       reliable: bool = False) -> ServerTransaction:
    """A server transaction for ``req`` (feed it with ``on_request``), answering to ``dest``
    (see ``response_dest``) over a reliable transport (a connection) or not (UDP)."""
    if req.method == "ACK":
        raise ValueError("an ACK creates no server transaction")
    cls = InviteServerTransaction if req.method == "INVITE" else NonInviteServerTransaction
    return cls(server_key(req), req.to_bytes(), tuple(dest), cls.INITIAL, config,
               reliable=reliable)


def transaction_from_record(record: dict) -> Transaction:
    """The transaction ``to_record`` gave ``record`` for (after a msgpack round trip too)."""
    cls = KINDS.get(record.get("kind"))
    if cls is None:
        raise ValueError(f"not a transaction record: kind {record.get('kind')!r}")
    return cls.from_record(record)
