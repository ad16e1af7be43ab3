"""A B2BUA call as a pure state machine: messages and timers in, actions out.

A call has an A-leg (the caller's dialog with us) and one B-leg per contact of
the callee (forking).  The record holds both legs' dialogs, every transaction
of the call and the call's progress, so whichever worker loads it can carry on;
the shell (b2bua.py) loads it, feeds it one event, writes it back
compare-and-set, and only then performs the actions.  Nothing here reads the
clock, draws random numbers or does I/O: ``now`` and an ``Ids`` source come in.

Leg names: "a" for the caller, "b0", "b1"... for the forks.  B-leg Call-IDs are
"sc<slot>.<tag>.<n>": the dispatcher reads the slot, so both legs of a call land
on the same worker, and the tag finds the call record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cluster.sip import digest
from cluster.sip.dialog import Dialog
from cluster.sip.message import Request, Response, build_request, build_response, parse
from cluster.sip.transaction import (
    Action,
    CancelTimer,
    Deliver,
    NoAck,
    Send,
    SetTimer,
    Terminated,
    TimedOut,
    TimerConfig,
    client_key,
    client_transaction,
    response_dest,
    server_key,
    server_transaction,
    transaction_from_record,
)
from cluster.sip.uri import hostport

# Q.850 causes (name, number) used in Reason headers and CDRs.
NORMAL_CLEARING = ("NORMAL_CLEARING", 16)
ORIGINATOR_CANCEL = ("ORIGINATOR_CANCEL", 487)
NO_ANSWER = ("NO_ANSWER", 19)
RECOVERY_ON_TIMER_EXPIRE = ("RECOVERY_ON_TIMER_EXPIRE", 102)
MEDIA_TIMEOUT = ("MEDIA_TIMEOUT", 102)
ADMIN_HANGUP = ("NORMAL_CLEARING", 16)
COMPLETED_ELSEWHERE = ("Call completed elsewhere", 200)
# SIP status of the failed call -> Q.850 cause (RFC 3398 section 8.2.6.1, abridged).
STATUS_CAUSES = {404: ("UNALLOCATED_NUMBER", 1), 408: ("RECOVERY_ON_TIMER_EXPIRE", 102),
                 480: ("NO_USER_RESPONSE", 18), 486: ("USER_BUSY", 17),
                 487: ("ORIGINATOR_CANCEL", 487), 603: ("CALL_REJECTED", 21),
                 600: ("USER_BUSY", 17)}
WAIT_ONLY = frozenset({"D", "I", "J", "K", "M"})  # timers whose firing only ends a transaction
RELAYED_METHODS = ("INVITE", "UPDATE", "INFO", "MESSAGE", "NOTIFY", "REFER", "PRACK")
# Headers a relayed request or response carries over to the other leg (plus the body).
RELAYED_HEADERS = ("content-type", "content-disposition", "event", "subscription-state",
                   "refer-to", "session-expires", "min-se", "info-package", "reason")


@dataclass
class Settings:
    """What a call needs of the configuration (not stored in the record)."""

    address: str  # advertised SIP address and port: our Via and Contact
    port: int
    user_agent: bytes = b"sipcluster"
    timers: TimerConfig = field(default_factory=TimerConfig)
    no_answer_timeout: float = 60.0
    max_duration: float = 0.0
    allow: bytes = b"INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, MESSAGE, NOTIFY, REFER"
    supported: bytes = b"timer"
    xcid_header: bytes = b"X-Call-ID"  # the A-leg Call-ID on B-leg requests; b"" = none
    # Route table row -> (username, password) answering a gateway's 401/407; kept out of
    # the call record so no password is ever written to Redis.
    gateway_credentials: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Ctx:
    """What one event brings besides the message: the time, id sources, settings, and
    where the message came from (answers to it go there)."""

    now: float
    ids: Ids
    cfg: Settings
    source: tuple[str, int] | None = None
    media: object = field(default_factory=lambda: _PASS_THROUGH)


class _PassThrough:
    """Bypass media: SDP goes from leg to leg unchanged (the shell passes a relay)."""

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        return body


_PASS_THROUGH = _PassThrough()


class Ids:
    """Where fresh tags and branches come from (random in the shell, counters in tests)."""

    def tag(self) -> str:
        raise NotImplementedError

    def branch(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Target:
    """One place to ring: a registered contact, reached through ``peer`` via ``host``."""

    uri: bytes
    peer: tuple[str, int]
    host: str
    sock_index: int = 0
    route: int = -1  # the route table row of a gateway target, -1 for a registered contact


@dataclass(frozen=True)
class Out:
    """Send ``data`` to ``dest`` from host ``host``'s SIP socket ``sock_index``."""

    data: bytes
    dest: tuple[str, int]
    host: str
    sock_index: int = 0


@dataclass(frozen=True)
class Arm:
    """Arm timer ``name`` of this call for time ``at`` (tx timers: "tx|<key>|<timer>")."""

    name: str
    at: float


@dataclass(frozen=True)
class Cdr:
    record: dict


@dataclass
class Leg:
    name: str
    call_id: bytes
    peer: tuple[str, int]
    host: str
    sock_index: int
    local_tag: str
    user: str
    state: str = "calling"  # calling, early, answered, failed, ended
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

    def to_record(self) -> dict:
        # Shallow on purpose: every field is a plain value or an already plain record
        # (dataclasses.asdict deep-copies, and was the costliest step of a call event).
        record = {f.name: getattr(self, f.name) for f in _LEG_FIELDS}
        record["peer"] = list(self.peer)
        return record

    @classmethod
    def from_record(cls, record: dict) -> Leg:
        record = dict(record)
        record["peer"] = tuple(record["peer"])
        return cls(**record)


