"""The call's table (workers/sip/call/state.py): every row, driven by real messages and
timers from a call in that state, lands in its next state with the effect written here;
every other state/event pair is an ignored pair that does nothing; and together they
cover every pair."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from callkit import (
    ANSWER_SDP,
    CALLEE_ADDRS,
    CALLER_ADDR,
    Actions,
    Callee,
    Caller,
    Flow,
    Rig,
    answered,
    begin,
    seed_invite,
    summary,
)

from cluster.sip.message import parse
from workers.sip.call import ADMIN_HANGUP, IGNORED, TABLE, Call, CallState, Event

S, E = CallState, Event
EARLY_SDP = ANSWER_SDP.replace(b"4008", b"4010")


@pytest.fixture
def seen(monkeypatch) -> list[tuple[CallState, Event]]:
    """The (state, event) pairs the call dispatches, in order."""
    pairs = []
    dispatch = Call.dispatch

    def recording(self, event, ctx, **args):
        pairs.append((self.state, event))
        return dispatch(self, event, ctx, **args)

    monkeypatch.setattr(Call, "dispatch", recording)
    return pairs


# --------------------------------------------------------------------------- states


def page_request():
    """The seed's caller sends a MESSAGE instead of an INVITE."""
    data = seed_invite().to_bytes().replace(b"INVITE sip:", b"MESSAGE sip:", 1)
    data = data.replace(b" INVITE\r\n", b" MESSAGE\r\n")
    msg = parse(data)
    msg.set_header(b"Content-Type", b"text/plain")
    msg.set_body(b"hello")
    return parse(msg.to_bytes())


def trying(rig: Rig, forks: int = 2) -> Flow:
    return begin(rig, forks)


def ringing(rig: Rig, forks: int = 2, body: bytes = b"") -> Flow:
    flow = begin(rig, forks)
    flow.caller.learn(flow.from_callee(flow.callee.respond(180 if not body else 183,
                                                           body=body)).one(CALLER_ADDR))
    return flow


def early(rig: Rig, forks: int = 2) -> Flow:
    return ringing(rig, forks, body=EARLY_SDP)


def answered_unacked(rig: Rig, forks: int = 1) -> Flow:
    """Fork 0 answered; the caller got the 200 and has not ACKed it."""
    flow = ringing(rig, forks)
    flow.ok = flow.caller.learn(flow.from_callee(flow.callee.respond(
        200, body=ANSWER_SDP)).one(CALLER_ADDR))
    return flow


def ended(rig: Rig, forks: int = 1) -> Flow:
    flow = answered(rig, forks)
    flow.from_caller(flow.caller.request("BYE"))
    return flow


def paging(rig: Rig) -> Flow:
    caller = Caller(page_request())
    started = rig.start(invite=caller.invite, forks=2)
    callees = [Callee(started.one(addr), addr, f"calleetag{i}")
               for i, addr in enumerate(CALLEE_ADDRS[:2])]
    return Flow(rig, caller, callees, started)


SETUPS: dict[CallState, Callable[[Rig], Flow]] = {
    S.TRYING: trying, S.RINGING: ringing, S.EARLY: early, S.ANSWERED: answered,
    S.ENDED: ended}


def to_caller(acts: Actions) -> list[str]:
    return [summary(m) for m in acts.sent(CALLER_ADDR)]


def to_callee(acts: Actions, index: int = 0) -> list[str]:
    return [summary(m) for m in acts.sent(CALLEE_ADDRS[index])]


# --------------------------------------------------------------------------- rows


@dataclass
class RowCase:
    state: CallState
    event: Event
    setup: Callable[[Rig], Flow]
    trigger: Callable[[Flow], Actions]
    check: Callable[[Flow, Actions], None]
    next: CallState | None = None  # the state after (None: the state before)
    settings: dict | None = None


def fork1(status: int, body: bytes = b""):
    return lambda flow: flow.from_callee(flow.callees[1].respond(status, body=body), 1)


def fork0(status: int, body: bytes = b""):
    return lambda flow: flow.from_callee(flow.callee.respond(status, body=body))


