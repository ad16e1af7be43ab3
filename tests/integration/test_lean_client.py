"""The client every process gets for one Redis server (cluster/leanclient.py) on a real
redis-server: what it sends is what redis-py would send, replies keep redis-py's types and
error classes, and a connection that went bad is never read from again."""

from __future__ import annotations

import threading
import time

import gevent
import pytest
import redis

from cluster import redisclient
from cluster.leanclient import Batch, LeanRedis, pack_commands
from workers.sip.worker import coalescing


class Text(str):
    pass


class Count(int):
    pass


PACKED = [
    ("SET", "k", b"v\x00\xff\r\n", "é", 1, -3, 2.5, 1e20, float("inf"), 1796642117.38792),
    ("ZADD", "timers:{1}", 0.1, "member|x"),
    ("PING",),
    ("SET", Text("k"), Count(7), memoryview(b"view"), bytearray(b"array")),  # and views
    ("SCRIPT LOAD", "return 1"),  # a command name of two words
    (b"XGROUP CREATE", "s", "g", "$", "MKSTREAM"),
]


def test_commands_are_packed_as_redis_py_packs_them():
    assert pack_commands(PACKED) == b"".join(redis.Connection().pack_commands(PACKED))


@pytest.mark.parametrize("value", [True, None, [1], {"a": 1}, 2j])
def test_what_redis_py_refuses_to_send_is_refused(value):
    with pytest.raises(redis.DataError):
        redis.Connection().pack_commands([("SET", "k", value)])
    with pytest.raises(redis.DataError):
        pack_commands([("SET", "k", value)])


@pytest.fixture
def client(redis_url):
    made = redisclient.connect(redis_url, timeout=0.25)
    assert isinstance(made, LeanRedis)
    yield made
    made.close()


# Each row: a command method and its arguments, run in this order on both clients.
ROWS = [
    ("set", ("k", b"v")), ("get", ("k",)), ("get", ("nothing",)), ("expire", ("k", 100)),
    ("ttl", ("k",)), ("exists", ("k", "nothing")), ("hset", ("h",), {"mapping": {"a": "1"}}),
    ("hgetall", ("h",)), ("hmget", ("h", "a", "b")), ("zadd", ("z", {"m": 1.5})),
    ("zrange", ("z", 0, -1), {"withscores": True}), ("zrangebyscore", ("z", "-inf", "+inf")),
    ("rpush", ("l", "a", "b")), ("lrange", ("l", 0, -1)), ("delete", ("l",)),
    ("xadd", ("s", {"f": "v"}), {"id": "1-1"}), ("xrange", ("s",)), ("incrby", ("n", 5)),
    ("set", ("k", "v"), {"nx": True}), ("publish", ("channel", "hello")),
    ("script_load", ("return 1",)), ("xgroup_create", ("s", "g"), {"id": "0"}),
    ("xinfo_groups", ("s",)), ("config_get", ("maxmemory",)),
]


def replies_of(made) -> list:
    made.flushall()
    out = []
    for row in ROWS:
        name, args, options = (*row, {}) if len(row) == 2 else row
        out.append((name, getattr(made, name)(*args, **options)))
    return out


def test_replies_are_the_ones_redis_py_gives(client, redis_url):
    lean = replies_of(client)
    plain = redis.Redis.from_url(redis_url)
    try:
        assert lean == replies_of(plain)
    finally:
        plain.close()
    assert ("get", None) in lean and ("set", True) in lean  # not all alike by accident


def batch_replies_of(made) -> list:
    made.flushall()
    pipe = made.pipeline(transaction=False)
    for row in ROWS:
        name, args, options = (*row, {}) if len(row) == 2 else row
        getattr(pipe, name)(*args, **options)
    return pipe.execute()


def test_a_batch_replies_as_redis_pys_pipeline(client, redis_url):
    plain = redis.Redis.from_url(redis_url)
    try:
        assert batch_replies_of(client) == batch_replies_of(plain)
    finally:
        plain.close()
    assert batch_replies_of(client) == [reply for _, reply in replies_of(client)]


