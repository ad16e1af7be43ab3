"""Calls survive ``kill -9`` of the worker that holds them (design invariant 1).

The call record in Redis names the worker that wrote it last; the tests kill
that one while the call rings or while it is established, and check that the
other worker carries the call to its end on both legs.  The load test kills a
worker every few seconds under a steady SIPp call load with digest on every
call and expects no failed call on either side.

Two tests hold Redis writes back (CLIENT PAUSE WRITE) to catch a worker between
an answer it sent and the write that should have come first: one kills the
worker there (a trusted-gateway cluster, ``gateway_cluster``, whose callers need
no digest and so no write before the 100 Trying), the other lets the write time
out.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time

import pytest
from calls_helpers import (
    PASSWORD,
    CallRun,
    all_ended,
    answers_to,
    assert_both_legs_ended,
    call_in_state,
    callee,
    caller,
    calls_of,
    cdrs_of,
    finish,
    provision,
    received,
    register,
    start_call,
    start_listening,
    trace_lines,
    wait_cdrs,
    wait_for,
)
from harness import Cluster, running_cluster
from sipua import UA

from cluster.sip.digest import parse_credentials
from cluster.sip.message import parse
from cluster.sip.transaction import server_key
from cluster.store import aor_of

DB, GATEWAY_DB = 8, 10  # this module's Redis databases on the session's redis-server
WORKERS = ("worker-0", "worker-1")
NO_ANSWER = 4  # seconds: longer than any answer delay used here
LOAD_RATE, LOAD_SECONDS, LOAD_HOLD_MS, KILL_EVERY = 5, 30, 3000, 5.0
LOAD_CALLERS = [str(u) for u in range(1010, 1020)]
LOAD_CALLEE = "1020"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    redis_server.client(db=DB).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    settings = {"calls": {"no_answer_timeout": NO_ANSWER}}
    with running_cluster(tmp_path_factory.mktemp("call-failover"), url, workers=2,
                         settings=settings) as running:
        provision(running, range(1000, 1030))
        yield running


@pytest.fixture(scope="module")
def gateway_cluster(tmp_path_factory, redis_server):
    """A cluster that trusts 127.0.0.1 as a gateway: calls from it need no digest."""
    redis_server.client(db=GATEWAY_DB).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{GATEWAY_DB}"
    gateway = Cluster(tmp_path_factory.mktemp("call-failover-gw"), url, workers=2,
                      settings={"calls": {"no_answer_timeout": NO_ANSWER}})
    with gateway.config_path.open("a") as config:  # the harness writes no [[routes]]
        config.write('\n[[routes]]\nmatch = "^9"\nuri = "sip:{user}@127.0.0.1:9"\n'
                     'trusted_source = "127.0.0.1"\n')
    try:
        gateway.start()
        provision(gateway, range(1000, 1010))
        yield gateway
    finally:
        gateway.stop()


def wait_running(cluster, name: str, timeout: float = 15.0) -> None:
    """Until supervisord runs ``name`` again and the dispatcher routes to every worker."""
    def back():
        state, _ = cluster.processes().get(f"worker:{name}", ("", 0))
        return state == "RUNNING" and cluster.joined_workers() == len(WORKERS)
    assert wait_for(back, timeout, step=0.1), cluster.log_tail()








def kill_holder(cluster, tag: str) -> tuple[str, int]:
    """kill -9 the worker that last wrote call ``tag``; its name and pid."""
    _, record = cluster.store.load_call(tag)
    victim = record["worker"]
    assert victim in WORKERS, record
    return victim, cluster.kill9(f"worker:{victim}")


def ended_by(cluster, tag: str) -> int:
    """The pid of the worker process that logged the end of call ``tag`` (0 if none did
    within 2 s: a worker writes its INFO lines in batches, up to 0.2 s late)."""
    def found() -> int:
        for name in WORKERS:
            match = re.search(rf"{name}\[(\d+)\] b2bua: .*call {tag} ended",
                              cluster.read_log(name))
            if match:
                return int(match.group(1))
        return 0
    return wait_for(found, 2.0) or 0


def test_kill9_of_the_worker_holding_a_ringing_call(cluster, tmp_path):
    run = start_call(cluster, tmp_path, "1000", "1001", hold_ms=500, answer_after_ms=2000)
    try:
        tag, _ = call_in_state(cluster, "1000", ("ringing", "early"))
        victim, pid = kill_holder(cluster, tag)
        killed_at = time.time()
    finally:
        finish(run)
    cdr = assert_both_legs_ended(cluster, run, "1000", tag)
    (answer,) = received(run.uac.messages, "INVITE", 200)
    assert answer.at > killed_at  # the 200 came after the kill, through another process
    assert float(cdr["answer"]) > killed_at
    assert ended_by(cluster, tag) not in (0, pid)
    wait_running(cluster, victim)


def test_a_worker_stopped_by_supervisord_writes_the_lines_it_held(cluster):
    """A worker writes its INFO lines in batches; a stop drains it and exits at once
    (os._exit), and the lines it held are in its log all the same."""
    pid = cluster.pid_of("worker:worker-0")
    cluster.ctl("stop", "worker:worker-0")  # returns once the process has exited
    log = cluster.read_log("worker-0")
    assert f"worker-0[{pid}] " in log
    draining = log.find(f"worker-0[{pid}] worker: draining: ")
    drained = log.find(f"worker-0[{pid}] worker: drained; exiting")
    assert 0 <= draining < drained, log[-2000:]
    cluster.ctl("start", "worker:worker-0")
    wait_running(cluster, "worker-0")


def test_kill9_of_the_worker_holding_an_established_call(cluster, tmp_path):
    run = start_call(cluster, tmp_path, "1002", "1003", hold_ms=4000, answer_after_ms=0)
    try:
        tag, _ = call_in_state(cluster, "1002", ("answered",))
        time.sleep(0.3)  # the caller's ACK is in
        victim, pid = kill_holder(cluster, tag)
        killed_at = time.time()
    finally:
        finish(run)
    cdr = assert_both_legs_ended(cluster, run, "1002", tag)
    assert float(cdr["end"]) > killed_at
    assert 3.5 <= float(cdr["billsec"]) <= 6.0, cdr
    assert ended_by(cluster, tag) not in (0, pid)
    wait_running(cluster, victim)


def test_timers_of_a_killed_worker_fire_elsewhere(cluster, tmp_path):
    """The no-answer timer of a ringing call whose worker died: 480 and CANCEL all the same."""
    run = start_call(cluster, tmp_path, "1004", "1005", uac="call_uac_fail.xml",
                     uas="call_uas_ring.xml")
    try:
        tag, _ = call_in_state(cluster, "1004", ("ringing", "early"))
        victim, pid = kill_holder(cluster, tag)
    finally:
        finish(run)
    assert run.uac.ok and run.uas[0].ok, run.report() + "\n" + trace_lines(cluster, tag)
    finals = {m.status for m in received(run.uac.messages, "INVITE", final=True)
              if m.header("CSeq") == "2 INVITE"}
    assert finals == {480}
    assert received(run.uas[0].messages, "CANCEL")
    cdrs = wait_cdrs(cluster, "1004")
    assert [(c["hangup_cause"], c["hangup_side"]) for c in cdrs] == [("NO_ANSWER", "system")]
    assert all_ended(cluster, "1004") == []
    assert ended_by(cluster, tag) not in (0, pid)
    wait_running(cluster, victim)


def invite(ua: UA, callee_user: str, cseq: int) -> bytes:
    uri = f"sip:{callee_user}@127.0.0.1"
    headers = [f"Contact: <sip:{ua.user}@127.0.0.1:{ua.port}>", "Content-Type: application/sdp"]
    body = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            b"m=audio 4000 RTP/AVP 0\r\n")
    data = ua.request("INVITE", uri, headers, body=body, cseq=cseq)
    return data.replace(f"To: <sip:{ua.user}@127.0.0.1>".encode(),
                        f"To: <sip:{callee_user}@127.0.0.1>".encode())


def lost_after_100(messages) -> list[str]:
    """Call-IDs whose authenticated INVITE got 100 Trying and then no other answer."""
    answers: dict[str, list[int]] = {}
    for msg in messages:
        if msg.direction == "received" and msg.header("CSeq") == "2 INVITE":
            answers.setdefault(msg.header("Call-ID"), []).append(msg.status)
    return sorted(call_id for call_id, statuses in answers.items() if set(statuses) == {100})


def test_a_call_that_got_100_trying_survives_its_worker(gateway_cluster):
    """The worker answers 100 Trying, then dies before the call is in Redis.

    After a provisional response a UAC stops retransmitting its INVITE (RFC 3261
    17.1.1.2), so unless the call was written before the 100 left, nobody ever answers
    it.  The caller is a trusted gateway (no digest, so no Redis write before the 100);
    writes are held back (CLIENT PAUSE WRITE) to widen the window between the 100 and
    the write to the worker's Redis timeout, and both workers are killed the moment the
    100 arrives (whichever had the INVITE).  The callee never answers: a caller that got
    100 Trying must get a final response (480 on no answer).  A cluster that writes
    first answers 503 under the pause instead of 100: that is fine too; so is no answer
    while the write is held (workers.outage_hold), as long as the INVITE's retransmission
    is carried out once writes are back and ends in a final response.
    """
    cluster = gateway_cluster
    pids = [cluster.pid_of(f"worker:{name}") for name in WORKERS]
    with UA(cluster.address, user="1007") as phone:  # rings, never answers
        assert phone.register(PASSWORD).status == 200
        with UA(cluster.address, user="1006") as ua:
            ua.skip_provisional = False
            cluster.store.redis.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
            try:
                ua.send(invite(ua, "1007", 1))
                first = answers_to(ua, 1, 1.0)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
            finally:
                cluster.store.redis.execute_command("CLIENT", "UNPAUSE")
            final = first if first is not None and first.status >= 200 else None
            provisional = first is not None
            deadline = time.monotonic() + NO_ANSWER + 8
            while final is None and time.monotonic() < deadline:
                if not provisional:
                    ua.send(ua.last_sent)  # Timer A: retransmit until a provisional comes
                reply = answers_to(ua, 1, 0.5)
                provisional = provisional or reply is not None
                final = reply if reply is not None and reply.status >= 200 else None
    for name in WORKERS:
        wait_running(cluster, name)
    if first is None:  # held for its retransmission, which the live workers carried out
        assert final is not None, "no answer at all to the INVITE or its retransmissions"
        assert final.status in (408, 480), final.status
    elif first.status == 100:
        assert final is not None, "the caller got 100 Trying, then nothing: the call is lost"
        assert final.status in (408, 480), final.status
    else:
        assert first.status == 503, first.status


def test_redis_trouble_after_an_answer_sends_no_second_final(cluster):
    with UA(cluster.address, user="1008") as ua:
        cluster.store.redis.execute_command("CLIENT", "PAUSE", 2000, "WRITE")
        try:
            ua.send(invite(ua, "1009", 1))
            statuses = []
            while (reply := answers_to(ua, 1, 1.0)) is not None:
                statuses.append(reply.status)
        finally:
            cluster.store.redis.execute_command("CLIENT", "UNPAUSE")
    assert statuses == [407]


def test_no_failed_call_while_a_worker_is_killed_every_5_seconds(cluster, tmp_path):
    calls = LOAD_RATE * LOAD_SECONDS
    timeout = LOAD_SECONDS + LOAD_HOLD_MS / 1000 + 30
    uas = start_listening(callee(cluster, tmp_path / "uas", calls=calls, timeout=timeout))
    register(cluster, LOAD_CALLEE, [uas.port])
    uac = caller(cluster, tmp_path / "uac", "", LOAD_CALLEE, users=LOAD_CALLERS, calls=calls,
                 rate=LOAD_RATE, hold_ms=LOAD_HOLD_MS, timeout=timeout)
    run = CallRun(uac, [uas])
    kills = []
    try:
        uac.sipp.start()
        started = time.monotonic()
        for index in range(int(LOAD_SECONDS // KILL_EVERY)):
            time.sleep(max(0.0, started + (index + 1) * KILL_EVERY - time.monotonic()))
            victim = WORKERS[index % len(WORKERS)]
            wait_running(cluster, victim, timeout=KILL_EVERY)
            kills.append(cluster.kill9(f"worker:{victim}"))
    finally:
        finish(run)
    assert len(kills) == LOAD_SECONDS // KILL_EVERY
    report = run.report()
    assert lost_after_100(uac.messages) == [], report  # 100 Trying only once the call is kept
    assert uac.result.created == calls and uac.result.successful == calls, report
    assert uac.result.failed == 0 and uas.result.failed == 0, report
    assert uas.result.successful == calls, report
    assert run.uac.ok and uas.ok, report
    cdrs = [c for u in LOAD_CALLERS for c in cdrs_of(cluster, u)]
    assert len(cdrs) == calls
    assert {c["hangup_cause"] for c in cdrs} == {"NORMAL_CLEARING"}
    assert all(2.5 <= float(c["billsec"]) <= 8.0 for c in cdrs), sorted(
        float(c["billsec"]) for c in cdrs)[-5:]
    for user in LOAD_CALLERS:
        assert all_ended(cluster, user) == []


def authenticated_invite(ua: UA, callee_user: str, challenge, cseq: int, nc: int = 1) -> bytes:
    """The INVITE of ``invite`` with credentials answering ``challenge`` (a 407)."""
    as_www = dataclasses.replace(challenge, headers=[
        ("WWW-Authenticate", v) for v in challenge.all("Proxy-Authenticate")])
    uri = f"sip:{callee_user}@127.0.0.1"
    creds = ua.authorization(as_www, "INVITE", uri, PASSWORD, nc=nc)
    data = invite(ua, callee_user, cseq)
    return data.replace(b"Content-Type:", f"Proxy-Authorization: {creds}\r\nContent-Type:"
                        .encode(), 1)


def test_a_retransmission_whose_first_copy_died_with_its_worker_is_not_a_replay(cluster):
    """A worker accepted the INVITE's nonce-count, then died before writing the call: the
    INVITE's retransmission (same branch) reaches another worker and must be carried on,
    not challenged again; the same credentials in a new transaction are still a replay."""
    with UA(cluster.address, user="1021") as phone:
        assert phone.register(PASSWORD).status == 200
        with UA(cluster.address, user="1022") as ua:
            ua.send(invite(ua, "1021", 1))
            challenge = answers_to(ua, 1, 2.0)
            assert challenge is not None and challenge.status == 407
            data = authenticated_invite(ua, "1021", challenge, 2)
            # What the dead worker left behind: the count accepted for this transaction.
            req = parse(data)
            creds = next(c for c in map(parse_credentials, req.header_lines(
                "proxy-authorization")) if c.is_digest)
            aor = aor_of("1022", "127.0.0.1")
            assert cluster.store.accept_nonce_count(aor, creds.nonce, creds.nonce_count, 300,
                                                    server_key(req))
            ua.skip_provisional = False
            ua.send(data)  # the retransmission
            first = answers_to(ua, 2, 2.0)
            assert first is not None and first.status in (100, 180), first
            assert wait_for(lambda: calls_of(cluster, "1022"), 5.0)
            # The same credentials in another transaction (another call): a replay.
            replay = data.replace(b"branch=z9hG4bK", b"branch=z9hG4bKx", 1)
            replay = replay.replace(ua.call_id.encode(), b"replay-" + ua.call_id.encode())
            ua.skip_provisional = True
            ua.send(replay)
            deadline = time.monotonic() + 2.0
            again = None
            while again is None and (left := deadline - time.monotonic()) > 0:
                reply = ua.receive(timeout=left)
                if reply is not None and reply.header("Call-ID").startswith("replay-"):
                    again = reply
            assert again is not None and again.status == 407, again
