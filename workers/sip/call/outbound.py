"""What a call sends, and how it ends: ACKs, CANCELs, BYEs, responses to the caller,
requests passed on from one leg to the other, SDP through the media, and the CDR."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.sip.dialog import Dialog
from cluster.sip.message import Request, Response, build_request, build_response, parse
from cluster.sip.sdp import first_audio_codec
from cluster.sip.transaction import response_dest, server_transaction, transaction_from_record
from cluster.sip.uri import hostport

from .actions import Actions, Cdr, Out
from .legs import RINGING, Leg, LegState
from .state import CallState
from .wire import Ctx, answers_reliable, arrival, carried, contact, reason

if TYPE_CHECKING:
    from .machine import Call

Cause = tuple[str, int]


class Outbound:
    """The call's senders (mixed into ``Call``)."""

    # ---------------------------------------------------------------- ACK
    def _send_ack(self: Call, leg: Leg, cseq: int, body: bytes, content_type: bytes | None,
                  ctx: Ctx) -> Actions:
        """The ACK of this leg's 2xx to CSeq ``cseq``.  A repeated 2xx (our ACK was lost, or
        crossed it) gets the very same ACK again, as RFC 3261 13.2.2.4 has it: a new one
        (another branch) is a new request to the peer, which a strict UA refuses."""
        if leg.last_ack and parse(leg.last_ack).cseq.number == cseq:
            return self._resend_ack(leg)
        dialog = Dialog.from_record(leg.dialog)
        ack, _ = dialog.create_request(
            "ACK", branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=self._contact_uri(leg, ctx), body=body, headers=self._xcid(leg, ctx),
            content_type=content_type if body else None, cseq=cseq)
        leg.dialog = dialog.to_record()
        leg.last_ack = ack.to_bytes()
        return self._resend_ack(leg)

    @staticmethod
    def _resend_ack(leg: Leg) -> Actions:
        return [Out(leg.last_ack, leg.peer, leg.host, leg.sock_index)]

    def _held_bye(self: Call, ctx: Ctx) -> Actions:
        cause = self.bye_caller_after_ack
        if cause is None:
            return []
        self.bye_caller_after_ack = None
        return self._send_bye(self.a, tuple(cause), ctx)

    def _caller_unacked(self: Call) -> bool:
        entry = self.txs.get(self.a.invite_key)
        return (entry is not None and entry["tx"]["state"] == "Accepted"
                and not entry["tx"].get("acked"))

    # ---------------------------------------------------------------- leg to leg
    def _pass_on(self: Call, leg: Leg, req: Request, ctx: Ctx) -> Actions:
        """An in-dialog request from ``leg``: the same request on the other leg."""
        other = self.other(leg)
        if other is None or other.dialog is None:
            return self._answer_locally(leg, req, 481, ctx)
        if req.method == "INVITE" and self._invite_pending(leg):
            return self._answer_locally(leg, req, 491, ctx)
        stx = server_transaction(req, response_dest(req, ctx.source or leg.peer), ctx.cfg.timers,
                                 reliable=answers_reliable(ctx, leg.sock_index))
        stx.on_request(req, ctx.now)
        role = "reinvite" if req.method == "INVITE" else "relayed"
        self.txs[stx.key] = {"leg": leg.name, "role": role, "tx": stx.to_record(),
                             **arrival(ctx)}
        dialog = Dialog.from_record(other.dialog)
        request, _ = dialog.create_request(
            req.method, branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=self._contact_uri(other, ctx),
            headers=(*carried(req), *self._xcid(other, ctx)),
            body=self._sdp(ctx, leg, req.body, req.content_type, offer=True), content_type=None)
        other.dialog = dialog.to_record()
        out = self._start_client(other, request, "relay", ctx, server=stx.key)
        if req.method == "INVITE":
            out += self._respond(stx.key, build_response(req, 100), ctx.now)
        return out

    def _invite_pending(self: Call, leg: Leg) -> bool:
        return any(e["leg"] == leg.name and e["role"] == "reinvite"
                   and e["tx"]["state"] == "Proceeding" for e in self.txs.values())

    def _relay_response(self: Call, entry: dict, leg: Leg, resp: Response, ctx: Ctx) -> Actions:
        """The other leg answered a relayed request: the same answer to the requester."""
        server = self.txs.get(entry["server"])
        if server is None or resp.status == 100:
            return []
        requester = self.leg(server["leg"])
        request = transaction_from_record(server["tx"]).request_msg
        if self.state == CallState.ENDED:
            return self._answered_after_the_end(leg, resp, ctx)
        out: Actions = []
        if resp.cseq.method == "INVITE" and 200 <= resp.status < 300:
            dialog = Dialog.from_record(leg.dialog)
            dialog.update_from_response(resp)
            leg.dialog = dialog.to_record()
            if request.body:
                out += self._send_ack(leg, resp.cseq.number, b"", None, ctx)
            else:
                self.pending_ack[requester.name] = {"leg": leg.name, "cseq": resp.cseq.number}
            self._session_timer(resp, ctx.now)
        if resp.cseq.method == "UPDATE" and 200 <= resp.status < 300:
            self._session_timer(resp, ctx.now)
        headers = [*carried(resp), (b"Server", ctx.cfg.user_agent)]
        if resp.status < 300 and request.method == "INVITE":
            headers.append((b"Contact", contact(self._user_for(requester), ctx.cfg)))
        body = self._sdp(ctx, leg, resp.body, resp.content_type, offer=not request.body)
        answer = build_response(request, resp.status, resp.reason.decode("utf-8", "replace"),
                                headers=headers, body=body)
        return out + self._respond(entry["server"], answer, ctx.now)

    def _answered_after_the_end(self: Call, leg: Leg, resp: Response, ctx: Ctx) -> Actions:
        """A relayed request answered after the call ended (a BYE crossed it, as when a
        caller whose ACK was lost gave up): a 2xx to a re-INVITE still gets its ACK (RFC
        3261 13.2.2.4; unACKed, the phone repeats it for 32 s), with no SDP, since the
        relay session went with the call; nothing goes on to the requester, who hung up."""
        if resp.cseq.method != "INVITE" or not 200 <= resp.status < 300:
            return []
        dialog = Dialog.from_record(leg.dialog)
        dialog.update_from_response(resp)
        leg.dialog = dialog.to_record()
        return self._send_ack(leg, resp.cseq.number, b"", None, ctx)

    # ---------------------------------------------------------------- towards the caller
    def _to_caller(self: Call, leg: Leg, resp: Response, ctx: Ctx) -> Actions:
        """A callee's 18x or 2xx goes on to the caller, with its SDP through the media."""
        invite = self._tx(self.a.invite_key)
        if invite is None:
            return []
        body = self._sdp(ctx, leg, resp.body, resp.content_type, offer=not self.a_offer)
        if body and resp.content_type == b"application/sdp":
            # The CDR's codec: the last answer the caller got (it replaces an early one).
            self.codec = first_audio_codec(body) or self.codec
        request = invite.request_msg
        headers = [(b"Contact", contact(self.callee, ctx.cfg)), (b"Allow", ctx.cfg.allow),
                   (b"Supported", ctx.cfg.supported), (b"Server", ctx.cfg.user_agent),
                   *carried(resp)]
        answer = build_response(request, resp.status, resp.reason.decode("utf-8", "replace"),
                                to_tag=self.a.local_tag, headers=headers, body=body)
        if self.a.dialog is None:
            dialog = Dialog.from_uas(request, self.a.local_tag, self._contact_uri(self.a, ctx))
            self.a.dialog = dialog.to_record()
        if resp.status >= 200:
            dialog = Dialog.from_record(self.a.dialog)
            dialog.confirm()
            self.a.dialog = dialog.to_record()
            self.a.state = LegState.ANSWERED
        else:
            self.a.state = LegState.EARLY
        return self._respond(self.a.invite_key, answer, ctx.now)

    def _fail_caller(self: Call, status: int, cause: Cause, side: str,
                     invite: Request, ctx: Ctx, reason_phrase: str | None = None) -> Actions:
        """The call did not connect: a final failure to the caller, and the CDR."""
        answer = build_response(invite, status, reason_phrase or None, to_tag=self.a.local_tag,
                                headers=[(b"Server", ctx.cfg.user_agent)])
        out = self._respond(self.a.invite_key, answer, ctx.now)
        return out + self._end(cause, side, ctx.now, status=status)

    # ---------------------------------------------------------------- CANCEL, BYE
    def _cancel_forks(self: Call, ctx: Ctx, reason: Cause | None) -> Actions:
        out: Actions = []
        for leg in self.forks:
            if leg.state not in RINGING or leg.name == (self.b.name if self.b else ""):
                continue
            if leg.provisional:
                out += self._send_cancel(leg, ctx, reason)
            else:  # RFC 3261 9.1: no CANCEL before a provisional response
                leg.cancel_pending = True
                leg.cancel_reason = list(reason) if reason else None
            leg.state = LegState.FAILED if leg.final else LegState.CANCELLING
        return out

    def _send_cancel(self: Call, leg: Leg, ctx: Ctx, cause: Cause | None = None) -> Actions:
        invite = self._tx(leg.invite_key)
        leg.cancel_pending = False
        if invite is None or invite.state not in ("Calling", "Proceeding"):
            return []
        request = invite.request_msg
        headers = [(b"Via", bytes(request.via)), (b"Max-Forwards", b"70"),
                   (b"From", request.header("from")), (b"To", request.header("to")),
                   (b"Call-ID", request.call_id), (b"CSeq", b"%d CANCEL" % request.cseq.number)]
        if cause is not None:
            headers.append((b"Reason", reason(cause)))
        cancel = build_request("CANCEL", request.uri_raw, [*headers, *self._xcid(leg, ctx)])
        return self._start_client(leg, cancel, "cancel", ctx)

    def _send_bye(self: Call, leg: Leg | None, cause: Cause, ctx: Ctx) -> Actions:
        if leg is None or leg.dialog is None or leg.state == LegState.ENDED:
            return []
        dialog = Dialog.from_record(leg.dialog)
        bye, _ = dialog.create_request(
            "BYE", branch=ctx.ids.branch(), via_host=ctx.cfg.address, via_port=ctx.cfg.port,
            contact=b"",
            headers=((b"Reason", reason(cause)), (b"User-Agent", ctx.cfg.user_agent),
                     *self._xcid(leg, ctx)))
        leg.dialog = dialog.to_record()
        leg.state = LegState.ENDED
        return self._start_client(leg, bye, "bye", ctx)

    # ---------------------------------------------------------------- small parts
    def _session_timer(self: Call, resp: Response, now: float) -> None:
        """RFC 4028: when the phones use session timers, end the call if refreshes stop."""
        value = resp.header("session-expires")
        if not value:
            return
        interval = value.split(b";")[0].strip()
        if not interval.isdigit():
            return
        self.session_interval = int(interval)
        self.timers["session"] = now + self.session_interval

    def _sdp(self: Call, ctx: Ctx, leg: Leg, body: bytes, content_type: bytes | None, *,
             offer: bool) -> bytes:
        """An SDP body from ``leg`` on its way to the other leg: through the media relay
        (or unchanged in bypass mode).  Other bodies pass as they are."""
        if not body or content_type != b"application/sdp":
            return body
        return ctx.media.rewrite(self.tag, leg.name, body, offer=offer, peer_ip=leg.peer[0])

    def _user_for(self: Call, leg: Leg) -> str:
        """The user our Contact shows to ``leg``: the party on the other side."""
        return self.callee if leg.name == "a" else self.caller

    def _contact_uri(self: Call, leg: Leg, ctx: Ctx) -> bytes:
        return contact(self._user_for(leg), ctx.cfg)[1:-1]

    def _xcid(self: Call, leg: Leg, ctx: Ctx) -> tuple[tuple[bytes, bytes], ...]:
        """The header naming the A-leg's Call-ID, for a request to a B-leg (sngrep's
        sip.xcid, Homer's correlation): none on the A-leg, none when configured off."""
        if leg.name == "a" or not ctx.cfg.xcid_header:
            return ()
        return ((ctx.cfg.xcid_header, self.a.call_id),)

    # ---------------------------------------------------------------- the end
    def _end(self: Call, cause: Cause, side: str, now: float, status: int) -> Actions:
        if self.state == CallState.ENDED:
            return []
        self.state = CallState.ENDED
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
            "sip_status": status, "codec": self.codec or self._offered_codec()}
        return [Cdr(record)]

    def _offered_codec(self: Call) -> str:
        """No answer reached the caller: the first format the caller offered, if its
        INVITE is still at hand."""
        invite = self._tx(self.a.invite_key) if self.a_offer else None
        if invite is None:
            return ""
        request = invite.request_msg
        if request.content_type != b"application/sdp":
            return ""
        return first_audio_codec(request.body)
