"""The B2BUA call state machine (workers/sip/call/): the seed call, forking, failures,
CANCEL, timers, re-INVITE and in-dialog requests, ending.

Every test runs twice: with one ``Call`` object throughout, and with a fresh one rebuilt
from the msgpack record before every event, as the cluster runs it (see callkit.Rig).
"""

from __future__ import annotations

import pytest
from callkit import (
    A_HOST,
    A_SOCK,
    ADDRESS,
    ANSWER_SDP,
    B_HOST,
    B_SOCK,
    CALLER_ADDR,
    CALLER_CONTACT_URI,
    NORMAL_CLEARING_REASON,
    OUR_CONTACT_TO_CALLEE,
    OUR_CONTACT_TO_CALLER,
    SLOT,
    START,
    TAG,
    Callee,
    Caller,
    Rig,
    answered,
    begin,
    invite_without_sdp,
    seed_invite,
    seed_sdp,
    summary,
    targets,
)

from cluster.sip.message import Request, Response, parse
from cluster.store import parse_timer_member, timer_member
from workers.sip.call import (
    ADMIN_HANGUP,
    MEDIA_TIMEOUT,
    Reply,
    best_final,
)

EARLY_SDP = (b"v=0\r\no=FreeSWITCH 1726881924 1726881925 IN IP4 192.168.31.50\r\ns=FreeSWITCH\r\n"
             b"c=IN IP4 192.168.31.50\r\nt=0 0\r\nm=audio 17734 RTP/AVP 8 101\r\n"
             b"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")
CALLER_TAG = "0e837329"


@pytest.fixture(params=[False, True], ids=["one-object", "restored"])
def make_rig(request):
    return lambda **settings: Rig(restore=request.param, **settings)


@pytest.fixture
def rig(make_rig) -> Rig:
    return make_rig()


# --------------------------------------------------------------------------- flows


def a_tag(rig: Rig) -> str:
    return rig.call.a.local_tag


def b_tag(rig: Rig, index: int = 0) -> str:
    return rig.call.forks[index].local_tag


def header_block(msg: Request | Response) -> bytes:
    return msg.to_bytes().split(b"\r\n\r\n", 1)[0]


def assert_bye(msg: Request, *, uri: bytes, call_id: bytes, from_tag: str, to_tag: str,
               cseq: int, reason: bytes = NORMAL_CLEARING_REASON) -> None:
    assert msg.method == "BYE"
    assert msg.uri_raw == uri
    assert msg.call_id == call_id
    assert msg.from_.tag == from_tag and msg.to.tag == to_tag
    assert (msg.cseq.number, msg.cseq.method) == (cseq, "BYE")
    assert msg.header("reason") == reason
    assert msg.via.branch.startswith("z9hG4bK") and msg.via.sent_by == (ADDRESS, 5060)
    assert msg.body == b""


def cause_reason(name: str, q850: int) -> bytes:
    return b'Q.850;cause=%d;text="%s"' % (q850, name.encode())


# --------------------------------------------------------------------------- the seed call


def test_start_sends_100_to_the_caller_and_a_fresh_invite_to_the_callee(rig):
    caller = Caller()
    acts = rig.start()
    trying = acts.one(CALLER_ADDR)
    assert trying.status == 100 and trying.to.tag is None
    assert trying.header_lines("via") == caller.invite.header_lines("via")
    assert trying.call_id == caller.invite.call_id and trying.cseq.number == 2
    to_caller = [o for o in acts.outs if o.dest == CALLER_ADDR][0]
    assert (to_caller.host, to_caller.sock_index) == (A_HOST, A_SOCK)

    target = targets(1)[0]
    invite = acts.one(target.peer)
    to_callee = [o for o in acts.outs if o.dest == target.peer][0]
    assert (to_callee.host, to_callee.sock_index) == (B_HOST, B_SOCK)
    assert invite.method == "INVITE" and invite.uri_raw == target.uri
    assert invite.call_id == f"sc{SLOT}.{TAG}.0".encode()
    assert len(invite.vias) == 1
    assert invite.via.branch.startswith("z9hG4bK") and invite.via.has_rport
    assert invite.via.sent_by == (ADDRESS, 5060)
    assert invite.from_.sip_uri.user == b"1002" and invite.from_.sip_uri.host == ADDRESS
    assert invite.from_.tag and invite.from_.tag != CALLER_TAG
    assert invite.to.sip_uri.user == b"1009" and invite.to.tag is None
    assert invite.header("contact") == OUR_CONTACT_TO_CALLEE
    assert invite.max_forwards == 69
    assert (invite.cseq.number, invite.cseq.method) == (1, "INVITE")
    assert invite.body == caller.invite.body and invite.content_type == b"application/sdp"
    # Nothing of the A-leg but its Call-ID in X-Call-ID (calls.xcid_header, for sngrep and
    # Homer to group the legs; test_x_call_id_* below).
    assert invite.header("x-call-id") == caller.invite.call_id
    head = b"\r\n".join(line for line in header_block(invite).split(b"\r\n")
                         if not line.startswith(b"X-Call-ID:"))
    for leak in (caller.invite.call_id, b"192.168.31.142", b"55747", CALLER_TAG.encode(),
                 caller.invite.via.branch.encode(), b"Proxy-Authorization", b"Zoiper"):
        assert leak not in head, leak

    key = f"c|{invite.via.branch}|INVITE"
    assert acts.arms == {f"tx|{key}|A": START + 0.5, f"tx|{key}|B": START + 32.0,
                         "no-answer": START + 60.0}
    assert acts.cdrs == [] and acts.replies == []


@pytest.mark.parametrize(("line", "expected"), [
    (b"Max-Forwards: 5", 4), (b"Max-Forwards: 1", 0), (None, 69)])
def test_max_forwards_is_decremented(rig, line, expected):
    data = seed_invite().to_bytes()
    data = data.replace(b"Max-Forwards: 70\r\n", line + b"\r\n" if line else b"")
    invite = begin(rig, invite=parse(data)).callee.invite
    assert invite.max_forwards == expected


def test_start_leaves_the_100_to_the_shell_when_it_sent_it(rig):
    acts = rig.start(trying_sent=True)
    assert [summary(m) for m in acts.sent()] == ["INVITE"]


def test_a_retransmitted_invite_gets_the_last_provisional_again(rig):
    flow = begin(rig)
    again = flow.from_caller(flow.caller.invite)
    assert [summary(m) for m in again.sent()] == ["100 INVITE"]
    assert again.sent(flow.callee.addr) == []
    flow.from_callee(flow.callee.respond(180))
    again = flow.from_caller(flow.caller.invite)
    assert [m.status for m in again.sent()] == [180]


def test_a_retransmitted_invite_after_the_200_gets_the_200_again(rig):
    flow = begin(rig)
    ok = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP)).one(CALLER_ADDR)
    again = flow.from_caller(flow.caller.invite)
    assert [o.data for o in again.outs] == [ok.to_bytes()]
    assert again.sent(flow.callee.addr) == [] and len(rig.call.forks) == 1


def test_100_from_the_callee_is_not_relayed(rig):
    flow = begin(rig)
    assert flow.from_callee(flow.callee.respond(100)).outs == []


def test_180_is_relayed_with_our_to_tag_and_contact(rig):
    flow = begin(rig)
    acts = flow.from_callee(flow.callee.respond(180))
    ringing = acts.one(CALLER_ADDR)
    assert ringing.status == 180 and ringing.body == b""
    assert ringing.to.tag == a_tag(rig) and ringing.to.tag != flow.callee.tag
    assert ringing.header("contact") == OUR_CONTACT_TO_CALLER
    assert ringing.header_lines("via") == flow.caller.invite.header_lines("via")
    assert ringing.call_id == flow.caller.invite.call_id
    assert acts.sent(flow.callee.addr) == []
    assert flow.callee.addr[0].encode() not in header_block(ringing)


