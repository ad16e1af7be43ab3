"""Helpers for the B2BUA call tests: a deterministic rig around ``Call`` and the phones.

``Rig`` drives one call the way the cluster does: a fake clock, counting ``Ids``, and in
"restored" mode a fresh ``Call`` rebuilt from a msgpack round trip of the record before
every event (any worker may handle the next one).  Before every event it prunes the call
at its clock, as the shell does; after every event it checks that the record packs and
survives ``from_record`` unchanged and that every action is one the shell performs, and
it arms timers from ``Call.timer_entries`` as the shell does (the timer store).
``Caller`` and ``Callee`` play the phones: they write their messages as wire text and
``parse`` them, as the cluster would receive them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import msgpack

from cluster.sip.message import Request, Response, parse
from workers.sip.call import Call, Cdr, Ctx, Ids, Out, Reply, Settings, Target, check

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "seed"
CRLF = b"\r\n"
START = 1_726_881_924.0  # the fake clock's start (the seed's day); exact in binary
ADDRESS = "192.168.31.109"  # the cluster's advertised address (the seed's FreeSWITCH)
TAG = "0123456789abcdef01234567"  # the call record's tag (24 hex digits, as the shell makes)
SLOT = 7
A_HOST, A_SOCK = "host-a", 1  # where the caller's INVITE came in
B_HOST, B_SOCK = "host-b", 2  # where the callee's registration came in
CALLER_ADDR = ("192.168.31.142", 55747)  # Zoiper in the seed
CALLER_CONTACT_URI = b"sip:1002@192.168.31.142:55747;transport=UDP"
CALLEE_ADDRS = [("192.168.31.50", 60119), ("192.168.31.51", 5062), ("192.168.31.52", 5064)]
OUR_CONTACT_TO_CALLEE = b"<sip:1002@192.168.31.109:5060>"
OUR_CONTACT_TO_CALLER = b"<sip:1009@192.168.31.109:5060>"
NORMAL_CLEARING_REASON = b'Q.850;cause=16;text="NORMAL_CLEARING"'
ANSWER_SDP = (b"v=0\r\no=- 3935917257 3935917258 IN IP4 192.168.31.50\r\ns=pjmedia\r\n"
              b"c=IN IP4 192.168.31.50\r\nt=0 0\r\nm=audio 4008 RTP/AVP 8 101\r\n"
              b"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")


def wire(name: str) -> bytes:
    return (SEED / f"{name}.sip").read_bytes()


def seed_invite() -> Request:
    """The caller's authenticated INVITE of the seed (04), with an SDP offer."""
    return parse(wire("04-invite"))


def seed_sdp() -> bytes:
    """The seed caller's SDP offer."""
    return seed_invite().body


def invite_without_sdp() -> Request:
    """The seed INVITE as a delayed offer: no body, no Content-Type."""
    invite = seed_invite()
    invite.remove_header("content-type")
    invite.set_body(b"")
    return parse(invite.to_bytes())


def targets(count: int = 1) -> list[Target]:
    return [Target(b"sip:1009@%s:%d;ob" % (addr[0].encode(), addr[1]), addr, B_HOST, B_SOCK)
            for addr in CALLEE_ADDRS[:count]]


def roundtrip(record: dict) -> dict:
    """A record as another worker reads it back from Redis."""
    return msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False)


class CountingIds(Ids):
    """Tags and branches from counters: every run of a test sees the same ones."""

    def __init__(self) -> None:
        self.tags = itertools.count(1)
        self.branches = itertools.count(1)

    def tag(self) -> str:
        return f"ourtag{next(self.tags)}"

    def branch(self) -> str:
        return f"z9hG4bKour{next(self.branches)}"


class Actions(list):
    """What one event returned, with views by kind; ``arms`` are the timers the event
    armed or moved (name -> due), from the call's timer entries before and after."""

    arms: dict[str, float]

    @property
    def outs(self) -> list[Out]:
        return [a for a in self if isinstance(a, Out)]

    def sent(self, dest: tuple[str, int] | None = None) -> list[Request | Response]:
        """The datagrams sent (to ``dest``), parsed back."""
        return [parse(a.data) for a in self.outs if dest is None or a.dest == dest]

    def one(self, dest: tuple[str, int]) -> Request | Response:
        msgs = self.sent(dest)
        assert len(msgs) == 1, f"expected one message to {dest}, got {msgs}"
        return msgs[0]

    @property
    def cdrs(self) -> list[dict]:
        return [a.record for a in self if isinstance(a, Cdr)]

    @property
    def replies(self) -> list[Reply]:
        return [a for a in self if isinstance(a, Reply)]


