"""One contract for the store the registrar and the authenticator use, run against both
implementations: the real Store on a real redis-server and tests/memstore.py's
MemoryStore (the unit tests' stand-in).  Each test states one behaviour; a difference
between the two fails here, not in a shell's unit test.

Binding expiry is driven by the ``now`` the registrar passes, so it needs no waiting; key
TTLs run on Redis's clock, so those tests use short TTLs and wait (at most 1.2 s) on Redis
and move the memory store's clock instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from memstore import MemoryStore

from cluster.store import (
    STREAM_SHARDS,
    Binding,
    NonceAsk,
    Store,
    aor_of,
    cdr_position,
    pack,
    stream_shard,
    tx_key,
)

REALM = "example.com"
AOR = aor_of("1002", REALM)


class FakeClock:
    def __init__(self, start: float):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Env:
    store: Store | MemoryStore
    now: Callable[[], float]
    wait: Callable[[float], None]  # let this much key-TTL time pass


@pytest.fixture(params=["memory", "redis"])
def env(request):
    if request.param == "memory":
        clock = FakeClock(time.time())
        yield Env(MemoryStore(clock), clock, clock.advance)
        return
    store = Store(request.getfixturevalue("redis_url"))
    try:
        yield Env(store, time.time, time.sleep)
    finally:
        store.redis.close()


def binding(key: str, now: float, *, expires: float = 3600, call_id: str = "c1",
            cseq: int = 1) -> Binding:
    return Binding(key=key, contact=f"sip:{key}@192.0.2.1:5062".encode(),
                   expires_at=now + expires, call_id=call_id, cseq=cseq,
                   source=("192.0.2.1", 5062), host="h1", nat=True, q=0.5,
                   user_agent="phone/1", registered_at=now, params={"transport": "udp"})


_tx_seq = iter(range(1_000_000))


def register(env: Env, now: float, *, set_bindings=(), remove=(), star=False, call_id="c1",
             cseq=1, nonce=None, nc=None, max_contacts=3, tx=None, tx_ttl=32.0,
             nonce_ttl=300.0):
    tx = tx or tx_key(AOR, f"z9hG4bK{next(_tx_seq)}")
    return env.store.register(AOR, tx, now=now, nonce=nonce, nc=nc, nonce_ttl=nonce_ttl,
                              tx_ttl=tx_ttl, max_contacts=max_contacts, call_id=call_id,
                              cseq=cseq, set_bindings=list(set_bindings),
                              remove_keys=list(remove), star=star)


def keys(bindings) -> list[str]:
    return [b.key for b in bindings]


# ---------------------------------------------------------------- directory

def test_users_are_written_read_listed_and_deleted(env):
    store = env.store
    assert store.get_user("1002", REALM) is None and not store.has_users()
    store.put_user("1002", REALM, {"MD5": "a" * 32})
    store.put_user("1001", REALM, {"MD5": "b" * 32})
    store.put_user("1002", "other.org", {"MD5": "c" * 32})
    record = store.get_user("1002", REALM)
    assert (record["user"], record["realm"], record["ha1"]) == ("1002", REALM, {"MD5": "a" * 32})
    assert abs(record["created"] - env.now()) <= 2
    assert store.has_users()
    assert [(u["user"], u["realm"]) for u in store.list_users()] == [
        ("1001", REALM), ("1002", REALM), ("1002", "other.org")]
    assert [u["user"] for u in store.list_users("other.org")] == ["1002"]
    assert store.delete_user("1002", REALM) is True
    assert store.delete_user("1002", REALM) is False
    assert store.get_user("1002", REALM) is None
    assert store.get_user("1002", "other.org") is not None


def test_deleting_a_user_drops_its_bindings(env):
    now = env.now()
    env.store.put_user("1002", REALM, {"MD5": "a" * 32})
    assert register(env, now, set_bindings=[binding("a", now)]).outcome == "ok"
    assert env.store.delete_user("1002", REALM) is True
    assert env.store.bindings(AOR, now) == [] and env.store.raw_bindings(AOR) == {}
    assert env.store.registered_aors() == []


# ---------------------------------------------------------------- register

def test_a_registered_binding_comes_back_whole(env):
    now = env.now()
    sent = binding("a", now)
    result = register(env, now, set_bindings=[sent])
    assert result.outcome == "ok" and result.response is None
    [got] = result.bindings
    assert got == Binding.from_record(sent.to_record())  # expiry kept to the millisecond
    assert abs(got.expires_at - sent.expires_at) < 0.001
    assert env.store.bindings(AOR, now) == [got]
    assert list(env.store.raw_bindings(AOR)) == ["a"]
    assert env.store.registered_aors() == [AOR]


def test_bindings_are_listed_oldest_registration_first(env):
    now = env.now()
    register(env, now, set_bindings=[binding("b", now + 1)])
    result = register(env, now + 2, set_bindings=[binding("a", now + 2)], call_id="c2")
    assert keys(result.bindings) == ["b", "a"]
    assert keys(env.store.bindings(AOR, now + 2)) == ["b", "a"]


def test_a_refresh_replaces_the_binding(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now, expires=60)])
    result = register(env, now + 30, set_bindings=[binding("a", now + 30, cseq=2)], cseq=2)
    assert result.outcome == "ok"
    [got] = result.bindings
    assert got.cseq == 2 and abs(got.expires_at - (now + 3630)) < 0.001


def test_bindings_lapse_at_their_expiry_and_the_next_register_purges_them(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now, expires=60)])
    assert keys(env.store.bindings(AOR, now + 59)) == ["a"]
    assert env.store.bindings(AOR, now + 61) == []
    assert list(env.store.raw_bindings(AOR)) == ["a"]  # still stored until a REGISTER
    result = register(env, now + 61, set_bindings=[binding("b", now + 61)], call_id="c2")
    assert keys(result.bindings) == ["b"]
    assert list(env.store.raw_bindings(AOR)) == ["b"]


def test_expires_zero_removes_that_binding_only(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now), binding("b", now)])
    result = register(env, now + 1, remove=["a"], cseq=2)
    assert result.outcome == "ok" and keys(result.bindings) == ["b"]
    assert register(env, now + 2, remove=["b"], cseq=3).bindings == []
    assert env.store.raw_bindings(AOR) == {}
    assert env.store.registered_aors() == []


def test_removing_an_unknown_binding_is_no_error(env):
    now = env.now()
    result = register(env, now, remove=["nothing"])
    assert result.outcome == "ok" and result.bindings == []


def test_star_removes_every_binding(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now)])
    register(env, now, set_bindings=[binding("b", now, call_id="c2")], call_id="c2")
    result = register(env, now + 1, star=True, call_id="c3")
    assert result.outcome == "ok" and result.bindings == []
    assert env.store.bindings(AOR, now + 1) == [] and env.store.registered_aors() == []


def test_star_with_a_stale_cseq_is_refused_and_keeps_the_bindings(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now, cseq=5)], cseq=5)
    assert register(env, now + 1, star=True, cseq=5).outcome == "stale-cseq"
    assert keys(env.store.bindings(AOR, now + 1)) == ["a"]


def test_a_cseq_not_above_the_last_of_its_call_id_is_refused(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now, cseq=5)], cseq=5)
    for cseq in (4, 5):
        result = register(env, now + 1, set_bindings=[binding("a", now + 1, cseq=cseq)],
                          cseq=cseq)
        assert (result.outcome, result.bindings) == ("stale-cseq", [])
        assert register(env, now + 1, remove=["a"], cseq=cseq).outcome == "stale-cseq"
    assert env.store.bindings(AOR, now + 1)[0].cseq == 5
    # Another Call-ID (the phone restarted) starts its own count.
    other = register(env, now + 1, set_bindings=[binding("a", now + 1, call_id="c9")],
                     call_id="c9")
    assert other.outcome == "ok" and other.bindings[0].call_id == "c9"


def test_a_refused_register_records_neither_its_transaction_nor_its_count(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now, cseq=5)], cseq=5)
    tx = tx_key(AOR, "z9hG4bKrefused")
    assert register(env, now, set_bindings=[binding("a", now)], tx=tx, nonce="n",
                    nc=1).outcome == "stale-cseq"
    again = register(env, now, set_bindings=[binding("a", now, cseq=6)], cseq=6, tx=tx,
                     nonce="n", nc=1)
    assert again.outcome == "ok"


def test_too_many_contacts_are_refused_but_a_full_set_may_refresh(env):
    now = env.now()
    full = [binding(k, now) for k in "abc"]
    assert register(env, now, set_bindings=full).outcome == "ok"
    result = register(env, now, set_bindings=[binding("d", now)], cseq=2)
    assert (result.outcome, result.bindings) == ("too-many", [])
    # (bindings registered at the same moment come in no particular order)
    assert sorted(keys(env.store.bindings(AOR, now))) == ["a", "b", "c"]
    refreshed = register(env, now + 1, set_bindings=[binding(k, now + 1, cseq=3) for k in "abc"],
                         cseq=3)
    assert refreshed.outcome == "ok" and len(refreshed.bindings) == 3
    # Replacing one within the same request fits.
    swap = register(env, now + 2, set_bindings=[binding("d", now + 2, cseq=4)], remove=["a"],
                    cseq=4)
    assert swap.outcome == "ok" and sorted(keys(swap.bindings)) == ["b", "c", "d"]


def test_a_refused_register_changes_nothing(env):
    # Every check comes before the first write: neither the removal it asked for before a
    # too-many (or before a stale CSeq further on), nor the purge of an expired binding,
    # nor the AORs index.
    now = env.now()
    register(env, now, set_bindings=[binding("a", now), binding("x", now, expires=1)])
    register(env, now, set_bindings=[binding(k, now, call_id="c2", cseq=5) for k in "bc"],
             call_id="c2", cseq=5, max_contacts=4)
    before, aors = env.store.raw_bindings(AOR), env.store.registered_aors()
    later = now + 2  # "x" has expired
    too_many = register(env, later, set_bindings=[binding(k, later, cseq=2) for k in "de"],
                        remove=["a"], cseq=2, max_contacts=3)
    assert (too_many.outcome, too_many.bindings) == ("too-many", [])
    stale = register(env, later, set_bindings=[binding("b", later, call_id="c2", cseq=3)],
                     remove=["a"], call_id="c2", cseq=3)
    assert stale.outcome == "stale-cseq"
    star = register(env, later, star=True, call_id="c2", cseq=4)
    assert star.outcome == "stale-cseq"
    assert env.store.raw_bindings(AOR) == before
    assert env.store.registered_aors() == aors
    assert sorted(keys(env.store.bindings(AOR, later))) == ["a", "b", "c"]


def test_a_retransmission_is_a_dup_answered_once_its_answer_is_stored(env):
    now = env.now()
    tx = tx_key(AOR, "z9hG4bKretx")
    assert register(env, now, set_bindings=[binding("a", now)], tx=tx).outcome == "ok"
    dup = register(env, now, set_bindings=[binding("a", now)], tx=tx, nonce="n", nc=1)
    assert (dup.outcome, dup.response, dup.bindings) == ("dup", None, [])
    env.store.store_answers([(tx, b"SIP/2.0 200 OK\r\n\r\n", 32.0)])
    assert register(env, now, tx=tx).response == b"SIP/2.0 200 OK\r\n\r\n"


def test_a_transaction_is_forgotten_after_its_ttl(env):
    now = env.now()
    tx = tx_key(AOR, "z9hG4bKshort")
    register(env, now, set_bindings=[binding("a", now)], tx=tx, tx_ttl=0.2)
    assert register(env, now, tx=tx).outcome == "dup"
    env.wait(0.35)
    assert register(env, now, set_bindings=[binding("a", now, cseq=2)], cseq=2,
                    tx=tx).outcome == "ok"


def test_a_replayed_nonce_count_is_refused_and_a_higher_one_accepted(env):
    now = env.now()
    assert register(env, now, set_bindings=[binding("a", now)], nonce="n1", nc=1).outcome == "ok"
    for nc in (1, 0):
        result = register(env, now, set_bindings=[binding("a", now, cseq=2)], cseq=2,
                          nonce="n1", nc=nc)
        assert (result.outcome, result.bindings) == ("replay", [])
    assert register(env, now, set_bindings=[binding("a", now, cseq=2)], cseq=2, nonce="n1",
                    nc=2).outcome == "ok"
    # Counts are per nonce, and a request without a count is not checked.
    assert register(env, now, cseq=3, nonce="n2", nc=1).outcome == "ok"
    assert register(env, now, cseq=4, nonce="n1", nc=None).outcome == "ok"


def test_nonce_counts_are_forgotten_after_the_nonce_lifetime(env):
    now = env.now()
    register(env, now, nonce="n1", nc=1, nonce_ttl=0.2)
    assert register(env, now, cseq=2, nonce="n1", nc=1).outcome == "replay"
    env.wait(0.35)
    assert register(env, now, cseq=3, nonce="n1", nc=1).outcome == "ok"


# ---------------------------------------------------------------- nonce counts elsewhere

def test_accept_nonce_count_refuses_replays_but_not_retransmissions(env):
    store = env.store
    assert store.accept_nonce_count(AOR, "n", 1, 300, "tx:a") is True
    assert store.accept_nonce_count(AOR, "n", 1, 300, "tx:a") is True  # same transaction
    assert store.accept_nonce_count(AOR, "n", 1, 300, "tx:b") is False  # a replay
    assert store.accept_nonce_count(AOR, "n", 0, 300, "tx:a") is False
    assert store.accept_nonce_count(AOR, "n", 2, 300, "tx:b") is True
    assert store.accept_nonce_count(AOR, "n", 1, 300, "tx:a") is False  # superseded
    assert store.accept_nonce_count(AOR, "other", 1, 300, "tx:c") is True
    assert store.accept_nonce_count(AOR, "n", 2, 300, "tx:b c") is False  # tx compared whole


def test_a_count_a_register_used_is_not_accepted_again_outside_it(env):
    now = env.now()
    register(env, now, nonce="n", nc=3)
    assert env.store.accept_nonce_count(AOR, "n", 3, 300, "tx:any") is False
    assert env.store.accept_nonce_count(AOR, "n", 4, 300, "tx:any") is True
    assert register(env, now, cseq=2, nonce="n", nc=4).outcome == "replay"


# ---------------------------------------------------------------- answers and bindings

def test_stored_answers_lapse_after_their_ttl(env):
    env.store.store_answers([("tx:{a}:1", b"answer", 0.2), ("tx:{a}:2", b"kept", 30.0),
                             ("tx:{a}:3", b"", 30.0)])
    assert env.store.stored_answer("tx:{a}:1") == b"answer"
    assert env.store.stored_answer("tx:{a}:3") is None  # an empty answer is none
    assert env.store.stored_answer("tx:{a}:missing") is None
    env.wait(0.35)
    assert env.store.stored_answer("tx:{a}:1") is None
    assert env.store.stored_answer("tx:{a}:2") == b"kept"


def test_drop_binding_removes_only_the_binding_that_was_read(env):
    now = env.now()
    register(env, now, set_bindings=[binding("a", now), binding("b", now)])
    old = env.store.raw_bindings(AOR)
    register(env, now + 1, set_bindings=[binding("a", now + 1, cseq=2)], cseq=2)  # refreshed
    assert env.store.drop_binding(AOR, "a", old["a"]) is False
    assert env.store.drop_binding(AOR, "b", old["b"]) is True
    assert env.store.drop_binding(AOR, "b", old["b"]) is False
    assert keys(env.store.bindings(AOR, now + 1)) == ["a"]
    assert env.store.registered_aors() == [AOR]
    assert env.store.drop_binding(AOR, "a", env.store.raw_bindings(AOR)["a"]) is True
    assert env.store.registered_aors() == [] and env.store.raw_bindings(AOR) == {}


# ---------------------------------------------------------------- failure counting

def test_auth_failures_count_per_source_within_their_window(env):
    store = env.store
    assert store.auth_failures("192.0.2.7") == 0
    assert [store.note_auth_failure("192.0.2.7", 1) for _ in range(3)] == [1, 2, 3]
    assert store.note_auth_failure("192.0.2.8", 1) == 1
    assert store.auth_failures("192.0.2.7") == 3
    env.wait(1.2)  # the window (whole seconds) started at the first failure
    assert store.auth_failures("192.0.2.7") == 0
    assert store.note_auth_failure("192.0.2.7", 1) == 1


def test_a_user_is_locked_once_at_the_threshold(env):
    store = env.store
    assert [store.note_user_auth_failure(AOR, 600, 3, 300) for _ in range(2)] == [0.0, 0.0]
    assert store.user_locked(AOR) == 0.0
    assert store.note_user_auth_failure(AOR, 600, 3, 300) == 300.0
    assert store.note_user_auth_failure(AOR, 600, 3, 900) == 300.0  # not extended
    assert store.user_locked(AOR) == 300.0
    assert store.user_locked(aor_of("1001", REALM)) == 0.0


# ---------------------------------------------------------------- calls, timers, CDRs

CALL = "0123456789abcdef01234567"
RECORD = {"state": "trying", "a": {"call_id": "a@x", "cseq": 1}, "forks": [], "sdp": b"v=0"}


def test_a_call_is_written_only_at_the_version_it_was_read_at(env):
    store = env.store
    assert store.load_call(CALL) is None and store.call_version(CALL) == 0
    first = store.save_call(CALL, 0, RECORD, 60)
    assert first > 0 and store.load_call(CALL) == (first, RECORD)
    assert store.call_version(CALL) == first
    assert store.save_call(CALL, 0, {**RECORD, "state": "early"}, 60) is None  # exists now
    assert store.save_call(CALL, first + 1, {**RECORD, "state": "early"}, 60) is None
    second = store.save_call(CALL, first, {**RECORD, "state": "early"}, 60)
    assert second not in (None, first) and store.call_version(CALL) == second
    assert store.load_call(CALL) == (second, {**RECORD, "state": "early"})
    assert store.save_call(CALL, first, RECORD, 60) is None  # the version moved on


def test_a_call_record_given_packed_is_stored_as_those_bytes(env):
    """The worker packs a record once, for the write and for its cache's size."""
    packed = pack({**RECORD, "state": "ringing"})
    first = env.store.save_call(CALL, 0, RECORD, 60, packed=packed)
    assert env.store.load_call(CALL) == (first, {**RECORD, "state": "ringing"})