def test_183_with_sdp_is_relayed_with_the_sdp(rig):
    flow = begin(rig)
    acts = flow.from_callee(flow.callee.respond(183, body=EARLY_SDP))
    progress = acts.one(CALLER_ADDR)
    assert progress.status == 183
    assert progress.body == EARLY_SDP and progress.content_type == b"application/sdp"
    assert progress.to.tag == a_tag(rig)


def test_200_is_acked_at_once_and_relayed_with_sdp_and_contact(rig):
    flow = begin(rig)
    ringing = flow.from_callee(flow.callee.respond(180)).one(CALLER_ADDR)
    rig.advance(5)
    acts = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))

    ack = acts.one(flow.callee.addr)
    assert ack.method == "ACK" and ack.uri_raw == b"sip:1009@192.168.31.50:60119;ob"
    assert (ack.cseq.number, ack.cseq.method) == (1, "ACK")
    assert ack.call_id == flow.callee.invite.call_id
    assert ack.from_.tag == b_tag(rig) and ack.to.tag == flow.callee.tag
    assert ack.via.branch.startswith("z9hG4bK")
    assert ack.via.branch != flow.callee.invite.via.branch
    assert ack.body == b""

    ok = acts.one(CALLER_ADDR)
    assert ok.status == 200 and ok.cseq.method == "INVITE"
    assert ok.body == ANSWER_SDP and ok.content_type == b"application/sdp"
    assert ok.header("contact") == OUR_CONTACT_TO_CALLER
    assert ok.to.tag == ringing.to.tag == a_tag(rig)
    assert b"192.168.31.50" not in header_block(ok)
    akey = rig.call.a.invite_key
    bkey = f"c|{flow.callee.invite.via.branch}|INVITE"
    assert acts.arms == {f"tx|{akey}|2xx": rig.now + 0.5, f"tx|{akey}|L": rig.now + 32.0,
                         f"tx|{bkey}|M": rig.now + 32.0}
    assert acts.cdrs == []


def test_200_is_retransmitted_until_the_callers_ack(rig):
    flow = begin(rig)
    first = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    ok_bytes = [o.data for o in first.outs if o.dest == CALLER_ADDR][0]
    name = rig.timer("|2xx")
    intervals = []
    for _ in range(5):
        before = rig.armed[name]
        acts = rig.fire(name)
        assert [o.data for o in acts.outs] == [ok_bytes]
        assert [o.dest for o in acts.outs] == [CALLER_ADDR]
        intervals.append(acts.arms[name] - before)
    assert intervals == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubling from T1, capped at T2

    caller = flow.caller
    caller.learn(parse(ok_bytes))
    assert flow.from_caller(caller.ack()).outs == []  # the B-leg was ACKed already
    assert rig.fire(name) == []
    rig.advance(60)
    ended = rig.fire(rig.timer("|L", "|INVITE|"))  # Timer L after the ACK: no BYE
    assert ended.outs == [] and ended.cdrs == [] and rig.call.state == "answered"


def test_a_2xx_never_acked_by_the_caller_ends_the_call(rig):
    flow = begin(rig)
    flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    acts = rig.fire(rig.timer("|L", rig.call.a.invite_key))
    reason = cause_reason("RECOVERY_ON_TIMER_EXPIRE", 102)
    assert acts.one(CALLER_ADDR).method == "BYE"
    assert acts.one(CALLER_ADDR).header("reason") == reason
    assert acts.one(flow.callee.addr).header("reason") == reason
    [cdr] = acts.cdrs
    assert (cdr["hangup_cause"], cdr["hangup_side"]) == ("RECOVERY_ON_TIMER_EXPIRE", "system")


def test_a_retransmitted_200_from_the_callee_is_acked_again_only(rig):
    flow = answered(rig)
    acts = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    assert [summary(m) for m in acts.sent()] == ["ACK"]
    assert acts.one(flow.callee.addr).cseq.number == 1
    assert rig.call.state == "answered" and acts.cdrs == []


def test_a_200_retransmitted_after_the_invite_transaction_ended_is_acked_again(rig):
    flow = answered(rig)
    rig.advance(40)
    rig.fire(rig.timer("|M"))  # RFC 6026 Timer M: the INVITE client transaction ends
    acts = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    assert [summary(m) for m in acts.sent()] == ["ACK"]
    assert acts.one(flow.callee.addr).to.tag == flow.callee.tag
    assert rig.call.state == "answered"


def test_the_call_state_after_the_answer(rig):
    flow = answered(rig)
    call = rig.call
    assert call.state == "answered" and call.winner == 0 and call.answered == START
    assert "no-answer" not in call.timers
    assert flow.ok.to.tag == a_tag(rig)


# --------------------------------------------------------------------------- BYE


def test_bye_from_the_caller(rig):
    flow = answered(rig)
    rig.advance(30)
    acts = flow.from_caller(flow.caller.request("BYE"))
    ok = acts.one(CALLER_ADDR)
    assert (ok.status, ok.cseq.method) == (200, "BYE")
    bye = acts.one(flow.callee.addr)
    assert_bye(bye, uri=b"sip:1009@192.168.31.50:60119;ob", call_id=flow.callee.invite.call_id,
               from_tag=b_tag(rig), to_tag=flow.callee.tag, cseq=2)
    assert [(o.host, o.sock_index) for o in acts.outs if o.dest == flow.callee.addr] == [
        (B_HOST, B_SOCK)]
    [cdr] = acts.cdrs
    assert cdr == {
        "caller": "1002", "callee": "1009", "a_call_id": flow.caller.invite.call_id.decode(),
        "b_call_id": f"sc{SLOT}.{TAG}.0", "start": START, "answer": START,
        "end": START + 30, "duration": 30.0, "billsec": 30.0,
        "caller_source": "{}:{}".format(*CALLER_ADDR), "hangup_cause": "NORMAL_CLEARING",
        "q850": 16, "hangup_side": "caller", "sip_status": 200,
        "codec": "PCMA/8000"}  # the answer's first format (the caller offered GSM first)
    assert rig.call.state == "ended"
    done = flow.from_callee(flow.callee.answer(bye))
    assert done.outs == [] and done.cdrs == []


def test_bye_from_the_callee_in_the_seed_shape(rig):
    flow = answered(rig)
    bye = flow.callee.seed_bye()
    acts = rig.request(bye, flow.callee.addr)
    ok = acts.one(flow.callee.addr)
    assert (ok.status, ok.cseq.number) == (200, 30422)
    assert ok.via.branch == bye.via.branch
    to_caller = acts.one(CALLER_ADDR)
    assert_bye(to_caller, uri=CALLER_CONTACT_URI, call_id=flow.caller.invite.call_id,
               from_tag=a_tag(rig), to_tag=CALLER_TAG, cseq=3)
    assert [(o.host, o.sock_index) for o in acts.outs if o.dest == CALLER_ADDR] == [
        (A_HOST, A_SOCK)]
    [cdr] = acts.cdrs
    assert (cdr["hangup_side"], cdr["hangup_cause"], cdr["q850"]) == ("callee",
                                                                      "NORMAL_CLEARING", 16)
    done = rig.response(flow.caller.answer(to_caller), CALLER_ADDR)
    assert done.outs == [] and done.cdrs == []


