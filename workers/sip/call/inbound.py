"""Messages and timers into a call: transactions first (a retransmission is absorbed,
a response matched), then each leg's own bookkeeping, then what matters to the call as
a whole goes to the table (``dispatch``, state.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.sip import digest
from cluster.sip.dialog import Dialog
from cluster.sip.message import Request, Response, build_response, parse
from cluster.sip.transaction import (
    Deliver,
    NoAck,
    TimedOut,
    client_key,
    response_dest,
    server_key,
    server_transaction,
    transaction_from_record,
)

from .actions import Actions, Out, Reply
from .legs import RINGING, Leg, LegState
from .state import CONNECTING, Event
from .wire import (
    CALL_TIMERS,
    NORMAL_CLEARING,
    RECOVERY_ON_TIMER_EXPIRE,
    RELAYED_METHODS,
    Ctx,
    answers_reliable,
    arrival,
    our_via,
    reason,
)

if TYPE_CHECKING:
    from .machine import Call


class Inbound:
    """The entry points of a call (mixed into ``Call``)."""

    # ---------------------------------------------------------------- requests
    def on_request(self: Call, req: Request, source: tuple[str, int], ctx: Ctx) -> Actions:
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
        if (req.from_.tag or "") != dialog.remote_tag:  # RFC 3261 12.2.2: not this dialog
            if req.method == "BYE" and req.from_.tag in leg.stray:
                return self._answer_locally(leg, req, 200, ctx)  # one we are ending anyway
            return [Reply(481)]
        if self._lost(leg):  # its dialog is not the call's: we ended it (ACK and BYE)
            return self._answer_locally(leg, req, 200 if req.method == "BYE" else 481, ctx)
        if not dialog.check_remote_cseq(req):
            return [Reply(500, "CSeq out of order")]
        dialog.update_from_request(req)
        leg.dialog = dialog.to_record()
        if req.method == "INVITE":
            self._implied_ack(leg, req, ctx)
        if req.method == "BYE":
            out = self._answer_locally(leg, req, 200, ctx)
            event = Event.CALLER_BYE if leg.name == "a" else Event.CALLEE_BYE
            return out + self.dispatch(event, ctx, leg=leg)
        if req.method == "OPTIONS":
            return self._answer_locally(leg, req, 200, ctx)
        if req.method in RELAYED_METHODS:
            return self.dispatch(Event.IN_DIALOG_REQUEST, ctx, leg=leg, req=req)
        return self._answer_locally(leg, req, 405, ctx, [(b"Allow", ctx.cfg.allow)])

    def _lost(self: Call, leg: Leg) -> bool:
        """A fork that another fork beat to the answer: nothing from its dialog (an early
        one, or the one its late 2xx made) reaches the call."""
        return leg is not self.a and self.winner >= 0 and leg is not self.b

    def _retransmission(self: Call, key: str, req: Request, ctx: Ctx) -> Actions:
        entry = self.txs[key]
        tx = transaction_from_record(entry["tx"])
        if not tx.matches(req):
            return [Reply(482, "Loop Detected")]
        actions = tx.on_request(req, ctx.now)
        self._save_tx(key, tx)
        out = self._run(self.leg(entry["leg"]), actions, entry)
        if req.method == "ACK" and any(isinstance(a, Deliver) for a in actions):
            out += self._acked(self.leg(entry["leg"]), req, ctx)
        return out

    def _ack(self: Call, leg: Leg, req: Request, ctx: Ctx) -> Actions:
        """An ACK for a 2xx we sent (a new branch, in the dialog)."""
        if leg.dialog is None or req.to.tag != leg.local_tag \
                or (req.from_.tag or "") != Dialog.from_record(leg.dialog).remote_tag:
            return []  # the ACK of a failure answered statelessly (or of no dialog of ours)
        self._stop_2xx(leg, lambda number: number == req.cseq.number, ctx)
        return self._acked(leg, req, ctx)

    def _implied_ack(self: Call, leg: Leg, req: Request, ctx: Ctx) -> None:
        """A re-INVITE from ``leg`` while our 2xx to its earlier INVITE still waits for the
        ACK: the ACK was lost (as in a host restart's outage), since RFC 3261 14.1 lets a
        UAC start a new INVITE only once its last one has its final answer.  Repeating that
        2xx any longer only reaches a phone busy with the new INVITE (a SIPp caller aborts
        the call on it), so it stops here.  Not when the ACK was to carry the answer to a
        delayed offer, nor when a BYE waits for it: those need the ACK itself."""
        if leg.name in self.pending_ack or (leg is self.a and self.bye_caller_after_ack):
            return
        self._stop_2xx(leg, lambda number: number < req.cseq.number, ctx)

    def _stop_2xx(self: Call, leg: Leg, acked, ctx: Ctx) -> None:
        """Our INVITE server transactions of ``leg`` that repeat their 2xx (Accepted) and
        whose INVITE's CSeq number ``acked`` accepts: their 2xx is ACKed, no more repeats."""
        for key, entry in list(self.txs.items()):
            if entry["leg"] == leg.name and entry["role"] in ("invite", "reinvite") \
                    and entry["tx"]["kind"] == "ist" and entry["tx"]["state"] == "Accepted":
                tx = transaction_from_record(entry["tx"])
                if acked(tx.request_msg.cseq.number):
                    tx.ack_received(ctx.now)
                    self._save_tx(key, tx)

    def _acked(self: Call, leg: Leg, req: Request, ctx: Ctx) -> Actions:
        """Our 2xx was ACKed: pass on a delayed ACK (with the answer SDP) to the other leg,
        and a BYE for the caller that waited for this ACK."""
        out = self._held_bye(ctx) if leg is self.a else []
        pending = self.pending_ack.pop(leg.name, None)
        if pending is None:
            return out
        other = self.leg(pending["leg"])
        answer = self._sdp(ctx, leg, req.body, req.content_type, offer=False)
        return self._send_ack(other, pending["cseq"], answer, req.content_type, ctx) + out

    def _cancel(self: Call, leg: Leg, req: Request, ctx: Ctx) -> Actions:
        """CANCEL of the caller's INVITE: 200, then the table (RFC 3261 9.2)."""
        if leg.name != "a" or leg.invite_key not in self.txs:
            return [Reply(481)]
        return [Reply(200), *self.dispatch(Event.CALLER_CANCEL, ctx)]

    def _answer_locally(self: Call, leg: Leg, req: Request, status: int, ctx: Ctx,
                        headers: list = ()) -> Actions:
        """Answer an in-dialog request ourselves, through a server transaction."""
        stx = server_transaction(req, response_dest(req, ctx.source or leg.peer), ctx.cfg.timers,
                                 reliable=answers_reliable(ctx, leg.sock_index))
        stx.on_request(req, ctx.now)
        self.txs[stx.key] = {"leg": leg.name, "role": "local", "tx": stx.to_record(),
                             **arrival(ctx)}
        response = build_response(req, status, headers=[*headers, (b"Server", ctx.cfg.user_agent)])
        return self._respond(stx.key, response, ctx.now)

    # ---------------------------------------------------------------- responses
    def on_response(self: Call, resp: Response, source: tuple[str, int], ctx: Ctx) -> Actions:
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
        out = self._run(leg, actions)
        for action in actions:
            if isinstance(action, Deliver):
                out += self._on_delivered(entry, leg, action.msg, ctx)
        return out

    def _on_delivered(self: Call, entry: dict, leg: Leg, resp: Response, ctx: Ctx) -> Actions:
        role = entry["role"]
        if role == "invite":
            return self._fork_response(leg, resp, ctx)
        if role == "relay":
            return self._relay_response(entry, leg, resp, ctx)
        if role == "bye" and resp.status >= 200:
            leg.state = LegState.ENDED
        return []

    def _fork_response(self: Call, leg: Leg, resp: Response, ctx: Ctx) -> Actions:
        status = resp.status
        if resp.cseq.method == "MESSAGE":
            return self._page_response(leg, resp, ctx)
        if status == 100:  # RFC 3261 9.1: from now on a CANCEL may be sent
            leg.provisional = True
            return self._send_cancel(leg, ctx, leg.held_reason) if leg.cancel_pending else []
        invite = self._tx(leg.invite_key)
        invite_msg = invite.request_msg if invite is not None else None
        if status < 200:
            leg.provisional = True
            if resp.to.tag and invite_msg is not None and leg.dialog is None:
                leg.dialog = Dialog.from_uac(invite_msg, resp).to_record()
            leg.state = LegState.EARLY
            out = []
            if leg.cancel_pending:
                out += self._send_cancel(leg, ctx, leg.held_reason)
            event = Event.FORK_EARLY_MEDIA if resp.body else Event.FORK_RINGING
            return out + self.dispatch(event, ctx, leg=leg, resp=resp)
        if status < 300:
            return self._fork_2xx(leg, resp, invite_msg, ctx)
        if status in (401, 407) and invite_msg is not None:
            retry = self._authenticate_fork(leg, resp, invite_msg, ctx)
            if retry is not None:
                return retry
        leg.state = LegState.FAILED
        leg.final = status
        leg.reason_phrase = resp.reason.decode("utf-8", "replace")
        return self._fork_failed(ctx)

    def _fork_2xx(self: Call, leg: Leg, resp: Response, invite_msg: Request | None,
                  ctx: Ctx) -> Actions:
        if 200 <= leg.final < 300:  # this fork answered already
            if Dialog.from_record(leg.dialog).remote_tag == resp.to.tag:
                return self._repeated_2xx(leg)
            return self._second_dialog(leg, resp, invite_msg, ctx)
        if leg.dialog is None or Dialog.from_record(leg.dialog).remote_tag != resp.to.tag:
            if invite_msg is None:
                return []
            leg.dialog = Dialog.from_uac(invite_msg, resp).to_record()
        dialog = Dialog.from_record(leg.dialog)
        dialog.update_from_response(resp)
        dialog.confirm()
        leg.dialog = dialog.to_record()
        leg.final = resp.status
        return self.dispatch(Event.FORK_ANSWERED, ctx, leg=leg, resp=resp)

    def _repeated_2xx(self: Call, leg: Leg) -> Actions:
        """A fork's 2xx again (our ACK got lost, or crossed it): the same ACK again, and
        nothing else (RFC 3261 13.2.2.4): a loser got its BYE with the first one."""
        if not leg.last_ack or (self.b is leg and "a" in self.pending_ack):
            return []  # the winner's ACK still waits for the caller's answer
        return self._resend_ack(leg)

    def _second_dialog(self: Call, leg: Leg, resp: Response, invite_msg: Request | None,
                       ctx: Ctx) -> Actions:
        """A 2xx from another phone behind a forking proxy, after this fork's first one:
        a dialog of its own that the call never uses.  ACK it, then BYE it (RFC 3261
        13.2.2.4); a repeat gets the same ACK only."""
        tag = resp.to.tag
        if tag in leg.stray:
            return [Out(leg.stray[tag], leg.peer, leg.host, leg.sock_index)]
        if invite_msg is None or not tag:
            return []
        dialog = Dialog.from_uac(invite_msg, resp)
        ack, _ = dialog.create_request(
            "ACK", branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=self._contact_uri(leg, ctx), headers=self._xcid(leg, ctx),
            cseq=resp.cseq.number)
        bye, _ = dialog.create_request(
            "BYE", branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=b"", headers=((b"Reason", reason(NORMAL_CLEARING)),
                                  (b"User-Agent", ctx.cfg.user_agent), *self._xcid(leg, ctx)))
        leg.stray = {**leg.stray, tag: ack.to_bytes()}
        out: Actions = [Out(leg.stray[tag], leg.peer, leg.host, leg.sock_index)]
        return out + self._start_client(leg, bye, "stray-bye", ctx)

    def _fork_failed(self: Call, ctx: Ctx) -> Actions:
        """A fork failed: the call fails once no fork may still answer."""
        if any(leg.state in RINGING for leg in self.forks):
            return self.dispatch(Event.FORK_FAILED, ctx)
        return self.dispatch(Event.ALL_FORKS_FAILED, ctx)

    def _page_response(self: Call, leg: Leg, resp: Response, ctx: Ctx) -> Actions:
        """An out-of-dialog MESSAGE (RFC 3428): the first 2xx of any contact is the answer."""
        if resp.status < 200:
            return []
        if resp.status < 300:
            return self.dispatch(Event.PAGE_ANSWERED, ctx, leg=leg, resp=resp)
        leg.final = resp.status
        leg.reason_phrase = resp.reason.decode("utf-8", "replace")
        leg.state = LegState.FAILED
        return self._fork_failed(ctx)

    def _authenticate_fork(self: Call, leg: Leg, resp: Response, invite: Request, ctx: Ctx
                           ) -> Actions | None:
        """A gateway challenged our INVITE: send it again with credentials, once (only
        while the call still connects)."""
        credentials = ctx.cfg.gateway_credentials.get(leg.route)
        if credentials is None or leg.auth_tried or self.state not in CONNECTING:
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
        retry.set_header(b"Via", our_via(ctx.cfg, ctx.ids.branch()))
        retry.set_header(b"CSeq", b"%d INVITE" % (invite.cseq.number + 1))
        retry.add_header(b"Proxy-Authorization" if proxy else b"Authorization", value)
        leg.auth_tried = True
        leg.provisional = False
        return self._start_client(leg, retry, "invite", ctx)

    def _stray_2xx(self: Call, leg: Leg, resp: Response, ctx: Ctx) -> Actions:
        """A 2xx retransmitted after our INVITE transaction ended: ACK it again (RFC 6026)."""
        if resp.to.tag in leg.stray:
            return [Out(leg.stray[resp.to.tag], leg.peer, leg.host, leg.sock_index)]
        if leg.dialog is None or Dialog.from_record(leg.dialog).remote_tag != resp.to.tag:
            return []
        return self._send_ack(leg, resp.cseq.number, b"", None, ctx)

    # ---------------------------------------------------------------- timers, hang-up
    def hangup_now(self: Call, cause: tuple[str, int], side: str, ctx: Ctx) -> Actions:
        """End the call from here (operator, media timeout): CANCEL or BYE both legs."""
        return self.dispatch(Event.HANGUP, ctx, cause=cause, side=side)

    def on_timer(self: Call, name: str, due: float, ctx: Ctx) -> Actions:
        if name.startswith("tx|"):
            key, _, timer = name[3:].rpartition("|")
            return self._tx_timer(key, timer, due, ctx)
        if self.timers.get(name) != due:
            return []  # stale: re-armed, cancelled, or fired elsewhere already
        del self.timers[name]
        cause = CALL_TIMERS.get(name)
        if cause is None:
            return []
        return self.dispatch(Event.TIMER_EXPIRED, ctx, cause=cause, side="system")

    def _tx_timer(self: Call, key: str, timer: str, due: float, ctx: Ctx) -> Actions:
        entry = self.txs.get(key)
        if entry is None:
            return []
        tx = transaction_from_record(entry["tx"])
        actions = tx.on_timer(timer, ctx.now, due)
        self._save_tx(key, tx)
        leg = self.leg(entry["leg"])
        out = self._run(leg, actions, entry)
        for action in actions:
            if isinstance(action, TimedOut):
                out += self._timed_out(entry, leg, ctx)
            elif isinstance(action, NoAck) and entry["role"] == "invite":
                out += self.dispatch(Event.CALLER_NO_ACK, ctx, cause=RECOVERY_ON_TIMER_EXPIRE,
                                     side="system")
        return out

    def _timed_out(self: Call, entry: dict, leg: Leg, ctx: Ctx) -> Actions:
        role = entry["role"]
        if role == "invite":  # Timer B: the callee is unreachable
            leg.state = LegState.FAILED
            leg.final = 408
            return self._fork_failed(ctx)
        if role == "relay":
            server = self.txs.get(entry["server"])
            if server is not None:
                request = transaction_from_record(server["tx"]).request_msg
                return self._respond(entry["server"], build_response(request, 408), ctx.now)
        if role == "bye":
            leg.state = LegState.ENDED
        return []
