"""Every Redis error class, injected into the store: "unavailable for now" becomes
StoreUnavailable (a 503 and a retry), a bug stays what it is; and a background loop's
Backoff logs once per streak and waits a bounded, growing time."""

from __future__ import annotations

import logging

import pytest
import redis
from redis import exceptions as rx
from redis._parsers.base import BaseParser

from cluster import store as st
from cluster.backoff import Backoff
from cluster.store import Store, StoreUnavailable


def reply_error(text: str) -> Exception:
    """The exception redis-py makes of an error reply, as the server sends it."""
    return BaseParser.parse_error(text)


def in_pipeline(exc: Exception) -> Exception:
    """The same error as a pipeline raises it (a copy, annotated with the command)."""
    copy = type(exc)(*exc.args)
    redis.Redis().pipeline(transaction=False).annotate_exception(
        copy, 2, ("EVALSHA", "abc", 1, "call:{x}"))
    assert "of pipeline caused error" in str(copy)
    return copy


UNAVAILABLE = [
    rx.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    rx.TimeoutError("Timeout reading from socket"),
    ConnectionResetError(104, "Connection reset by peer"),
    rx.MaxConnectionsError("Too many connections"),
    reply_error("LOADING Redis is loading the dataset in memory"),
    reply_error("READONLY You can't write against a read only replica."),
    reply_error("OOM command not allowed when used memory > 'maxmemory'."),
    reply_error("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to "
                "'no'."),
    reply_error("BUSY Redis is busy running a script. You can only call SCRIPT KILL or "
                "SHUTDOWN NOSAVE."),
    reply_error("MISCONF Redis is configured to save RDB snapshots, but it's currently "
                "unable to persist to disk."),
    reply_error("NOREPLICAS Not enough good replicas to write."),
    reply_error("MOVED 3999 127.0.0.1:6381"),
    reply_error("ASK 3999 127.0.0.1:6381"),
    reply_error("TRYAGAIN Multiple keys request during rehashing of slot"),
    reply_error("CLUSTERDOWN The cluster is down"),
    reply_error("NOAUTH Authentication required."),
    reply_error("WRONGPASS invalid username-password pair or user is disabled."),
    reply_error("NOPERM this user has no permissions to run the 'set' command"),
    reply_error("ERR invalid password"),
    reply_error("ERR max number of clients reached"),
    rx.InvalidResponse("Protocol Error: x"),
    # What RedisCluster raises itself (a failover, a cluster away, redirections exhausted).
    rx.SlotNotCoveredError('Slot "3999" not covered by the cluster. '
                           '"require_full_coverage=True"'),
    rx.RedisClusterException("Redis Cluster cannot be connected. Please provide at least "
                             "one reachable node: Error 111"),
    rx.ClusterError("TTL exhausted."),
]

BUGS = [
    reply_error("WRONGTYPE Operation against a key holding the wrong kind of value"),
    reply_error("ERR unknown command 'NOSUCH', with args beginning with: "),
    reply_error("ERR wrong number of arguments for 'set' command"),
    reply_error("BUSYGROUP Consumer Group name already exists"),
    reply_error("BUSYKEY Target key name already exists."),
    reply_error("ERR Error running script (call to f_abc): @user_script:1: bad"),
    reply_error("CROSSSLOT Keys in request don't hash to the same slot"),
    rx.DataError("Invalid input of type: 'dict'."),
    rx.RedisClusterException("DEL - all keys must map to the same key slot"),
]


class StubRedis:
    """A client whose every command raises the error it is given."""

    def __init__(self, exc: Exception):
        self.exc = exc
        self.calls = 0
        self.connection_pool = self
        self.disconnects = 0
        self.loaded: list[str] = []

    def raiser(self, *_args, **_kwargs):
        self.calls += 1
        raise self.exc

    get = set = hgetall = xadd = xreadgroup = xautoclaim = raiser

    def scan_iter(self, **_kwargs):
        self.calls += 1
        raise self.exc
        yield  # a generator, as redis-py's is

    def disconnect(self, inuse_connections: bool = True) -> None:
        # Only idle ones: one in use may be a pub/sub reader's, closed under its feet.
        assert not inuse_connections
        self.disconnects += 1

    def script_load(self, script: str) -> str:
        self.loaded.append(script)
        return "sha"


def stub_store(exc: Exception) -> tuple[Store, StubRedis]:
    store = Store("redis://127.0.0.1:1/0")  # connects lazily: nothing is reached
    stub = StubRedis(exc)
    store.redis = stub
    return store, stub


def ids(errors):
    return [type(e).__name__ + ":" + str(e)[:20] for e in errors]


@pytest.mark.parametrize("exc", UNAVAILABLE, ids=ids(UNAVAILABLE))
def test_unavailable_classes_become_store_unavailable(exc):
    store, stub = stub_store(exc)
    with pytest.raises(StoreUnavailable) as raised:
        store.get_user("alice", "example.com")
    assert raised.value.__cause__ is exc
    with pytest.raises(StoreUnavailable):
        store.list_users()  # through SCAN
    assert st.is_unavailable(exc)


