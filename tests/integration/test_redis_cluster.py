"""The cluster on a Redis Cluster: 6 nodes (3 primaries, 3 replicas) on loopback ports.

``redis.url`` is ``redis+cluster://`` naming two of the primaries.  The store's operations
(scripts, pipelines that hold scripts and WAIT, streams and consumer groups, pub/sub,
scans) run against it directly; then a relay-mode cluster (two workers, one relay) takes
20 REGISTERs with digest, 6 calls between RTP phones (media through the relay both ways,
BYE, one CDR each), and every sipctl listing and the metrics endpoint read across the
three primaries.
"""

from __future__ import annotations

import contextlib
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
from cluster.store import (
    CDR_LEGACY,
    CDR_STREAMS,
    RELAY_EVENTS_LEGACY,
    RELAY_EVENTS_STREAMS,
    STREAM_SHARDS,
    Binding,
    Store,
    StoreUnavailable,
    call_key,
    cdr_position,
    stream_shard,
    timer_key,
    tx_key,
)

PASSWORD = "1234"
REGISTERING = [str(user) for user in range(3100, 3120)]  # 20 REGISTERs
CALLING = [(str(3120 + 2 * i), str(3121 + 2 * i)) for i in range(6)]  # 6 calls
HUNG_UP = ("3140", "3141")  # a call the operator ends
LIVE = [("3142", "3143"), ("3144", "3145"), ("3146", "3147")]  # 3 calls up at once
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
    popped = store.claim_due_timers(time.time()).due
    assert sorted((t, n) for t, n, _ in popped) == sorted((t, n) for t, n, _ in arm)
    assert store.claim_due_timers(time.time()).due == []  # claimed: leased, not due again yet
    store.remove_timers(popped)  # seen by their calls: gone from every shard's node
    assert store.claim_due_timers(time.time() + 400) == ([], None)
    store.replica_wait, store.wait_counters = (1, 500), {"replica_wait_short": 0}
    newer = store.save_call(tag, version, {"state": "answered"}, 60)
    assert newer and store.wait_counters == {"replica_wait_short": 0}
    store.replica_wait = (0, 0)

    # Answers cached under the call's tag, a trace, a CDR.
    store.store_answers([(tx_key(tag, "z9hG4bK1"), b"SIP/2.0 200 OK\r\n\r\n", 30)])
    assert store.stored_answer(tx_key(tag, "z9hG4bK1")) == b"SIP/2.0 200 OK\r\n\r\n"
    store.add_trace(tag, [{"first": "INVITE"}], 10, 60)
    assert store.trace(tag) == [{"first": "INVITE"}]
    assert any(t == tag for t, _ in store.call_records())

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
    store.relay_save_sessions(relay, sessions)
    refreshed = [(cid, {**rec, "version": 2}, ttl) for cid, rec, ttl in sessions]
    assert store.relay_refresh_sessions(relay, refreshed) == [1] * 12
    assert len(store.relay_owned_sessions(relay)) == 12
    event_id = store.relay_report_event({"event": "media-timeout",
                                         "call_id": "call-3"},
                                        [refreshed[3]], relay)
    events = store.read_media_events("rc-group", "rc-consumer")
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


def test_the_timer_and_stream_shards_sit_on_every_primary(redis_cluster):  # noqa: F811
    """Where the cluster itself (CLUSTER KEYSLOT, CLUSTER SLOTS) puts the shards: the 3 CDR
    and the 3 media-event shards one per primary, the 4 timer shards on all 3 primaries
    (two share one: 4 keys, 3 nodes)."""
    client = redis_cluster.primaries()[0].client()
    try:
        for key in (*CDR_STREAMS, *RELAY_EVENTS_STREAMS,
                    *(timer_key(s) for s in range(store_module.TIMER_SHARDS))):
            assert client.execute_command("CLUSTER KEYSLOT", key) == key_slot(key.encode())
    finally:
        client.close()
    primaries = {node.port for node in redis_cluster.primaries()}
    assert len(primaries) == 3
    for shards in (CDR_STREAMS, RELAY_EVENTS_STREAMS):
        assert sorted(node_of(redis_cluster, key) for key in shards) == sorted(primaries)
    timer_nodes = [node_of(redis_cluster, timer_key(s))
                   for s in range(store_module.TIMER_SHARDS)]
    assert set(timer_nodes) == primaries
    assert sorted(timer_nodes.count(port) for port in primaries) == [1, 1, 2]


