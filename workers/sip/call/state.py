"""The call as a table: call states, the call-level events, and one table
``(state, event) -> (handler, next state)``.

Messages and timers reach the call through machine.py, which does the per-leg
bookkeeping (dialogs, transactions, a fork's own progress) and turns what matters to the
call as a whole into one of the events below; ``Call.dispatch`` looks the pair up, runs
the handler (a method of the call, handlers.py) and moves to the next state.  A pair
that is not a row is in ``IGNORED``, with the reason it means nothing in that state; a
test holds every row and every ignored pair to what is written here.

A MESSAGE relayed to the callee's contacts (a "page") is a call too: it is TRYING until
one contact takes it (PAGE_ANSWERED) or all refuse (ALL_FORKS_FAILED), then ENDED.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class CallState(StrEnum):
    """Where the call as a whole is.  Values are what the record stores (text)."""

    TRYING = "trying"  # the forks are out; the caller had only 100 Trying
    RINGING = "ringing"  # the caller got a 180 (the last provisional had no SDP)
    EARLY = "early"  # the caller got a 183 with SDP (early media)
    ANSWERED = "answered"  # a fork answered; the caller got its 200
    ENDED = "ended"  # over: failed, cancelled, or hung up; the CDR was written


class Event(StrEnum):
    """What can happen to a call as a whole."""

    FORK_RINGING = "fork ringing"  # a fork's provisional (not 100) without SDP
    FORK_EARLY_MEDIA = "fork early media"  # a fork's provisional with SDP
    FORK_ANSWERED = "fork answered"  # a fork's first 2xx to our INVITE (a repeat, or
    # a second dialog's 2xx behind a forking proxy, is the fork's own bookkeeping)
    FORK_FAILED = "fork failed"  # a fork failed (or timed out); others still ring
    ALL_FORKS_FAILED = "all forks failed"  # the last ringing fork failed
    PAGE_ANSWERED = "page answered"  # a contact's 2xx to a relayed MESSAGE
    CALLER_CANCEL = "caller cancel"  # CANCEL of the caller's INVITE
    CALLER_BYE = "caller bye"  # BYE from the caller's side
    # Requests reach the table only from the call's own dialogs: the caller's, and a
    # fork's while none has won, then the winner's (inbound.py answers the rest itself).
    CALLEE_BYE = "callee bye"  # BYE from a fork's side
    IN_DIALOG_REQUEST = "in-dialog request"  # re-INVITE, UPDATE, INFO...: for the other leg
    CALLER_NO_ACK = "caller no ack"  # our 2xx to the caller was never ACKed (Timer L)
    TIMER_EXPIRED = "timer expired"  # no-answer, max-duration or session (with a cause)
    HANGUP = "hangup"  # the operator or a media timeout hangs up (with a cause)


class Row(NamedTuple):
    handler: str  # a method of Call: handler(ctx, **event arguments) -> actions
    next: CallState


S, E = CallState, Event
CONNECTING = (S.TRYING, S.RINGING, S.EARLY)  # not answered, not ended


def _rows() -> dict[tuple[CallState, Event], Row]:
    table = {}
    for state in CONNECTING:
        table |= {
            (state, E.FORK_RINGING): Row("_progress", S.RINGING),
            (state, E.FORK_EARLY_MEDIA): Row("_progress", S.EARLY),
            (state, E.FORK_ANSWERED): Row("_won", S.ANSWERED),
            (state, E.ALL_FORKS_FAILED): Row("_all_failed", S.ENDED),
            (state, E.CALLER_CANCEL): Row("_caller_cancelled", S.ENDED),
            (state, E.TIMER_EXPIRED): Row("_abandon", S.ENDED),
            (state, E.HANGUP): Row("_abandon", S.ENDED),
        }
    for state in (S.RINGING, S.EARLY):  # the caller's early dialog exists from the 1xx on
        table |= {
            (state, E.CALLER_BYE): Row("_caller_cancelled", S.ENDED),
            (state, E.IN_DIALOG_REQUEST): Row("_relay_request", state),
        }
    table |= {
        (S.TRYING, E.PAGE_ANSWERED): Row("_page_answered", S.ENDED),
        (S.ANSWERED, E.FORK_ANSWERED): Row("_late_answer", S.ANSWERED),
        (S.ANSWERED, E.CALLER_BYE): Row("_hang_up_by_bye", S.ENDED),
        (S.ANSWERED, E.CALLEE_BYE): Row("_hang_up_by_bye", S.ENDED),
        (S.ANSWERED, E.IN_DIALOG_REQUEST): Row("_relay_request", S.ANSWERED),
        (S.ANSWERED, E.CALLER_NO_ACK): Row("_no_ack", S.ENDED),
        (S.ANSWERED, E.TIMER_EXPIRED): Row("_hang_up", S.ENDED),
        (S.ANSWERED, E.HANGUP): Row("_hang_up", S.ENDED),
        (S.ENDED, E.FORK_ANSWERED): Row("_late_answer", S.ENDED),
        (S.ENDED, E.IN_DIALOG_REQUEST): Row("_refuse_in_dialog", S.ENDED),
        (S.ENDED, E.CALLER_NO_ACK): Row("_bye_held_for_ack", S.ENDED),
    }
    return table


TABLE: dict[tuple[CallState, Event], Row] = _rows()

# Every other pair, and why it does nothing to the call (per-leg bookkeeping, such as a
# late fork's own CANCEL or a 200 to a BYE, happens before the event, in machine.py).
_CALL_DONE = "the call is answered or over: only the fork's own bookkeeping happens"
IGNORED: dict[tuple[CallState, Event], str] = {}
for _state in CallState:
    IGNORED[_state, E.FORK_FAILED] = "other forks may still answer (the last one's failure " \
        "is ALL_FORKS_FAILED)" if _state in CONNECTING else _CALL_DONE
for _state in (S.ANSWERED, S.ENDED):
    for _event in (E.FORK_RINGING, E.FORK_EARLY_MEDIA, E.ALL_FORKS_FAILED):
        IGNORED[_state, _event] = _CALL_DONE
    IGNORED[_state, E.CALLER_CANCEL] = "too late to cancel: the CANCEL gets its 200 only"
for _state in CONNECTING:
    IGNORED[_state, E.CALLEE_BYE] = "a BYE in a fork's early dialog: the 200 only; the " \
        "fork's INVITE still ends it"
    IGNORED[_state, E.CALLER_NO_ACK] = "cannot happen: no 2xx went to the caller yet"
for _state in (S.RINGING, S.EARLY, S.ANSWERED):
    IGNORED[_state, E.PAGE_ANSWERED] = "cannot happen: a page is trying or ended"
IGNORED |= {
    (S.TRYING, E.CALLER_BYE): "cannot happen: no dialog exists before a provisional (481)",
    (S.TRYING, E.IN_DIALOG_REQUEST): "cannot happen: no dialog exists before a provisional",
    (S.ENDED, E.PAGE_ANSWERED): "another contact took the page already",
    (S.ENDED, E.CALLER_BYE): "over already: the BYE gets its 200 only",
    (S.ENDED, E.CALLEE_BYE): "over already: the BYE gets its 200 only",
    (S.ENDED, E.TIMER_EXPIRED): "over already (its timers were cleared at the end)",
    (S.ENDED, E.HANGUP): "over already",
}