def test_a_call_record_lapses_after_its_ttl(env):
    env.store.save_call(CALL, 0, RECORD, 0.2)
    env.wait(0.35)
    assert env.store.load_call(CALL) is None and env.store.call_version(CALL) == 0
    assert env.store.save_call(CALL, 0, RECORD, 60) is not None


def test_timers_armed_with_a_write_are_claimed_when_due_as_a_lease(env):
    store, now = env.store, env.now()
    assert store.claim_due_timers(now) == ([], None)  # no timer at all
    version = store.save_call(CALL, 0, RECORD, 60,
                              arm=[(CALL, "B", now - 1.25), (CALL, "A", now + 100.5)])
    # claimed, and the next due is the claim's own lease end (earlier than A)
    assert store.claim_due_timers(now) == ([(CALL, "B", now - 1.25)], now + 3.0)
    assert store.claim_due_timers(now) == ([], now + 3.0)  # not due again within the lease
    assert store.claim_due_timers(now + 3.5, lease=3.0).due == [(CALL, "B", now - 1.25)]
    store.remove_timers([(CALL, "B", now - 1.25), (CALL, "missing", now)])
    assert store.claim_due_timers(now + 60) == ([], now + 100.5)  # A is the only one left
    # Armed before the compare-and-set, so armed even when the write loses.
    assert store.save_call(CALL, version + 1, RECORD, 60, arm=[(CALL, "C", now - 2.0)]) is None
    assert store.claim_due_timers(now).due == [(CALL, "C", now - 2.0)]
    assert store.claim_due_timers(now + 200).due == [(CALL, "C", now - 2.0),
                                                     (CALL, "A", now + 100.5)]