def caller_cancel(flow: Flow) -> Actions:
    return flow.from_caller(flow.caller.cancel())


def caller_bye(flow: Flow) -> Actions:
    return flow.from_caller(flow.caller.request("BYE"))


def from_callee(flow: Flow, req) -> Actions:
    """A request from fork 0's phone."""
    return flow.rig.request(req, flow.callee.addr)


def callee_bye(flow: Flow) -> Actions:
    return from_callee(flow, flow.callee.request("BYE"))


def hangup(flow: Flow) -> Actions:
    return flow.rig.hangup(ADMIN_HANGUP)


def no_answer(flow: Flow) -> Actions:
    return flow.rig.fire("no-answer")


def timer_l(flow: Flow) -> Actions:
    return flow.rig.fire(flow.rig.timer("|L", flow.rig.call.a.invite_key))


def cdr(flow: Flow) -> dict:
    [record] = flow.last.cdrs
    return record


def expect(caller=None, callee0=None, callee1=None, replies=None, cdr_cause=None):
    """A check: what went to the caller and to each fork, stateless replies, the CDR."""
    def check(flow: Flow, acts: Actions) -> None:
        if caller is not None:
            assert to_caller(acts) == caller
        if callee0 is not None:
            assert to_callee(acts, 0) == callee0
        if callee1 is not None:
            assert to_callee(acts, 1) == callee1
        if replies is not None:
            assert [r.status for r in acts.replies] == replies
        if cdr_cause is None:
            assert acts.cdrs == []
        else:
            [record] = acts.cdrs
            assert record["hangup_cause"] == cdr_cause
    return check


def connecting_rows(state: CallState, setup) -> list[RowCase]:
    # A fork that sent no provisional gets its CANCEL later (RFC 3261 9.1): in TRYING no
    # fork had one; from RINGING on, fork 0 had one.
    cancel0 = [] if state == S.TRYING else ["CANCEL"]
    return [
        RowCase(state, E.FORK_RINGING, setup, fork1(180), expect(caller=["180 INVITE"]),
                S.RINGING),
        RowCase(state, E.FORK_EARLY_MEDIA, setup, fork1(183, EARLY_SDP),
                expect(caller=["183 INVITE"]), S.EARLY),
        RowCase(state, E.FORK_ANSWERED, setup, fork1(200, ANSWER_SDP),
                expect(caller=["200 INVITE"], callee0=cancel0, callee1=["ACK"]), S.ANSWERED),
        RowCase(state, E.ALL_FORKS_FAILED, lambda rig: setup(rig, forks=1), fork0(486),
                expect(caller=["486 INVITE"], callee0=["ACK"], cdr_cause="USER_BUSY"), S.ENDED),
        RowCase(state, E.CALLER_CANCEL, setup, caller_cancel,
                expect(caller=["487 INVITE"], callee0=cancel0, callee1=[], replies=[200],
                       cdr_cause="ORIGINATOR_CANCEL"), S.ENDED),
        RowCase(state, E.TIMER_EXPIRED, setup, no_answer,
                expect(caller=["480 INVITE"], callee0=cancel0, cdr_cause="NO_ANSWER"), S.ENDED),
        RowCase(state, E.HANGUP, setup, hangup,
                expect(caller=["480 INVITE"], callee0=cancel0, cdr_cause="NORMAL_CLEARING"),
                S.ENDED),
    ]


def early_dialog_rows(state: CallState, setup) -> list[RowCase]:
    return [
        RowCase(state, E.CALLER_BYE, setup, caller_bye,
                expect(caller=["200 BYE", "487 INVITE"], callee0=["CANCEL"],
                       cdr_cause="ORIGINATOR_CANCEL"), S.ENDED),
        # INFO in fork 0's early dialog goes on to the caller, whose dialog is early too.
        RowCase(state, E.IN_DIALOG_REQUEST, setup,
                lambda flow: from_callee(flow, flow.callee.request(
                    "INFO", body=b"Signal=1\r\n", content_type=b"application/dtmf-relay")),
                expect(caller=["INFO"], callee0=[])),
    ]