def test_a_bye_from_the_callee_waits_for_the_callers_ack(rig):
    flow = begin(rig)
    flow.caller.learn(flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP)).one(
        CALLER_ADDR))
    acts = rig.request(flow.callee.seed_bye(), flow.callee.addr)
    assert [summary(m) for m in acts.sent()] == ["200 BYE"]  # to the callee only
    acts = flow.from_caller(flow.caller.ack())
    assert acts.one(CALLER_ADDR).method == "BYE"


def test_a_retransmitted_bye_is_answered_again_without_a_second_bye(rig):
    flow = answered(rig)
    bye = flow.caller.request("BYE")
    first = flow.from_caller(bye)
    first_ok = [o.data for o in first.outs if o.dest == CALLER_ADDR]
    again = flow.from_caller(bye)
    assert [o.data for o in again.outs] == first_ok
    assert again.sent(flow.callee.addr) == [] and again.cdrs == []


def test_a_retransmitted_bye_from_the_callee_is_answered_again_only(rig):
    flow = answered(rig)
    bye = flow.callee.seed_bye()
    rig.request(bye, flow.callee.addr)
    again = rig.request(bye, flow.callee.addr)
    assert [summary(m) for m in again.sent()] == ["200 BYE"]
    assert again.sent(CALLER_ADDR) == [] and again.cdrs == []


def test_our_bye_is_retransmitted_on_timer_e_until_answered(rig):
    flow = answered(rig)
    acts = flow.from_caller(flow.caller.request("BYE"))
    bye_bytes = [o.data for o in acts.outs if o.dest == flow.callee.addr][0]
    name = rig.timer("|E", "|BYE|")
    intervals = []
    for _ in range(5):
        before = rig.armed[name]
        again = rig.fire(name)
        assert [(o.data, o.dest) for o in again.outs] == [(bye_bytes, flow.callee.addr)]
        intervals.append(again.arms[name] - before)
    assert intervals == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert flow.from_callee(flow.callee.answer(parse(bye_bytes))).outs == []
    assert rig.fire(name) == []


def test_our_bye_gives_up_on_timer_f(rig):
    flow = answered(rig)
    flow.from_caller(flow.caller.request("BYE"))
    acts = rig.fire(rig.timer("|F", "|BYE|"))
    assert acts.outs == [] and acts.cdrs == []
    assert not any(e["role"] == "bye" for e in rig.call.txs.values())


def test_byes_crossing(rig):
    flow = answered(rig)
    flow.from_caller(flow.caller.request("BYE"))
    acts = rig.request(flow.callee.seed_bye(), flow.callee.addr)
    assert [summary(m) for m in acts.sent()] == ["200 BYE"]
    assert acts.sent(CALLER_ADDR) == [] and acts.cdrs == []


# --------------------------------------------------------------------------- delayed offer


def test_delayed_offer_the_b_leg_ack_carries_the_callers_answer(rig):
    flow = begin(rig, invite=invite_without_sdp())
    invite = flow.callee.invite
    assert invite.body == b"" and invite.header("content-type") is None
    acts = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    assert acts.sent(flow.callee.addr) == []  # the ACK waits for the caller's answer
    ok = flow.caller.learn(acts.one(CALLER_ADDR))
    assert ok.status == 200 and ok.body == ANSWER_SDP

    caller_sdp = seed_sdp()  # the caller's answer: the SDP the seed's Zoiper sends
    acts = flow.from_caller(flow.caller.ack(body=caller_sdp))
    ack = acts.one(flow.callee.addr)
    assert ack.method == "ACK" and (ack.cseq.number, ack.cseq.method) == (1, "ACK")
    assert ack.body == caller_sdp and ack.content_type == b"application/sdp"
    assert ack.to.tag == flow.callee.tag
    assert acts.sent(CALLER_ADDR) == []
    assert rig.fire(rig.timer("|2xx")) == []  # the caller's ACK stopped the 200


def test_delayed_offer_a_repeated_ack_is_not_passed_on_twice(rig):
    flow = begin(rig, invite=invite_without_sdp())
    flow.caller.learn(flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP)).one(CALLER_ADDR))
    ack = flow.caller.ack(body=seed_sdp())
    assert flow.from_caller(ack).one(flow.callee.addr).method == "ACK"
    assert flow.from_caller(ack).outs == []


# --------------------------------------------------------------------------- forking


def test_forking_first_2xx_wins_and_the_ringing_fork_is_cancelled(rig):
    flow = begin(rig, forks=2)
    inv0, inv1 = flow.callees[0].invite, flow.callees[1].invite
    assert inv0.call_id == f"sc{SLOT}.{TAG}.0".encode()
    assert inv1.call_id == f"sc{SLOT}.{TAG}.1".encode()
    assert inv0.from_.tag != inv1.from_.tag and inv0.via.branch != inv1.via.branch
    assert inv0.body == inv1.body == flow.caller.invite.body

    ringing = flow.from_callee(flow.callees[1].respond(180), 1).one(CALLER_ADDR)
    acts = flow.from_callee(flow.callees[0].respond(200, body=ANSWER_SDP), 0)
    assert acts.one(flow.callees[0].addr).method == "ACK"
    ok = acts.one(CALLER_ADDR)
    assert ok.status == 200 and ok.to.tag == ringing.to.tag  # one dialog for the caller
    cancel = acts.one(flow.callees[1].addr)
    assert cancel.method == "CANCEL" and cancel.uri_raw == inv1.uri_raw
    assert cancel.header_lines("via") == inv1.header_lines("via")
    assert (cancel.cseq.number, cancel.cseq.method) == (1, "CANCEL")
    assert cancel.call_id == inv1.call_id
    assert cancel.header("from") == inv1.header("from") and cancel.to.tag is None

    assert flow.from_callee(flow.callees[1].answer(cancel), 1).outs == []
    terminated = flow.from_callee(flow.callees[1].respond(487), 1)
    ack = terminated.one(flow.callees[1].addr)
    assert ack.method == "ACK" and ack.via.branch == inv1.via.branch  # the transaction's ACK
    assert terminated.sent(CALLER_ADDR) == [] and terminated.cdrs == []
    assert rig.call.state == "answered"


def test_forking_the_cancel_waits_for_a_provisional(rig):
    flow = begin(rig, forks=2)
    acts = flow.from_callee(flow.callees[0].respond(200, body=ANSWER_SDP), 0)
    assert acts.sent(flow.callees[1].addr) == []  # RFC 3261 9.1: not before a provisional
    acts = flow.from_callee(flow.callees[1].respond(100), 1)
    cancel = acts.one(flow.callees[1].addr)
    assert cancel.method == "CANCEL" and cancel.via.branch == flow.callees[1].invite.via.branch


def test_forking_the_waiting_cancel_goes_on_a_180_which_is_not_relayed(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[0].respond(200, body=ANSWER_SDP), 0)
    acts = flow.from_callee(flow.callees[1].respond(180), 1)
    assert [summary(m) for m in acts.sent()] == ["CANCEL"]
    assert acts.sent(CALLER_ADDR) == []


def test_forking_a_late_2xx_from_the_loser_gets_ack_and_bye(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[1].respond(180), 1)
    flow.from_callee(flow.callees[0].respond(200, body=ANSWER_SDP), 0)
    loser = flow.callees[1]
    acts = flow.from_callee(loser.respond(200, body=ANSWER_SDP), 1)
    assert [summary(m) for m in acts.sent()] == ["ACK", "BYE"]
    ack, bye = acts.sent(loser.addr)
    assert ack.to.tag == loser.tag and ack.cseq.number == 1
    assert_bye(bye, uri=b"sip:1009@192.168.31.51:5062;ob", call_id=loser.invite.call_id,
               from_tag=b_tag(rig, 1), to_tag=loser.tag, cseq=2)
    assert acts.cdrs == [] and rig.call.state == "answered" and rig.call.winner == 0


