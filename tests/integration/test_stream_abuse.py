"""Abuse of the TLS listener: handshakes that never end, a flood of them, and what each
leaves behind in the dispatcher.

test_streams.py has the bad input inside a connection (a slowloris, 10 MB of header, a
Content-Length over the limit); here the handshake itself is the attack.  An unfinished
handshake counts as a message begun (cluster/streams.py): closed after
streams.message_timeout with one log line.  After each abuse, the dispatcher's open
descriptors return exactly to what they were, and its resident memory to within
RSS_SLACK_KB (for the flood, of what it was after a first flood: see there).
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time

import pytest
from calls_helpers import PASSWORD, provision
from harness import running_cluster, wait_for
from procstat import fd_count, rss_kb
from streamua import StreamUA, self_signed

from conftest import free_tcp_port

DB = 9  # this module's Redis database on the session's redis-server
USERS = range(3100, 3120)
MESSAGE_TIMEOUT = 2.0
MAX_PER_SOURCE = 32
FLOOD = 200
FLOOD_SOURCES = [f"127.0.2.{n}" for n in range(1, 11)]  # 20 connections from each
# The dispatcher's resident memory after an abuse, once its connections are closed, may
# stay above the baseline by this much: freed memory the allocator keeps for reuse
# rather than handing back.  Measured: 0 to 1.3 MB after 50 to 200 unfinished
# handshakes, levelling off at about 1 MB over 12 rounds of 50; one open TLS connection
# holds about 16 kB (bench/bench_tls.py), so 200 leaked would show as 3 MB or more.
# The first time 200 handshakes are under way at once the dispatcher grows by about
# 8 MB, kept by the allocator for the next time: the flood test's baseline is taken
# after a first flood, and the second must not add to it.
RSS_SLACK_KB = 2048
# A legitimate client's connect, handshake and registration during the flood must take
# at most this long.  Measured on 2 cores at load 6 to 7: 20 to 25 ms without the flood,
# 0.5 to 0.8 s with it (each of its ClientHellos costs the dispatcher about 2 ms of CPU,
# bench/bench_tls.py, and the phone's handshake waits its turn among them).
LEGITIMATE_SECONDS = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp("stream-abuse")
    cert, key = self_signed(folder)
    redis_server.client(db=DB).flushdb()
    settings = {"streams": {"tls_port": free_tcp_port(), "tls_cert": cert, "tls_key": key,
                            "message_timeout": MESSAGE_TIMEOUT,
                            "max_per_source": MAX_PER_SOURCE}}
    with running_cluster(folder, f"redis://127.0.0.1:{redis_server.port}/{DB}", workers=2,
                         settings=settings) as running:
        running.cert = cert
        provision(running, USERS)
        # Warm up: the first TLS connection, registration and unfinished handshake allocate
        # what later ones reuse, so the baselines below are not taken from a cold process.
        legitimate_registration(running, "3119")
        with half_hello(running):
            pass
        yield running


def tls_address(cluster) -> tuple[str, int]:
    return ("127.0.0.1", cluster.config.streams.tls_port)


def client_hello() -> bytes:
    """A real TLS ClientHello (as the ssl module's client writes it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16" and len(data) > 100  # a handshake record
    return data


def half_hello(cluster, bind: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(tls_address(cluster), timeout=5, source_address=(bind, 0))
    data = client_hello()
    sock.sendall(data[:len(data) // 2])
    return sock


def legitimate_registration(cluster, user: str) -> float:
    """Seconds a TLS phone takes to connect, shake hands and register (401, 200)."""
    started = time.monotonic()
    with StreamUA(tls_address(cluster), user=user, cafile=cluster.cert) as ua:
        contact = f"<sip:{user}@127.0.0.1:{ua.port};transport=tls>"
        reply = ua.register(PASSWORD, contacts=[contact])
        took = time.monotonic() - started
        assert reply is not None and reply.status == 200, reply
    return took


def closed_by_server(sock: socket.socket, timeout: float) -> tuple[float | None, int]:
    """Seconds until the server closes ``sock`` (None: still open after ``timeout``), and
    the bytes it wrote before (its part of the handshake), read and otherwise ignored."""
    started = time.monotonic()
    deadline = started + timeout
    received = 0
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None, received
        except ConnectionError:
            return time.monotonic() - started, received
        if not data:
            return time.monotonic() - started, received
        received += len(data)
    return None, received


def stream_figures(cluster) -> tuple[float, dict]:
    """When the dispatcher's heartbeat was written, and its stream counters
    (cluster/streams.py figures)."""
    (proc,) = cluster.store.processes("dispatcher")
    return (float(proc.get("seen", 0)),
            {k: v for k, v in proc.items() if k.startswith("streams_")})


def settled_figures(cluster) -> dict:
    """The counters once two heartbeats written after this call (one a second) agree and
    no TLS connection is open.  Two reads of one heartbeat are not two heartbeats: on a
    loaded machine a late heartbeat read twice gave a baseline from before the fixture's
    warm-up (CI: 6 connections counted for 4)."""
    since = time.time()
    last: dict | None = None
    last_seen = since

    def settled():
        nonlocal last, last_seen
        seen, now = stream_figures(cluster)
        if seen <= last_seen:  # no new heartbeat since the last look
            time.sleep(0.2)
            return False
        same = now == last and now.get("streams_open_tls", 0) == 0
        last, last_seen = now, seen
        return same
    assert wait_for(settled, 15), last
    return last


def grew(before: dict, after: dict, name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def dispatcher_state(cluster) -> tuple[int, int, int]:
    """(pid, open descriptors, resident kB) of the dispatcher, once its descriptors have
    stayed the same for half a second (no connection still closing)."""
    pid = cluster.pid_of("dispatcher")
    last, steady_since = fd_count(pid), time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() - steady_since < 0.5 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = fd_count(pid)
        if now != last:
            last, steady_since = now, time.monotonic()
    return pid, last, rss_kb(pid)


def assert_back_to_baseline(cluster, baseline: tuple[int, int, int]) -> tuple[int, int]:
    """Descriptors exactly as before (within 5 s), memory within RSS_SLACK_KB; the
    dispatcher is the same process.  The descriptors and kB now."""
    pid, fds, rss = baseline
    assert cluster.pid_of("dispatcher") == pid, "the dispatcher restarted"
    assert wait_for(lambda: fd_count(pid) == fds, 5), (
        f"the dispatcher holds {fd_count(pid)} descriptors, {fds} before")
    now_rss = rss_kb(pid)
    assert now_rss <= rss + RSS_SLACK_KB, f"RSS {rss} kB before, {now_rss} kB after"
    return fd_count(pid), now_rss


def log_size(cluster) -> int:
    return len(cluster.read_log("dispatcher"))


def closing_lines(cluster, ports: set[int], since: int) -> list[str]:
    """The dispatcher's log lines, past the first ``since`` characters, closing a
    connection from one of ``ports`` because its handshake did not finish in time."""
    pattern = re.compile(r"TLS connection \w+ from [\d.]+:(\d+) closed: handshake not "
                         r"complete within 2 s \(streams\.message_timeout\)")
    return [line for line in cluster.read_log("dispatcher")[since:].splitlines()
            if (m := pattern.search(line)) and int(m.group(1)) in ports]


def test_a_handshake_that_never_ends_is_closed_in_bounded_time(cluster):
    counted = settled_figures(cluster)
    baseline = dispatcher_state(cluster)
    logged = log_size(cluster)
    with StreamUA(tls_address(cluster), user="3100", cafile=cluster.cert) as bystander:
        assert bystander.options(timeout=3).status == 200
        # One connects and says nothing; one sends half a ClientHello and stops.
        opened = time.monotonic()
        silent = socket.create_connection(tls_address(cluster), timeout=5)
        half = half_hello(cluster)
        ports = {silent.getsockname()[1], half.getsockname()[1]}
        try:
            # Meanwhile the others carry on: the open connection, and a new phone.
            assert bystander.options(timeout=3).status == 200
            assert legitimate_registration(cluster, "3101") < LEGITIMATE_SECONDS
            assert time.monotonic() - opened < MESSAGE_TIMEOUT - 0.5, "not in the meantime"
            for sock in (silent, half):
                assert closed_by_server(sock, MESSAGE_TIMEOUT + 3)[0] is not None, \
                    "an unfinished handshake was left open"
                # Not before its time (the clock ticks a few times a second), nor long after.
                waited = time.monotonic() - opened
                assert MESSAGE_TIMEOUT - 0.3 <= waited <= MESSAGE_TIMEOUT + 3, waited
        finally:
            silent.close()
            half.close()
        assert bystander.options(timeout=3).status == 200
    assert wait_for(lambda: len(closing_lines(cluster, ports, logged)) == 2, 3), \
        cluster.read_log("dispatcher")[-2000:]
    assert_back_to_baseline(cluster, baseline)
    after = settled_figures(cluster)
    # The two, the bystander and the phone: four opened, four closed, two for their time.
    assert grew(counted, after, "streams_opened_tls") == 4
    assert grew(counted, after, "streams_closed_tls") == 4
    assert grew(counted, after, "streams_closed_slow") == 2


def handshake_flood(cluster, user: str) -> float:
    """200 connections, 20 from each of 10 addresses, each send a ClientHello and no
    more, while the phone ``user`` connects and registers over TLS: each costs the
    dispatcher its key share and a signature, the phone's handshake among them.  Every
    flood connection gets the server's part of the handshake (the work was done), then is
    closed by the server after message_timeout, with its log line.  The phone's seconds."""
    hellos = [client_hello() for _ in range(FLOOD)]
    flood: list[socket.socket] = []
    logged = log_size(cluster)

    def open_flood():
        for i, hello in enumerate(hellos):
            sock = socket.create_connection(tls_address(cluster), timeout=5,
                                            source_address=(FLOOD_SOURCES[i % 10], 0))
            flood.append(sock)
            sock.sendall(hello)
    try:
        sender = threading.Thread(target=open_flood)
        sender.start()
        try:
            during = legitimate_registration(cluster, user)
        finally:
            sender.join(10)
        assert len(flood) == FLOOD
        ends = [closed_by_server(sock, MESSAGE_TIMEOUT + 3) for sock in flood]
        assert not [e for e in ends if e[0] is None], "unfinished handshakes left open"
        unanswered = sum(1 for _, received in ends if not received)
        assert unanswered == 0, f"{unanswered} ClientHellos not answered before the timeout"
        ports = {sock.getsockname()[1] for sock in flood}
    finally:
        for sock in flood:
            sock.close()
    assert wait_for(lambda: len(closing_lines(cluster, ports, logged)) == FLOOD, 3)
    return during


def test_a_handshake_flood_does_not_hold_back_a_legitimate_client(cluster):
    normal = sorted(legitimate_registration(cluster, "3102") for _ in range(3))[1]
    before_any = dispatcher_state(cluster)
    # The first flood: the dispatcher's memory grows once to hold 200 handshakes at a
    # time (measured: about 8 MB), which the allocator keeps for the next.
    first = handshake_flood(cluster, "3103")
    counted = settled_figures(cluster)
    baseline = dispatcher_state(cluster)
    assert baseline[1] == before_any[1], "descriptors left over from the first flood"
    second = handshake_flood(cluster, "3104")
    print(f"legitimate TLS registration: {normal * 1000:.0f} ms without a flood, "
          f"{first * 1000:.0f} and {second * 1000:.0f} ms during the two floods")
    for during in (first, second):
        assert during < LEGITIMATE_SECONDS, (
            f"registration took {during:.2f} s during a flood ({normal:.3f} s without)")
    # The second flood leaves nothing behind: descriptors exact, memory within the slack
    # (200 connections leaked would be 3 MB or more).
    fds, rss = assert_back_to_baseline(cluster, baseline)
    print(f"dispatcher: {before_any[1]} descriptors and {before_any[2]} kB before the first "
          f"flood, {baseline[1]} and {baseline[2]} kB after it, {fds} and {rss} kB after "
          f"the second")
    after = settled_figures(cluster)
    assert grew(counted, after, "streams_opened_tls") == FLOOD + 1
    assert grew(counted, after, "streams_closed_slow") == FLOOD
    assert grew(counted, after, "streams_closed_tls") == FLOOD + 1
    # After it, a phone registers in its usual time again.
    assert legitimate_registration(cluster, "3105") < LEGITIMATE_SECONDS


def test_rounds_of_unfinished_handshakes_leave_nothing_behind(cluster):
    """Round after round of 50 half ClientHellos: no descriptor kept, and no memory
    growing round by round."""
    baseline = dispatcher_state(cluster)
    sizes = []
    for _ in range(4):
        socks = [half_hello(cluster, FLOOD_SOURCES[i % 10]) for i in range(50)]
        try:
            assert all(closed_by_server(s, MESSAGE_TIMEOUT + 3)[0] is not None for s in socks)
        finally:
            for sock in socks:
                sock.close()
        sizes.append(assert_back_to_baseline(cluster, baseline)[1])
    print(f"dispatcher RSS {baseline[2]} kB before, after each round: {sizes}")