def summary(msg: Request | Response) -> str:
    """"INVITE" or "180" with the CSeq: short names for asserting on what was sent."""
    if isinstance(msg, Request):
        return msg.method
    return f"{msg.status} {msg.cseq.method}"


class Rig:
    """One call, a fake clock, the timer store; ``restore`` rebuilds the call before
    every event from its msgpack record."""

    def __init__(self, restore: bool, **settings) -> None:
        self.restore = restore
        self.now = START
        self.ids = CountingIds()
        self.cfg = Settings(address=ADDRESS, port=5060, **settings)
        self.call: Call | None = None
        # Timer name -> the latest due time armed.  Disarmed timers stay, as a disarm
        # the store lost would leave them: firing one must do nothing.
        self.armed: dict[str, float] = {}

    def ctx(self, source: tuple[str, int] | None = None) -> Ctx:
        return Ctx(self.now, self.ids, self.cfg, source)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    # ---------------------------------------------------------------- events
    def start(self, invite: Request | None = None, forks: int = 1,
              trying_sent: bool = False) -> Actions:
        self.call, actions = Call.start(
            tag=TAG, slot=SLOT, invite=invite or seed_invite(), source=CALLER_ADDR,
            host=A_HOST, sock_index=A_SOCK, caller="1002", callee="1009",
            targets=targets(forks), ctx=self.ctx(CALLER_ADDR), trying_sent=trying_sent)
        return self._after(actions, {})

    def request(self, req: Request, source: tuple[str, int]) -> Actions:
        return self._event(lambda call: call.on_request(req, source, self.ctx(source)))

    def response(self, resp: Response, source: tuple[str, int]) -> Actions:
        return self._event(lambda call: call.on_response(resp, source, self.ctx(source)))

    def fire(self, name: str, due: float | None = None) -> Actions:
        """Timer ``name`` fires with ``due`` (default: the latest one armed); the clock
        moves on to the due time if it is behind."""
        due = self.armed[name] if due is None else due
        self.now = max(self.now, due)
        return self._event(lambda call: call.on_timer(name, due, self.ctx()))

    def hangup(self, cause: tuple[str, int], side: str = "system") -> Actions:
        return self._event(lambda call: call.hangup_now(cause, side, self.ctx()))

    def _event(self, event) -> Actions:
        if self.restore:
            self.call = Call.from_record(roundtrip(self.call.to_record()))
        before = self.call.timer_entries(waits=True)
        self.call.prune(self.now)
        return self._after(event(self.call), before)

    def _after(self, actions: list, before: dict[str, float]) -> Actions:
        record = roundtrip(self.call.to_record())
        assert roundtrip(Call.from_record(record).to_record()) == record
        # The shell arms timer_entries(); the wait-only timers (waits=True) are listed so a
        # test can step the clock to them: "firing" one prunes, as the shell's next event.
        after = self.call.timer_entries(waits=True)
        result = Actions(check(actions))
        result.arms = {name: due for name, due in after.items() if before.get(name) != due}
        self.armed.update(result.arms)
        return result

    # ---------------------------------------------------------------- timers
    def timer(self, suffix: str, key_part: str = "") -> str:
        """The one armed timer whose name ends with ``suffix`` and contains ``key_part``."""
        names = [n for n in self.armed if n.endswith(suffix) and key_part in n]
        assert len(names) == 1, f"timers {suffix!r} {key_part!r}: {names} of {list(self.armed)}"
        return names[0]


# --------------------------------------------------------------------------- phones