@pytest.fixture(params=["single", "cluster"])
def any_store(request):
    """A Store on one redis-server, then on the Redis Cluster (both emptied first)."""
    if request.param == "single":
        url = request.getfixturevalue("redis_url")
    else:
        cluster_set = request.getfixturevalue("redis_cluster")
        cluster_set.flushall()
        url = cluster_set.url
    store = Store(url, timeout=2.0)
    try:
        yield store
    finally:
        store.redis.close()


def test_cdrs_of_every_shard_and_of_the_old_single_stream_are_read_in_order(any_store):
    """CDRs written before the upgrade (the single ``cdr`` stream) are read as they were,
    with their ids; new ones land in all 3 shards; each is listed once, pages included."""
    store = any_store
    old = [store.redis.xadd(CDR_LEGACY, {"a_call_id": f"old-{n}", "caller": "1"}).decode()
           for n in range(2)]
    time.sleep(0.002)
    call_ids = [f"new-{n}@192.0.2.7" for n in range(12)]
    for call_id in call_ids:
        store.add_cdr({"a_call_id": call_id, "caller": "2"})
    cdrs = store.cdrs_after()
    assert [c["id"] for c in cdrs[:2]] == old  # the old ids, unchanged
    assert sorted(c["a_call_id"] for c in cdrs) == sorted(["old-0", "old-1", *call_ids])
    lengths = [store.redis.xlen(key) for key in CDR_STREAMS]
    assert lengths == [[stream_shard(c) for c in call_ids].count(k)
                       for k in range(STREAM_SHARDS)]
    assert min(lengths) >= 1 and sum(lengths) == 12
    paged, page = [], store.cdrs_after("0-0", 5)
    while page:
        paged += page
        page = store.cdrs_after(page[-1]["id"], 5)
    assert paged == cdrs
    assert [cdr_position(c["id"])[2] for c in cdrs[2:]] == \
        [stream_shard(c["a_call_id"]) for c in cdrs[2:]]


def test_media_events_of_every_shard_reach_the_group_once(any_store):
    """Events for 9 calls (all 3 shards) and one in the old single stream: read once by one
    consumer, claimed by another once stale, acknowledged; a shard deleted (its group with
    it) gets its group again at the next read."""
    store = any_store
    store.media_events_group("b2bua")
    store.media_events_group("b2bua")  # a second worker: fine
    call_ids = [f"event-{n}@192.0.2.7" for n in range(9)]
    posted = [store.relay_report_event({"event": "media-timeout", "call_id": c})
              for c in call_ids]
    assert {stream_shard(c) for c in call_ids} == {0, 1, 2}
    legacy = store.redis.xadd(RELAY_EVENTS_LEGACY, {"event": "media-timeout",
                                                    "call_id": "old"}).decode()
    read = store.read_media_events("b2bua", "w1")
    assert sorted(eid for eid, _ in read) == sorted([*posted, f"l/{legacy}"])
    assert sorted(e["call_id"] for _, e in read) == sorted([*call_ids, "old"])
    assert store.read_media_events("b2bua", "w1", block_ms=20) == []
    time.sleep(0.05)
    claimed = store.claim_stale_media_events("b2bua", "w2", min_idle_ms=20)
    assert sorted(eid for eid, _ in claimed) == sorted(eid for eid, _ in read)
    assert store.ack_media_events("b2bua", [eid for eid, _ in read]) == 10
    assert store.claim_stale_media_events("b2bua", "w2", min_idle_ms=0) == []
    # A blocking read waits on one shard per call: an event in any shard is seen by the
    # next read at the latest.
    late = store.relay_report_event({"event": "probe", "call_id": call_ids[2]})
    found = store.read_media_events("b2bua", "w1", block_ms=20)
    assert [eid for eid, _ in found] == [late]
    store.redis.delete(RELAY_EVENTS_STREAMS[1])  # its group goes with it
    in_shard_1 = next(c for c in call_ids if stream_shard(c) == 1)
    again = store.relay_report_event({"event": "probe", "call_id": in_shard_1})
    assert again.startswith("1/")
    assert [eid for eid, _ in store.read_media_events("b2bua", "w1")] == [again]


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
    armed = {(t, n) for t, n, _ in store.claim_due_timers(time.time() + 400).due}
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
        for user in [*REGISTERING, *(u for pair in CALLING + LIVE for u in pair), *HUNG_UP]:
            running.add_user(user, PASSWORD)
        yield running


