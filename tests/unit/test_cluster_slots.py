"""Redis Cluster: every script and every multi-key command the store sends touches one slot.

The store runs here against a client that records what it would send (no Redis): for
representative AORs and call ids, each EVALSHA's KEYS and each command naming several keys
must hash (redis.crc.key_slot, Redis Cluster's CRC16 with hash tags) to one slot, which is
what a Redis Cluster demands (CROSSSLOT otherwise).  The key families of one call and of
one AOR share a slot too; the timer shards do not share one.
"""

from __future__ import annotations

import time

import pytest
import redis
from redis.client import Pipeline
from redis.crc import key_slot

from cluster import redisclient
from cluster import store as store_module
from cluster.clusterclient import routing_key
from cluster.store import Binding, Store
from workers.sip.b2bua import call_tag

# Commands whose every argument after the name is a key.
_ALL_KEYS = {"DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "WATCH", "SINTER", "SUNION"}
AORS = ["1002@127.0.0.1", "alice@example.com", "o'brien+x@sip.example.org", "a{b}c@x",
        "ünï@例え.jp"]
A_CALL_IDS = [b"0f6c1a8e-0a2b@10.0.0.1", b"abc", b"{weird}call@id", b"x" * 200]


def keys_of(args: tuple) -> list[str]:
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return [_text(k) for k in args[3:3 + int(args[2])]]
    if name in _ALL_KEYS:
        return [_text(k) for k in args[1:]]
    if name == "WAIT":
        return []
    return [_text(args[1])]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def slot(key: str) -> int:
    return key_slot(key.encode())


class Recorder(redis.Redis):
    """Records commands instead of sending them, and answers what the store expects."""

    def __init__(self):
        super().__init__()
        self.sent: list[tuple] = []

    def execute_command(self, *args, **options):
        self.sent.append(args)
        return answer(args)

    def pipeline(self, transaction=True, shard_hint=None):
        return RecordingPipeline(self)


class RecordingPipeline(Pipeline):
    def __init__(self, recorder: Recorder):
        super().__init__(None, {}, False, None)
        self.recorder = recorder

    def execute(self, raise_on_error=True):
        replies = []
        for args, _options in self.command_stack:
            self.recorder.sent.append(args)
            replies.append(answer(args))
        self.reset()
        return replies


def answer(args: tuple):
    name = str(args[0]).upper()
    if name == "EVALSHA":
        keys = keys_of(args)
        if keys[0].startswith("reg:"):
            return [b"ok", []]
        if keys[0].startswith("call:"):
            return int(args[-1])  # the new version
        if keys[0].startswith("timers:"):
            return [[], None]  # nothing claimed, the shard empty
        return 1
    if name == "XADD":
        return b"1-0"
    if name == "ZRANGE":
        return []
    if name in ("HGETALL",):
        return {}
    if name in ("HKEYS",):
        return []
    if name == "WAIT":
        return 1
    return 1


@pytest.fixture
def recorded(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(redisclient, "connect", lambda *a, **k: recorder)
    return Store("redis+cluster://127.0.0.1:7000"), recorder  # indexes off, as on a Cluster


def exercise(store: Store) -> None:
    """Every store function that runs a script or names several keys, for each id."""
    now = time.time()
    store.replica_wait = (1, 100)
    for aor in AORS:
        binding = Binding("k", b"sip:x@127.0.0.1", now + 60, "cid", 1, ("127.0.0.1", 5060), "h")
        store.register(aor, store_module.tx_key(aor, "z9hG4bK-1"), now=now, nonce="n0nce",
                       nc=1, nonce_ttl=30, tx_ttl=30, max_contacts=5, call_id="cid", cseq=1,
                       set_bindings=[binding], remove_keys=["old"], star=False)
        store.accept_nonce_count(aor, "n0nce", 2, 30, "tx")
        store.drop_binding(aor, "k", b"packed")
        user, realm = aor.split("@")
        store.delete_user(user, realm)
    for a_call_id in A_CALL_IDS:
        tag = call_tag(a_call_id)
        arm = [(tag, "B", now), (tag, "timeout", now + 30)]
        store.save_call(tag, 0, {"state": "trying"}, 60, arm=arm)
        store.relay_refresh_sessions("h/relay-0",
                                     [(tag, {"relay": "h/relay-0", "version": 1}, 60)])
        store.relay_report_event({"event": "media-timeout", "call_id": tag},
                                 [(tag, {"relay": "h/relay-0", "version": 2}, 60)],
                                 "h/relay-0")
    store.claim_due_timers(now)


def test_every_script_and_multi_key_command_touches_one_slot(recorded):
    store, recorder = recorded
    exercise(store)
    checked = 0
    for args in recorder.sent:
        keys = keys_of(args)
        name = str(args[0]).upper()
        if name in ("EVALSHA", "EVAL") or len(keys) > 1:
            assert keys, args
            assert len({slot(k) for k in keys}) == 1, (name, keys, [slot(k) for k in keys])
            checked += 1
    # Each kind was seen: register, nonce-count, drop, CAS, refresh, pop, multi-key DEL.
    scripts = {keys_of(a)[0].split(":")[0] for a in recorder.sent
               if str(a[0]).upper() == "EVALSHA"}
    assert scripts == {"reg", "nc", "call", "relay", "timers"}, scripts
    assert any(str(a[0]).upper() == "DEL" and len(a) > 2 for a in recorder.sent)
    # Per AOR: REGISTER, nonce-count, drop, DEL; per call: CAS, refresh, report; per shard: pop.
    assert checked == 4 * len(AORS) + 3 * len(A_CALL_IDS) + store_module.TIMER_SHARDS


def test_a_wait_is_routed_with_the_write_before_it(recorded):
    store, recorder = recorded
    store.replica_wait = (1, 100)
    store.save_call("t" * 24, 0, {}, 60, arm=[("u" * 24, "A", 1.0)])
    sent = [a for a in recorder.sent]
    assert [str(a[0]).upper() for a in sent] == ["ZADD", "EVALSHA", "WAIT"]
    assert routing_key(sent[2]) is None and keys_of(sent[1]) == ["call:{" + "t" * 24 + "}"]


def test_a_pipelined_stream_read_is_routed_by_its_stream_not_its_group():
    """XREADGROUP names the group first, the stream after STREAMS (redis-py sends bytes)."""
    pipe = redis.Redis().pipeline(transaction=False)
    pipe.xreadgroup("b2bua", "w1", {store_module.RELAY_EVENTS_STREAMS[2]: ">"}, count=5)
    pipe.xautoclaim(store_module.RELAY_EVENTS_STREAMS[1], "b2bua", "w1", 100)
    pipe.xack(store_module.RELAY_EVENTS_STREAMS[0], "b2bua", "1-0")
    assert [routing_key(args) for args, _options in pipe.command_stack] == [
        store_module.RELAY_EVENTS_STREAMS[2], store_module.RELAY_EVENTS_STREAMS[1],
        store_module.RELAY_EVENTS_STREAMS[0]]


@pytest.mark.parametrize("aor", AORS)
def test_the_keys_of_one_aor_share_a_slot(aor):
    keys = [store_module.user_key(aor), store_module.reg_key(aor), store_module.ping_key(aor),
            store_module.nc_key(aor, "nonce"), store_module.tx_key(aor, "z9hG4bK.1"),
            store_module.authuser_key(aor), store_module.authlock_key(aor)]
    assert len({slot(k) for k in keys}) == 1, keys


@pytest.mark.parametrize("a_call_id", A_CALL_IDS)
def test_the_keys_of_one_call_share_a_slot(a_call_id):
    tag = call_tag(a_call_id)
    b_leg = f"sc{slot(store_module.call_key(tag))}.{tag}.1".encode()
    assert call_tag(b_leg) == tag  # both legs' messages find the same call
    keys = [store_module.call_key(tag), store_module.trace_key(tag),
            store_module.tx_key(tag, "z9hG4bK-a"), store_module.tx_key(tag, "z9hG4bK-b INVITE"),
            store_module.relay_session_key(tag)]
    assert len({slot(k) for k in keys}) == 1, keys


def test_the_timer_shards_sit_in_different_slots_spread_over_the_slot_space():
    slots = sorted(slot(store_module.timer_key(s)) for s in range(store_module.TIMER_SHARDS))
    assert len(set(slots)) == store_module.TIMER_SHARDS
    # An evenly split 3-primary cluster (0-5460, 5461-10922, 10923-16383) gets every third.
    thirds = {s * 3 // 16384 for s in slots}
    assert thirds == {0, 1, 2}, slots


def test_each_stream_shard_sits_in_its_own_third_of_the_slot_space():
    """The CDR and media-event shards: one per primary of an evenly split 3-primary cluster
    (0-5460, 5461-10922, 10923-16383); one call's CDR and events share a shard."""
    for keys in (store_module.CDR_STREAMS, store_module.RELAY_EVENTS_STREAMS):
        slots = [slot(k) for k in keys]
        assert slots == [13206, 9143, 5076], (keys, slots)
        assert sorted(s * 3 // 16384 for s in slots) == [0, 1, 2]
    assert [slot(store_module.cdr_key(k)) for k in range(store_module.STREAM_SHARDS)] == \
        [slot(store_module.relay_events_key(k)) for k in range(store_module.STREAM_SHARDS)]


def test_the_stream_shard_of_a_call_is_stable_and_the_shards_fill_evenly():
    shards = [store_module.stream_shard(f"call-{n}@192.0.2.1") for n in range(3000)]
    assert shards == [store_module.stream_shard(f"call-{n}@192.0.2.1") for n in range(3000)]
    counts = [shards.count(k) for k in range(store_module.STREAM_SHARDS)]
    assert min(counts) > 900, counts  # 1000 each when even


def test_the_global_keys_do_not_all_sit_on_one_primary():
    """The hang-up stream, the relay table, the timer shards and the stream shards are one key
    (one slot) each; an evenly split 3-primary cluster serves each third of them from
    another node."""
    globals_ = [store_module.HANGUP_STREAM, store_module.RELAY_NODES_KEY,
                *store_module.CDR_STREAMS, *store_module.RELAY_EVENTS_STREAMS,
                *(store_module.timer_key(s) for s in range(store_module.TIMER_SHARDS))]
    thirds = {}
    for key in globals_:
        thirds.setdefault(slot(key) * 3 // 16384, []).append(key)
    assert sorted(thirds) == [0, 1, 2], thirds
    assert [len(thirds[third]) for third in (0, 1, 2)] == [4, 4, 4], thirds