def lost_after_answering(rig: Rig):
    """Fork 1 rang, fork 0 answered, fork 1 answered too late and got ACK and BYE."""
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[1].respond(180), 1)
    flow.caller.learn(flow.from_callee(flow.callees[0].respond(200, body=ANSWER_SDP), 0).one(
        CALLER_ADDR))
    flow.from_caller(flow.caller.ack())
    late = flow.from_callee(flow.callees[1].respond(200, body=ANSWER_SDP), 1)
    return flow, late


def test_forking_the_losers_repeated_late_2xx_gets_the_same_ack_only(rig):
    flow, late = lost_after_answering(rig)
    loser = flow.callees[1]
    [first_ack] = [o.data for o in late.outs if parse(o.data).method == "ACK"]
    byes = [e for e in rig.call.txs.values() if e["role"] == "bye"]
    for _ in range(2):
        again = flow.from_callee(loser.respond(200, body=ANSWER_SDP), 1)
        assert [(o.data, o.dest) for o in again.outs] == [(first_ack, loser.addr)]
        assert again.cdrs == []
    assert [e for e in rig.call.txs.values() if e["role"] == "bye"] == byes
    assert rig.call.state == "answered" and rig.call.winner == 0


def test_forking_the_losers_late_2xx_after_its_transaction_ended_gets_the_same_ack(rig):
    flow, late = lost_after_answering(rig)
    loser = flow.callees[1]
    [first_ack] = [o.data for o in late.outs if parse(o.data).method == "ACK"]
    rig.advance(40)
    rig.fire(rig.timer("|M", loser.invite.via.branch))
    again = flow.from_callee(loser.respond(200, body=ANSWER_SDP), 1)
    assert [(o.data, o.dest) for o in again.outs] == [(first_ack, loser.addr)]


def test_forking_a_bye_from_the_losers_dialog_gets_200_and_leaves_the_call(rig):
    flow, _ = lost_after_answering(rig)
    loser = flow.callees[1]
    acts = rig.request(loser.request("BYE"), loser.addr)
    assert [summary(m) for m in acts.sent()] == ["200 BYE"]
    assert acts.one(loser.addr).to.tag == b_tag(rig, 1)
    assert acts.cdrs == [] and rig.call.state == "answered" and rig.call.winner == 0
    # The winning dialog is untouched: the caller's BYE goes on to fork 0.
    acts = flow.from_caller(flow.caller.request("BYE"))
    assert acts.one(flow.callees[0].addr).to.tag == flow.callees[0].tag
    assert [c["hangup_side"] for c in acts.cdrs] == ["caller"]


@pytest.mark.parametrize("method", ["INFO", "INVITE", "OPTIONS", "UPDATE"])
def test_forking_other_requests_from_the_losers_dialog_get_481(rig, method):
    flow, _ = lost_after_answering(rig)
    loser = flow.callees[1]
    acts = rig.request(loser.request(method, body=b"x", content_type=b"text/plain"), loser.addr)
    assert [summary(m) for m in acts.sent()] == [f"481 {method}"]
    assert rig.call.state == "answered" and rig.call.txs[rig.call.a.invite_key]


def test_forking_a_bye_in_a_cancelled_forks_early_dialog_leaves_the_call(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[1].respond(180), 1)
    flow.from_callee(flow.callees[0].respond(200, body=ANSWER_SDP), 0)  # CANCEL to fork 1
    acts = rig.request(flow.callees[1].request("BYE"), flow.callees[1].addr)
    assert [summary(m) for m in acts.sent()] == ["200 BYE"]
    acts = rig.request(flow.callees[1].request("INFO", body=b"x", content_type=b"text/plain"),
                       flow.callees[1].addr)
    assert [summary(m) for m in acts.sent()] == ["481 INFO"]
    assert acts.cdrs == [] and rig.call.state == "answered"


def second_phone(flow) -> Callee:
    """Another phone behind a forking proxy that got fork 0's INVITE too."""
    return Callee(flow.callee.invite, flow.callee.addr, "calleetag0-second")


def test_forking_downstream_a_second_dialog_gets_ack_and_bye_and_is_never_bridged(rig):
    flow = answered(rig)
    first = rig.call.forks[0].dialog
    other = second_phone(flow)
    acts = flow.from_callee(other.respond(200, body=ANSWER_SDP))
    assert [summary(m) for m in acts.sent()] == ["ACK", "BYE"]
    ack, bye = acts.sent(other.addr)
    assert ack.to.tag == bye.to.tag == other.tag and ack.cseq.number == 1
    assert_bye(bye, uri=b"sip:1009@192.168.31.50:60119;ob", call_id=other.invite.call_id,
               from_tag=b_tag(rig), to_tag=other.tag, cseq=2)
    assert acts.cdrs == [] and rig.call.state == "answered"
    assert rig.call.forks[0].dialog == first  # the bridged dialog stays the first one
    # Its 2xx again: the same ACK only.
    again = flow.from_callee(other.respond(200, body=ANSWER_SDP))
    assert [(o.data, o.dest) for o in again.outs] == [(ack.to_bytes(), other.addr)]
    # The first dialog's 2xx again: its own ACK, as before.
    again = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    assert [m.to.tag for m in again.sent()] == [flow.callee.tag]
    # The answer to our BYE ends that dialog only.
    assert flow.from_callee(other.answer(bye)).outs == []
    assert rig.call.state == "answered"


def test_forking_downstream_a_bye_on_the_second_dialog_does_not_end_the_call(rig):
    flow = answered(rig)
    other = second_phone(flow)
    flow.from_callee(other.respond(200, body=ANSWER_SDP))
    bye = other.request("BYE")
    acts = rig.request(bye, other.addr)
    assert [summary(m) for m in acts.sent()] == ["200 BYE"]
    assert acts.cdrs == [] and rig.call.state == "answered"
    assert [summary(m) for m in rig.request(bye, other.addr).sent()] == ["200 BYE"]
    acts = rig.request(other.request("INFO", body=b"x", content_type=b"text/plain"), other.addr)
    assert acts == [Reply(481)]
    # The call still runs on the first dialog, both ways.
    acts = rig.request(flow.callee.request("INFO", body=b"x", content_type=b"text/plain"),
                       flow.callee.addr)
    assert [summary(m) for m in acts.sent()] == ["INFO"]
    acts = flow.from_caller(flow.caller.request("BYE"))
    assert acts.one(flow.callee.addr).to.tag == flow.callee.tag


def test_forking_downstream_a_second_dialog_before_the_callers_ack(rig):
    flow = begin(rig, invite=invite_without_sdp())  # our ACK waits for the caller's answer
    flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    other = second_phone(flow)
    acts = flow.from_callee(other.respond(200, body=ANSWER_SDP))
    assert [(summary(m), m.to.tag) for m in acts.sent()] == [("ACK", other.tag),
                                                             ("BYE", other.tag)]
    assert rig.call.pending_ack["a"]["leg"] == "b0"


