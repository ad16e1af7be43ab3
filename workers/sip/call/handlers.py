"""What the call's table (state.py) runs: one method per kind of row.  Each takes the
event's context and arguments and returns the actions; the table then sets the next
state (``_end`` sets ENDED itself, which makes a second end do nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.sip.message import Request, Response, build_response
from cluster.sip.transaction import transaction_from_record

from .actions import Actions
from .legs import Leg, LegState
from .wire import (
    COMPLETED_ELSEWHERE,
    NORMAL_CLEARING,
    ORIGINATOR_CANCEL,
    STATUS_CAUSES,
    Ctx,
    best_final,
)

if TYPE_CHECKING:
    from .machine import Call

Cause = tuple[str, int]


class Handlers:
    """The table's handlers (mixed into ``Call``)."""

    # ---------------------------------------------------------------- the forks
    def _progress(self: Call, ctx: Ctx, leg: Leg, resp: Response) -> Actions:
        """A fork rings (or sends early media): the caller gets the same."""
        return self._to_caller(leg, resp, ctx)

    def _won(self: Call, ctx: Ctx, leg: Leg, resp: Response) -> Actions:
        """The first fork to answer: ACK it (or wait for the caller's answer SDP), 200 to
        the caller, CANCEL the other forks, start the call's timers."""
        self.winner = int(leg.name[1:])
        leg.state = LegState.ANSWERED
        self.answered = ctx.now
        self.timers.pop("no-answer", None)
        out: Actions = []
        if self.a_offer:
            out += self._send_ack(leg, resp.cseq.number, b"", None, ctx)
        else:  # the answer comes in the caller's ACK
            self.pending_ack["a"] = {"leg": leg.name, "cseq": resp.cseq.number}
        out += self._to_caller(leg, resp, ctx)
        out += self._cancel_forks(ctx, reason=COMPLETED_ELSEWHERE)
        if ctx.cfg.max_duration:
            self.timers["max-duration"] = ctx.now + ctx.cfg.max_duration
        self._session_timer(resp, ctx.now)
        return out

    def _late_answer(self: Call, ctx: Ctx, leg: Leg, resp: Response) -> Actions:
        """Too late: another fork won, or the caller gave up.  ACK, then BYE (RFC 3261
        16.7)."""
        leg.state = LegState.ANSWERED
        out = self._send_ack(leg, resp.cseq.number, b"", None, ctx)
        return out + self._send_bye(leg, NORMAL_CLEARING, ctx)

    def _all_failed(self: Call, ctx: Ctx) -> Actions:
        """No fork may answer any more: the best of their failures to the caller."""
        status, reason = best_final([(leg.final, leg.reason_phrase) for leg in self.forks])
        cause = STATUS_CAUSES.get(status, ("CALL_REJECTED", 21))
        invite = self._tx(self.a.invite_key)
        if invite is None:  # its transaction is gone (not seen): end it all the same
            return self._end(cause, "callee", ctx.now, status=status)
        return self._fail_caller(status, cause, "callee", invite.request_msg, ctx, reason)

    def _page_answered(self: Call, ctx: Ctx, leg: Leg, resp: Response) -> Actions:
        """A contact took the page: its answer to the sender, and the page is done."""
        leg.final = resp.status
        leg.reason_phrase = resp.reason.decode("utf-8", "replace")
        leg.state = LegState.ANSWERED
        invite = self._tx(self.a.invite_key)
        out = []
        if invite is not None:
            out = self._respond(self.a.invite_key, build_response(
                invite.request_msg, resp.status, leg.reason_phrase, to_tag=self.a.local_tag,
                headers=[(b"Server", ctx.cfg.user_agent)]), ctx.now)
        return out + self._end(NORMAL_CLEARING, "callee", ctx.now, status=resp.status)

    # ---------------------------------------------------------------- the caller
    def _caller_cancelled(self: Call, ctx: Ctx, leg: Leg | None = None) -> Actions:
        """CANCEL (or BYE) from the caller before an answer: 487 to it, CANCEL the forks."""
        invite = self._tx(self.a.invite_key)
        if invite is not None:
            out = self._fail_caller(487, ORIGINATOR_CANCEL, "caller", invite.request_msg, ctx)
        else:  # its transaction is gone (not seen): end it all the same
            out = self._end(ORIGINATOR_CANCEL, "caller", ctx.now, status=487)
        return out + self._cancel_forks(ctx, reason=ORIGINATOR_CANCEL)

    def _no_ack(self: Call, ctx: Ctx, cause: Cause, side: str) -> Actions:
        """Our 2xx to the caller was never ACKed: give the call up (RFC 3261 13.3.1.4)."""
        return self._held_bye(ctx) + self._hang_up(ctx, cause, side)

    def _bye_held_for_ack(self: Call, ctx: Ctx, cause: Cause, side: str) -> Actions:
        """The call ended while our 2xx to the caller waited for its ACK, which never came:
        the caller's BYE that waited for it goes now."""
        return self._held_bye(ctx)

    # ---------------------------------------------------------------- either side
    def _hang_up_by_bye(self: Call, ctx: Ctx, leg: Leg) -> Actions:
        """BYE from one side of an answered call: BYE to the other side."""
        side = "caller" if leg.name == "a" else "callee"
        other = self.other(leg)
        out = self._end(NORMAL_CLEARING, side, ctx.now, status=200) + self._terminate_pending(
            leg, ctx)
        if other is self.a and self._caller_unacked():
            # RFC 3261 15: no BYE before the ACK of our 2xx; it goes with the ACK,
            # or when the 2xx is given up on (Timer L).
            self.bye_caller_after_ack = list(NORMAL_CLEARING)
        else:
            out += self._send_bye(other, NORMAL_CLEARING, ctx)
        return out

    def _terminate_pending(self: Call, leg: Leg, ctx: Ctx) -> Actions:
        """RFC 3261 15.1.2: requests ``leg`` sent before its BYE that are still unanswered
        (a re-INVITE the other side has not answered yet) get 487."""
        out: Actions = []
        for key, entry in list(self.txs.items()):
            if entry["leg"] == leg.name and entry["role"] in ("reinvite", "relayed") \
                    and entry["tx"]["state"] in ("Trying", "Proceeding"):
                request = transaction_from_record(entry["tx"]).request_msg
                out += self._respond(key, build_response(request, 487), ctx.now)
        return out

    def _relay_request(self: Call, ctx: Ctx, leg: Leg, req: Request) -> Actions:
        """re-INVITE, UPDATE, INFO, MESSAGE...: the same request on the other leg."""
        return self._pass_on(leg, req, ctx)

    def _refuse_in_dialog(self: Call, ctx: Ctx, leg: Leg, req: Request) -> Actions:
        """The call is over: no other leg to pass a request on to."""
        return self._answer_locally(leg, req, 481, ctx)

    # ---------------------------------------------------------------- from here
    def _abandon(self: Call, ctx: Ctx, cause: Cause, side: str) -> Actions:
        """Hang up a call that was not answered: CANCEL the forks, 480 to the caller."""
        invite = self._tx(self.a.invite_key)
        out = self._cancel_forks(ctx, reason=cause)
        if invite is not None:
            out += self._fail_caller(480, cause, side, invite.request_msg, ctx)
        else:  # its transaction is gone (not seen): end it all the same
            out += self._end(cause, side, ctx.now, status=480)
        return out

    def _hang_up(self: Call, ctx: Ctx, cause: Cause, side: str) -> Actions:
        """Hang up an answered call: BYE both legs."""
        out = self._end(cause, side, ctx.now, status=200)
        out += self._send_bye(self.a, cause, ctx)
        out += self._send_bye(self.b, cause, ctx)
        return out
