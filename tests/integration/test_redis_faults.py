"""Redis in trouble is an answer, not a crash (design invariant 11).

A cluster in relay mode runs against its own redis-server, which each test hurts
in one way: memory full (OOM), consumer groups deleted (NOGROUP), scripts flushed
(NOSCRIPT), killed and restarted empty, paused 5 s (SIGSTOP), turned into a replica
(READONLY).  Every time: no process restarts (same pids, all RUNNING), a new
request gets 503 with Retry-After (never 500) while the fault lasts (these clusters
answer it at once: workers.outage_hold = 0; test_redis_blip.py tests the hold), no worker
logs an internal error, and service comes back by itself within seconds.  And a
BYE sent while Redis is paused is not refused: its retransmission ends both legs
once Redis is back, with one CDR.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest
import redis
from harness import Cluster, running_cluster, wait_for
from rtp_phone import Phone, SipMessage
from sipua import UA, Reply

from cluster import store as store_module
from conftest import RedisServer, free_tcp_port, require_redis_server

PASSWORD = "1234"
MEDIA_TIMEOUT = 3  # seconds
SETTINGS = {"media": {"mode": "relay", "rtp_port_min": 28000, "rtp_port_max": 28999,
                      "relays": 1, "media_timeout": MEDIA_TIMEOUT},
            "workers": {"outage_hold": 0}}
USERS = range(3100, 3140)
RECOVERY = 10.0  # seconds service may take to come back once the fault ends
T1 = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RedisServer]:
    """This module's own redis-server: the tests kill, pause and demote it."""
    require_redis_server()
    own = RedisServer(tmp_path_factory.mktemp("redis-faults-redis"), port=free_tcp_port())
    own.start()
    try:
        yield own
    finally:
        with suppress(ProcessLookupError, AttributeError):
            os.kill(own.process.pid, signal.SIGCONT)
        own.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, server) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("redis-faults"), server.url, workers=2,
                         settings=SETTINGS) as running:
        provision(running)
        yield running


@pytest.fixture(scope="module")
def untraced(tmp_path_factory, server) -> Iterator[Cluster]:
    """A second cluster (its own Redis database) that keeps no message trace: a BYE's
    first write is then the call's compare-and-set itself, on a connection made before
    the pause, so Redis runs it when it resumes although the worker gave up on it."""
    settings = {"media": {**SETTINGS["media"], "rtp_port_min": 29000, "rtp_port_max": 29999},
                "calls": {"trace": False}, "workers": {"outage_hold": 0}}
    with running_cluster(tmp_path_factory.mktemp("redis-faults-untraced"),
                         f"redis://127.0.0.1:{server.port}/1", workers=2,
                         settings=settings) as running:
        provision(running)
        yield running


@pytest.fixture
def admin(server) -> Iterator[redis.Redis]:
    client = server.client(socket_timeout=5.0)
    try:
        yield client
    finally:
        client.close()


def provision(cluster: Cluster) -> None:
    """Users (again, after a fault that emptied Redis): retried until Redis takes them."""
    def put() -> bool:
        try:
            for user in USERS:
                cluster.add_user(str(user), PASSWORD)
            return True
        except store_module.StoreUnavailable:
            return False
    assert wait_for(put, RECOVERY, step=0.2), "could not write the users"


def running_pids(cluster: Cluster) -> dict[str, int]:
    table = cluster.processes()
    assert table and all(state == "RUNNING" for state, _ in table.values()), table
    return {name: pid for name, (_, pid) in table.items()}