@dataclass
class Call:
    tag: str
    slot: int
    caller: str
    callee: str
    a: Leg
    forks: list[Leg] = field(default_factory=list)
    state: str = "trying"  # trying, ringing, early, answered, ended
    created: float = 0.0
    answered: float = 0.0
    ended: float = 0.0
    winner: int = -1
    txs: dict[str, dict] = field(default_factory=dict)  # key -> {"leg", "role", "tx", ...}
    timers: dict[str, float] = field(default_factory=dict)  # call-level timers
    a_offer: bool = True  # the caller's INVITE carried SDP
    pending_ack: dict = field(default_factory=dict)  # leg -> ACK of the other leg to send
    hangup: dict = field(default_factory=dict)  # cause, q850, side, status
    worker: str = ""
    session_interval: int = 0
    method: str = "INVITE"  # or MESSAGE: a page relayed to the callee's contacts
    bye_caller_after_ack: list | None = None  # a BYE for the caller held until its ACK

    # ---------------------------------------------------------------- records
    def to_record(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in _CALL_FIELDS}
        record["a"] = self.a.to_record()
        record["forks"] = [leg.to_record() for leg in self.forks]
        record["txs"] = {key: dict(entry) for key, entry in self.txs.items()}
        record["timers"] = dict(self.timers)
        record["pending_ack"] = dict(self.pending_ack)
        record["hangup"] = dict(self.hangup)
        return record

    def timer_entries(self) -> dict[str, float]:
        """Every timer the call is waiting for: name -> due.  The shell arms and disarms
        timers in Redis from the difference between two of these, so a cancelled timer
        is removed instead of firing for nothing.  Timers that would only end a finished
        transaction (D, I, J, K, M) are left out: such a transaction is dropped when the
        call is next touched after its time (``prune``), or with the record."""
        entries = dict(self.timers)
        for key, entry in self.txs.items():
            for name, due in entry["tx"]["timers"].items():
                if name not in WAIT_ONLY:
                    entries[f"tx|{key}|{name}"] = due
        return entries

    def prune(self, now: float) -> None:
        """Drop transactions that only waited for a wait-only timer that is now past."""
        for key, entry in list(self.txs.items()):
            timers = entry["tx"]["timers"]
            if timers and all(n in WAIT_ONLY and due <= now for n, due in timers.items()):
                del self.txs[key]

    @classmethod
    def from_record(cls, record: dict) -> Call:
        """A call that shares nothing mutable with ``record``, so the shell can compare
        the record before and after an event."""
        record = dict(record)
        record["a"] = Leg.from_record(record["a"])
        record["forks"] = [Leg.from_record(r) for r in record["forks"]]
        record["txs"] = {key: dict(entry) for key, entry in record["txs"].items()}
        for name in ("timers", "pending_ack", "hangup"):
            record[name] = dict(record[name])
        return cls(**record)

    @property
    def is_call(self) -> bool:
        return self.method == "INVITE"

    @property
    def live(self) -> bool:
        return self.state != "ended"

    def leg(self, name: str) -> Leg:
        return self.a if name == "a" else self.forks[int(name[1:])]

    def leg_of_call_id(self, call_id: bytes) -> Leg | None:
        if call_id == self.a.call_id:
            return self.a
        return next((leg for leg in self.forks if leg.call_id == call_id), None)

    @property
    def b(self) -> Leg | None:
        """The answering fork, once there is one."""
        return self.forks[self.winner] if self.winner >= 0 else None

    def other(self, leg: Leg) -> Leg | None:
        return self.b if leg.name == "a" else self.a

    # ---------------------------------------------------------------- creation
    @classmethod
    def start(cls, *, tag: str, slot: int, invite: Request, source: tuple[str, int], host: str,
              sock_index: int, caller: str, callee: str, targets: list[Target], ctx: Ctx,
              trying_sent: bool = False) -> tuple[Call, list]:
        """A new call: 100 Trying to the caller, an INVITE to every target."""
        a = Leg("a", invite.call_id, response_dest(invite, source), host, sock_index,
                ctx.ids.tag(), caller)
        call = cls(tag, slot, caller, callee, a, created=ctx.now, a_offer=bool(invite.body),
                   method=invite.method)
        out: list = []
        ist = server_transaction(invite, a.peer, ctx.cfg.timers)
        ist.on_request(invite, ctx.now)
        a.invite_key = ist.key
        call.txs[ist.key] = {"leg": "a", "role": "invite", "tx": ist.to_record()}
        trying = call._respond(ist.key, build_response(invite, 100, headers=[
            (b"Server", ctx.cfg.user_agent)]), ctx.now)
        if not trying_sent and invite.method == "INVITE":  # the shell may have sent it already
            out += trying
        offer = call._sdp(ctx, a, invite.body, invite.content_type, offer=True)
        for index, target in enumerate(targets):
            out += call._fork(index, target, invite, offer, ctx)
        if ctx.cfg.no_answer_timeout and invite.method == "INVITE":
            out.append(call._arm("no-answer", ctx.now + ctx.cfg.no_answer_timeout))
        return call, out

    def _fork(self, index: int, target: Target, invite: Request, body: bytes, ctx: Ctx) -> list:
        call_id = f"sc{self.slot}.{self.tag}.{index}".encode()
        leg = Leg(f"b{index}", call_id, target.peer, target.host, target.sock_index, ctx.ids.tag(),
                  self.callee, target=target.uri, route=target.route)
        self.forks.append(leg)
        display = invite.from_.display
        from_value = (b'"' + display.replace(b'"', b"") + b'" ' if display else b"") + \
            b"<sip:%s@%s>;tag=%s" % (self.caller.encode(), ctx.cfg.address.encode(),
                                     leg.local_tag.encode())
        max_forwards = min(70, (invite.max_forwards or 70) - 1)
        method = invite.method
        headers = [
            (b"Via", _via(ctx.cfg, ctx.ids.branch())), (b"Max-Forwards", b"%d" % max_forwards),
            (b"From", from_value),
            (b"To", b"<sip:%s@%s>" % (self.callee.encode(), ctx.cfg.address.encode())),
            (b"Call-ID", call_id), (b"CSeq", b"1 %s" % method.encode())]
        if method == "INVITE":
            headers += [(b"Contact", _contact(self.caller, ctx.cfg)), (b"Allow", ctx.cfg.allow),
                        (b"Supported", ctx.cfg.supported)]
        headers += [(b"User-Agent", ctx.cfg.user_agent), *_carried(invite), *self._xcid(leg, ctx)]
        request = build_request(method, target.uri, headers, body)
        return self._start_client(leg, request, "invite", ctx)

    def _xcid(self, leg: Leg, ctx: Ctx) -> tuple[tuple[bytes, bytes], ...]:
        """The header naming the A-leg's Call-ID, for a request to a B-leg (sngrep's
        sip.xcid, Homer's correlation): none on the A-leg, none when configured off."""
        if leg.name == "a" or not ctx.cfg.xcid_header:
            return ()
        return ((ctx.cfg.xcid_header, self.a.call_id),)

    # ---------------------------------------------------------------- transactions
    def _arm(self, name: str, at: float) -> Arm:
        self.timers[name] = at
        return Arm(name, at)

    def _tx(self, key: str):
        entry = self.txs.get(key)
        return None if entry is None else transaction_from_record(entry["tx"])

    def _save_tx(self, key: str, tx) -> None:
        if tx.terminated:
            self.txs.pop(key, None)
        else:
            self.txs[key]["tx"] = tx.to_record()

    def _start_client(self, leg: Leg, request: Request, role: str, ctx: Ctx,
                      **extra) -> list:
        ctr = client_transaction(request, leg.peer, ctx.cfg.timers)
        if role == "invite":
            leg.invite_key = ctr.key
        self.txs[ctr.key] = {"leg": leg.name, "role": role, "tx": ctr.to_record(), **extra}
        actions = ctr.start(ctx.now)
        self._save_tx(ctr.key, ctr)
        return self._run(ctr.key, leg, actions)

    def _respond(self, key: str, response: Response, now: float) -> list:
        """Send a response through the server transaction ``key``."""
        entry = self.txs.get(key)
        if entry is None:
            return []
        tx = transaction_from_record(entry["tx"])
        actions = tx.send_response(response, now)
        self._save_tx(key, tx)
        return self._run(key, self.leg(entry["leg"]), actions)

    def _run(self, key: str, leg: Leg, actions: list[Action]) -> list:
        """Turn a transaction's actions into the call's: sends go out via the leg's host."""
        out: list = []
        for action in actions:
            if isinstance(action, Send):
                out.append(Out(action.data, action.dest, leg.host, leg.sock_index))
            elif isinstance(action, SetTimer):
                out.append(Arm(f"tx|{key}|{action.name}", action.at))
            elif isinstance(action, (CancelTimer, Terminated, Deliver, TimedOut, NoAck)):
                out.append(action)
        return out

    # ---------------------------------------------------------------- requests
    def on_request(self, req: Request, source: tuple[str, int], ctx: Ctx) -> list:
        leg = self.leg_of_call_id(req.call_id)
        if leg is None:
            return [Reply(481)]
        key = server_key(req)
        if key in self.txs and req.method != "CANCEL":  # a retransmission, or the ACK of a final
            return self._retransmission(key, req, ctx)
        if req.method == "ACK":
            return self._ack(leg, req, ctx)
        if req.method == "CANCEL":
            return self._cancel(leg, req, ctx)
        if req.to.tag is None:
            return [Reply(482, "Loop Detected")]  # a second initial INVITE: a loop or a fork
        if leg.dialog is None or req.to.tag != leg.local_tag:
            return [Reply(481)]
        dialog = Dialog.from_record(leg.dialog)
        if not dialog.check_remote_cseq(req):
            return [Reply(500, "CSeq out of order")]
        dialog.update_from_request(req)
        leg.dialog = dialog.to_record()
        if req.method == "BYE":
            return self._bye(leg, req, ctx)
        if req.method == "OPTIONS":
            return self._answer_locally(leg, req, 200, ctx)
        if req.method in RELAYED_METHODS:
            return self._relay_request(leg, req, ctx)
        return self._answer_locally(leg, req, 405, ctx, [(b"Allow", ctx.cfg.allow)])

    def _retransmission(self, key: str, req: Request, ctx: Ctx) -> list:
        entry = self.txs[key]
        tx = transaction_from_record(entry["tx"])
        if not tx.matches(req):
            return [Reply(482, "Loop Detected")]
        actions = tx.on_request(req, ctx.now)
        self._save_tx(key, tx)
        out = self._run(key, self.leg(entry["leg"]), actions)
        if req.method == "ACK" and any(isinstance(a, Deliver) for a in actions):
            out += self._acked(self.leg(entry["leg"]), req, ctx)
        return [a for a in out if not isinstance(a, Deliver)]

    def _ack(self, leg: Leg, req: Request, ctx: Ctx) -> list:
        """An ACK for a 2xx we sent (a new branch, in the dialog)."""
        if leg.dialog is None or req.to.tag != leg.local_tag:
            return []  # the ACK of a failure answered statelessly: absorbed
        for key, entry in list(self.txs.items()):
            if entry["leg"] == leg.name and entry["role"] in ("invite", "reinvite") \
                    and entry["tx"]["kind"] == "ist" and entry["tx"]["state"] == "Accepted":
                tx = transaction_from_record(entry["tx"])
                if tx.request_msg.cseq.number == req.cseq.number:
                    self._save_tx(key, _ack_received(tx, ctx.now))
        return self._acked(leg, req, ctx)

    def _acked(self, leg: Leg, req: Request, ctx: Ctx) -> list:
        """Our 2xx was ACKed: pass on a delayed ACK (with the answer SDP) to the other leg,
        and a BYE for the caller that waited for this ACK."""
        out = self._held_bye(ctx) if leg is self.a else []
        pending = self.pending_ack.pop(leg.name, None)
        if pending is None:
            return out
        other = self.leg(pending["leg"])
        answer = self._sdp(ctx, leg, req.body, req.content_type, offer=False)
        return self._send_ack(other, pending["cseq"], answer, req.content_type, ctx) + out

    def _held_bye(self, ctx: Ctx) -> list:
        cause = self.bye_caller_after_ack
        if cause is None:
            return []
        self.bye_caller_after_ack = None
        return self._send_bye(self.a, tuple(cause), ctx)

    def _caller_unacked(self) -> bool:
        entry = self.txs.get(self.a.invite_key)
        return (entry is not None and entry["tx"]["state"] == "Accepted"
                and not entry["tx"].get("acked"))

    def _send_ack(self, leg: Leg, cseq: int, body: bytes, content_type: bytes | None,
                  ctx: Ctx) -> list:
        """The ACK of this leg's 2xx to CSeq ``cseq``.  A repeated 2xx (our ACK was lost, or
        crossed it) gets the very same ACK again, as RFC 3261 13.2.2.4 has it: a new one
        (another branch) is a new request to the peer, which a strict UA refuses."""
        if leg.last_ack and parse(leg.last_ack).cseq.number == cseq:
            return [Out(leg.last_ack, leg.peer, leg.host, leg.sock_index)]
        dialog = Dialog.from_record(leg.dialog)
        ack, _ = dialog.create_request(
            "ACK", branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=_contact_uri(self, leg, ctx.cfg), body=body, headers=self._xcid(leg, ctx),
            content_type=content_type if body else None, cseq=cseq)
        leg.dialog = dialog.to_record()
        leg.last_ack = ack.to_bytes()
        return [Out(leg.last_ack, leg.peer, leg.host, leg.sock_index)]

    def _cancel(self, leg: Leg, req: Request, ctx: Ctx) -> list:
        """CANCEL of the caller's INVITE: 200, 487, CANCEL to every fork (RFC 3261 9.2)."""
        target = self.txs.get(leg.invite_key)
        if leg.name != "a" or target is None:
            return [Reply(481)]
        out: list = [Reply(200)]
        if self.state in ("answered", "ended"):
            return out
        invite = transaction_from_record(target["tx"]).request_msg
        out += self._fail_caller(487, ORIGINATOR_CANCEL, "caller", invite, ctx)
        out += self._cancel_forks(ctx, reason=ORIGINATOR_CANCEL)
        return out

    def _bye(self, leg: Leg, req: Request, ctx: Ctx) -> list:
        out = self._answer_locally(leg, req, 200, ctx)
        side = "caller" if leg.name == "a" else "callee"
        if self.state == "answered":
            other = self.other(leg)
            out += self._end(NORMAL_CLEARING, side, ctx.now, status=200)
            if other is self.a and self._caller_unacked():
                # RFC 3261 15: no BYE before the ACK of our 2xx; it goes with the ACK,
                # or when the 2xx is given up on (Timer L).
                self.bye_caller_after_ack = list(NORMAL_CLEARING)
            else:
                out += self._send_bye(other, NORMAL_CLEARING, ctx)
        elif leg.name == "a" and self.state != "ended":
            invite = self._tx(self.a.invite_key)
            if invite is not None:
                out += self._fail_caller(487, ORIGINATOR_CANCEL, side, invite.request_msg,
                                         ctx)
            out += self._cancel_forks(ctx, reason=ORIGINATOR_CANCEL)
        return out

    def _answer_locally(self, leg: Leg, req: Request, status: int, ctx: Ctx,
                        headers: list = ()) -> list:
        """Answer an in-dialog request ourselves, through a server transaction."""
        stx = server_transaction(req, response_dest(req, ctx.source or leg.peer), ctx.cfg.timers)
        stx.on_request(req, ctx.now)
        self.txs[stx.key] = {"leg": leg.name, "role": "local", "tx": stx.to_record()}
        response = build_response(req, status, headers=[*headers, (b"Server", ctx.cfg.user_agent)])
        return self._respond(stx.key, response, ctx.now)

    def _relay_request(self, leg: Leg, req: Request, ctx: Ctx) -> list:
        """re-INVITE, UPDATE, INFO, MESSAGE...: the same request on the other leg."""
        other = self.other(leg)
        if other is None or other.dialog is None or self.state == "ended":
            return self._answer_locally(leg, req, 481, ctx)
        if req.method == "INVITE" and self._invite_pending(leg):
            return self._answer_locally(leg, req, 491, ctx)
        stx = server_transaction(req, response_dest(req, ctx.source or leg.peer), ctx.cfg.timers)
        stx.on_request(req, ctx.now)
        role = "reinvite" if req.method == "INVITE" else "relayed"
        self.txs[stx.key] = {"leg": leg.name, "role": role, "tx": stx.to_record()}
        dialog = Dialog.from_record(other.dialog)
        request, _ = dialog.create_request(
            req.method, branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=_contact_uri(self, other, ctx.cfg),
            headers=(*_carried(req), *self._xcid(other, ctx)),
            body=self._sdp(ctx, leg, req.body, req.content_type, offer=True), content_type=None)
        other.dialog = dialog.to_record()
        out = self._start_client(other, request, "relay", ctx, server=stx.key)
        if req.method == "INVITE":
            out += self._respond(stx.key, build_response(req, 100), ctx.now)
        return out

    def _invite_pending(self, leg: Leg) -> bool:
        return any(e["leg"] == leg.name and e["role"] == "reinvite"
                   and e["tx"]["state"] == "Proceeding" for e in self.txs.values())

    # ---------------------------------------------------------------- responses
    def on_response(self, resp: Response, source: tuple[str, int], ctx: Ctx) -> list:
        key = client_key(resp)
        entry = self.txs.get(key)
        leg = self.leg_of_call_id(resp.call_id)
        if leg is None:
            return []
        if entry is None:
            # No transaction (it ended): a retransmitted 2xx to our INVITE gets its ACK again.
            if resp.cseq.method == "INVITE" and 200 <= resp.status < 300:
                return self._stray_2xx(leg, resp, ctx)
            return []
        tx = transaction_from_record(entry["tx"])
        actions = tx.on_response(resp, ctx.now)
        self._save_tx(key, tx)
        out = self._run(key, leg, actions)
        for action in actions:
            if isinstance(action, Deliver):
                out += self._on_delivered(entry, leg, action.msg, ctx)
        return [a for a in out if not isinstance(a, Deliver)]

    def _on_delivered(self, entry: dict, leg: Leg, resp: Response, ctx: Ctx) -> list:
        role = entry["role"]
        if role == "invite":
            return self._fork_response(leg, resp, ctx)
        if role == "relay":
            return self._relay_response(entry, leg, resp, ctx)
        if role == "bye" and resp.status >= 200:
            leg.state = "ended"
        return []

    def _fork_response(self, leg: Leg, resp: Response, ctx: Ctx) -> list:
        status = resp.status
        if resp.cseq.method == "MESSAGE":
            return self._message_response(leg, resp, ctx)
        if status == 100:  # RFC 3261 9.1: from now on a CANCEL may be sent
            leg.provisional = True
            return self._send_cancel(leg, ctx, _held(leg)) if leg.cancel_pending else []
        invite = self._tx(leg.invite_key)
        invite_msg = invite.request_msg if invite is not None else None
        if status < 200:
            leg.provisional = True
            if resp.to.tag and invite_msg is not None and leg.dialog is None:
                leg.dialog = Dialog.from_uac(invite_msg, resp).to_record()
            leg.state = "early"
            out = []
            if leg.cancel_pending:
                out += self._send_cancel(leg, ctx, _held(leg))
            if self.state in ("trying", "ringing", "early"):
                self.state = "early" if resp.body else "ringing"
                out += self._to_caller(leg, resp, ctx)
            return out
        if status < 300:
            return self._fork_answered(leg, resp, invite_msg, ctx)
        if status in (401, 407) and invite_msg is not None:
            retry = self._authenticate_fork(leg, resp, invite_msg, ctx)
            if retry is not None:
                return retry
        leg.state = "failed"
        leg.final = status
        leg.reason_phrase = resp.reason.decode("utf-8", "replace")
        return self._maybe_all_failed(ctx)

    def _fork_answered(self, leg: Leg, resp: Response, invite_msg: Request | None,
                       ctx: Ctx) -> list:
        if leg.dialog is None or Dialog.from_record(leg.dialog).remote_tag != resp.to.tag:
            if invite_msg is None:
                return []
            leg.dialog = Dialog.from_uac(invite_msg, resp).to_record()
        dialog = Dialog.from_record(leg.dialog)
        dialog.update_from_response(resp)
        dialog.confirm()
        leg.dialog = dialog.to_record()
        leg.final = resp.status
        if self.b is leg:  # the winner's 2xx again: our ACK got lost (RFC 3261 13.2.2.4)
            if "a" in self.pending_ack or not leg.last_ack:
                return []  # that ACK still waits for the caller's answer
            return [Out(leg.last_ack, leg.peer, leg.host, leg.sock_index)]
        if self.winner >= 0 or self.state == "ended":
            # Too late: another fork won, or the caller gave up.  ACK, then BYE (RFC 3261 16.7).
            leg.state = "answered"
            out = self._send_ack(leg, resp.cseq.number, b"", None, ctx)
            return out + self._send_bye(leg, NORMAL_CLEARING, ctx)
        self.winner = int(leg.name[1:])
        leg.state = "answered"
        self.state = "answered"
        self.answered = ctx.now
        self.timers.pop("no-answer", None)
        out: list = []
        if self.a_offer:
            out += self._send_ack(leg, resp.cseq.number, b"", None, ctx)
        else:  # the answer comes in the caller's ACK
            self.pending_ack["a"] = {"leg": leg.name, "cseq": resp.cseq.number}
        out += self._to_caller(leg, resp, ctx)
        out += self._cancel_forks(ctx, reason=COMPLETED_ELSEWHERE)
        if ctx.cfg.max_duration:
            out.append(self._arm("max-duration", ctx.now + ctx.cfg.max_duration))
        out += self._session_timer(resp, ctx.now)
        return out

    def _message_response(self, leg: Leg, resp: Response, ctx: Ctx) -> list:
        """An out-of-dialog MESSAGE (RFC 3428): the first 2xx of any contact is the answer."""
        if resp.status < 200 or self.state == "ended":
            return []
        leg.final = resp.status
        leg.reason_phrase = resp.reason.decode("utf-8", "replace")
        if resp.status >= 300:
            leg.state = "failed"
            return self._maybe_all_failed(ctx)
        leg.state = "answered"
        invite = self._tx(self.a.invite_key)
        answer = build_response(invite.request_msg, resp.status, leg.reason_phrase,
                                to_tag=self.a.local_tag, headers=[(b"Server", ctx.cfg.user_agent)])
        return self._respond(self.a.invite_key, answer, ctx.now) + self._end(
            NORMAL_CLEARING, "callee", ctx.now, status=resp.status)

    def _authenticate_fork(self, leg: Leg, resp: Response, invite: Request, ctx: Ctx
                           ) -> list | None:
        """A gateway challenged our INVITE: send it again with credentials, once."""
        credentials = ctx.cfg.gateway_credentials.get(leg.route)
        if credentials is None or leg.auth_tried or self.state in ("answered", "ended"):
            return None
        proxy = resp.status == 407
        challenge = resp.header("proxy-authenticate" if proxy else "www-authenticate")
        if challenge is None:
            return None
        value = digest.authorization(
            challenge, method="INVITE", uri=invite.uri_raw.decode("latin-1"),
            username=credentials[0], password=credentials[1], cnonce=ctx.ids.tag())
        if value is None:
            return None
        retry = parse(invite.to_bytes())
        retry.set_header(b"Via", _via(ctx.cfg, ctx.ids.branch()))
        retry.set_header(b"CSeq", b"%d INVITE" % (invite.cseq.number + 1))
        retry.add_header(b"Proxy-Authorization" if proxy else b"Authorization", value)
        leg.auth_tried = True
        leg.provisional = False
        return self._start_client(leg, retry, "invite", ctx)

    def _stray_2xx(self, leg: Leg, resp: Response, ctx: Ctx) -> list:
        """A 2xx retransmitted after our INVITE transaction ended: ACK it again (RFC 6026)."""
        if leg.dialog is None or Dialog.from_record(leg.dialog).remote_tag != resp.to.tag:
            return []
        return self._send_ack(leg, resp.cseq.number, b"", None, ctx)

    def _maybe_all_failed(self, ctx: Ctx) -> list:
        if self.state in ("answered", "ended"):
            return []
        if any(leg.state in ("calling", "early") for leg in self.forks):
            return []
        status, reason = best_final([(leg.final, leg.reason_phrase) for leg in self.forks])
        invite = self._tx(self.a.invite_key)
        if invite is None:
            return []
        cause = STATUS_CAUSES.get(status, ("CALL_REJECTED", 21))
        return self._fail_caller(status, cause, "callee", invite.request_msg, ctx, reason)

    def _relay_response(self, entry: dict, leg: Leg, resp: Response, ctx: Ctx) -> list:
        """The other leg answered a relayed request: the same answer to the requester."""
        server = self.txs.get(entry["server"])
        if server is None or resp.status == 100:
            return []
        requester = self.leg(server["leg"])
        request = transaction_from_record(server["tx"]).request_msg
        out: list = []
        if resp.cseq.method == "INVITE" and 200 <= resp.status < 300:
            dialog = Dialog.from_record(leg.dialog)
            dialog.update_from_response(resp)
            leg.dialog = dialog.to_record()
            if request.body:
                out += self._send_ack(leg, resp.cseq.number, b"", None, ctx)
            else:
                self.pending_ack[requester.name] = {"leg": leg.name, "cseq": resp.cseq.number}
            out += self._session_timer(resp, ctx.now)
        if resp.cseq.method == "UPDATE" and 200 <= resp.status < 300:
            out += self._session_timer(resp, ctx.now)
        headers = [*_carried(resp), (b"Server", ctx.cfg.user_agent)]
        if resp.status < 300 and request.method == "INVITE":
            headers.append((b"Contact", _contact(self._user_for(requester), ctx.cfg)))
        body = self._sdp(ctx, leg, resp.body, resp.content_type, offer=not request.body)
        answer = build_response(request, resp.status, resp.reason.decode("utf-8", "replace"),
                                headers=headers, body=body)
        return out + self._respond(entry["server"], answer, ctx.now)

    # ---------------------------------------------------------------- towards the caller
    def _to_caller(self, leg: Leg, resp: Response, ctx: Ctx) -> list:
        """A callee's 18x or 2xx goes on to the caller, with its SDP through the media."""
        invite = self._tx(self.a.invite_key)
        if invite is None:
            return []
        body = self._sdp(ctx, leg, resp.body, resp.content_type, offer=not self.a_offer)
        request = invite.request_msg
        headers = [(b"Contact", _contact(self.callee, ctx.cfg)), (b"Allow", ctx.cfg.allow),
                   (b"Supported", ctx.cfg.supported), (b"Server", ctx.cfg.user_agent),
                   *_carried(resp)]
        answer = build_response(request, resp.status, resp.reason.decode("utf-8", "replace"),
                                to_tag=self.a.local_tag, headers=headers, body=body)
        if self.a.dialog is None:
            dialog = Dialog.from_uas(request, self.a.local_tag, _contact_uri(self, self.a, ctx.cfg))
            self.a.dialog = dialog.to_record()
        if resp.status >= 200:
            dialog = Dialog.from_record(self.a.dialog)
            dialog.confirm()
            self.a.dialog = dialog.to_record()
            self.a.state = "answered"
        else:
            self.a.state = "early"
        return self._respond(self.a.invite_key, answer, ctx.now)

    def _fail_caller(self, status: int, cause: tuple[str, int], side: str,
                     invite: Request, ctx: Ctx, reason: str | None = None) -> list:
        """The call did not connect: a final failure to the caller, and the CDR."""
        answer = build_response(invite, status, reason or None, to_tag=self.a.local_tag,
                                headers=[(b"Server", ctx.cfg.user_agent)])
        out = self._respond(self.a.invite_key, answer, ctx.now)
        return out + self._end(cause, side, ctx.now, status=status)

    def _cancel_forks(self, ctx: Ctx,
                      reason: tuple[str, int] | None) -> list:
        out: list = []
        for leg in self.forks:
            if leg.state not in ("calling", "early") or leg.name == (self.b.name if self.b else ""):
                continue
            if leg.provisional:
                out += self._send_cancel(leg, ctx, reason)
            else:  # RFC 3261 9.1: no CANCEL before a provisional response
                leg.cancel_pending = True
                leg.cancel_reason = list(reason) if reason else None
            leg.state = "failed" if leg.final else "cancelling"
        return out

    def _send_cancel(self, leg: Leg, ctx: Ctx,
                     reason: tuple[str, int] | None = None) -> list:
        invite = self._tx(leg.invite_key)
        leg.cancel_pending = False
        if invite is None or invite.state not in ("Calling", "Proceeding"):
            return []
        request = invite.request_msg
        headers = [(b"Via", bytes(request.via)), (b"Max-Forwards", b"70"),
                   (b"From", request.header("from")), (b"To", request.header("to")),
                   (b"Call-ID", request.call_id), (b"CSeq", b"%d CANCEL" % request.cseq.number)]
        if reason is not None:
            headers.append((b"Reason", _reason(reason)))
        cancel = build_request("CANCEL", request.uri_raw, [*headers, *self._xcid(leg, ctx)])
        return self._start_client(leg, cancel, "cancel", ctx)

    def _send_bye(self, leg: Leg | None, cause: tuple[str, int], ctx: Ctx) -> list:
        if leg is None or leg.dialog is None or leg.state == "ended":
            return []
        dialog = Dialog.from_record(leg.dialog)
        bye, _ = dialog.create_request(
            "BYE", branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=b"",
            headers=((b"Reason", _reason(cause)), (b"User-Agent", ctx.cfg.user_agent),
                     *self._xcid(leg, ctx)))
        leg.dialog = dialog.to_record()
        leg.state = "ended"
        return self._start_client(leg, bye, "bye", ctx)

    def _session_timer(self, resp: Response, now: float) -> list:
        """RFC 4028: when the phones use session timers, end the call if refreshes stop."""
        value = resp.header("session-expires")
        if not value:
            return []
        interval = value.split(b";")[0].strip()
        if not interval.isdigit():
            return []
        self.session_interval = int(interval)
        return [self._arm("session", now + self.session_interval)]

    def _sdp(self, ctx: Ctx, leg: Leg, body: bytes, content_type: bytes | None, *,
             offer: bool) -> bytes:
        """An SDP body from ``leg`` on its way to the other leg: through the media relay
        (or unchanged in bypass mode).  Other bodies pass as they are."""
        if not body or content_type != b"application/sdp":
            return body
        return ctx.media.rewrite(self.tag, leg.name, body, offer=offer, peer_ip=leg.peer[0])

    def _user_for(self, leg: Leg) -> str:
        """The user our Contact shows to ``leg``: the party on the other side."""
        return self.callee if leg.name == "a" else self.caller

    # ---------------------------------------------------------------- ending
    def _end(self, cause: tuple[str, int], side: str, now: float, status: int) -> list:
        if self.state == "ended":
            return []
        self.state = "ended"
        self.ended = now
        self.timers.clear()
        self.hangup = {"cause": cause[0], "q850": cause[1], "side": side, "status": status}
        if not self.is_call:
            return []  # a MESSAGE is no call: no CDR
        b = self.b
        record = {
            "caller": self.caller, "callee": self.callee, "a_call_id": self.a.call_id.decode(
                "latin-1"), "b_call_id": b.call_id.decode("latin-1") if b else "",
            "start": round(self.created, 3), "answer": round(self.answered, 3) if self.answered
            else "", "end": round(now, 3),
            "duration": round(now - self.created, 3),
            "billsec": round(now - self.answered, 3) if self.answered else 0,
            "caller_source": hostport(*self.a.peer),
            "hangup_cause": cause[0], "q850": cause[1], "hangup_side": side,
            "sip_status": status}
        return [Cdr(record)]

    def hangup_now(self, cause: tuple[str, int], side: str, ctx: Ctx) -> list:
        """End the call from here (operator, media timeout, timers): BYE both legs."""
        if self.state == "ended":
            return []
        if self.state != "answered":
            invite = self._tx(self.a.invite_key)
            out = self._cancel_forks(ctx, reason=cause)
            if invite is not None:
                out += self._fail_caller(480, cause, side, invite.request_msg, ctx)
            return out
        out = self._end(cause, side, ctx.now, status=200)
        out += self._send_bye(self.a, cause, ctx)
        out += self._send_bye(self.b, cause, ctx)
        return out

    # ---------------------------------------------------------------- timers
    def on_timer(self, name: str, due: float, ctx: Ctx) -> list:
        if name.startswith("tx|"):
            key, _, timer = name[3:].rpartition("|")
            return self._tx_timer(key, timer, due, ctx)
        if self.timers.get(name) != due:
            return []  # stale: re-armed, cancelled, or fired elsewhere already
        del self.timers[name]
        if name == "no-answer":
            return self.hangup_now(NO_ANSWER, "system", ctx)
        if name == "max-duration":
            return self.hangup_now(RECOVERY_ON_TIMER_EXPIRE, "system", ctx)
        if name == "session":
            return self.hangup_now(RECOVERY_ON_TIMER_EXPIRE, "system", ctx)
        return []

    def _tx_timer(self, key: str, timer: str, due: float, ctx: Ctx) -> list:
        entry = self.txs.get(key)
        if entry is None:
            return []
        tx = transaction_from_record(entry["tx"])
        actions = tx.on_timer(timer, ctx.now, due)
        self._save_tx(key, tx)
        leg = self.leg(entry["leg"])
        out = self._run(key, leg, actions)
        for action in actions:
            if isinstance(action, TimedOut):
                out += self._timed_out(entry, leg, ctx)
            elif isinstance(action, NoAck) and entry["role"] == "invite":
                out += self._held_bye(ctx) + self.hangup_now(RECOVERY_ON_TIMER_EXPIRE,
                                                             "system", ctx)
        return [a for a in out if not isinstance(a, (Deliver, TimedOut, NoAck))]

    def _timed_out(self, entry: dict, leg: Leg, ctx: Ctx) -> list:
        role = entry["role"]
        if role == "invite":  # Timer B: the callee is unreachable
            leg.state = "failed"
            leg.final = 408
            return self._maybe_all_failed(ctx)
        if role == "relay":
            server = self.txs.get(entry["server"])
            if server is not None:
                request = transaction_from_record(server["tx"]).request_msg
                return self._respond(entry["server"], build_response(request, 408), ctx.now)
        if role == "bye":
            leg.state = "ended"
        return []