def test_forking_one_busy_fork_does_not_end_the_call(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[1].respond(180), 1)
    acts = flow.from_callee(flow.callees[0].respond(486), 0)
    assert [summary(m) for m in acts.sent()] == ["ACK"]
    acts = flow.from_callee(flow.callees[1].respond(200, body=ANSWER_SDP), 1)
    assert acts.one(CALLER_ADDR).status == 200
    assert rig.call.winner == 1


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(("finals", "expected"), [
    ([(486, "Busy Here"), (404, "Not Found"), (603, "Decline")], (603, "Decline")),
    ([(603, "Decline"), (600, "Busy Everywhere")], (603, "Decline")),
    ([(486, "Busy Here"), (404, "Not Found")], (486, "Busy Here")),
    ([(503, "Service Unavailable"), (404, "Not Found")], (404, "Not Found")),
    ([(302, "Moved"), (486, "Busy Here")], (302, "Moved")),
    ([(408, "Request Timeout"), (408, "Request Timeout")], (480, "Temporarily Unavailable")),
    ([(408, "Request Timeout"), (503, "Service Unavailable")], (480, "Temporarily Unavailable")),
    ([(0, ""), (200, "OK")], (480, "Temporarily Unavailable")),
    ([(408, "Request Timeout"), (486, "Busy Here")], (486, "Busy Here")),
])
def test_best_final(finals, expected):
    assert best_final(finals) == expected


@pytest.mark.parametrize(("statuses", "status", "cause"), [
    ((486, 404, 603), 603, ("CALL_REJECTED", 21)),
    ((486, 404), 486, ("USER_BUSY", 17)),
    ((503, 404), 404, ("UNALLOCATED_NUMBER", 1)),
])
def test_all_forks_fail_the_caller_gets_the_best_final(rig, statuses, status, cause):
    flow = begin(rig, forks=len(statuses))
    for index, fork_status in enumerate(statuses[:-1]):
        acts = flow.from_callee(flow.callees[index].respond(fork_status), index)
        assert [summary(m) for m in acts.sent()] == ["ACK"] and acts.cdrs == []
    last = len(statuses) - 1
    acts = flow.from_callee(flow.callees[last].respond(statuses[-1]), last)
    final = acts.one(CALLER_ADDR)
    assert final.status == status and final.to.tag == a_tag(rig)
    [cdr] = acts.cdrs
    assert (cdr["hangup_cause"], cdr["q850"]) == cause
    assert (cdr["hangup_side"], cdr["sip_status"], cdr["b_call_id"]) == ("callee", status, "")
    assert cdr["codec"] == "GSM/8000"  # no answer reached the caller: its offer's first
    assert rig.call.state == "ended"
    ack = flow.caller.ack_failure(final)
    assert flow.from_caller(ack).outs == []  # the caller's ACK ends the retransmissions
    assert rig.fire(rig.timer("|G", rig.call.a.invite_key)) == []


def test_a_failure_to_the_caller_is_retransmitted_until_acked(rig):
    flow = begin(rig)
    acts = flow.from_callee(flow.callee.respond(486))
    busy = [o.data for o in acts.outs if o.dest == CALLER_ADDR]
    assert parse(busy[0]).reason == b"Busy Here"
    again = rig.fire(rig.timer("|G", rig.call.a.invite_key))
    assert [o.data for o in again.outs] == busy


def test_timer_b_on_every_fork_gives_480(rig):
    flow = begin(rig, forks=2)
    key0 = f"c|{flow.callees[0].invite.via.branch}|INVITE"
    key1 = f"c|{flow.callees[1].invite.via.branch}|INVITE"
    retransmitted = rig.fire(f"tx|{key0}|A")
    assert [(o.data, o.dest) for o in retransmitted.outs] == [
        (flow.callees[0].invite.to_bytes(), flow.callees[0].addr)]
    assert retransmitted.arms == {f"tx|{key0}|A": START + 1.5}
    assert rig.fire(f"tx|{key0}|B").outs == []
    acts = rig.fire(f"tx|{key1}|B")
    final = acts.one(CALLER_ADDR)
    assert final.status == 480
    [cdr] = acts.cdrs
    assert (cdr["sip_status"], cdr["hangup_cause"], cdr["q850"]) == (480, "NO_USER_RESPONSE", 18)


def test_a_408_and_a_timer_b_give_480(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[0].respond(408), 0)
    acts = rig.fire(f"tx|c|{flow.callees[1].invite.via.branch}|INVITE|B")
    assert acts.one(CALLER_ADDR).status == 480


# --------------------------------------------------------------------------- CANCEL


def test_cancel_from_the_caller(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[0].respond(180), 0)
    rig.advance(3)
    acts = flow.from_caller(flow.caller.cancel())
    assert acts.replies == [Reply(200)]
    terminated = acts.one(CALLER_ADDR)
    assert (terminated.status, terminated.cseq.method) == (487, "INVITE")
    assert terminated.to.tag == a_tag(rig)
    cancel = acts.one(flow.callees[0].addr)
    assert cancel.method == "CANCEL"
    assert cancel.header("reason") == cause_reason("ORIGINATOR_CANCEL", 487)
    assert acts.sent(flow.callees[1].addr) == []  # no provisional yet: the CANCEL waits
    [cdr] = acts.cdrs
    assert (cdr["hangup_cause"], cdr["q850"], cdr["hangup_side"], cdr["sip_status"]) == (
        "ORIGINATOR_CANCEL", 487, "caller", 487)
    assert (cdr["answer"], cdr["billsec"], cdr["duration"], cdr["end"]) == (
        "", 0, 3.0, START + 3)

    late = flow.from_callee(flow.callees[1].respond(180), 1)
    assert [summary(m) for m in late.sent()] == ["CANCEL"]
    cancels = [cancel, late.one(flow.callees[1].addr)]
    for index in (0, 1):
        callee = flow.callees[index]
        assert flow.from_callee(callee.answer(cancels[index]), index).outs == []
        acts = flow.from_callee(callee.respond(487), index)
        assert [summary(m) for m in acts.sent()] == ["ACK"] and acts.cdrs == []
    assert flow.from_caller(flow.caller.ack_failure(terminated)).outs == []
    again = flow.from_caller(flow.caller.cancel())
    assert again == [Reply(200)]


def test_a_held_back_cancel_carries_the_same_reason(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[0].respond(180), 0)
    now = flow.from_caller(flow.caller.cancel()).one(flow.callees[0].addr)
    later = flow.from_callee(flow.callees[1].respond(180), 1).one(flow.callees[1].addr)
    assert now.header("reason") == cause_reason("ORIGINATOR_CANCEL", 487)
    assert later.header("reason") == now.header("reason")


def test_cancel_crossing_a_200(rig):
    flow = begin(rig)
    flow.from_callee(flow.callee.respond(180))
    acts = flow.from_caller(flow.caller.cancel())
    assert acts.one(CALLER_ADDR).status == 487
    assert acts.one(flow.callee.addr).method == "CANCEL"
    crossing = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    assert [summary(m) for m in crossing.sent()] == ["ACK", "BYE"]
    assert crossing.sent(CALLER_ADDR) == [] and crossing.cdrs == []
    ack, bye = crossing.sent(flow.callee.addr)
    assert ack.to.tag == bye.to.tag == flow.callee.tag
    assert bye.header("reason") == NORMAL_CLEARING_REASON


def test_cancel_after_the_200_changes_nothing(rig):
    flow = answered(rig)
    acts = flow.from_caller(flow.caller.cancel())
    assert acts == [Reply(200)]
    assert rig.call.state == "answered"


# --------------------------------------------------------------------------- call timers


def test_no_answer_timer(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[0].respond(180), 0)
    acts = rig.fire("no-answer")
    assert rig.now == START + 60
    final = acts.one(CALLER_ADDR)
    assert final.status == 480 and final.to.tag == a_tag(rig)
    cancel = acts.one(flow.callees[0].addr)
    assert cancel.method == "CANCEL" and cancel.header("reason") == cause_reason("NO_ANSWER", 19)
    assert acts.sent(flow.callees[1].addr) == []
    [cdr] = acts.cdrs
    assert (cdr["hangup_cause"], cdr["q850"], cdr["hangup_side"], cdr["sip_status"]) == (
        "NO_ANSWER", 19, "system", 480)
    assert rig.fire("no-answer") == []  # fired once


