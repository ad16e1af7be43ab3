"""A B2BUA call as a pure state machine: messages and timers in, actions out.

A call has an A-leg (the caller's dialog with us) and one B-leg per contact of
the callee (forking).  The record holds both legs' dialogs, every transaction
of the call and the call's progress, so whichever worker loads it can carry on;
the shell (b2bua.py) loads it, feeds it one event, writes it back
compare-and-set, and only then performs the actions.  Nothing here reads the
clock, draws random numbers or does I/O: ``now``, an ``Ids`` source and the media
relay's SDP rewrites (fetched by the shell around the event, media.py) come in.

The parts: this module holds the record, the transactions and the table driver;
inbound.py takes messages and timers in, handlers.py is what the table
(state.py) runs, outbound.py builds what the call sends.

Leg names: "a" for the caller, "b0", "b1"... for the forks.  B-leg Call-IDs come
from cluster/sip/ids.py, which the dispatcher and the operator CLI read them with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cluster.sip.ids import b_leg_call_id, host_part
from cluster.sip.message import Request, Response, build_request, build_response
from cluster.sip.transaction import (
    Action,
    Send,
    client_transaction,
    response_dest,
    server_transaction,
    transaction_from_record,
)

from .actions import Actions, Out
from .handlers import Handlers
from .inbound import Inbound
from .legs import Leg
from .outbound import Outbound
from .state import TABLE, CallState, Event
from .wire import WAIT_ONLY, Ctx, Target, carried, contact, our_via


@dataclass
class Call(Inbound, Handlers, Outbound):
    tag: str
    slot: int
    caller: str
    callee: str
    a: Leg
    forks: list[Leg] = field(default_factory=list)
    state: CallState = CallState.TRYING
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
    codec: str = ""  # the first format of the last SDP answer sent to the caller (the CDR's)

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

    def timer_entries(self, *, waits: bool = False) -> dict[str, float]:
        """Every timer the call is waiting for: name -> due (transaction timers are
        "tx|<key>|<timer>").  The shell arms and disarms timers in Redis from the
        difference between two of these, so a cancelled timer is removed instead of
        firing for nothing; this is the call's only way of asking for a timer.  Timers
        that would only end a finished transaction (D, I, J, K, M) are left out: such a
        transaction is dropped when the call is next touched after its time (``prune``),
        or with the record.  ``waits`` lists them too, for a test clock to step to."""
        entries = dict(self.timers)
        for key, entry in self.txs.items():
            for name, due in entry["tx"]["timers"].items():
                if waits or name not in WAIT_ONLY:
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
        record["state"] = CallState(record["state"])
        return cls(**record)

    @property
    def is_call(self) -> bool:
        return self.method == "INVITE"

    @property
    def live(self) -> bool:
        return self.state != CallState.ENDED

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

    # ---------------------------------------------------------------- the table
    def dispatch(self, event: Event, ctx: Ctx, **args) -> Actions:
        """One call-level event: its row's handler, then the row's next state."""
        row = TABLE.get((self.state, event))
        if row is None:  # an ignored pair: state.IGNORED says why (a test keeps it complete)
            return []
        actions = getattr(self, row.handler)(ctx, **args)
        self.state = row.next
        return actions

    # ---------------------------------------------------------------- creation
    @classmethod
    def start(cls, *, tag: str, slot: int, invite: Request, source: tuple[str, int], host: str,
              sock_index: int, caller: str, callee: str, targets: list[Target], ctx: Ctx,
              trying_sent: bool = False) -> tuple[Call, Actions]:
        """A new call: 100 Trying to the caller, an INVITE to every target."""
        a = Leg("a", invite.call_id, response_dest(invite, source), host, sock_index,
                ctx.ids.tag(), caller)
        call = cls(tag, slot, caller, callee, a, created=ctx.now, a_offer=bool(invite.body),
                   method=invite.method)
        out: Actions = []
        ist = server_transaction(invite, a.peer, ctx.cfg.timers,
                                 reliable=ctx.cfg.reliable(sock_index))
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
            call.timers["no-answer"] = ctx.now + ctx.cfg.no_answer_timeout
        return call, out

    def _fork(self, index: int, target: Target, invite: Request, body: bytes,
              ctx: Ctx) -> Actions:
        call_id = b_leg_call_id(self.slot, self.tag, index)
        leg = Leg(f"b{index}", call_id, target.peer, target.host, target.sock_index, ctx.ids.tag(),
                  self.callee, target=target.uri, route=target.route)
        self.forks.append(leg)
        display = invite.from_.display
        host = host_part(ctx.cfg.address).encode()
        from_value = (b'"' + display.replace(b'"', b"") + b'" ' if display else b"") + \
            b"<sip:%s@%s>;tag=%s" % (self.caller.encode(), host, leg.local_tag.encode())
        max_forwards = min(70, (invite.max_forwards or 70) - 1)
        method = invite.method
        headers = [
            (b"Via", our_via(ctx.cfg, ctx.ids.branch())),
            (b"Max-Forwards", b"%d" % max_forwards), (b"From", from_value),
            (b"To", b"<sip:%s@%s>" % (self.callee.encode(), host)),
            (b"Call-ID", call_id), (b"CSeq", b"1 %s" % method.encode())]
        if method == "INVITE":
            headers += [(b"Contact", contact(self.caller, ctx.cfg)), (b"Allow", ctx.cfg.allow),
                        (b"Supported", ctx.cfg.supported)]
        headers += [(b"User-Agent", ctx.cfg.user_agent), *carried(invite), *self._xcid(leg, ctx)]
        request = build_request(method, target.uri, headers, body)
        return self._start_client(leg, request, "invite", ctx)

    # ---------------------------------------------------------------- transactions
    def _tx(self, key: str):
        entry = self.txs.get(key)
        return None if entry is None else transaction_from_record(entry["tx"])

    def _save_tx(self, key: str, tx) -> None:
        if tx.terminated:
            self.txs.pop(key, None)
        else:
            self.txs[key]["tx"] = tx.to_record()

    def _start_client(self, leg: Leg, request: Request, role: str, ctx: Ctx,
                      **extra) -> Actions:
        ctr = client_transaction(request, leg.peer, ctx.cfg.timers,
                                 reliable=ctx.cfg.reliable(leg.sock_index))
        if role == "invite":
            leg.invite_key = ctr.key
        self.txs[ctr.key] = {"leg": leg.name, "role": role, "tx": ctr.to_record(), **extra}
        actions = ctr.start(ctx.now)
        self._save_tx(ctr.key, ctr)
        return self._run(leg, actions)

    def _respond(self, key: str, response: Response, now: float) -> Actions:
        """Send a response through the server transaction ``key``."""
        entry = self.txs.get(key)
        if entry is None:
            return []
        tx = transaction_from_record(entry["tx"])
        actions = tx.send_response(response, now)
        self._save_tx(key, tx)
        return self._run(self.leg(entry["leg"]), actions, entry)

    @staticmethod
    def _run(leg: Leg, actions: list[Action], entry: dict | None = None) -> Actions:
        """A transaction's sends, as the call's: out via the leg's host, or for a server
        transaction ``entry``, the host that received its request (see Ctx.host).  Its
        timers are in its record (``timer_entries``); what it delivers, the caller of
        ``_run`` reads from ``actions`` itself; nothing else goes up."""
        entry = entry or {}
        host, sock_index = entry.get("host", leg.host), entry.get("sock", leg.sock_index)
        return [Out(a.data, a.dest, host, sock_index) for a in actions if isinstance(a, Send)]


_CALL_FIELDS = fields(Call)
