"""OPTIONS pings to registered contacts: answered ones stay, silent ones are dropped."""

from __future__ import annotations

import threading
import time

import pytest
from harness import Cluster
from sipua import UA

pytestmark = pytest.mark.integration
INTERVAL = 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    redis_server.client().flushall()
    running = Cluster(tmp_path_factory.mktemp("pings"), redis_server.url,
                      settings={"registrar": {"ping_interval": INTERVAL}}).start()
    for user in ("1002", "1009"):
        running.add_user(user, "1234")
    try:
        yield running
    finally:
        running.stop()


def answer_pings(ua: UA, stop: threading.Event, seen: list) -> None:
    ua.sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, addr = ua.sock.recvfrom(65535)
        except TimeoutError:
            continue
        if not data.startswith(b"OPTIONS "):
            continue
        seen.append(data)
        lines = data.decode().split("\r\n")
        copied = [line for line in lines
                  if line.split(":")[0] in ("Via", "From", "Call-ID", "CSeq")]
        to = next(line for line in lines if line.startswith("To:")) + ";tag=pong"
        ua.sock.sendto("\r\n".join(["SIP/2.0 200 OK", *copied, to, "Content-Length: 0", "", ""])
                       .encode(), addr)


def test_answered_contact_stays_and_silent_contact_is_dropped(cluster):
    with UA(cluster.address, user="1002") as alive, UA(cluster.address, user="1009") as silent:
        assert alive.register("1234", expires=600).status == 200
        assert silent.register("1234", expires=600).status == 200
        stop, seen = threading.Event(), []
        answering = threading.Thread(target=answer_pings, args=(alive, stop, seen), daemon=True)
        answering.start()
        try:
            deadline = time.monotonic() + 10 * INTERVAL
            while cluster.store.bindings("1009@127.0.0.1") and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop.set()
            answering.join(timeout=2)
        assert cluster.store.bindings("1009@127.0.0.1") == []
        assert len(cluster.store.bindings("1002@127.0.0.1")) == 1
        assert len(seen) >= 3
        assert all(b"sip:1002@127.0.0.1:" in ping.split(b"\r\n")[0] for ping in seen)