_LEG_FIELDS = fields(Leg)
_CALL_FIELDS = fields(Call)


@dataclass(frozen=True)
class Reply:
    """An answer the shell sends statelessly to the request at hand (no transaction)."""

    status: int
    reason: str | None = None


def best_final(finals: list[tuple[int, str]]) -> tuple[int, str]:
    """RFC 3261 16.7 step 6: a 6xx wins; else the lowest class, first come, a real answer
    before a timeout (408); only timeouts in that class -> 480."""
    finals = [(s, r) for s, r in finals if s >= 300]
    if not finals:
        return 480, "Temporarily Unavailable"
    six = [f for f in finals if f[0] >= 600]
    if six:
        return six[0]
    lowest = min(s // 100 for s, _ in finals)
    in_class = [f for f in finals if f[0] // 100 == lowest]
    answered = [f for f in in_class if f[0] != 408]  # in its class, a timeout says least
    if not answered:  # the contacts of that class all timed out: not reachable now
        return 480, "Temporarily Unavailable"
    return answered[0]


def _ack_received(tx, now: float):
    tx.ack_received(now)
    return tx


def _via(cfg: Settings, branch: str) -> bytes:
    host = f"[{cfg.address}]" if ":" in cfg.address else cfg.address
    return b"SIP/2.0/UDP %s:%d;branch=%s;rport" % (host.encode(), cfg.port, branch.encode())


def _contact(user: str, cfg: Settings) -> bytes:
    host = f"[{cfg.address}]" if ":" in cfg.address else cfg.address
    return b"<sip:%s@%s:%d>" % (user.encode(), host.encode(), cfg.port)


def _contact_uri(call: Call, leg: Leg, cfg: Settings) -> bytes:
    return _contact(call._user_for(leg), cfg)[1:-1]


def _reason(cause: tuple[str, int]) -> bytes:
    if tuple(cause) == COMPLETED_ELSEWHERE:  # RFC 3326: the phone shows no missed call
        return b'SIP;cause=200;text="Call completed elsewhere"'
    return b'Q.850;cause=%d;text="%s"' % (cause[1], cause[0].encode())


def _held(leg: Leg) -> tuple[str, int] | None:
    return tuple(leg.cancel_reason) if leg.cancel_reason else None


def _carried(msg: Request | Response) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers that go on to the other leg."""
    return [(h.name, h.value) for h in msg.headers if h.key in RELAYED_HEADERS]