def text(start: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [start, *(name + b": " + value for name, value in headers)]
    lines.append(b"Content-Length: %d" % len(body))
    return CRLF.join(lines) + CRLF + CRLF + body


def response_to(req: Request, status: int, reason: bytes = b"", *, to_tag: str | None = None,
                contact: bytes | None = None, body: bytes = b"",
                headers: list[tuple[bytes, bytes]] = ()) -> Response:
    """What a phone answers to ``req``: Via, From, To (with ``to_tag``), Call-ID, CSeq."""
    to = req.header("to")
    if to_tag and req.to.tag is None:
        to += b";tag=" + to_tag.encode()
    hs = [(b"Via", via) for via in req.header_lines("via")]
    hs += [(b"From", req.header("from")), (b"To", to), (b"Call-ID", req.call_id),
           (b"CSeq", req.header("cseq"))]
    if contact:
        hs.append((b"Contact", contact))
    if body:
        hs.append((b"Content-Type", b"application/sdp"))
    hs += list(headers)
    start = b"SIP/2.0 %d %s" % (status, reason or _reason(status))
    return parse(text(start, hs, body))


def _reason(status: int) -> bytes:
    from cluster.sip.message import REASONS
    return REASONS.get(status, "Whatever").encode()


class Caller:
    """The seed's Zoiper: it sent 04-invite; it learns our To tag and Contact."""

    addr = CALLER_ADDR

    def __init__(self, invite: Request | None = None) -> None:
        self.invite = invite or seed_invite()
        self.cseq = self.invite.cseq.number
        self.remote_tag: str | None = None
        self.remote_target: bytes | None = None
        self.branches = itertools.count(1)

    def learn(self, resp: Response) -> Response:
        """Take the dialog's To tag and our Contact from a response we sent it."""
        if resp.to.tag:
            self.remote_tag = resp.to.tag
        if resp.contacts:
            self.remote_target = bytes(resp.contacts[0].uri)
        return resp

    def _via(self, branch: str | None = None) -> bytes:
        branch = branch or f"z9hG4bK-524287-1---caller{next(self.branches)}"
        return b"SIP/2.0/UDP %s:%d;branch=%s;rport" % (
            self.addr[0].encode(), self.addr[1], branch.encode())

    def request(self, method: str, *, cseq: int | None = None, to_tag: str | None = None,
                body: bytes = b"", content_type: bytes = b"application/sdp",
                headers: list[tuple[bytes, bytes]] = (), branch: str | None = None) -> Request:
        """A request in the A-leg dialog (the CSeq goes up unless given)."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        tag = to_tag or self.remote_tag
        hs = [(b"Via", self._via(branch)), (b"Max-Forwards", b"70"),
              (b"Contact", b"<%s>" % CALLER_CONTACT_URI),
              (b"To", self.invite.header("to") + b";tag=" + tag.encode()),
              (b"From", self.invite.header("from")), (b"Call-ID", self.invite.call_id),
              (b"CSeq", b"%d %s" % (cseq, method.encode())), (b"User-Agent", b"Zoiper")]
        if body:
            hs.append((b"Content-Type", content_type))
        hs += list(headers)
        uri = self.remote_target or self.invite.uri_raw
        return parse(text(b"%s %s SIP/2.0" % (method.encode(), uri), hs, body))

    def ack(self, body: bytes = b"", cseq: int | None = None) -> Request:
        """The ACK for a 2xx: a new branch, the INVITE's CSeq number (seed 13)."""
        return self.request("ACK", cseq=cseq or self.invite.cseq.number, body=body)

    def ack_failure(self, final: Response, invite: Request | None = None) -> Request:
        """The ACK for a non-2xx final to ``invite`` (default: the first one): the
        INVITE's branch, Request-URI and CSeq number, the response's To."""
        invite = invite or self.invite
        hs = [(b"Via", invite.header("via")), (b"Max-Forwards", b"70"),
              (b"To", final.header("to")), (b"From", invite.header("from")),
              (b"Call-ID", invite.call_id), (b"CSeq", b"%d ACK" % invite.cseq.number)]
        return parse(text(b"ACK %s SIP/2.0" % invite.uri_raw, hs))

    def answer(self, req: Request, status: int = 200, *, body: bytes = b"") -> Response:
        """The phone's response to a request we sent it in the A-leg dialog."""
        contact = b"<%s>" % CALLER_CONTACT_URI if req.method == "INVITE" and status < 300 else None
        return response_to(req, status, contact=contact, body=body)

    def cancel(self) -> Request:
        """CANCEL of the INVITE (RFC 3261 9.1): its Via, Request-URI, From, To, CSeq number."""
        hs = [(b"Via", self.invite.header("via")), (b"Max-Forwards", b"70"),
              (b"To", self.invite.header("to")), (b"From", self.invite.header("from")),
              (b"Call-ID", self.invite.call_id),
              (b"CSeq", b"%d CANCEL" % self.invite.cseq.number)]
        return parse(text(b"CANCEL %s SIP/2.0" % self.invite.uri_raw, hs))


class Callee:
    """A registered phone of the callee that got one of our B-leg INVITEs."""

    def __init__(self, invite: Request, addr: tuple[str, int], tag: str) -> None:
        self.invite = invite
        self.addr = addr
        self.tag = tag
        self.contact = b"<sip:1009@%s:%d;ob>" % (addr[0].encode(), addr[1])
        self.cseq = 30421
        self.branches = itertools.count(1)

    def respond(self, status: int, *, body: bytes = b"", tagged: bool = True,
                headers: list[tuple[bytes, bytes]] = (), reason: bytes = b"") -> Response:
        """A response to our INVITE (100 untagged, others with the phone's To tag)."""
        with_tag = tagged and status != 100
        return response_to(self.invite, status, reason, to_tag=self.tag if with_tag else None,
                           contact=self.contact if 100 < status < 300 else None, body=body,
                           headers=headers)

    def answer(self, req: Request, status: int = 200, *, body: bytes = b"",
               headers: list[tuple[bytes, bytes]] = ()) -> Response:
        """A response to a request we sent the phone in its dialog (or a CANCEL)."""
        contact = self.contact if req.method == "INVITE" and status < 300 else None
        return response_to(req, status, to_tag=self.tag, contact=contact, body=body,
                           headers=headers)

    def request(self, method: str, *, cseq: int | None = None, body: bytes = b"",
                content_type: bytes = b"application/sdp",
                headers: list[tuple[bytes, bytes]] = (), to_tag: str | None = None) -> Request:
        """A request in the B-leg dialog, to the Contact our INVITE gave."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        our = self.invite.header("from")
        if to_tag is not None:
            our = our.split(b";tag=")[0] + b";tag=" + to_tag.encode()
        hs = [(b"Via", b"SIP/2.0/UDP %s:%d;rport;branch=z9hG4bKPjcallee%d" % (
                  self.addr[0].encode(), self.addr[1], next(self.branches))),
              (b"Max-Forwards", b"70"), (b"From", self._own_address()), (b"To", our),
              (b"Call-ID", self.invite.call_id), (b"CSeq", b"%d %s" % (cseq, method.encode())),
              (b"Contact", self.contact)]
        if body:
            hs.append((b"Content-Type", content_type))
        hs += list(headers)
        uri = bytes(self.invite.contacts[0].uri)
        return parse(text(b"%s %s SIP/2.0" % (method.encode(), uri), hs, body))

    def seed_bye(self) -> Request:
        """The seed's 16-bye (MicroSIP hanging up), moved into this phone's dialog."""
        bye = parse(wire("16-bye"))
        bye.set_uri(bytes(self.invite.contacts[0].uri))
        bye.set_header(b"Via", b"SIP/2.0/UDP %s:%d;rport;branch=z9hG4bKPjf3b1d22a5602462d8ca11"
                       b"d6db5fad320" % (self.addr[0].encode(), self.addr[1]))
        bye.set_header(b"From", self._own_address())
        bye.set_header(b"To", self.invite.header("from"))
        bye.set_header(b"Call-ID", self.invite.call_id)
        return parse(bye.to_bytes())

    def _own_address(self) -> bytes:
        return self.invite.header("to") + b";tag=" + self.tag.encode()


# --------------------------------------------------------------------------- flows


@dataclass
class Flow:
    rig: Rig
    caller: Caller
    callees: list[Callee]
    started: Actions
    ok: Response | None = None  # the 200 the caller got

    @property
    def callee(self) -> Callee:
        return self.callees[0]

    def from_callee(self, resp: Response, index: int = 0) -> Actions:
        return self.rig.response(resp, self.callees[index].addr)

    def from_caller(self, req: Request) -> Actions:
        return self.rig.request(req, CALLER_ADDR)


def begin(rig: Rig, forks: int = 1, invite: Request | None = None) -> Flow:
    """The caller's INVITE; one phone per fork gets our INVITE."""
    caller = Caller(invite)
    started = rig.start(invite=caller.invite, forks=forks)
    callees = [Callee(started.one(addr), addr, f"calleetag{i}")
               for i, addr in enumerate(CALLEE_ADDRS[:forks])]
    return Flow(rig, caller, callees, started)


def answered(rig: Rig, forks: int = 1, headers: list[tuple[bytes, bytes]] = ()) -> Flow:
    """The seed call up to the caller's ACK: 100, 180, 200 from fork 0, ACK."""
    flow = begin(rig, forks)
    flow.from_callee(flow.callee.respond(100))
    flow.caller.learn(flow.from_callee(flow.callee.respond(180)).one(CALLER_ADDR))
    acts = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP, headers=headers))
    flow.ok = flow.caller.learn(acts.one(CALLER_ADDR))
    assert flow.from_caller(flow.caller.ack()).outs == []
    return flow