def scrape(cluster) -> str:
    """The dispatcher's metrics page."""
    url = f"http://127.0.0.1:{cluster.config.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def test_twenty_registrations_with_digest(cluster):
    answers = []
    for user in REGISTERING:
        with UA(cluster.address, user=user) as ua:
            reply = ua.register(PASSWORD)
            answers.append(reply.status if reply is not None else 0)
    assert answers == [200] * 20, answers
    aors = {aor.split("@")[0] for aor in cluster.store.registered_aors()}
    assert set(REGISTERING) <= aors
    listed = cluster.sipctl_json("regs")
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
        shown = cluster.sipctl_json("call", call.caller.call_id)
        assert shown["call"] == call.tag and shown["state"] == "answered", shown
        done = cluster.sipctl("hangup", call.caller.call_id).stdout
        assert "ended" in done, done
        for phone in (call.caller, call.callee):
            bye = phone.wait_request("BYE")
            assert bye is not None and "NORMAL_CLEARING" in bye.header("Reason")
        cdr = wait_cdr(cluster, call.caller.call_id)
        assert cdr is not None and cdr["hangup_side"] == "operator", cdr


def test_plain_sipctl_calls_lists_the_live_calls_and_sipctl_cdr_each_cdr_once(
        cluster, redis_cluster):  # noqa: F811
    """3 calls up at once: ``sipctl calls`` (no --all) lists exactly them, ``sipctl stats``
    counts them answered; once they ended, neither does, and ``sipctl cdr`` lists every
    CDR of the test cluster once, as many as the shards hold, on more than one primary."""
    with contextlib.ExitStack() as stack:
        calls = [stack.enter_context(call_between(cluster, int(a), int(b))) for a, b in LIVE]
        listed = cluster.sipctl_json("calls")
        assert sorted(row["a_call_id"] for row in listed) == \
            sorted(call.caller.call_id for call in calls), listed
        assert {row["state"] for row in listed} == {"answered"}
        stats = cluster.sipctl_json("stats")
        assert stats["calls_by_state"]["answered"] == 3 and stats["active_calls"] == 3, stats
        assert 'sipcluster_active_calls{state="answered"} 3.0' in scrape(cluster)
        for call in calls:
            assert call.caller.hangup().status == 200
    live_ids = [call.caller.call_id for call in calls]
    for call_id in live_ids:
        assert wait_cdr(cluster, call_id) is not None, call_id
    assert cluster.sipctl_json("calls") == []
    assert cluster.sipctl_json("stats")["active_calls"] == 0
    cdrs = cluster.sipctl_json("cdr")
    ids = [c["id"] for c in cdrs]
    assert len(set(ids)) == len(ids)
    a_call_ids = [c["a_call_id"] for c in cdrs]
    assert len(set(a_call_ids)) == len(a_call_ids)  # one CDR per call
    assert set(live_ids) <= set(a_call_ids)
    lengths = {key: cluster.store.redis.xlen(key) for key in CDR_STREAMS}
    assert sum(lengths.values()) == len(cdrs)
    assert list(lengths.values()) == [[stream_shard(c) for c in a_call_ids].count(k)
                                      for k in range(STREAM_SHARDS)]
    holding = {node_of(redis_cluster, key) for key, n in lengths.items() if n}
    assert len(holding) == len({stream_shard(c) for c in a_call_ids}) >= 2, lengths
    assert [cdr_position(i) for i in ids] == sorted(cdr_position(i) for i in ids)


def test_sipctl_listings_and_metrics_read_every_primary(cluster, redis_cluster):  # noqa: F811
    users = cluster.sipctl_json("users", "list")
    assert len(users) == len(REGISTERING) + 2 * len(CALLING + LIVE) + len(HUNG_UP)
    listed = cluster.sipctl_json("cluster")
    roles = sorted(p["role"] for p in listed)
    assert roles.count("worker") == 2 and "dispatcher" in roles and "relay" in roles, listed
    stats = cluster.sipctl_json("stats")
    assert stats["registrations"]["aors"] >= len(REGISTERING), stats["registrations"]
    calls = cluster.sipctl_json("calls", "--all")
    callers = {row["caller"] for row in calls}
    assert {caller for caller, _ in CALLING} <= callers, calls
    cdrs = cluster.sipctl_json("cdr")
    assert sorted(c["caller"] for c in cdrs if c["caller"] in dict(CALLING)) == \
        sorted(dict(CALLING))
    assert "sipcluster_" in scrape(cluster)
    # The call keys of one call share a slot; call records sit on more than one primary.
    tags = [tag for tag, _ in cluster.store.call_records()]
    assert len({node_of(redis_cluster, call_key(t)) for t in tags}) >= 2
    # Nothing crashed on the way (MOVED, a script refused in a pipeline...).
    assert {state for state, _pid in cluster.processes().values()} == {"RUNNING"}
    assert "Traceback" not in cluster.log_tail(lines=100_000)