def late_fork_after_cancel(rig: Rig) -> Flow:
    flow = ringing(rig, forks=1)
    flow.from_caller(flow.caller.cancel())
    return flow


def ended_unacked(rig: Rig) -> Flow:
    """The callee hung up before the caller ACKed our 200: the caller's BYE waits."""
    flow = answered_unacked(rig)
    from_callee(flow, flow.callee.request("BYE"))
    return flow


ROWS: list[RowCase] = [
    *connecting_rows(S.TRYING, trying), *connecting_rows(S.RINGING, ringing),
    *connecting_rows(S.EARLY, early),
    *early_dialog_rows(S.RINGING, ringing), *early_dialog_rows(S.EARLY, early),
    RowCase(S.TRYING, E.PAGE_ANSWERED, paging, fork0(200),
            expect(caller=["200 MESSAGE"], callee0=[], callee1=[]), S.ENDED),
    RowCase(S.ANSWERED, E.FORK_ANSWERED, lambda rig: answered(rig, forks=2),
            fork1(200, ANSWER_SDP), expect(caller=[], callee1=["ACK", "BYE"])),
    RowCase(S.ANSWERED, E.CALLER_BYE, answered, caller_bye,
            expect(caller=["200 BYE"], callee0=["BYE"], cdr_cause="NORMAL_CLEARING"), S.ENDED),
    RowCase(S.ANSWERED, E.CALLEE_BYE, answered, callee_bye,
            expect(caller=["BYE"], callee0=["200 BYE"], cdr_cause="NORMAL_CLEARING"), S.ENDED),
    RowCase(S.ANSWERED, E.IN_DIALOG_REQUEST, answered,
            lambda flow: flow.from_caller(flow.caller.request(
                "INFO", body=b"Signal=1\r\n", content_type=b"application/dtmf-relay")),
            expect(caller=[], callee0=["INFO"])),
    RowCase(S.ANSWERED, E.CALLER_NO_ACK, answered_unacked, timer_l,
            expect(caller=["BYE"], callee0=["BYE"], cdr_cause="RECOVERY_ON_TIMER_EXPIRE"),
            S.ENDED),
    RowCase(S.ANSWERED, E.TIMER_EXPIRED, answered,
            lambda flow: flow.rig.fire("max-duration"),
            expect(caller=["BYE"], callee0=["BYE"], cdr_cause="RECOVERY_ON_TIMER_EXPIRE"),
            S.ENDED, settings={"max_duration": 3600.0}),
    RowCase(S.ANSWERED, E.HANGUP, answered, hangup,
            expect(caller=["BYE"], callee0=["BYE"], cdr_cause="NORMAL_CLEARING"), S.ENDED),
    RowCase(S.ENDED, E.FORK_ANSWERED, late_fork_after_cancel, fork0(200, ANSWER_SDP),
            expect(caller=[], callee0=["ACK", "BYE"])),
    RowCase(S.ENDED, E.IN_DIALOG_REQUEST, ended,
            lambda flow: from_callee(flow, flow.callee.request(
                "INFO", body=b"Signal=1\r\n", content_type=b"application/dtmf-relay")),
            expect(caller=[], callee0=["481 INFO"])),
    RowCase(S.ENDED, E.CALLER_NO_ACK, ended_unacked, timer_l,
            expect(caller=["BYE"], callee0=[])),
]


@pytest.mark.parametrize("case", ROWS, ids=[f"{c.state}-{c.event}" for c in ROWS])
def test_table_row(case: RowCase, seen):
    rig = Rig(restore=True, **(case.settings or {}))
    flow = case.setup(rig)
    assert rig.call.state == case.state
    seen.clear()
    acts = case.trigger(flow)
    assert seen[-1] == (case.state, case.event)
    expected = case.next or case.state
    assert TABLE[case.state, case.event].next == expected
    assert rig.call.state == expected
    case.check(flow, acts)


def test_every_row_is_tested():
    assert sorted((c.state, c.event) for c in ROWS) == sorted(TABLE)