def test_one_claim_takes_the_due_timers_of_every_shard_and_tells_the_earliest_left(env):
    from cluster.store.schema import TIMER_SHARDS, timer_shard

    store, now = env.store, env.now()
    tags: dict[int, str] = {}  # a call in every shard
    for n in range(200):
        tags.setdefault(timer_shard(f"call-{n}"), f"call-{n}")
        if len(tags) == TIMER_SHARDS:
            break
    assert len(tags) == TIMER_SHARDS
    for shard, tag in tags.items():
        store.save_call(tag, 0, RECORD, 60, arm=[(tag, "due", now - 1.0 - shard),
                                                 (tag, "later", now + 50.0 + shard)])
    claim = store.claim_due_timers(now, lease=100.0)
    assert sorted(claim.due) == sorted((tag, "due", now - 1.0 - shard)
                                       for shard, tag in tags.items())
    assert claim.next_due == now + 50.0  # the earliest of all shards (shard 0's "later")
    claim = store.claim_due_timers(now + 60.0, lease=100.0)
    assert sorted(claim.due) == sorted((tag, "later", now + 50.0 + shard)
                                       for shard, tag in tags.items())
    assert claim.next_due == now + 100.0  # the first claim's leases end first


def test_timers_disarmed_with_a_write_are_gone_whether_it_wins_or_not(env):
    store, now = env.store, env.now()
    version = store.save_call(CALL, 0, RECORD, 60,
                              arm=[(CALL, "A", now - 1.5), (CALL, "B", now - 1.0),
                                   ("other", "C", now - 0.5)])
    won = store.save_call(CALL, version, RECORD, 60, disarm=[(CALL, "A", now - 1.5)])
    assert won not in (None, version)
    lost = store.save_call(CALL, version, RECORD, 60, disarm=[("other", "C", now - 0.5),
                                                              (CALL, "missing", now)])
    assert lost is None and store.load_call(CALL) == (won, RECORD)
    assert store.claim_due_timers(now).due == [(CALL, "B", now - 1.0)]