def test_no_answer_timer_after_the_answer_is_stale(rig):
    answered(rig)
    assert rig.fire("no-answer", START + 60) == []
    assert rig.call.state == "answered"


def test_session_timer(rig):
    flow = answered(rig, headers=[(b"Session-Expires", b"1800;refresher=uac")])
    assert flow.ok.header("session-expires") == b"1800;refresher=uac"
    assert rig.armed["session"] == START + 1800
    acts = rig.fire("session")
    reason = cause_reason("RECOVERY_ON_TIMER_EXPIRE", 102)
    assert acts.one(CALLER_ADDR).method == "BYE" and acts.one(CALLER_ADDR).header(
        "reason") == reason
    assert acts.one(flow.callee.addr).method == "BYE" and acts.one(flow.callee.addr).header(
        "reason") == reason
    [cdr] = acts.cdrs
    assert (cdr["hangup_cause"], cdr["hangup_side"], cdr["billsec"]) == (
        "RECOVERY_ON_TIMER_EXPIRE", "system", 1800)


def test_a_session_refresh_re_arms_the_session_timer(rig):
    flow = answered(rig, headers=[(b"Session-Expires", b"1800;refresher=uac")])
    first_due = rig.armed["session"]
    rig.advance(900)
    refresh = flow.from_caller(flow.caller.request("INVITE", body=seed_sdp(), headers=[
        (b"Session-Expires", b"1800;refresher=uac")]))
    reinvite = refresh.one(flow.callee.addr)
    assert reinvite.header("session-expires") == b"1800;refresher=uac"
    acts = flow.from_callee(flow.callee.answer(reinvite, body=ANSWER_SDP, headers=[
        (b"Session-Expires", b"1800;refresher=uac")]))
    assert acts.arms["session"] == START + 2700
    assert rig.fire("session", first_due) == []  # the old expiry is stale
    assert rig.call.state == "answered"
    assert rig.fire("session").one(CALLER_ADDR).method == "BYE"


def test_max_duration(make_rig):
    rig = make_rig(max_duration=3600.0)
    flow = answered(rig)
    assert rig.armed["max-duration"] == START + 3600
    acts = rig.fire("max-duration")
    assert acts.one(CALLER_ADDR).method == "BYE" and acts.one(flow.callee.addr).method == "BYE"
    [cdr] = acts.cdrs
    assert (cdr["hangup_cause"], cdr["billsec"]) == ("RECOVERY_ON_TIMER_EXPIRE", 3600)


def test_no_max_duration_by_default(rig):
    answered(rig)
    assert "max-duration" not in rig.armed


def test_stale_timers_do_nothing(rig):
    flow = begin(rig)
    name_a = rig.timer("|A")
    assert rig.fire(name_a, rig.armed[name_a] + 0.25) == []  # not the due time armed
    assert rig.fire("no-answer", START + 59) == []
    assert rig.fire("no-such-timer", START) == []
    flow.from_callee(flow.callee.respond(180))
    assert rig.fire(name_a, START + 0.5) == []  # Timer A ended with the provisional
    assert rig.call.state == "ringing"
    assert rig.call.timers == {"no-answer": START + 60}


def test_timers_fire_with_the_due_time_as_the_store_gives_it_back(rig):
    rig.now = 1_726_881_924.1234567  # a time.time() reading, not a whole millisecond
    begin(rig)
    due = rig.armed["no-answer"]
    _, _, stored = parse_timer_member(timer_member("tag", "no-answer", due))
    acts = rig.fire("no-answer", stored)
    assert acts.one(CALLER_ADDR).status == 480


# --------------------------------------------------------------------------- re-INVITE


def hold_sdp(direction: bytes) -> bytes:
    return seed_sdp().replace(b"a=sendrecv", b"a=" + direction)


def test_reinvite_hold_from_the_caller(rig):
    flow = answered(rig)
    offer = hold_sdp(b"sendonly")
    reinvite = flow.caller.request("INVITE", body=offer)
    acts = flow.from_caller(reinvite)
    assert [m.status for m in acts.sent(CALLER_ADDR)] == [100]
    relayed = acts.one(flow.callee.addr)
    assert relayed.method == "INVITE" and relayed.uri_raw == b"sip:1009@192.168.31.50:60119;ob"
    assert relayed.call_id == flow.callee.invite.call_id
    assert (relayed.cseq.number, relayed.cseq.method) == (2, "INVITE")
    assert relayed.from_.tag == b_tag(rig) and relayed.to.tag == flow.callee.tag
    assert relayed.body == offer and relayed.content_type == b"application/sdp"
    assert relayed.header("contact") == OUR_CONTACT_TO_CALLEE
    assert b"192.168.31.142" not in header_block(relayed)

    answer = ANSWER_SDP.replace(b"a=sendrecv", b"a=recvonly")
    acts = flow.from_callee(flow.callee.answer(relayed, body=answer))
    ack = acts.one(flow.callee.addr)
    assert ack.method == "ACK" and (ack.cseq.number, ack.cseq.method) == (2, "ACK")
    ok = acts.one(CALLER_ADDR)
    assert (ok.status, ok.cseq.number, ok.cseq.method) == (200, 3, "INVITE")
    assert ok.body == answer and ok.header("contact") == OUR_CONTACT_TO_CALLER
    assert ok.to.tag == a_tag(rig)
    name = rig.timer("|2xx", reinvite.via.branch)
    assert [o.dest for o in rig.fire(name).outs] == [CALLER_ADDR]  # retransmitted until ACK
    assert flow.from_caller(flow.caller.ack(cseq=3)).outs == []
    assert rig.fire(name) == []
    assert rig.call.state == "answered"


def test_a_reinvite_from_the_caller_stands_for_its_lost_ack(rig):
    """The caller's ACK was lost (a host restart's outage) and it went on to a re-INVITE,
    which RFC 3261 14.1 allows only after the 200: that 200 is not repeated any more, and
    the re-INVITE goes on to the callee as usual."""
    flow = begin(rig)
    flow.caller.learn(flow.from_callee(flow.callee.respond(180)).one(CALLER_ADDR))
    flow.caller.learn(flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP)).one(
        CALLER_ADDR))
    name = rig.timer("|2xx", rig.call.a.invite_key)
    assert [o.dest for o in rig.fire(name).outs] == [CALLER_ADDR]  # no ACK yet: repeated
    acts = flow.from_caller(flow.caller.request("INVITE", body=hold_sdp(b"sendonly")))
    assert acts.one(flow.callee.addr).method == "INVITE"
    assert rig.fire(name) == []  # the 200 is not repeated any more
    rig.advance(60)
    assert rig.fire(rig.timer("|L", rig.call.a.invite_key)).cdrs == []  # no BYE, no end
    assert rig.call.state == "answered"


def test_a_reinvite_does_not_stand_for_an_ack_that_carries_the_answer(rig):
    """Delayed offer: the caller's ACK carries the answer the callee waits for, so a
    re-INVITE cannot replace it; our 200 is still repeated."""
    flow = begin(rig, invite=invite_without_sdp())
    flow.caller.learn(flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP)).one(
        CALLER_ADDR))
    flow.from_caller(flow.caller.request("INVITE", body=hold_sdp(b"sendonly")))
    name = rig.timer("|2xx", rig.call.a.invite_key)
    assert [o.dest for o in rig.fire(name).outs] == [CALLER_ADDR]