def test_a_batch_answers_every_command_in_order(client):
    pipe = client.pipeline(transaction=False)
    assert isinstance(pipe, Batch)
    pipe.set("a", "1")
    pipe.incr("a")
    pipe.lpush("a", "x")  # wrong type: an error reply, in its place
    pipe.get("a")
    assert len(pipe) == 4
    replies = pipe.execute(raise_on_error=False)
    assert replies[:2] == [True, 2]
    assert isinstance(replies[2], redis.ResponseError) and "WRONGTYPE" in str(replies[2])
    assert replies[3] == b"2"
    assert len(pipe) == 0  # emptied, as a pipeline is
    pipe.lpush("a", "x")
    with pytest.raises(redis.ResponseError):
        pipe.execute()
    assert client.get("a") == b"2"  # the connection is still in step


def test_a_transaction_is_still_redis_pys(client):
    with client.pipeline() as pipe:
        assert not isinstance(pipe, Batch)
        pipe.set("t", "1").incr("t")
        assert pipe.execute() == [True, 2]


def test_a_script_error_keeps_its_class(client):
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha("0" * 40, 0)
    assert client.ping() is True


def test_a_connection_the_server_closed_is_replaced_before_it_is_used(client, redis_url):
    assert client.ping() is True
    assert len(client.lane._idle) == 1  # kept for the next command
    killer = redis.Redis.from_url(redis_url)
    try:
        assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        killer.close()
    time.sleep(0.05)
    # No error: the closed connection is found out before the command is written.
    assert client.set("after", "kill") is True
    assert client.get("after") == b"kill"


# A script that holds the server for 600 ms, then answers "late".
BUSY_600_MS = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= 600000
return 'late'
"""


def test_a_timed_out_reply_is_never_read_as_the_next_one(client):
    with pytest.raises(redis.TimeoutError):
        client.eval(BUSY_600_MS, 0)
    assert client.lane._idle == []  # the connection in doubt was not kept
    time.sleep(0.7)
    assert client.set("x", "1") is True  # not the late "OK" of the sleep
    assert client.incr("x") == 2
    assert client.get("x") == b"2"


def test_threads_share_one_client(client):
    """A relay's loop and its writer thread use one store: no connection is used by two
    at once, and none is lost."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(300):
                pipe = client.pipeline(transaction=False)
                pipe.incr("shared").incr("shared")
                pipe.execute()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and client.get("shared") == b"2400"
    assert len(client.lane._idle) <= 4


@pytest.fixture
def shared(redis_url):
    """A client as the workers make it: greenlets of one turn share a write."""
    made = redisclient.connect(redis_url, timeout=0.25, wrap_lane=coalescing)
    yield made
    made.close()


def test_greenlets_of_one_turn_share_a_write_with_redis_pys_replies(shared, redis_url):
    shared.flushall()
    before = shared.info("stats")["total_reads_processed"]

    def work(n: int):
        pipe = shared.pipeline(transaction=False)
        pipe.set(f"k{n}", n).incr(f"k{n}").lpush(f"k{n}", "x").get(f"k{n}")
        return pipe.execute(raise_on_error=False), shared.incrby("sum", n)

    done = [gevent.spawn(work, n) for n in range(8)]
    gevent.joinall(done, raise_error=True)
    after = shared.info("stats")["total_reads_processed"]
    for n, greenlet in enumerate(done):
        replies, _total = greenlet.value
        assert replies[:2] == [True, n + 1] and replies[3] == str(n + 1).encode()
        assert isinstance(replies[2], redis.ResponseError) and "WRONGTYPE" in str(replies[2])
    assert sorted(total for _, total in (g.value for g in done))[-1] == sum(range(8))
    # 8 pipelines in one write, 8 INCRBYs in the next, and the INFO that read the figure:
    # reads of the server, so round trips (one more for the INFO before).
    assert after - before == 3
    assert (shared.lane.batches, shared.lane.callers) == (5, 19)  # with FLUSHALL, 2 INFO


def test_a_timed_out_batch_fails_every_caller_and_the_next_is_in_step(shared):
    shared.set("x", "1")
    slow = gevent.spawn(shared.eval, BUSY_600_MS, 0)
    quick = gevent.spawn(shared.get, "x")  # in the same write, behind the slow script
    gevent.joinall([slow, quick])
    assert isinstance(slow.exception, redis.TimeoutError)
    assert isinstance(quick.exception, redis.TimeoutError)
    time.sleep(0.7)
    assert shared.incr("x") == 2  # not the late replies of the batch in doubt
    assert shared.get("x") == b"2"