def test_a_call_and_its_kept_answer_are_read_together(env):
    store = env.store
    kept, other = tx_key(CALL, "s|b1|INVITE"), tx_key(CALL, "s|b2|INVITE")
    assert store.load_call_and_answer(CALL, kept) == (None, None, None, None, None)
    store.store_answers([(kept, b"SIP/2.0 100 Trying", 30)])
    version = store.save_call(CALL, 0, RECORD, 60)
    assert store.load_call_and_answer(CALL, kept) == ((version, RECORD), b"SIP/2.0 100 Trying",
                                                      None, None, None)
    assert store.load_call_and_answer(CALL, other)[1] is None
    assert store.load_call_and_answer(CALL, other, user=("1002", REALM)).user is None
    store.put_user("1002", REALM, {"MD5": "ha1"})
    arrival = store.load_call_and_answer(CALL, other, user=("1002", REALM))
    assert arrival.user == store.get_user("1002", REALM) and arrival.call == (version, RECORD)


def test_a_user_and_its_bindings_are_read_together(env):
    store, now = env.store, env.now()
    assert store.user_and_bindings("1002", REALM) == (None, [])
    store.put_user("1002", REALM, {"MD5": "ha1"})
    user, bindings = store.user_and_bindings("1002", REALM)
    assert user["ha1"] == {"MD5": "ha1"} and bindings == []
    register(env, now, set_bindings=[binding("k1", now), binding("k2", now, expires=-1)])
    user, bindings = store.user_and_bindings("1002", REALM, now)
    assert keys(bindings) == ["k1"]  # the lapsed one left out
    assert bindings == store.bindings(AOR, now)