def internal_errors(cluster: Cluster) -> list[str]:
    return [line for path in sorted(cluster.log_dir.glob("*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if "internal error" in line or "Traceback" in line]


# ------------------------------------------------------------------ requests
def register(cluster: Cluster, user: int) -> Reply | None:
    """REGISTER with credentials (answering the 401): the final answer."""
    with UA(cluster.address, user=str(user)) as ua:
        return ua.register(PASSWORD, expires=60)


def invite(cluster: Cluster, caller: int, callee: int) -> SipMessage | None:
    """An authenticated INVITE (answering the 407): the final answer."""
    with Phone(cluster.address, str(caller), PASSWORD) as phone:
        with suppress(AssertionError):
            phone.call(str(callee), timeout=4.0)
        finals = [m for m in phone.messages if m.is_response and m.status >= 200]
        return finals[-1] if finals else None


def assert_refused_for_now(cluster: Cluster, caller: int, callee: int) -> None:
    """New requests get 503 with Retry-After while the fault lasts (never 500)."""
    reply = register(cluster, caller)
    assert reply is not None and reply.status == 503, reply and reply.status
    assert reply.header("Retry-After"), "503 without Retry-After"
    answer = invite(cluster, caller, callee)
    assert answer is not None and answer.status == 503, answer and answer.first_line
    assert answer.header("Retry-After"), "503 without Retry-After"


def registered(cluster: Cluster, user: int) -> bool:
    reply = register(cluster, user)
    return reply is not None and reply.status == 200


@contextmanager
def call_between(cluster: Cluster, caller_user: int, callee_user: int,
                 phone=Phone) -> Iterator[tuple[Phone, Phone]]:
    """An answered call between two phones with media both ways (closed afterwards)."""
    caller = phone(cluster.address, str(caller_user), PASSWORD)
    callee = phone(cluster.address, str(callee_user), PASSWORD)
    try:
        assert callee.register() == 200
        answered: dict = {}

        def answer() -> None:
            try:
                callee.answer(callee.wait_call())
                answered["ok"] = True
            except AssertionError as exc:
                answered["error"] = exc

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        caller.call(str(callee_user))
        answering.join(timeout=10)
        assert answered.get("ok"), answered.get("error")
        yield caller, callee
    finally:
        caller.close()
        callee.close()


def cdrs_of(cluster: Cluster, call_id: str) -> list[dict]:
    return [cdr for cdr in cluster.store.cdrs_after() if cdr.get("a_call_id") == call_id]


def full_call(cluster: Cluster, caller: int, callee: int) -> bool:
    """A whole call (register, INVITE, answer, media, BYE, CDR) works."""
    try:
        with call_between(cluster, caller, callee) as (a, b):
            time.sleep(0.3)
            reply = a.hangup()
            bye = b.wait_request("BYE", timeout=3.0)
            return (reply is not None and reply.status == 200 and bye is not None
                    and wait_for(lambda: cdrs_of(cluster, a.call_id), 3.0) is not None)
    except (AssertionError, store_module.StoreUnavailable):
        return False


def assert_recovers(cluster: Cluster, pids: dict[str, int], caller: int, callee: int,
                    since: float) -> float:
    """Service is back within RECOVERY seconds, nobody restarted; the seconds it took."""
    assert wait_for(lambda: registered(cluster, caller), RECOVERY, step=0.2), (
        "REGISTER did not come back\n" + cluster.log_tail())
    back = time.monotonic() - since
    assert wait_for(lambda: full_call(cluster, caller, callee), RECOVERY, step=0.2), (
        "calls did not come back\n" + cluster.log_tail())
    # The background loops are alive: the dispatcher's heartbeat thread (it names the
    # workers it routes to), the workers' and relays' heartbeats, the metrics endpoint.
    assert wait_for(lambda: cluster.joined_workers() >= 2, RECOVERY), cluster.log_tail()
    assert wait_for(lambda: len(cluster.store.processes()) >= 4, RECOVERY), (
        cluster.store.processes())
    assert metrics_status(cluster) == 200
    assert running_pids(cluster) == pids
    assert internal_errors(cluster) == []
    print(f"service back {back:.1f} s after the fault ended")
    return back


def metrics_status(cluster: Cluster) -> int:
    url = f"http://127.0.0.1:{cluster.config.metrics.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5.0) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ------------------------------------------------------------------ the faults
def test_redis_out_of_memory(cluster, admin):
    pids = running_pids(cluster)
    assert full_call(cluster, 3100, 3101)
    admin.set("ballast", b"x" * 100_000)
    policy = admin.config_get("maxmemory-policy")["maxmemory-policy"]
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # below what is used: every write is refused
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("probe", b"1")
        assert_refused_for_now(cluster, 3100, 3101)
        time.sleep(2.5)  # the heartbeats' writes fail meanwhile
        assert running_pids(cluster) == pids
    finally:
        admin.config_set("maxmemory", 0)
        admin.config_set("maxmemory-policy", policy)
        admin.delete("ballast")
    assert_recovers(cluster, pids, 3100, 3101, time.monotonic())


def test_consumer_groups_deleted(cluster, admin):
    pids = running_pids(cluster)
    events = [*store_module.RELAY_EVENTS_STREAMS, store_module.RELAY_EVENTS_LEGACY]
    admin.delete(*events, store_module.HANGUP_STREAM)

    def grouped() -> bool:
        try:
            return (all({g["name"] for g in admin.xinfo_groups(key)} == {b"b2bua"}
                        for key in events) and
                    {g["name"] for g in admin.xinfo_groups(store_module.HANGUP_STREAM)}
                    == {b"workers"})
        except redis.ResponseError:  # no such key yet
            return False

    assert wait_for(grouped, 5.0), "the consumer groups were not made again"
    # The media timeout still hangs up (relay -> stream -> group -> B2BUA) ...
    with call_between(cluster, 3102, 3103) as (caller, callee):
        caller.media.stop()
        callee.media.stop()
        assert callee.wait_request("BYE", timeout=MEDIA_TIMEOUT + 8) is not None, (
            cluster.log_tail())
        assert caller.wait_request("BYE", timeout=3) is not None
    # ... and so does an operator's hangup, with the hangup stream deleted again.
    admin.delete(store_module.HANGUP_STREAM)
    with call_between(cluster, 3104, 3105) as (caller, callee):
        tag = callee.call_id.split(".")[1]  # B-leg Call-IDs are "sc<slot>.<tag>.<n>"
        cluster.store.post_hangup(tag, caller.call_id, "test")
        assert callee.wait_request("BYE", timeout=8) is not None, cluster.log_tail()
        assert caller.wait_request("BYE", timeout=3) is not None
    assert running_pids(cluster) == pids
    assert internal_errors(cluster) == []


def test_scripts_flushed(cluster, admin):
    pids = running_pids(cluster)
    admin.script_flush()
    assert registered(cluster, 3106)  # the registrar's script
    admin.script_flush()
    assert full_call(cluster, 3106, 3107)  # the call's compare-and-set, the timers' claim
    admin.script_flush()
    time.sleep(1.0)  # the relays' refresh script, the timer loop
    assert full_call(cluster, 3106, 3107)
    assert running_pids(cluster) == pids
    assert internal_errors(cluster) == []


def test_redis_killed_and_restarted_empty(cluster, server):
    pids = running_pids(cluster)
    server.stop()
    try:
        assert_refused_for_now(cluster, 3108, 3109)
        time.sleep(2.0)  # every loop meets the outage
        assert running_pids(cluster) == pids
    finally:
        server.start()
    ended = time.monotonic()
    provision(cluster)  # the users were lost with everything else (no persistence here)
    assert_recovers(cluster, pids, 3108, 3109, ended)


@contextmanager
def paused(server: RedisServer, seconds: float) -> Iterator[None]:
    """redis-server stopped (SIGSTOP) for ``seconds`` from now, whatever the body does."""
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
    timer.start()
    try:
        yield
    finally:
        timer.join()
        os.kill(pid, signal.SIGCONT)


def test_a_timer_claimed_while_redis_is_paused_is_not_lost(server):
    """The claim reaches Redis, the worker's read times out, Redis runs the claim when it
    resumes: the timer must come due again, not vanish with the reply nobody read."""
    store = store_module.Store(f"redis://127.0.0.1:{server.port}/2", timeout=0.25)
    tag, now = "feed" * 6, time.time()
    store.save_call(tag, 0, {"state": "ended"}, 60, arm=[(tag, "E", now - 0.1)])
    with paused(server, 1.0), pytest.raises(store_module.StoreUnavailable):
        store.claim_due_timers(now)
    store = store_module.Store(f"redis://127.0.0.1:{server.port}/2", timeout=2.0)
    assert store.claim_due_timers(now + 1.0).due == [], "claimed, yet due again at once"
    again = store.claim_due_timers(now + store_module.TIMER_LEASE + 0.1).due
    assert again == [(tag, "E", now - 0.1)]
    store.remove_timers(again)  # seen by its call: gone for good
    assert store.claim_due_timers(now + 100) == ([], None)


def test_a_subscription_that_stops_answering_is_given_up(server, monkeypatch):
    """A subscriber only reads, so a connection to a Redis that vanished without a FIN
    (powered off, cut off: a paused redis-server answers nothing either) would leave it
    deaf to bans and auth blocks for ever.  After a poll of silence it sends a PING; no
    answer by the next poll ends the subscription (the followers subscribe again).  A
    quiet Redis that answers is not given up."""
    monkeypatch.setattr(store_module.limits, "BLOCKS_POLL", 0.3)
    store = store_module.Store(f"redis://127.0.0.1:{server.port}/4", timeout=2.0)
    heard, failed = [], []

    def listen():
        try:
            for event in store.auth_events():
                heard.append(event)
        except store_module.StoreUnavailable as exc:
            failed.append(exc)

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(1.5)  # five polls of silence, each answered
    store.announce_block("192.0.2.7", 5)
    assert wait_for(lambda: heard, 2.0) and heard == [("source", "192.0.2.7", 5.0)]
    assert not failed
    with paused(server, 2.0):
        assert wait_for(lambda: failed, 1.8), "still waiting on a Redis that answers nothing"
    assert "PING" in str(failed[0])


def test_a_pipeline_meeting_flushed_scripts_runs_its_other_commands_once(server):
    """A relay's media event goes in one pipeline with the script that saves its session:
    after SCRIPT FLUSH only the script is sent again, the event is written once."""
    store = store_module.Store(f"redis://127.0.0.1:{server.port}/3", timeout=2.0)
    events = store_module.relay_events_key(store_module.stream_shard("flush-call"))
    store.redis.delete(events)
    relay = "flush-host/relay-0"
    session = ("flush-call", {"relay": relay, "version": 1}, 60)
    store.relay_save_sessions(relay, [session])
    store.redis.script_flush()
    store.relay_report_event({"event": "media-timeout", "call_id": "flush-call"},
                             [("flush-call", {"relay": relay, "version": 2}, 60)], relay)
    assert store.redis.xlen(events) == 1
    assert store.relay_session("flush-call")["version"] == 2  # the script did run


def test_redis_paused(cluster, server):
    pids = running_pids(cluster)
    with paused(server, 5.0):
        assert_refused_for_now(cluster, 3110, 3111)
    assert_recovers(cluster, pids, 3110, 3111, time.monotonic())


def test_redis_made_a_replica(cluster, server, admin, tmp_path):
    pids = running_pids(cluster)
    primary = RedisServer(tmp_path / "primary", port=free_tcp_port()).start()
    other = primary.client(socket_timeout=5.0)
    try:
        # The new primary first copies this Redis, so the replica keeps the same data
        # (users unknown meanwhile would be refused and counted as failed logins).
        other.replicaof("127.0.0.1", server.port)
        assert wait_for(lambda: other.info("replication").get("master_link_status") == "up",
                        10.0)
        other.replicaof("NO", "ONE")
        admin.replicaof("127.0.0.1", primary.port)
        assert wait_for(lambda: admin.info("replication").get("master_link_status") == "up",
                        10.0)
        with pytest.raises(redis.exceptions.ReadOnlyError):
            admin.set("probe", b"1")
        assert_refused_for_now(cluster, 3112, 3113)
        time.sleep(1.0)
        assert running_pids(cluster) == pids
    finally:
        admin.replicaof("NO", "ONE")
        other.close()
        primary.stop()
    ended = time.monotonic()
    assert_recovers(cluster, pids, 3112, 3113, ended)


# ------------------------------------------------------------------ a BYE while Redis is paused
class RetransmittingPhone(Phone):
    """A phone whose last request can be sent again, byte for byte (same branch)."""

    def _send_request(self, method, *args, **kwargs):
        kwargs.setdefault("branch", "z9hG4bK" + os.urandom(6).hex())
        self.last_request = (method, args, kwargs)
        return super()._send_request(method, *args, **kwargs)

    def retransmit(self) -> None:
        method, args, kwargs = self.last_request
        super()._send_request(method, *args, **kwargs)

    def hangup_like_a_phone(self) -> SipMessage | None:
        """BYE as a phone's non-INVITE client transaction sends it: again after T1, 2*T1...
        up to 4 s apart, until a final answer or Timer F (64*T1); that answer."""
        self.media.stop()
        self.cseq += 1
        since = time.monotonic()
        self._send_in_dialog("BYE", [])
        interval, deadline = T1, since + 64 * T1
        while time.monotonic() < deadline:
            reply = self.wait_response(self.call_id, self.cseq, interval, since=since)
            if reply is not None:
                return reply
            self.retransmit()
            interval = min(2 * interval, 4.0)
        return None


@pytest.mark.parametrize("phone_gives_up", [False, True], ids=["repeated", "sent-once"])
@pytest.mark.parametrize("which", ["cluster", "untraced"])
def test_a_bye_while_redis_is_paused_ends_both_legs_once_it_is_back(which, phone_gives_up,
                                                                    server, request):
    """Repeated as a phone does (its copy after the pause is carried out), or sent once
    (as if the phone had given up after 32 s: the worker's deferred copy is carried out)."""
    cluster = request.getfixturevalue(which)
    pids = running_pids(cluster)
    with call_between(cluster, 3114, 3115, phone=RetransmittingPhone) as (caller, callee):
        time.sleep(0.3)
        os.kill(server.process.pid, signal.SIGSTOP)
        resume = threading.Timer(5.0, os.kill, (server.process.pid, signal.SIGCONT))
        resume.start()
        try:
            started = time.monotonic()
            if phone_gives_up:
                reply = caller.hangup(timeout=5.0 + RECOVERY)  # one BYE, never repeated
            else:
                reply = caller.hangup_like_a_phone()
        finally:
            resume.join()
            os.kill(server.process.pid, signal.SIGCONT)
        answers = [m.status for m in caller.messages
                   if m.is_response and m.method == "BYE" and m.cseq == caller.cseq]
        assert 503 not in answers, answers
        assert reply is not None and reply.status == 200, (answers, cluster.log_tail())
        print(f"BYE answered {time.monotonic() - started:.1f} s after it was first sent")
        bye = callee.wait_request("BYE", timeout=10.0)
        assert bye is not None, cluster.log_tail()
        assert "MEDIA_TIMEOUT" not in bye.header("Reason")
        cdrs = wait_for(lambda: cdrs_of(cluster, caller.call_id), 10.0)
        assert cdrs, "no CDR\n" + cluster.log_tail()
        time.sleep(1.5)  # a second CDR would be written by now
        cdrs = cdrs_of(cluster, caller.call_id)
        assert len(cdrs) == 1, cdrs
        assert cdrs[0]["hangup_side"] == "caller" and cdrs[0]["hangup_cause"] == (
            "NORMAL_CLEARING"), cdrs
    assert running_pids(cluster) == pids
    assert internal_errors(cluster) == []