def test_a_repeated_2xx_to_a_relayed_reinvite_gets_the_same_ack_again(rig):
    """RFC 3261 13.2.2.4: the callee repeats its 2xx (our ACK was lost or crossed it, as
    when the cluster was restarting): the very same ACK again, not a new request."""
    flow = answered(rig)
    relayed = flow.from_caller(flow.caller.request("INVITE", body=hold_sdp(b"sendonly"))).one(
        flow.callee.addr)
    ok = flow.callee.answer(relayed, body=ANSWER_SDP.replace(b"a=sendrecv", b"a=recvonly"))
    first = flow.from_callee(ok).one(flow.callee.addr)
    again = flow.from_callee(ok).one(flow.callee.addr)
    assert first.method == "ACK" and again.to_bytes() == first.to_bytes()


def test_reinvite_hold_from_the_callee(rig):
    flow = answered(rig)
    offer = ANSWER_SDP.replace(b"a=sendrecv", b"a=sendonly")
    reinvite = flow.callee.request("INVITE", body=offer)
    acts = rig.request(reinvite, flow.callee.addr)
    assert [m.status for m in acts.sent(flow.callee.addr)] == [100]
    relayed = acts.one(CALLER_ADDR)
    assert relayed.method == "INVITE" and relayed.uri_raw == CALLER_CONTACT_URI
    assert (relayed.cseq.number, relayed.to.tag, relayed.from_.tag) == (3, CALLER_TAG,
                                                                       a_tag(rig))
    assert relayed.body == offer and relayed.header("contact") == OUR_CONTACT_TO_CALLER

    answer = hold_sdp(b"recvonly")
    acts = rig.response(flow.caller.answer(relayed, body=answer), CALLER_ADDR)
    assert acts.one(CALLER_ADDR).method == "ACK"
    ok = acts.one(flow.callee.addr)
    assert (ok.status, ok.body, ok.cseq.number) == (200, answer, reinvite.cseq.number)
    assert ok.header("contact") == OUR_CONTACT_TO_CALLEE
    ack = flow.callee.request("ACK", cseq=reinvite.cseq.number)
    assert rig.request(ack, flow.callee.addr).outs == []
    assert rig.fire(rig.timer("|2xx", reinvite.via.branch)) == []


def test_reinvite_without_sdp_the_ack_carries_the_answer(rig):
    flow = answered(rig)
    reinvite = flow.caller.request("INVITE")
    relayed = flow.from_caller(reinvite).one(flow.callee.addr)
    assert relayed.body == b""
    acts = flow.from_callee(flow.callee.answer(relayed, body=ANSWER_SDP))
    assert acts.sent(flow.callee.addr) == []  # the answer comes with the caller's ACK
    assert acts.one(CALLER_ADDR).body == ANSWER_SDP
    answer = hold_sdp(b"sendrecv")
    ack = flow.from_caller(flow.caller.ack(body=answer, cseq=reinvite.cseq.number)).one(
        flow.callee.addr)
    assert ack.method == "ACK" and ack.body == answer and ack.cseq.number == 2


def test_a_refused_reinvite_is_relayed_back(rig):
    flow = answered(rig)
    reinvite = flow.caller.request("INVITE", body=hold_sdp(b"sendonly"))
    relayed = flow.from_caller(reinvite).one(flow.callee.addr)
    acts = flow.from_callee(flow.callee.answer(relayed, 488))
    assert acts.one(flow.callee.addr).method == "ACK"  # the transaction's own ACK
    refused = acts.one(CALLER_ADDR)
    assert (refused.status, refused.cseq.number) == (488, 3)
    assert flow.from_caller(flow.caller.ack_failure(refused, reinvite)).outs == []
    assert rig.fire(rig.timer("|G", reinvite.via.branch)) == []  # the ACK stopped the 488
    assert rig.call.state == "answered"


def test_a_second_reinvite_while_one_is_pending_gets_491(rig):
    flow = answered(rig)
    flow.from_caller(flow.caller.request("INVITE", body=hold_sdp(b"sendonly")))
    acts = flow.from_caller(flow.caller.request("INVITE", body=hold_sdp(b"inactive")))
    assert [summary(m) for m in acts.sent()] == ["491 INVITE"]


# --------------------------------------------------------------------------- in-dialog


def test_info_is_relayed_both_ways(rig):
    flow = answered(rig)
    dtmf = b"Signal=5\r\nDuration=160\r\n"
    info = flow.caller.request("INFO", body=dtmf, content_type=b"application/dtmf-relay")
    acts = flow.from_caller(info)
    assert acts.sent(CALLER_ADDR) == []  # answered when the callee answers
    relayed = acts.one(flow.callee.addr)
    assert relayed.method == "INFO" and relayed.body == dtmf
    assert relayed.content_type == b"application/dtmf-relay"
    assert relayed.call_id == flow.callee.invite.call_id and relayed.cseq.number == 2
    ok = flow.from_callee(flow.callee.answer(relayed)).one(CALLER_ADDR)
    assert (ok.status, ok.cseq.method, ok.cseq.number) == (200, "INFO", info.cseq.number)
    assert ok.header("contact") is None

    back = flow.callee.request("INFO", body=dtmf, content_type=b"application/dtmf-relay")
    relayed = rig.request(back, flow.callee.addr).one(CALLER_ADDR)
    assert relayed.method == "INFO" and relayed.body == dtmf and relayed.cseq.number == 3
    ok = rig.response(flow.caller.answer(relayed), CALLER_ADDR).one(flow.callee.addr)
    assert (ok.status, ok.cseq.number) == (200, back.cseq.number)


def test_a_relayed_request_that_times_out_gets_408(rig):
    flow = answered(rig)
    info = flow.caller.request("INFO", body=b"Signal=1\r\n", content_type=b"application/dtmf-relay")
    relayed = flow.from_caller(info).one(flow.callee.addr)
    acts = rig.fire(rig.timer("|F", relayed.via.branch))
    timeout = acts.one(CALLER_ADDR)
    assert (timeout.status, timeout.cseq.method) == (408, "INFO")


def test_options_in_dialog_is_answered_200_locally(rig):
    flow = answered(rig)
    acts = flow.from_caller(flow.caller.request("OPTIONS"))
    assert [summary(m) for m in acts.sent()] == ["200 OPTIONS"]
    assert acts.one(CALLER_ADDR).to.tag == a_tag(rig)
    acts = rig.request(flow.callee.request("OPTIONS"), flow.callee.addr)
    assert [summary(m) for m in acts.sent(flow.callee.addr)] == ["200 OPTIONS"]


def test_an_unknown_method_in_dialog_is_405(rig):
    flow = answered(rig)
    acts = flow.from_caller(flow.caller.request("SUBSCRIBE", headers=[(b"Event", b"dialog")]))
    refused = acts.one(CALLER_ADDR)
    assert refused.status == 405 and refused.header("allow")
    assert acts.sent(flow.callee.addr) == []


def test_requests_with_an_unknown_to_tag_get_481(rig):
    flow = answered(rig)
    acts = flow.from_caller(flow.caller.request("BYE", to_tag="not-ours"))
    assert acts == [Reply(481)]
    acts = rig.request(flow.callee.request("BYE", to_tag="not-ours"), flow.callee.addr)
    assert acts == [Reply(481)]
    assert rig.call.state == "answered"


def with_from_tag(req: Request, tag: str) -> Request:
    req.set_header(b"From", req.header("from").replace(
        b";tag=" + req.from_.tag.encode(), b";tag=" + tag.encode()))
    return parse(req.to_bytes())