def test_a_nonce_count_is_checked_with_the_callee_read_in_its_round_trip(env):
    store, now = env.store, env.now()
    caller = aor_of("1001", REALM)
    assert store.nonce_count_and_user(caller, "n1", 1, 300, "tx1", "1002", REALM) == (
        True, None, [])
    store.put_user("1002", REALM, {"MD5": "ha1"})
    register(env, now, set_bindings=[binding("k1", now)])
    accepted, user, bindings = store.nonce_count_and_user(caller, "n1", 2, 300, "tx2",
                                                          "1002", REALM, now)
    assert accepted and user["ha1"] == {"MD5": "ha1"} and keys(bindings) == ["k1"]
    # A replayed count is refused; the callee is read all the same.
    accepted, user, bindings = store.nonce_count_and_user(caller, "n1", 2, 300, "tx3",
                                                          "1002", REALM, now)
    assert not accepted and user is not None and keys(bindings) == ["k1"]
    assert store.nonce_count_and_user(caller, "n1", 2, 300, "tx2", "1002", REALM, now)[0]


def test_a_nonce_count_and_its_callee_ride_with_the_call_read(env):
    """A caller whose credentials the worker checked on its own cache: the count and the
    callee come in the round trip that reads the call, as ``nonce_count_and_user``."""
    store, now = env.store, env.now()
    kept = tx_key(CALL, "s|b1|INVITE")
    store.put_user("1002", REALM, {"MD5": "ha1"})
    register(env, now, set_bindings=[binding("k1", now)])
    ask = NonceAsk(aor_of("1001", REALM), "n7", 1, 300, "tx1", "1002", REALM)
    arrival = store.load_call_and_answer(CALL, kept, nonce=ask)
    accepted, user, bindings = arrival.nonce
    assert arrival.call is None and arrival.answer is None
    assert accepted and user["ha1"] == {"MD5": "ha1"} and keys(bindings) == ["k1"]
    assert store.load_call_and_answer(CALL, kept, nonce=ask).nonce[0]  # its retransmission
    assert not store.load_call_and_answer(CALL, kept, nonce=ask._replace(tx="tx2")).nonce[0]
    assert store.load_call_and_answer(CALL, kept, user=("1002", REALM),
                                      nonce=ask._replace(nc=2)).user["ha1"] == {"MD5": "ha1"}
    assert store.load_call_and_answer(CALL, kept).nonce is None


