"""A Redis blip costs no request; a longer outage is answered 503 (workers.outage_hold).

A request that meets Redis trouble is left unanswered while its first copy failed
less than ``outage_hold`` seconds ago: its sender repeats it, and the copy that
finds Redis back is carried out.  Past the hold it gets 503 with Retry-After.  The
client here repeats its REGISTER like a phone (RFC 3261 Timer E: 0.5, 1, 2, 4, 4 s).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from harness import Cluster, running_cluster
from sipua import UA, Reply

from conftest import RedisServer, free_tcp_port, require_redis_server

PASSWORD = "1234"
HOLD = 2.0  # seconds: workers.outage_hold of this module's cluster
USER = "3201"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RedisServer]:
    require_redis_server()
    own = RedisServer(tmp_path_factory.mktemp("redis-blip-redis"), port=free_tcp_port())
    own.start()
    try:
        yield own
    finally:
        os.kill(own.process.pid, signal.SIGCONT)
        own.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, server) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("redis-blip"), server.url, workers=2,
                         settings={"workers": {"outage_hold": HOLD}}) as running:
        running.add_user(USER, PASSWORD)
        yield running


def pause(server: RedisServer, seconds: float) -> threading.Thread:
    """SIGSTOP redis-server now and SIGCONT it ``seconds`` later (in the background)."""
    os.kill(server.process.pid, signal.SIGSTOP)

    def resume():
        time.sleep(seconds)
        os.kill(server.process.pid, signal.SIGCONT)

    thread = threading.Thread(target=resume, daemon=True)
    thread.start()
    return thread


def send_like_a_phone(ua: UA, data: bytes, limit: float = 16.0) -> tuple[Reply | None, float]:
    """Send ``data`` and repeat it on Timer E until a final answer: (answer, seconds)."""
    started = time.monotonic()
    interval = 0.5
    ua.send(data)
    while (elapsed := time.monotonic() - started) < limit:
        reply = ua.receive(timeout=interval)
        if reply is not None:
            return reply, time.monotonic() - started
        interval = min(interval * 2, 4.0)
        ua.send(data)
    return None, elapsed


def registration(ua: UA) -> bytes:
    """A REGISTER with credentials (the challenge is fetched first: it needs no Redis)."""
    headers = [f"Contact: <sip:{USER}@127.0.0.1:{ua.port}>", "Expires: 60"]
    ua.send(ua.request("REGISTER", "sip:127.0.0.1", headers))
    challenge = ua.receive()
    assert challenge is not None and challenge.status == 401, challenge
    ua.cseq += 1
    auth = ua.authorization(challenge, "REGISTER", "sip:127.0.0.1", PASSWORD)
    return ua.request("REGISTER", "sip:127.0.0.1", [*headers, f"Authorization: {auth}"])


def test_a_blip_shorter_than_the_hold_costs_no_request(cluster, server):
    with UA(cluster.address, user=USER) as ua:
        data = registration(ua)
        resumed = pause(server, 1.5)
        answer, took = send_like_a_phone(ua, data)
        resumed.join()
    assert answer is not None and answer.status == 200, answer  # registered, no 503
    assert took >= 1.0, took  # it did wait for Redis


def test_an_outage_longer_than_the_hold_is_answered_503_with_retry_after(cluster, server):
    with UA(cluster.address, user=USER) as ua:
        data = registration(ua)
        resumed = pause(server, 6.0)
        try:
            answer, took = send_like_a_phone(ua, data)
        finally:
            resumed.join()
        assert answer is not None and answer.status == 503, answer
        assert answer.header("Retry-After"), answer.raw
        assert HOLD <= took < HOLD + 4.5, took  # the first copy past the hold
        # And once Redis is back, the phone's next try goes through.
        ua.cseq += 1
        assert ua.register(PASSWORD, expires=60).status == 200