def test_every_pair_is_a_row_or_ignored():
    pairs = {(state, event) for state in CallState for event in Event}
    assert set(TABLE) | set(IGNORED) == pairs
    assert not set(TABLE) & set(IGNORED)
    assert all(reason for reason in IGNORED.values())


IGNORED_PAIRS = sorted(IGNORED)


@pytest.mark.parametrize(("state", "event"), IGNORED_PAIRS,
                         ids=[f"{s}-{e}" for s, e in IGNORED_PAIRS])
def test_an_ignored_pair_does_nothing(state, event):
    rig = Rig(restore=True)
    SETUPS[state](rig)
    before = rig.call.to_record()
    # Whatever the event would carry: an ignored pair must not look at it.
    assert rig.call.dispatch(event, rig.ctx(), leg=None, resp=None, req=None, cause=None,
                             side=None) == []
    assert rig.call.to_record() == before


def test_a_fork_failure_while_others_ring_waits_for_them(seen):
    rig = Rig(restore=True)
    flow = ringing(rig)
    seen.clear()
    acts = fork1(486)(flow)
    assert seen == [(S.RINGING, E.FORK_FAILED)]
    assert to_caller(acts) == [] and rig.call.state == S.RINGING


def test_the_callers_cancel_after_the_answer_gets_its_200_only(seen):
    rig = Rig(restore=True)
    flow = answered(rig)
    seen.clear()
    acts = caller_cancel(flow)
    assert seen == [(S.ANSWERED, E.CALLER_CANCEL)]
    assert [r.status for r in acts.replies] == [200] and acts.outs == []
    assert rig.call.state == S.ANSWERED


def test_a_bye_in_a_forks_early_dialog_gets_its_200_only(seen):
    rig = Rig(restore=True)
    flow = ringing(rig)
    seen.clear()
    acts = callee_bye(flow)
    assert seen == [(S.RINGING, E.CALLEE_BYE)]
    assert to_callee(acts) == ["200 BYE"] and to_caller(acts) == []
    assert rig.call.state == S.RINGING


def test_a_request_from_a_losing_forks_dialog_is_no_event(seen):
    # Fork 1 rang (an early dialog), fork 0 won, fork 1's late 2xx got ACK and BYE.
    rig = Rig(restore=True)
    flow = ringing(rig)
    loser = flow.callees[1]
    fork1(180)(flow)
    fork0(200, ANSWER_SDP)(flow)
    fork1(200, ANSWER_SDP)(flow)
    seen.clear()
    acts = rig.request(loser.request("BYE"), loser.addr)
    assert to_callee(acts, 1) == ["200 BYE"]
    acts = rig.request(loser.request("INFO", body=b"x", content_type=b"text/plain"),
                       loser.addr)
    assert to_callee(acts, 1) == ["481 INFO"]
    assert to_callee(fork1(200, ANSWER_SDP)(flow), 1) == ["ACK"]  # its 2xx again
    assert seen == [] and rig.call.state == S.ANSWERED


def test_a_second_dialog_behind_a_forking_proxy_is_no_event(seen):
    rig = Rig(restore=True)
    flow = answered(rig)
    other = Callee(flow.callee.invite, flow.callee.addr, "calleetag0-second")
    seen.clear()
    assert to_callee(flow.from_callee(other.respond(200, body=ANSWER_SDP))) == ["ACK", "BYE"]
    assert to_callee(flow.from_callee(other.respond(200, body=ANSWER_SDP))) == ["ACK"]
    assert to_callee(flow.rig.request(other.request("BYE"), other.addr)) == ["200 BYE"]
    assert seen == [] and rig.call.state == S.ANSWERED


def test_a_request_of_another_dialog_on_a_leg_is_no_event(seen):
    rig = Rig(restore=True)
    flow = answered(rig)
    bye = flow.caller.request("BYE")
    bye.set_header(b"From", bye.header("from").replace(bye.from_.tag.encode(), b"other"))
    seen.clear()
    assert [r.status for r in flow.from_caller(parse(bye.to_bytes())).replies] == [481]
    assert seen == [] and rig.call.state == S.ANSWERED