def test_cdrs_are_appended_as_text_in_order(env):
    env.store.add_cdr({"caller": "1002", "duration": 3, "answer": None, "billsec": 1.5})
    env.store.add_cdr({"caller": "1001"})
    first, second = env.store.cdrs_after()
    assert {k: v for k, v in first.items() if k != "id"} == {
        "caller": "1002", "duration": "3", "answer": "", "billsec": "1.5"}
    assert {k: v for k, v in second.items() if k != "id"} == {"caller": "1001"}
    ids = [tuple(map(int, c["id"].split("-"))) for c in (first, second)]
    assert ids[0] < ids[1]
    assert env.store.cdrs_after(first["id"]) == [second]
    assert env.store.cdrs_after(second["id"]) == []


def test_cdrs_of_many_calls_spread_over_every_shard_and_are_read_once_each_in_order(env):
    """30 calls' CDRs, 2 ms apart: each in the shard of its A-leg Call-ID, listed in the
    order written (time order across the shards), each once."""
    call_ids = [f"shard-{n}@192.0.2.1" for n in range(30)]
    for call_id in call_ids:
        env.store.add_cdr({"a_call_id": call_id, "caller": "1002"})
        env.wait(0.002)
    cdrs = env.store.cdrs_after()
    assert [c["a_call_id"] for c in cdrs] == call_ids
    assert len({c["id"] for c in cdrs}) == 30
    shards = [cdr_position(c["id"])[2] for c in cdrs]
    assert shards == [stream_shard(call_id) for call_id in call_ids]
    assert [shards.count(k) for k in range(STREAM_SHARDS)] == [
        [stream_shard(c) for c in call_ids].count(k) for k in range(STREAM_SHARDS)]
    assert set(shards) == {0, 1, 2}
    # Read from any CDR on: exactly the ones after it.
    assert env.store.cdrs_after(cdrs[11]["id"]) == cdrs[12:]
    assert env.store.cdrs_after(cdrs[-1]["id"]) == []


def test_cdrs_written_in_one_millisecond_read_page_by_page_miss_none_and_repeat_none(env):
    """Written at once (many share a millisecond, so equal entry ids across the shards):
    pages of 4, each read after the last id of the page before, give the full list."""
    for n in range(40):
        env.store.add_cdr({"a_call_id": f"burst-{n}", "n": n})
    everything = env.store.cdrs_after()
    assert sorted(int(c["n"]) for c in everything) == list(range(40))
    positions = [cdr_position(c["id"]) for c in everything]
    assert positions == sorted(positions) and len(set(positions)) == 40
    paged, page = [], env.store.cdrs_after("0-0", 4)
    while page:
        assert len(page) <= 4
        paged += page
        page = env.store.cdrs_after(page[-1]["id"], 4)
    assert paged == everything
    # A time bound (a plain "<ms>-<seq>") takes every shard's CDRs after that moment.
    first_ms = positions[0][0]
    assert env.store.cdrs_after(f"{first_ms - 1}-{2**64 - 1}") == everything
    assert [c for c in env.store.cdrs_after(f"{first_ms}-{2**64 - 1}")] == \
        [c for c, p in zip(everything, positions, strict=True) if p[0] > first_ms]
