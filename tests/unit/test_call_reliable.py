"""A call whose legs run over a reliable transport (a connection: TCP, TLS, WS, WSS):
its transactions do not retransmit (RFC 3261 17), except the 2xx to the caller's INVITE
(13.3.1.4).  The rig says which socket numbers are connections (``Settings.reliable``),
as the shell does with envelope.is_stream."""

from __future__ import annotations

import pytest
from callkit import (
    A_SOCK,
    ANSWER_SDP,
    B_SOCK,
    CALLER_ADDR,
    CountingIds,
    Rig,
    answered,
    begin,
)

from cluster.sip.message import parse
from workers.sip.call import Ctx, Settings
from workers.sip.call.wire import answers_reliable


@pytest.fixture(params=[False, True], ids=["one-object", "restored"])
def restore(request) -> bool:
    return request.param


def tx_timers(rig: Rig, role: str, leg: str) -> dict[str, float]:
    """The pending timers of the call's transaction with ``role`` on ``leg``."""
    [entry] = [e for e in rig.call.txs.values() if e["role"] == role and e["leg"] == leg]
    return dict(entry["tx"]["timers"])


def test_an_invite_to_a_callee_over_a_connection_is_not_retransmitted(restore):
    rig = Rig(restore, reliable=lambda sock: sock == B_SOCK)
    flow = begin(rig)
    bkey = f"c|{flow.callee.invite.via.branch}|INVITE"
    assert {n: due for n, due in flow.started.arms.items() if n.startswith(f"tx|{bkey}|")} \
        == {f"tx|{bkey}|B": rig.now + 32.0}  # Timer B; over UDP Timer A too (below)
    rig.advance(20)
    flow.from_callee(flow.callee.respond(180))
    assert tx_timers(rig, "invite", "b0") == {}


def test_an_invite_to_a_callee_over_udp_is_retransmitted(restore):
    rig = Rig(restore)
    flow = begin(rig)
    bkey = f"c|{flow.callee.invite.via.branch}|INVITE"
    again = rig.fire(f"tx|{bkey}|A")
    assert [o.data for o in again.outs] == [flow.callee.invite.to_bytes()]


def test_a_bye_to_a_callee_over_a_connection_goes_once_and_ends_with_its_answer(restore):
    rig = Rig(restore, reliable=lambda sock: sock == B_SOCK)
    flow = answered(rig)
    acts = flow.from_caller(flow.caller.request("BYE"))
    [bye] = [parse(o.data) for o in acts.outs if o.dest == flow.callee.addr]
    assert [o.sock_index for o in acts.outs if o.dest == flow.callee.addr] == [B_SOCK]
    assert tx_timers(rig, "bye", "b0") == {"F": rig.now + 32.0}  # no Timer E
    assert not any(name.endswith("|E") for name in acts.arms)
    rig.advance(3)
    assert flow.from_callee(flow.callee.answer(bye)).outs == []
    assert tx_timers(rig, "bye", "b0") == {"K": rig.now}  # Timer K = 0
    rig.advance(0.001)  # the next event prunes it, as the shell's does
    flow.from_caller(flow.caller.request("OPTIONS"))
    assert not any(e["role"] == "bye" for e in rig.call.txs.values())


def test_a_caller_over_a_connection_still_gets_its_2xx_retransmitted(restore):
    """RFC 3261 13.3.1.4: the 2xx goes again until the ACK whatever the transport."""
    rig = Rig(restore, reliable=lambda sock: sock == A_SOCK)
    flow = begin(rig)
    first = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    ok = [o.data for o in first.outs if o.dest == CALLER_ADDR]
    name = rig.timer("|2xx")
    assert first.arms[name] == rig.now + 0.5
    assert [o.data for o in rig.fire(name).outs] == ok


def test_a_failure_to_a_caller_over_a_connection_goes_once_and_its_ack_ends_it(restore):
    rig = Rig(restore, reliable=lambda sock: sock == A_SOCK)
    flow = begin(rig)
    acts = flow.from_callee(flow.callee.respond(486))
    busy = acts.one(CALLER_ADDR)
    assert busy.status == 486
    assert set(tx_timers(rig, "invite", "a")) == {"H"}  # no Timer G
    rig.advance(0.2)
    assert flow.from_caller(flow.caller.ack_failure(busy)).outs == []
    assert tx_timers(rig, "invite", "a") == {"I": rig.now}  # Timer I = 0


def test_a_bye_from_a_caller_over_a_connection_is_answered_and_ended_at_once(restore):
    rig = Rig(restore, reliable=lambda sock: sock == A_SOCK)
    flow = answered(rig)
    acts = flow.from_caller(flow.caller.request("BYE"))
    assert acts.one(CALLER_ADDR).status == 200
    assert tx_timers(rig, "local", "a") == {"J": rig.now}  # Timer J = 0; 32 s over UDP


def test_answers_leave_reliably_when_the_request_came_over_a_connection():
    """The answers to a request go back through the socket it arrived on (Ctx.host)."""
    cfg = Settings(address="192.0.2.1", port=5060, reliable=lambda sock: sock >= 100)
    came_over_tcp = Ctx(0.0, CountingIds(), cfg, host="h2", sock_index=100)
    came_over_udp = Ctx(0.0, CountingIds(), cfg, host="h2", sock_index=1)
    no_arrival = Ctx(0.0, CountingIds(), cfg)
    assert answers_reliable(came_over_tcp, leg_sock=1) is True
    assert answers_reliable(came_over_udp, leg_sock=100) is False
    assert answers_reliable(no_arrival, leg_sock=100) is True
    assert answers_reliable(no_arrival, leg_sock=1) is False
    assert Settings(address="192.0.2.1", port=5060).reliable(1 << 40) is False  # default: UDP
