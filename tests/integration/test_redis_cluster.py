"""The cluster on a Redis Cluster: 6 nodes (3 primaries, 3 replicas) on loopback ports.

``redis.url`` is ``redis+cluster://`` naming two of the primaries.  The store's operations
(scripts, pipelines that hold scripts and WAIT, streams and consumer groups, pub/sub,
scans) run against it directly; then a relay-mode cluster (two workers, one relay) takes
20 REGISTERs with digest, 6 calls between RTP phones (media through the relay both ways,
BYE, one CDR each), and every sipctl listing and the metrics endpoint read across the
three primaries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from harness import running_cluster, wait_for
from redis.crc import key_slot
from rediscluster import redis_cluster  # noqa: F401 (a fixture)
from sipua import UA
from test_calls_relay import assert_received_all, call_between, settle_and_stop, wait_cdr

from cluster import store as store_module
from cluster.store import Binding, Store, StoreUnavailable, call_key, timer_key, tx_key
from conftest import ROOT

PASSWORD = "1234"
REGISTERING = [str(user) for user in range(3100, 3120)]  # 20 REGISTERs
CALLING = [(str(3120 + 2 * i), str(3121 + 2 * i)) for i in range(6)]  # 6 calls
HUNG_UP = ("3140", "3141")  # a call the operator ends
SETTINGS = {"media": {"mode": "relay", "relays": 1, "rtp_port_min": 38200,
                      "rtp_port_max": 38399}}


def node_of(cluster, key: str) -> int:
    """The port of the primary serving ``key``, as the cluster itself says."""
    slot = key_slot(key.encode())
    for node in cluster.primaries():
        client = node.client()
        try:
            for start, end, primary, *_replicas in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
    raise AssertionError(f"no primary serves slot {slot}")


# ------------------------------------------------------------------ the store alone
def test_the_store_works_on_the_cluster(redis_cluster):  # noqa: F811
    store = Store(redis_cluster.url, timeout=2.0)
    assert store.ping()
    shard_nodes = {node_of(redis_cluster, timer_key(s)) for s in range(store_module.TIMER_SHARDS)}
    assert len(shard_nodes) >= 2, "the timer shards all sit on one primary"

    # A call saved with timers armed in the same pipeline (shards on other nodes), then
    # again with WAIT for a replica: both are one pipeline over several primaries.
    tag = "c0ffee" * 4
    now = time.time()
    arm = [(tag, "B", now - 1), ("other" + tag, "A", now - 1), ("third" + tag, "A", now - 1)]
    version = store.save_call(tag, 0, {"state": "trying"}, 60, arm=arm)
    assert version and store.load_call(tag) == (version, {"state": "trying"})
    assert store.save_call(tag, 0, {"state": "lost"}, 60) is None  # compare-and-set lost
    popped = store.claim_due_timers(time.time())
    assert sorted((t, n) for t, n, _ in popped) == sorted((t, n) for t, n, _ in arm)
    assert store.claim_due_timers(time.time()) == []  # claimed: leased, not due again yet
    store.remove_timers(popped)  # seen by their calls: gone from every shard's node
    assert store.claim_due_timers(time.time() + 400) == []
    store.replica_wait, store.wait_counters = (1, 500), {"replica_wait_short": 0}
    newer = store.save_call(tag, version, {"state": "answered"}, 60)
    assert newer and store.wait_counters == {"replica_wait_short": 0}
    store.replica_wait = (0, 0)

    # Answers cached under the call's tag, a trace, a CDR.
    store.store_answers([(tx_key(tag, "z9hG4bK1"), b"SIP/2.0 200 OK\r\n\r\n", 30)])
    assert store.stored_answer(tx_key(tag, "z9hG4bK1")) == b"SIP/2.0 200 OK\r\n\r\n"
    store.add_trace(tag, [{"first": "INVITE"}], 10, 60)
    assert store.trace(tag) == [{"first": "INVITE"}]
    assert any(t == tag for t, _ in store_module.call_records(store))

    # A REGISTER (one script over reg, nc and tx of one AOR) and the directory.
    store.put_users([(f"cu{i}", "rc.test", {"MD5": "0" * 32}) for i in range(30)])
    assert len(store.list_users("rc.test")) == 30
    aor = "cu1@rc.test"
    binding = Binding("k", b"sip:cu1@127.0.0.1:5999", time.time() + 60, "cid", 1,
                      ("127.0.0.1", 5999), "h")
    result = store.register(aor, tx_key(aor, "b1"), now=time.time(), nonce="n1", nc=1,
                            nonce_ttl=30, tx_ttl=30, max_contacts=5, call_id="cid", cseq=1,
                            set_bindings=[binding], remove_keys=[], star=False)
    assert result.outcome == "ok" and [b.key for b in store.bindings(aor)] == ["k"]
    assert aor in store.registered_aors()
    assert store.accept_nonce_count(aor, "n2", 1, 30, "t1") is True
    assert store.accept_nonce_count(aor, "n2", 1, 30, "t2") is False

    # Relay sessions: refresh scripts pipelined over many slots, and a media event.
    relay = "rc-host/relay-0"
    sessions = [(f"call-{i}", {"relay": relay, "version": 1}, 60) for i in range(12)]
    store_module.relay_save_sessions(store, relay, sessions)
    refreshed = [(cid, {**rec, "version": 2}, ttl) for cid, rec, ttl in sessions]
    assert store_module.relay_refresh_sessions(store, relay, refreshed) == [1] * 12
    assert len(store_module.relay_owned_sessions(store, relay)) == 12
    event_id = store_module.relay_report_event(store, {"event": "media-timeout",
                                                       "call_id": "call-3"},
                                               [refreshed[3]], relay)
    events = store_module.read_media_events(store, "rc-group", "rc-consumer")
    assert [eid for eid, _ in events] == [event_id]

    # Pub/sub reaches a subscriber connected to whichever node.
    heard = []

    def listen():
        for event in store.auth_events():
            heard.append(event)
            return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert wait_for(lambda: store.announce_block("192.0.2.9", 5) is None and heard, 5.0,
                    step=0.3)
    assert heard[0] == ("source", "192.0.2.9", 5.0)


def test_pipelines_follow_a_slot_migrating_and_then_moved(redis_cluster):  # noqa: F811
    """A slot moved by hand while a store holds the old slot map: during the migration a new
    call in that slot is written through ASK, after it the store's pipeline meets MOVED and
    is run again where the slot went; the timers armed with it land in their own slots."""
    store = Store(redis_cluster.url, timeout=2.0)
    tag = "5107" * 6
    slot = key_slot(call_key(tag).encode())
    version = store.save_call(tag, 0, {"n": 1}, 60, arm=[(tag, "A", time.time() + 300)])
    assert version  # the store has read the slot map
    other = next(t for t in (f"{n:024x}" for n in range(1, 10**6))
                 if key_slot(call_key(t).encode()) == slot)  # another call in that slot
    source_port = node_of(redis_cluster, call_key(tag))
    nodes = {n.port: n for n in redis_cluster.primaries()}
    target_port = next(p for p in nodes if p != source_port)
    source, target = nodes[source_port].client(), nodes[target_port].client()
    try:
        source_id = source.execute_command("CLUSTER MYID")
        target_id = target.execute_command("CLUSTER MYID")
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        # The new call's key is not on the source: ASK sends it to the target.
        assert store.save_call(other, 0, {"n": 2}, 60, arm=[(other, "A", time.time() + 300)])
        assert store.load_call(other)[1] == {"n": 2}
        keys = source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
        for client in (target, source, *(nodes[p].client() for p in nodes
                                         if p not in (source_port, target_port))):
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    finally:
        source.close()
        target.close()
    # The store still believes the source serves the slot: MOVED, then the right node.
    newer = store.save_call(tag, version, {"n": 3}, 60, arm=[(tag, "B", time.time() + 300)])
    assert newer and store.load_call(tag) == (newer, {"n": 3})
    assert store.redis.get_node_from_key(call_key(tag)).port == target_port
    assert node_of(redis_cluster, call_key(tag)) == target_port
    armed = {(t, n) for t, n, _ in store.claim_due_timers(time.time() + 400)}
    assert armed == {(tag, "A"), (other, "A"), (tag, "B")}


def test_a_cluster_away_at_start_is_redis_trouble_not_a_crash():
    store = Store("redis+cluster://127.0.0.1:1,127.0.0.1:2/", timeout=0.2)  # nothing there
    with pytest.raises(StoreUnavailable):
        store.load_call("abc")
    with pytest.raises(StoreUnavailable):
        store.save_call("abc", 0, {}, 60, arm=[("abc", "A", 1.0)])
    with pytest.raises(StoreUnavailable):
        store.registered_aors()


# ------------------------------------------------------------------ a cluster on it
@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_cluster):  # noqa: F811
    redis_cluster.flushall()  # what the store's test above left
    with running_cluster(tmp_path_factory.mktemp("on-redis-cluster"), redis_cluster.url,
                         workers=2, settings=SETTINGS) as running:
        for user in [*REGISTERING, *(u for pair in CALLING for u in pair), *HUNG_UP]:
            running.add_user(user, PASSWORD)
        yield running


def sipctl(cluster, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "--config",
                           str(cluster.config_path), *args],
                          capture_output=True, text=True, env=cluster.env, cwd=ROOT, timeout=30)
    assert done.returncode == 0, f"sipctl {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout


def test_twenty_registrations_with_digest(cluster):
    answers = []
    for user in REGISTERING:
        with UA(cluster.address, user=user) as ua:
            reply = ua.register(PASSWORD)
            answers.append(reply.status if reply is not None else 0)
    assert answers == [200] * 20, answers
    aors = {aor.split("@")[0] for aor in cluster.store.registered_aors()}
    assert set(REGISTERING) <= aors
    listed = json.loads(sipctl(cluster, "regs", "--json"))
    assert sorted({row["aor"].split("@")[0] for row in listed} & set(REGISTERING)) == \
        sorted(REGISTERING)


def test_six_calls_with_relay_media_bye_and_one_cdr_each(cluster):
    call_ids = []
    for caller_user, callee_user in CALLING:
        with call_between(cluster, int(caller_user), int(callee_user)) as call:
            time.sleep(0.6)
            settle_and_stop(call.caller, call.callee)
            assert call.caller.media.sent >= 20 and call.callee.media.sent >= 20
            assert_received_all(call.caller, call.callee, call.caller_relay_port)
            assert_received_all(call.callee, call.caller, call.callee_relay_port)
            assert call.caller.hangup().status == 200
            bye = call.callee.wait_request("BYE")  # the other leg's, after the 200
            assert bye.header("Reason") == 'Q.850;cause=16;text="NORMAL_CLEARING"'
            assert len(call.callee.requests("BYE")) == 1
            call_ids.append(call.caller.call_id)
    for call_id in call_ids:
        assert wait_cdr(cluster, call_id) is not None, call_id
    cdrs = [c for c in cluster.store.cdrs_after() if c.get("a_call_id") in call_ids]
    assert sorted(c["a_call_id"] for c in cdrs) == sorted(call_ids)  # one each
    assert {c["hangup_cause"] for c in cdrs} == {"NORMAL_CLEARING"}


def test_sipctl_call_and_hangup_reach_a_worker_through_the_hangup_stream(cluster):
    with call_between(cluster, int(HUNG_UP[0]), int(HUNG_UP[1])) as call:
        shown = json.loads(sipctl(cluster, "call", call.caller.call_id, "--json"))
        assert shown["call"] == call.tag and shown["state"] == "answered", shown
        done = sipctl(cluster, "hangup", call.caller.call_id)
        assert "ended" in done, done
        for phone in (call.caller, call.callee):
            bye = phone.wait_request("BYE")
            assert bye is not None and "NORMAL_CLEARING" in bye.header("Reason")
        cdr = wait_cdr(cluster, call.caller.call_id)
        assert cdr is not None and cdr["hangup_side"] == "operator", cdr


def test_sipctl_listings_and_metrics_read_every_primary(cluster, redis_cluster):  # noqa: F811
    users = json.loads(sipctl(cluster, "users", "list", "--json"))
    assert len(users) == len(REGISTERING) + 2 * len(CALLING) + len(HUNG_UP)
    listed = json.loads(sipctl(cluster, "cluster", "--json"))
    roles = sorted(p["role"] for p in listed)
    assert roles.count("worker") == 2 and "dispatcher" in roles and "relay" in roles, listed
    stats = json.loads(sipctl(cluster, "stats", "--json"))
    assert stats["registrations"]["aors"] >= len(REGISTERING), stats["registrations"]
    calls = json.loads(sipctl(cluster, "calls", "--all", "--json"))
    callers = {row["caller"] for row in calls}
    assert {caller for caller, _ in CALLING} <= callers, calls
    cdrs = json.loads(sipctl(cluster, "cdr", "--json"))
    assert sorted(c["caller"] for c in cdrs if c["caller"] in dict(CALLING)) == \
        sorted(dict(CALLING))
    url = f"http://127.0.0.1:{cluster.config.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    assert "sipcluster_" in text
    # The call keys of one call share a slot; call records sit on more than one primary.
    tags = [tag for tag, _ in store_module.call_records(cluster.store)]
    assert len({node_of(redis_cluster, call_key(t)) for t in tags}) >= 2
    # Nothing crashed on the way (MOVED, a script refused in a pipeline...).
    assert {state for state, _pid in cluster.processes().values()} == {"RUNNING"}
    assert "Traceback" not in cluster.log_tail(lines=100_000)