REPLIES = [e for e in UNAVAILABLE if isinstance(e, redis.ResponseError)]


@pytest.mark.parametrize("exc", REPLIES, ids=ids(REPLIES))
def test_unavailable_replies_in_a_pipeline(exc):
    store, _ = stub_store(in_pipeline(exc))
    with pytest.raises(StoreUnavailable):
        store.get_user("alice", "example.com")


@pytest.mark.parametrize("exc", BUGS, ids=ids(BUGS))
def test_logic_errors_are_raised_as_they_are(exc):
    store, stub = stub_store(exc)
    with pytest.raises(type(exc)) as raised:
        store.get_user("alice", "example.com")
    assert raised.value is exc
    assert not isinstance(raised.value, StoreUnavailable)
    assert stub.disconnects == 0
    assert not st.is_unavailable(in_pipeline(exc))


def test_readonly_drops_every_connection():
    store, stub = stub_store(reply_error("READONLY You can't write against a read only "
                                         "replica."))
    with pytest.raises(StoreUnavailable):
        store.put_user("alice", "example.com", {"MD5": "x"})
    assert stub.disconnects == 1


def test_noscript_loads_every_script_again():
    store, stub = stub_store(reply_error("NOSCRIPT No matching script. Please use EVAL."))
    with pytest.raises(StoreUnavailable):
        store.get_user("alice", "example.com")
    assert len(stub.loaded) == 6  # register, nc, call CAS, drop binding, pop timers, relay
    assert "cmsgpack" in stub.loaded[0]


def test_nogroup_makes_the_group_anew_and_reads_again():
    nogroup = reply_error("NOGROUP No such key 'hangup' or consumer group 'workers' in "
                          "XREADGROUP with GROUP option")
    store, stub = stub_store(nogroup)
    made = []

    def xgroup_create(name, group, id, mkstream):  # noqa: A002 (redis-py's name)
        made.append((name, group, id, mkstream))
        stub.exc = None

    def xreadgroup(*_args, **_kwargs):
        if stub.exc is not None:
            raise stub.exc
        return [[b"hangup", [(b"1-0", {b"tag": b"t1", b"call_id": b"c"})]]]

    stub.xgroup_create, stub.xreadgroup = xgroup_create, xreadgroup
    requests = store.read_hangups("w1")
    assert made == [("hangup", "workers", "0", True)]
    assert requests == [("1-0", {"tag": "t1", "call_id": "c"})]
    assert st.is_nogroup(in_pipeline(reply_error("NOGROUP No such key 'hangup'")))


def test_backoff_logs_once_per_streak_and_is_bounded(caplog):
    backoff = Backoff(logging.getLogger("test"), "loop", first=0.1, limit=2.0)
    with caplog.at_level(logging.INFO, logger="test"):
        delays = [backoff.failed(StoreUnavailable("gone")) for _ in range(10)]
        backoff.failed(ValueError("a bug"))  # another kind of trouble is logged too
        backoff.ok()
        backoff.ok()
        again = backoff.failed(StoreUnavailable("gone"))
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert max(delays) == 2.0
    assert again == 0.1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unavailable" in m for m in messages) == 2
    assert sum("failed; retrying" in m for m in messages) == 1
    assert sum("resumed after 11 failed" in m for m in messages) == 1


class ShardDown:
    """A client whose XADD to one stream fails as a dead node's would."""

    def __init__(self, dead_stream: str) -> None:
        self.dead_stream = dead_stream
        self.added: list[str] = []

    def xadd(self, stream, fields, **kwargs):
        if stream == self.dead_stream:
            raise rx.ConnectionError("Error 111 connecting to 127.0.0.1:7002. Connection refused.")
        self.added.append(stream)
        return b"1-0"


@pytest.mark.parametrize("on_cluster", [True, False], ids=["cluster", "one-redis"])
def test_a_cdr_whose_shard_is_down_goes_to_the_next_shard_on_a_cluster(on_cluster):
    store = Store("redis://127.0.0.1:1/0")  # connects lazily: nothing is reached
    store.on_cluster = on_cluster
    call_id = "a-call@example.com"
    own = st.stream_shard(call_id)
    store.redis = client = ShardDown(st.cdr_key(own))
    record = {"a_call_id": call_id, "caller": "1002", "callee": "1009"}
    if not on_cluster:  # one server holds every shard: there is no other to try
        with pytest.raises(StoreUnavailable):
            store.add_cdr(record)
        assert client.added == []
        return
    store.add_cdr(record)
    assert client.added == [st.cdr_key((own + 1) % st.STREAM_SHARDS)]
    client.dead_stream = "none"
    store.add_cdr(record)  # its own shard again once it answers
    assert client.added[-1] == st.cdr_key(own)