@pytest.mark.parametrize("method", ["BYE", "INFO", "INVITE"])
def test_requests_with_our_to_tag_and_an_unknown_from_tag_get_481(rig, method):
    flow = answered(rig)
    before = rig.call.to_record()
    req = with_from_tag(flow.caller.request(method, body=b"x", content_type=b"text/plain"),
                        "not-the-callers")
    assert flow.from_caller(req) == [Reply(481)]
    req = with_from_tag(flow.callee.request(method, body=b"x", content_type=b"text/plain"),
                        "not-the-callees")
    assert rig.request(req, flow.callee.addr) == [Reply(481)]
    assert rig.call.to_record() == before


def test_an_ack_with_an_unknown_from_tag_is_absorbed(rig):
    flow = begin(rig, invite=invite_without_sdp())
    flow.caller.learn(flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP)).one(
        CALLER_ADDR))
    acts = flow.from_caller(with_from_tag(flow.caller.ack(body=seed_sdp()), "not-the-callers"))
    assert acts == [] and "a" in rig.call.pending_ack
    acts = flow.from_caller(flow.caller.ack(body=seed_sdp()))
    assert acts.one(flow.callee.addr).method == "ACK"


def test_a_request_of_another_call_id_gets_481(rig):
    flow = answered(rig)
    data = flow.caller.request("BYE").to_bytes().replace(
        flow.caller.invite.call_id, b"someone-else")
    assert rig.request(parse(data), CALLER_ADDR) == [Reply(481)]


def test_cseq_going_backwards_gets_500(rig):
    flow = answered(rig)
    flow.from_caller(flow.caller.request("OPTIONS", cseq=10))
    acts = flow.from_caller(flow.caller.request("INFO", cseq=9, body=b"x",
                                                content_type=b"text/plain"))
    assert acts == [Reply(500, "CSeq out of order")]
    acts = flow.from_caller(flow.caller.request("BYE", cseq=2))  # the INVITE's own number
    assert acts.replies == [Reply(500, "CSeq out of order")] and acts.outs == []
    assert rig.call.state == "answered"


def test_a_bye_in_the_early_dialog_from_the_caller_cancels(rig):
    flow = begin(rig)
    flow.caller.learn(flow.from_callee(flow.callee.respond(180)).one(CALLER_ADDR))
    acts = flow.from_caller(flow.caller.request("BYE"))
    assert sorted(m.status for m in acts.sent(CALLER_ADDR)) == [200, 487]
    assert acts.one(flow.callee.addr).method == "CANCEL"
    [cdr] = acts.cdrs
    assert cdr["hangup_cause"] == "ORIGINATOR_CANCEL"


# --------------------------------------------------------------------------- hangup_now


def test_hangup_now_on_an_answered_call_byes_both_legs(rig):
    flow = answered(rig)
    rig.advance(12)
    acts = rig.hangup(ADMIN_HANGUP)
    assert_bye(acts.one(CALLER_ADDR), uri=CALLER_CONTACT_URI, call_id=flow.caller.invite.call_id,
               from_tag=a_tag(rig), to_tag=CALLER_TAG, cseq=3)
    assert_bye(acts.one(flow.callee.addr), uri=b"sip:1009@192.168.31.50:60119;ob",
               call_id=flow.callee.invite.call_id, from_tag=b_tag(rig), to_tag=flow.callee.tag,
               cseq=2)
    [cdr] = acts.cdrs
    assert (cdr["hangup_side"], cdr["billsec"], cdr["sip_status"]) == ("system", 12, 200)
    assert rig.hangup(ADMIN_HANGUP) == []


def test_hangup_now_for_a_media_timeout_gives_its_reason(rig):
    answered(rig)
    acts = rig.hangup(MEDIA_TIMEOUT)
    assert {m.header("reason") for m in acts.sent()} == {
        cause_reason("MEDIA_TIMEOUT", 102)}


def test_hangup_now_before_the_answer(rig):
    flow = begin(rig, forks=2)
    flow.from_callee(flow.callees[1].respond(183, body=EARLY_SDP), 1)
    acts = rig.hangup(ADMIN_HANGUP)
    assert acts.one(CALLER_ADDR).status == 480
    assert acts.one(flow.callees[1].addr).method == "CANCEL"
    assert acts.sent(flow.callees[0].addr) == []
    [cdr] = acts.cdrs
    assert (cdr["sip_status"], cdr["hangup_side"]) == (480, "system")


def test_events_after_the_end_produce_no_second_cdr(rig):
    flow = answered(rig)
    flow.from_caller(flow.caller.request("BYE"))
    assert rig.hangup(ADMIN_HANGUP) == []
    assert rig.fire("no-answer", START + 60) == []
    assert rig.request(flow.callee.seed_bye(), flow.callee.addr).cdrs == []


# --------------------------------------------------------------------------- X-Call-ID
def test_x_call_id_names_the_caller_call_on_every_b_leg_request_and_never_on_the_a_leg(rig):
    flow = answered(rig)
    a_call_id = flow.caller.invite.call_id
    assert flow.callee.invite.header("x-call-id") == a_call_id
    dtmf = b"Signal=1\r\n"
    info = flow.caller.request("INFO", body=dtmf, content_type=b"application/dtmf-relay")
    relayed = flow.from_caller(info).one(flow.callee.addr)
    assert relayed.method == "INFO" and relayed.header("x-call-id") == a_call_id
    flow.from_callee(flow.callee.answer(relayed))
    back = flow.callee.request("INFO", body=dtmf, content_type=b"application/dtmf-relay")
    to_caller = rig.request(back, flow.callee.addr).one(CALLER_ADDR)
    assert to_caller.method == "INFO" and to_caller.header("x-call-id") is None
    rig.response(flow.caller.answer(to_caller), CALLER_ADDR)
    bye = flow.from_caller(flow.caller.request("BYE")).one(flow.callee.addr)
    assert bye.method == "BYE" and bye.header("x-call-id") == a_call_id


def test_x_call_id_on_the_ack_and_the_cancel(rig):
    flow = begin(rig)
    acts = flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
    ack = acts.one(flow.callee.addr)
    assert ack.method == "ACK" and ack.header("x-call-id") == flow.caller.invite.call_id
    other = begin(rig)
    other.from_callee(other.callee.respond(180))
    cancel = other.from_caller(other.caller.cancel()).one(other.callee.addr)
    assert cancel.method == "CANCEL"
    assert cancel.header("x-call-id") == other.caller.invite.call_id


@pytest.mark.parametrize(("name", "present"), [(b"", False), (b"X-CID", True)])
def test_x_call_id_can_be_renamed_or_left_out(make_rig, name, present):
    rig = make_rig(xcid_header=name)
    flow = begin(rig)
    head = header_block(flow.callee.invite)
    assert b"X-Call-ID" not in head
    assert (b"X-CID: " + flow.caller.invite.call_id in head) is present


def test_the_cdr_bills_from_the_answer_and_lasts_from_the_invite(rig):
    flow = begin(rig)
    flow.from_callee(flow.callee.respond(180))
    rig.advance(4.25)
    flow.caller.learn(flow.from_callee(flow.callee.respond(200, body=ANSWER_SDP))
                      .one(CALLER_ADDR))
    flow.from_caller(flow.caller.ack())
    rig.advance(10.5)
    [cdr] = flow.from_caller(flow.caller.request("BYE")).cdrs
    assert (cdr["start"], cdr["answer"], cdr["end"]) == (START, START + 4.25, START + 14.75)
    assert (cdr["duration"], cdr["billsec"]) == (14.75, 10.5)
    assert cdr["caller_source"] == "{}:{}".format(*CALLER_ADDR)
