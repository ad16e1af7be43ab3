"""B2BUA calls through a running cluster, with SIPp on both sides.

Every test runs a SIPp caller (digest on the INVITE) against one or more SIPp
callees registered as the callee user's contacts, then checks the SIP outcome
on both sides (SIPp's exit code and message files) and the call in Redis (the
CDR, and no call record left live).

Two clusters serve the module, each with its own Redis database:

* ``cluster``: no answer after ``NO_ANSWER`` seconds, default SIP timers;
* ``fast_cluster``: T1 = 0.1 s, so Timer B (64*T1) gives up on an unreachable
  callee after 6.4 s, and a no-answer timeout that does not get in its way.

Each test has its own caller and callee users, so tests never see each
other's calls, CDRs or registrations.
"""

from __future__ import annotations

import time

import pytest
from calls_helpers import (
    SipMessage,
    all_ended,
    calls_of,
    flow,
    provision,
    received,
    register,
    run_call,
    trace_lines,
    wait_cdrs,
)
from harness import running_cluster
from sipua import UA

from conftest import free_udp_port

DB, FAST_DB = 7, 9  # this module's Redis databases on the session's redis-server
NO_ANSWER = 3  # seconds
FAST_T1 = 0.1
USERS = range(1000, 1040)
REASON = 'Q.850;cause=16;text="NORMAL_CLEARING"'
SHORT = {"timeout": 12}  # SIPp's limit for calls that would otherwise wait 30 s to fail


def db_url(redis_server, db: int) -> str:
    redis_server.client(db=db).flushdb()
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    settings = {"calls": {"no_answer_timeout": NO_ANSWER}}
    with running_cluster(tmp_path_factory.mktemp("calls"), db_url(redis_server, DB),
                         workers=2, settings=settings) as running:
        provision(running, USERS)
        yield running


@pytest.fixture(scope="module")
def fast_cluster(tmp_path_factory, redis_server):
    settings = {"timers": {"t1": FAST_T1}, "calls": {"no_answer_timeout": 60}}
    with running_cluster(tmp_path_factory.mktemp("calls-fast"), db_url(redis_server, FAST_DB),
                         workers=2, settings=settings) as running:
        provision(running, USERS)
        yield running


# ------------------------------------------------------------------ checks shared by tests
def assert_sipp_ok(run) -> None:
    for party in [run.uac, *run.uas]:
        assert party.ok, run.report()


def assert_one_cdr(cluster, caller: str, **expected) -> dict:
    """The caller's single CDR, with the ``expected`` fields; and no call of it left live."""
    cdrs = wait_cdrs(cluster, caller)
    assert len(cdrs) == 1, cdrs
    cdr = cdrs[0]
    for key, value in expected.items():
        assert cdr[key] == str(value), (key, cdr)
    assert all_ended(cluster, caller) == []
    return cdr


def caller_call_id(run) -> str:
    return next(m for m in run.uac.messages if m.direction == "sent").header("Call-ID")


def reason_of(msg: SipMessage) -> str | None:
    return msg.header("Reason")


def ended_trace(cluster, caller: str) -> str:
    return "\n".join(trace_lines(cluster, tag) for tag, _ in calls_of(cluster, caller))


# ------------------------------------------------------------------ 1. the seed flow
def test_seed_flow_caller_hangs_up(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1000", "1001", uac={"hold_ms": 500})
    assert_sipp_ok(run)
    assert flow(run.uac.messages) == [
        "> INVITE", "< 407 INVITE", "> ACK", "> INVITE", "< 100 INVITE", "< 180 INVITE",
        "< 200 INVITE", "> ACK", "> BYE", "< 200 BYE"], ended_trace(cluster, "1000")
    assert flow(run.uas[0].messages) == [
        "< INVITE", "> 180 INVITE", "> 200 INVITE", "< ACK", "< BYE", "> 200 BYE"]
    (bye,) = received(run.uas[0].messages, "BYE")
    assert reason_of(bye) == REASON
    # The 200 the caller gets carries the callee's SDP and the cluster's Contact.
    (ok,) = received(run.uac.messages, "INVITE", 200)
    assert "m=audio" in ok.body
    assert ok.header("Contact") == f"<sip:1001@127.0.0.1:{cluster.sip_port}>"
    cdr = assert_one_cdr(cluster, "1000", callee="1001", hangup_cause="NORMAL_CLEARING",
                         q850=16, hangup_side="caller", sip_status=200,
                         a_call_id=caller_call_id(run))
    assert 0.4 <= float(cdr["billsec"]) < 3.0, cdr
    assert float(cdr["start"]) <= float(cdr["answer"]) <= float(cdr["end"])


def test_b_leg_shows_nothing_of_the_a_leg(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1025", "1026")
    assert_sipp_ok(run)
    sent = [m for m in run.uac.messages if m.direction == "sent" and m.method == "INVITE"][-1]
    (b_invite,) = received(run.uas[0].messages, "INVITE")
    a_call_id, a_branch = sent.header("Call-ID"), sent.branch
    a_tag = sent.header("From").rsplit("tag=", 1)[1]
    b_call_id = b_invite.header("Call-ID")
    assert b_call_id.startswith("sc") and a_call_id not in b_call_id
    assert a_tag not in b_invite.header("From")
    cluster_hostport = f"127.0.0.1:{cluster.sip_port}"
    (via,) = b_invite.headers("Via")
    assert via.startswith(f"SIP/2.0/UDP {cluster_hostport};branch=z9hG4bK"), via
    assert b_invite.branch != a_branch
    assert b_invite.header("Contact") == f"<sip:1025@{cluster_hostport}>"
    # Nothing of the caller's topology: its port, Call-ID, tag, branch, Proxy-Authorization;
    # its Call-ID only in X-Call-ID (calls.xcid_header), which groups the legs in sngrep.
    assert b_invite.header("X-Call-ID") == a_call_id
    head = "\n".join(line for line in b_invite.head.splitlines()
                     if not line.startswith("X-Call-ID:"))
    for secret in (f":{run.uac.port}", a_call_id, a_tag, a_branch, "Digest", "sipp-caller"):
        assert secret not in head, (secret, head)
    assert b_invite.header("Max-Forwards") == "69"
    assert "m=audio" in b_invite.body  # media = "bypass": the SDP goes through unchanged
    cdr = assert_one_cdr(cluster, "1025", b_call_id=b_call_id)
    assert cdr["a_call_id"] == a_call_id


def test_callee_hangs_up_and_the_caller_gets_bye_with_reason(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1002", "1003", uac={"scenario": "call_uac_wait_bye.xml"},
                   uas=[{"scenario": "call_uas_hangup.xml", "delay_ms": 500}])
    assert_sipp_ok(run)
    (bye,) = received(run.uac.messages, "BYE")
    assert reason_of(bye) == REASON
    # The BYE to the caller is in the caller's dialog: its Call-ID, its tag as the To tag.
    first = next(m for m in run.uac.messages if m.direction == "sent")
    assert bye.header("Call-ID") == first.header("Call-ID")
    assert bye.header("To").endswith(first.header("From").rsplit(";", 1)[1])
    assert f"127.0.0.1:{cluster.sip_port}" in bye.header("Via")
    cdr = assert_one_cdr(cluster, "1002", hangup_cause="NORMAL_CLEARING", hangup_side="callee",
                         sip_status=200)
    assert 0.4 <= float(cdr["billsec"]) < 3.0, cdr


# ------------------------------------------------------------------ 2. BYE retransmissions
def test_retransmitted_bye_is_answered_twice_and_relayed_once(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1004", "1005",
                   uac={"scenario": "call_uac_bye_twice.xml", "extra": ("-nr",)},
                   uas=[{"extra": ("-nr",)}])
    assert_sipp_ok(run)
    byes = [m for m in run.uac.messages if m.direction == "sent" and m.method == "BYE"]
    assert len(byes) == 2 and byes[0].text == byes[1].text
    answers = received(run.uac.messages, "BYE", 200, copies=True)
    assert len(answers) == 2
    time.sleep(1.0)  # time for a second BYE on the B-leg, were one sent
    assert len(received(run.uas[0].messages, "BYE", copies=True)) == 1
    assert_one_cdr(cluster, "1004", hangup_cause="NORMAL_CLEARING", hangup_side="caller")


def test_cluster_retransmits_its_bye_when_the_first_copy_is_lost(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1006", "1007", uac=SHORT,
                   uas=[{"scenario": "call_uas_lose_bye.xml", "extra": ("-nr",), **SHORT}])
    assert_sipp_ok(run)
    first, second = received(run.uas[0].messages, "BYE", copies=True)[:2]
    assert first.text == second.text  # a retransmission: the same branch, the same bytes
    assert first.branch == second.branch
    assert reason_of(second) == REASON
    # T1 (0.5 s) after the first copy, give or take the timer loop.
    assert 0.4 <= second.at - first.at <= 1.5, (first.at, second.at)
    assert_one_cdr(cluster, "1006", hangup_cause="NORMAL_CLEARING", hangup_side="caller")


def test_cluster_retransmits_its_200_until_the_caller_acks(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1029", "1030",
                   uac={"scenario": "call_uac_lose_200.xml", "extra": ("-nr",)})
    assert_sipp_ok(run)
    first, second = received(run.uac.messages, "INVITE", 200, copies=True)  # none after ACK
    assert first.text == second.text
    assert 0.4 <= second.at - first.at <= 1.5, (first.at, second.at)  # T1 = 0.5 s
    assert len(received(run.uas[0].messages, "ACK", copies=True)) == 1  # B-leg ACKed once
    assert_one_cdr(cluster, "1029", hangup_cause="NORMAL_CLEARING", hangup_side="caller")


def test_a_repeated_200_from_the_callee_is_acked_again(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1031", "1032", uac={"hold_ms": 800},
                   uas=[{"scenario": "call_uas_repeat_200.xml", "extra": ("-nr",)}])
    assert_sipp_ok(run)
    first, second = received(run.uas[0].messages, "ACK", copies=True)
    assert first.header("CSeq") == second.header("CSeq") == "1 ACK"
    assert first.header("Call-ID") == second.header("Call-ID")
    assert_one_cdr(cluster, "1031", hangup_cause="NORMAL_CLEARING", hangup_side="caller")


# ------------------------------------------------------------------ 3. failures
def final_status(run) -> int:
    finals = [m.status for m in received(run.uac.messages, "INVITE", 0, final=True)
              if m.header("CSeq") == "2 INVITE"]  # the INVITE with credentials
    assert finals, run.report()
    assert len(set(finals)) == 1, finals  # retransmissions of one final, never two finals
    return finals[0]


def assert_failed_call(cluster, run, caller: str, status: int, **cdr) -> None:
    assert_sipp_ok(run)
    assert final_status(run) == status
    acks = [m for m in run.uac.messages if m.direction == "sent" and m.method == "ACK"]
    assert len(acks) == 2  # the 407's and the failure's
    if cdr:
        assert_one_cdr(cluster, caller, sip_status=status, billsec=0, answer="", **cdr)
    else:
        assert all_ended(cluster, caller) == []


def test_busy_callee(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1008", "1009", uac={"scenario": "call_uac_fail.xml"},
                   uas=[{"scenario": "call_uas_busy.xml"}])
    assert_failed_call(cluster, run, "1008", 486, hangup_cause="USER_BUSY", hangup_side="callee")
    assert len(received(run.uas[0].messages, "ACK")) == 1


def test_declined_call(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1010", "1011", uac={"scenario": "call_uac_fail.xml"},
                   uas=[{"scenario": "call_uas_decline.xml", "delay_ms": 200}])
    assert_failed_call(cluster, run, "1010", 603, hangup_cause="CALL_REJECTED",
                       hangup_side="callee")
    assert "< 180 INVITE" in flow(run.uac.messages)  # the ringing went on to the caller


def test_unknown_user_is_404(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1012", "7777", uac={"scenario": "call_uac_fail.xml"},
                   uas=[])
    assert_failed_call(cluster, run, "1012", 404, hangup_cause="UNALLOCATED_NUMBER",
                       hangup_side="system")


def test_known_but_unregistered_user_is_480(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1013", "1014", uac={"scenario": "call_uac_fail.xml"},
                   uas=[])
    assert_failed_call(cluster, run, "1013", 480, hangup_cause="SUBSCRIBER_ABSENT",
                       hangup_side="system")


def test_no_answer_is_480_and_cancels_the_callee(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1015", "1016",
                   uac={"scenario": "call_uac_fail.xml", **SHORT},
                   uas=[{"scenario": "call_uas_ring.xml", **SHORT}])
    assert_failed_call(cluster, run, "1015", 480, hangup_cause="NO_ANSWER",
                       hangup_side="system")
    invite = [m for m in run.uac.messages if m.direction == "sent" and m.method == "INVITE"][-1]
    (failure,) = received(run.uac.messages, "INVITE", 480)
    assert NO_ANSWER - 0.2 <= failure.at - invite.at <= NO_ANSWER + 1.5
    (cancel,) = received(run.uas[0].messages, "CANCEL")
    assert cancel.header("Reason") == 'Q.850;cause=19;text="NO_ANSWER"'
    assert received(run.uas[0].messages, "ACK")  # the 487 was ACKed


def test_cancel_while_ringing(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1017", "1018",
                   uac={"scenario": "call_uac_cancel.xml", "hold_ms": 300},
                   uas=[{"scenario": "call_uas_ring.xml"}])
    assert_sipp_ok(run)
    assert flow(run.uac.messages)[-4:] == ["> CANCEL", "< 200 CANCEL", "< 487 INVITE", "> ACK"]
    (cancel,) = received(run.uas[0].messages, "CANCEL")
    (b_invite,) = received(run.uas[0].messages, "INVITE")
    assert cancel.branch == b_invite.branch  # RFC 3261 9.1: the CANCEL matches the INVITE
    assert cancel.header("Reason") == 'Q.850;cause=487;text="ORIGINATOR_CANCEL"'
    assert_one_cdr(cluster, "1017", hangup_cause="ORIGINATOR_CANCEL", hangup_side="caller",
                   sip_status=487, billsec=0)


def test_unreachable_callee_times_out(fast_cluster, tmp_path):
    """A registered contact nobody listens on: Timer B (64*T1 = 6.4 s), then 408/480."""
    register(fast_cluster, "1001", [free_udp_port()])
    run = run_call(fast_cluster, tmp_path, "1000", "1001",
                   uac={"scenario": "call_uac_fail.xml", **SHORT}, uas=[], register_callees=False)
    assert_sipp_ok(run)
    status = final_status(run)
    assert status in (408, 480)
    invite = [m for m in run.uac.messages if m.direction == "sent" and m.method == "INVITE"][-1]
    failure = received(run.uac.messages, "INVITE", status)[0]
    assert 64 * FAST_T1 - 0.3 <= failure.at - invite.at <= 64 * FAST_T1 + 2.0
    assert_one_cdr(fast_cluster, "1000", sip_status=status, hangup_side="callee")


# ------------------------------------------------------------------ 4. forking
def test_forking_one_answers_the_other_is_cancelled(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1019", "1020",
                   uas=[{"scenario": "call_uas.xml", "delay_ms": 300},
                        {"scenario": "call_uas_ring.xml"}])
    assert_sipp_ok(run)
    winner, loser = run.uas
    (w_invite,) = received(winner.messages, "INVITE")
    (l_invite,) = received(loser.messages, "INVITE")
    assert w_invite.header("Call-ID") != l_invite.header("Call-ID")  # one B-leg per contact
    (cancel,) = received(loser.messages, "CANCEL")
    assert cancel.branch == l_invite.branch
    assert not received(loser.messages, "BYE")
    # The caller saw one dialog: the ringing and the answer carry the same To tag.
    tags = {m.tag for m in received(run.uac.messages, "INVITE", 180)
            + received(run.uac.messages, "INVITE", 200)}
    assert len(tags) == 1, tags
    assert_one_cdr(cluster, "1019", hangup_cause="NORMAL_CLEARING",
                   b_call_id=w_invite.header("Call-ID"))


def test_late_2xx_from_a_second_fork_gets_ack_then_bye(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1021", "1022", uac={"hold_ms": 1000},
                   uas=[{"scenario": "call_uas_answer.xml"},
                        {"scenario": "call_uas_answer.xml", "delay_ms": 300}])
    assert_sipp_ok(run)
    first, late = run.uas
    assert flow(late.messages)[-4:] == ["> 200 INVITE", "< ACK", "< BYE", "> 200 BYE"]
    (late_bye,) = received(late.messages, "BYE")
    assert late_bye.header("Reason") == REASON
    caller_bye = next(m for m in run.uac.messages if m.direction == "sent" and m.method == "BYE")
    assert late_bye.at < caller_bye.at  # torn down at once, not when the call ends
    tags = {m.tag for m in received(run.uac.messages, "INVITE", 200)}
    assert len(tags) == 1, tags  # the caller saw only the first answer
    (w_invite,) = received(first.messages, "INVITE")
    assert_one_cdr(cluster, "1021", hangup_cause="NORMAL_CLEARING", hangup_side="caller",
                   b_call_id=w_invite.header("Call-ID"))


# ------------------------------------------------------------------ 5. in-dialog requests
def test_hold_resume_info_and_options_in_the_dialog(cluster, tmp_path):
    run = run_call(cluster, tmp_path, "1023", "1024",
                   uac={"scenario": "call_uac_dialog.xml", **SHORT},
                   uas=[{"scenario": "call_uas_dialog.xml", **SHORT}])
    assert_sipp_ok(run)
    uas_flow = flow(run.uas[0].messages)
    assert [s for s in uas_flow if s.startswith("<")] == [
        "< INVITE", "< ACK", "< INVITE", "< ACK", "< INVITE", "< ACK", "< INFO", "< BYE"]
    invites = received(run.uas[0].messages, "INVITE")
    assert "a=sendonly" in invites[1].body and "a=sendrecv" in invites[2].body
    # In-dialog requests on the B-leg: its Call-ID, rising CSeq, the cluster's Via.
    assert len({m.header("Call-ID") for m in invites}) == 1
    cseqs = [int(m.header("CSeq").split()[0]) for m in received(run.uas[0].messages, "INVITE")]
    assert cseqs == sorted(cseqs) and len(set(cseqs)) == 3
    (info,) = received(run.uas[0].messages, "INFO")
    assert info.header("Content-Type") == "application/dtmf-relay"
    assert "Signal=5" in info.body
    # The caller got the callee's answers: recvonly while held, sendrecv after.
    oks = {m.header("CSeq"): m for m in received(run.uac.messages, "INVITE", 200)}
    assert "a=recvonly" in oks["3 INVITE"].body and "a=sendrecv" in oks["4 INVITE"].body
    assert received(run.uac.messages, "INFO", 200) and received(run.uac.messages, "OPTIONS", 200)
    assert not received(run.uas[0].messages, "OPTIONS")  # answered by the cluster
    assert_one_cdr(cluster, "1023", hangup_cause="NORMAL_CLEARING", hangup_side="caller")


def test_bye_for_an_unknown_dialog_is_481(cluster):
    with UA(cluster.address, user="1027") as ua:
        bye = ua.request("BYE", f"sip:1028@127.0.0.1:{cluster.sip_port}", [
            "Contact: <sip:1027@127.0.0.1>"]).replace(
            b"To: <sip:1027@127.0.0.1>", b"To: <sip:1028@127.0.0.1>;tag=nosuchdialog")
        ua.send(bye)
        reply = ua.receive()
    assert reply is not None and reply.status == 481
