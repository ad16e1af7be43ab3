"""RTP relay processes against a real redis-server, driven through cluster/relayctl.py.

Two Python "phones" on loopback exchange RTP/RTCP through the ports that
offer/answer return.  Relays run as `python -m workers.relay`, configured from
the environment like supervisord does it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from harness import wait_for

from cluster import clusterauth
from cluster import store as st
from cluster.relayctl import RelayClient, RelayError, StreamSpec, control_key, decode, encode
from cluster.store import Store
from conftest import ROOT

# Below the kernel's ephemeral range, away from the demo deployment's 20000-29999 slices
# in use by a running cluster only when someone runs one.
PORT_MIN, PORT_MAX = 26000, 26999
HOST = "relay-test"
SECRET = "relay-test-secret"
KEY = control_key(SECRET)


def rtp(seq: int, ssrc: int = 0x11, payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, 8, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + payload


def rtcp(ssrc: int = 0x11) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


class Phone:
    """An RTP endpoint on 127.0.0.1 (or ::1): an RTP socket and an RTCP socket."""

    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.rtp = socket.socket(family, socket.SOCK_DGRAM)
        self.rtcp = socket.socket(family, socket.SOCK_DGRAM)
        for sock in (self.rtp, self.rtcp):
            sock.bind((host, 0))
            sock.settimeout(1.0)
        self.port = self.rtp.getsockname()[1]
        self.rtcp_port = self.rtcp.getsockname()[1]

    def spec(self, **kwargs) -> StreamSpec:
        return StreamSpec("audio", self.host, self.port, rtcp_port=self.rtcp_port, **kwargs)

    def close(self) -> None:
        self.rtp.close()
        self.rtcp.close()


def receive(sock: socket.socket, timeout: float = 1.0) -> tuple[bytes, tuple] | None:
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(2048)
    except TimeoutError:
        return None


def drain(sock: socket.socket) -> int:
    count = 0
    while receive(sock, 0.05) is not None:
        count += 1
    return count


@dataclass
class RelayProcs:
    redis_url: str
    env: dict = field(default_factory=dict)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start(self, index: int = 0, **settings: str) -> subprocess.Popen:
        env = {**os.environ, "REDIS_URL": self.redis_url, "SIPCLUSTER_RELAY_INDEX": str(index),
               "SIPCLUSTER_MEDIA_RTP_PORT_MIN": str(PORT_MIN),
               "SIPCLUSTER_MEDIA_RTP_PORT_MAX": str(PORT_MAX),
               "SIPCLUSTER_MEDIA_RELAYS": "2", "SIPCLUSTER_MEDIA_BIND": "127.0.0.1",
               "SIPCLUSTER_SIP_HOST_ID": HOST, "SIPCLUSTER_LOG_LEVEL": "INFO",
               "SIPCLUSTER_AUTH_SECRET": SECRET, **self.env}
        env.update({f"SIPCLUSTER_MEDIA_{k.upper()}": v for k, v in settings.items()})
        proc = subprocess.Popen([sys.executable, "-m", "workers.relay"], env=env, cwd=ROOT)
        self.procs[index] = proc
        return proc

    def kill(self, index: int) -> None:
        proc = self.procs.pop(index)
        proc.kill()
        proc.wait(timeout=5)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


@pytest.fixture
def relays(redis_url) -> Iterator[RelayProcs]:
    procs = RelayProcs(redis_url)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def store(redis_url) -> Iterator[Store]:
    store = Store(redis_url, timeout=1.0)
    yield store
    store.redis.close()


def wait_for_relays(client: RelayClient, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client._nodes_read = -1e9  # re-read relay:nodes now
        if len(client.relays()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} relay(s) did not announce themselves")


@pytest.fixture
def client(store) -> RelayClient:
    return RelayClient(store, host=HOST, key=KEY)


@pytest.fixture
def relay(relays, client) -> RelayProcs:
    relays.start(0, media_timeout="30")
    wait_for_relays(client, 1)
    return relays


def call(client: RelayClient, a: Phone, b: Phone, call_id: str = "call-1", **kwargs):
    to_b = client.offer(call_id, "a", [a.spec(**kwargs)])
    to_a = client.answer(call_id, "b", [b.spec(**kwargs)])
    return to_a.streams[0], to_b.streams[0]


@pytest.fixture
def phones() -> Iterator[tuple[Phone, Phone]]:
    a, b = Phone(), Phone()
    yield a, b
    a.close()
    b.close()


# --------------------------------------------------------------------------- forwarding


def test_rtp_and_rtcp_flow_both_ways_with_figures(relay, client, phones):
    a, b = phones
    to_a, to_b = call(client, a, b)
    assert to_a.address == to_b.address == "127.0.0.1"
    assert to_a.port % 2 == 0 and to_a.rtcp_port == to_a.port + 1 and to_a.port != to_b.port
    for seq in range(1, 6):
        a.rtp.sendto(rtp(seq), ("127.0.0.1", to_a.port))
        data, source = receive(b.rtp)
        assert data == rtp(seq) and source == ("127.0.0.1", to_b.port)  # from the relay port
        b.rtp.sendto(rtp(seq, ssrc=0x22), ("127.0.0.1", to_b.port))
        data, source = receive(a.rtp)
        assert data == rtp(seq, ssrc=0x22) and source == ("127.0.0.1", to_a.port)
    a.rtcp.sendto(rtcp(), ("127.0.0.1", to_a.rtcp_port))
    assert receive(b.rtcp) == (rtcp(), ("127.0.0.1", to_b.rtcp_port))
    b.rtcp.sendto(rtcp(0x22), ("127.0.0.1", to_b.rtcp_port))
    assert receive(a.rtcp) == (rtcp(0x22), ("127.0.0.1", to_a.rtcp_port))
    a.rtp.sendto(rtp(8), ("127.0.0.1", to_a.port))  # 6 and 7 lost
    assert receive(b.rtp) is not None

    figures = client.query("call-1")
    leg_a, leg_b = figures["legs"]
    stream_a = leg_a["streams"][0]
    assert stream_a["packets"] == 6 and stream_a["bytes"] == 6 * 172
    assert stream_a["lost"] == 2 and stream_a["gaps"] == 1
    assert stream_a["rtcp_packets"] == 1 and stream_a["dropped"] == 0
    assert stream_a["latched"] == ["127.0.0.1", a.port]
    assert stream_a["latched_rtcp"] == ["127.0.0.1", a.rtcp_port]
    assert stream_a["jitter_ms"] >= 0 and stream_a["last_packet"] == pytest.approx(time.time(),
                                                                                   abs=5)
    assert leg_b["streams"][0]["packets"] == 5 and leg_b["streams"][0]["lost"] == 0

    final = client.delete("call-1")
    assert final["legs"][0]["streams"][0]["packets"] == 6
    assert client.query("call-1") is None
    a.rtp.sendto(rtp(9), ("127.0.0.1", to_a.port))
    assert receive(b.rtp, 0.3) is None  # the ports are closed


def test_rtcp_mux_on_one_leg(relay, client, phones):
    a, b = phones
    to_b = client.offer("mux", "a", [a.spec(rtcp_mux=True)])
    assert to_b.streams[0].rtcp_mux  # offered on to b as a offered it
    to_a = client.answer("mux", "b", [b.spec(rtcp_mux=False)])
    assert to_a.streams[0].rtcp_mux  # the relay accepts a's mux whatever b does
    port_a, port_b = to_a.streams[0], to_b.streams[0]
    # a multiplexes: its RTCP goes to the RTP port and reaches b's RTCP socket
    a.rtp.sendto(rtp(1), ("127.0.0.1", port_a.port))
    assert receive(b.rtp)[0] == rtp(1)
    a.rtp.sendto(rtcp(), ("127.0.0.1", port_a.port))
    assert receive(b.rtcp) == (rtcp(), ("127.0.0.1", port_b.rtcp_port))
    # b does not: its RTCP reaches a on a's RTP socket, from the relay's RTP port
    b.rtcp.sendto(rtcp(0x22), ("127.0.0.1", port_b.rtcp_port))
    assert receive(a.rtp) == (rtcp(0x22), ("127.0.0.1", port_a.port))
    figures = client.query("mux")["legs"][0]["streams"][0]
    assert figures["packets"] == 1 and figures["rtcp_packets"] == 1  # RTCP kept out of RTP figures


def test_latching_follows_the_real_source_and_blocks_others(relay, client, phones):
    a, b = phones
    natted = Phone()  # a's packets really come from another port (a NAT), same IP
    intruder = Phone()
    try:
        to_a, to_b = call(client, a, b)
        # before a sends, b's packets go to a's SDP address
        b.rtp.sendto(rtp(1, ssrc=0x22), ("127.0.0.1", to_b.port))
        assert receive(a.rtp)[0] == rtp(1, ssrc=0x22)
        natted.rtp.sendto(rtp(1), ("127.0.0.1", to_a.port))
        assert receive(b.rtp)[0] == rtp(1)
        # latched: b's packets now go where a's came from
        b.rtp.sendto(rtp(2, ssrc=0x22), ("127.0.0.1", to_b.port))
        assert receive(natted.rtp)[0] == rtp(2, ssrc=0x22)
        assert receive(a.rtp, 0.2) is None
        # a third source (even a's SDP port) gets nothing through, and is counted
        intruder.rtp.sendto(rtp(99, ssrc=0x99), ("127.0.0.1", to_a.port))
        a.rtp.sendto(rtp(98, ssrc=0x98), ("127.0.0.1", to_a.port))
        assert receive(b.rtp, 0.3) is None
        stream = client.query("call-1")["legs"][0]["streams"][0]
        assert stream["dropped"] == 2 and stream["latched"] == ["127.0.0.1", natted.port]

        # a re-INVITE with the same address keeps ports and latching
        again = client.offer("call-1", "a", [a.spec()])
        assert again.streams[0].port == to_b.port
        intruder.rtp.sendto(rtp(97, ssrc=0x97), ("127.0.0.1", to_a.port))
        assert receive(b.rtp, 0.3) is None
        # signalling says a moved (new port): the relay latches again, same relay ports
        moved = client.offer("call-1", "a", [intruder.spec()])
        assert moved.streams[0].port == to_b.port
        assert client.answer("call-1", "b", [b.spec()]).streams[0].port == to_a.port
        intruder.rtp.sendto(rtp(3), ("127.0.0.1", to_a.port))
        assert receive(b.rtp)[0] == rtp(3)
        natted.rtp.sendto(rtp(4), ("127.0.0.1", to_a.port))
        assert receive(b.rtp, 0.3) is None
    finally:
        natted.close()
        intruder.close()


def test_latching_only_from_the_signalled_ip_unless_told_otherwise(relay, client, phones):
    a, b = phones
    # The SDP (or the B2BUA, from the SIP source) names another IP: 127.0.0.1 may not latch.
    client.offer("strict", "a", [a.spec(latch_ip="127.0.0.9")])
    to_a = client.answer("strict", "b", [b.spec()]).streams[0]
    a.rtp.sendto(rtp(1), ("127.0.0.1", to_a.port))
    assert receive(b.rtp, 0.3) is None
    assert client.query("strict")["legs"][0]["streams"][0]["latched"] is None
    client.offer("loose", "a", [a.spec(latch_ip="127.0.0.9")], latch_any=True)
    to_a = client.answer("loose", "b", [b.spec()]).streams[0]
    a.rtp.sendto(rtp(1), ("127.0.0.1", to_a.port))
    assert receive(b.rtp)[0] == rtp(1)


def test_hold_keeps_ports_and_latching(relay, client, phones):
    a, b = phones
    to_a, to_b = call(client, a, b)
    a.rtp.sendto(rtp(1), ("127.0.0.1", to_a.port))
    assert receive(b.rtp) is not None
    held = client.offer("call-1", "b", [StreamSpec("audio", "0.0.0.0", b.port)], hold=True)
    assert held.streams[0].port == to_a.port
    a.rtp.sendto(rtp(2), ("127.0.0.1", to_a.port))
    assert receive(b.rtp, 0.3) is None  # nothing is sent to a party on hold
    assert client.query("call-1")["hold"]
    resumed = client.offer("call-1", "b", [b.spec()])
    assert resumed.streams[0].port == to_a.port
    assert client.answer("call-1", "a", [a.spec()]).streams[0].port == to_b.port
    a.rtp.sendto(rtp(3), ("127.0.0.1", to_a.port))
    assert receive(b.rtp)[0] == rtp(3)
    assert not client.query("call-1")["hold"]


def test_ipv6_legs_and_audio_plus_video(relay, client):
    a, b = Phone("::1"), Phone("::1")
    try:
        video_a, video_b = Phone("::1"), Phone("::1")
        specs_a = [a.spec(), StreamSpec("video", "::1", video_a.port, video_a.rtcp_port)]
        specs_b = [b.spec(), StreamSpec("video", "::1", video_b.port, video_b.rtcp_port)]
        to_b = client.offer("v6", "a", specs_a, other_family=6)
        to_a = client.answer("v6", "b", specs_b)
        assert [s.media for s in to_a.streams] == ["audio", "video"]
        assert {s.address for s in to_a.streams + to_b.streams} == {"::1"}
        assert len({s.port for s in to_a.streams + to_b.streams}) == 4
        a.rtp.sendto(rtp(1), ("::1", to_a.streams[0].port))
        assert receive(b.rtp)[0] == rtp(1)
        video_b.rtp.sendto(rtp(1, ssrc=7), ("::1", to_b.streams[1].port))
        assert receive(video_a.rtp)[0] == rtp(1, ssrc=7)
        with pytest.raises(RelayError, match="IPv4"):
            client.offer("v6", "a", [Phone().spec()])  # a leg never changes family
        video_a.close()
        video_b.close()
    finally:
        a.close()
        b.close()


def test_offer_is_idempotent_and_retries_get_the_same_answer(relay, client, phones):
    a, _ = phones
    first = client.offer("idem", "a", [a.spec()])
    assert client.offer("idem", "a", [a.spec()]) == first
    control = client.relays()[0].control
    message = clusterauth.seal(KEY, encode({"id": b"retry-1", "cmd": "offer", "call_id": "idem2",
                                            "leg": "a", "streams": [a.spec().to_message()]}),
                               nonce=b"retry-1!")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        replies = []
        for _ in range(2):
            sock.sendto(message, control)
            replies.append(decode(clusterauth.unseal(KEY, sock.recv(65535))[1]))
        sock.sendto(clusterauth.seal(KEY, b"\xc1garbage"), control)  # dropped and counted
        sock.sendto(clusterauth.seal(KEY, encode({"id": b"q", "cmd": "query",
                                                  "call_id": "nope"})), control)
        assert decode(clusterauth.unseal(KEY, sock.recv(65535))[1]) == {
            "id": b"q", "ok": True, "found": False}
    assert replies[0] == replies[1] and replies[0]["id"] == b"retry-1"
    with pytest.raises(RelayError, match="no session"):
        client.answer("unknown-call", "b", [a.spec()], relay=first.relay)


def test_commands_not_sealed_with_the_cluster_key_are_ignored_and_counted(relay, client, store,
                                                                         phones):
    """A local process without the key (or a replayed capture) cannot create, change or
    end a session: no answer, nothing done, one count each."""
    a, b = phones
    call(client, a, b, call_id="owned")
    control = client.relays()[0].control
    offer = {"cmd": "offer", "call_id": "forged", "leg": "a", "streams": [a.spec().to_message()]}
    delete = {"cmd": "delete", "call_id": "owned"}
    wrong = control_key("another-secret")
    forged = [encode({"id": b"plain-1", **offer}),  # unsealed msgpack, as before the keys
              encode({"id": b"plain-2", **delete}),
              clusterauth.seal(wrong, encode({"id": b"wrong-1", **offer})),  # another key
              clusterauth.seal(KEY, encode({"id": b"stale-1", **delete}),  # too old
                               now=time.time() - 3 * clusterauth.WINDOW)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in forged:
            sock.sendto(datagram, control)
        assert receive(sock, 0.5) is None
    assert client.query("forged") is None and client.query("owned") is not None
    node = wait_for(lambda: next((n for n in store.relay_nodes()
                                  if n.get("control_unauthenticated", 0) >= 4), None), 5.0)
    assert node is not None and node["control_unauthenticated"] == 4


# --------------------------------------------------------------------------- Redis


def test_sessions_and_heartbeat_in_redis(relay, client, store, phones):
    a, b = phones
    call(client, a, b)
    record = store.relay_session("call-1")
    assert record["relay"] == f"{HOST}/relay-0" and record["control"][1] == PORT_MIN
    assert [leg["name"] for leg in record["legs"]] == ["a", "b"]
    ttl = store.redis.pttl(st.relay_session_key("call-1"))
    assert 60_000 < ttl <= 63_000  # media timeout 30 s + grace 30 s + 3 s between saves
    nodes = {n["id"]: n for n in store.relay_nodes()}
    node = nodes[f"{HOST}/relay-0"]
    assert node["control"] == ["127.0.0.1", PORT_MIN] and node["sessions"] >= 0
    assert node["ports"] == [PORT_MIN + 2, PORT_MIN + 499]
    client.delete("call-1")
    assert store.relay_session("call-1") is None
    assert store.redis.zcard(st.relay_owned_key(f"{HOST}/relay-0")) == 0


def test_media_timeout_is_reported_once_on_the_stream(relays, client, store, phones):
    relays.start(0, media_timeout="1")
    wait_for_relays(client, 1)
    store.media_events_group("b2bua")
    store.media_events_group("b2bua")  # a second worker creating it is fine
    a, b = phones
    to_a, _ = call(client, a, b, call_id="silent")
    call(client, Phone(), Phone(), call_id="talking")
    talking = client.query("talking")["legs"][0]["streams"][0]["port"]
    talker = Phone()
    try:
        client.offer("talking", "a", [talker.spec()])
        deadline = time.monotonic() + 4.0
        events = []
        seq = 0
        while time.monotonic() < deadline and not events:
            seq += 1
            talker.rtp.sendto(rtp(seq), ("127.0.0.1", talking))
            events = store.read_media_events("b2bua", "worker-1", block_ms=50)
        assert len(events) == 1
        entry_id, event = events[0]
        assert event["event"] == "media-timeout" and event["call_id"] == "silent"
        assert event["relay"] == f"{HOST}/relay-0" and float(event["idle"]) >= 1.0
        assert client.query("silent")["timeout_reported"]
        assert store.relay_session("silent")["timeout_reported"]
        # unacknowledged: another consumer can claim it once it is stale
        time.sleep(0.1)
        claimed = store.claim_stale_media_events("b2bua", "worker-2", min_idle_ms=50)
        assert [e[0] for e in claimed] == [entry_id]
        assert store.ack_media_events("b2bua", [entry_id]) == 1
        until = time.monotonic() + 1.5  # the same silence is not reported twice
        while time.monotonic() < until:
            seq += 1
            talker.rtp.sendto(rtp(seq), ("127.0.0.1", talking))
            assert store.read_media_events("b2bua", "worker-1", block_ms=50) == []
    finally:
        talker.close()


def test_hard_ttl_frees_a_session_whose_delete_was_lost(relays, client, store, phones):
    relays.start(0, media_timeout="1")
    wait_for_relays(client, 1)
    a, _ = phones
    port = client.offer("lost-delete", "a", [a.spec()]).streams[0].port
    assert store.redis.pttl(st.relay_session_key("lost-delete")) <= 5000  # 1 s + 1 s + 3 s
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and client.query("lost-delete") is not None:
        time.sleep(0.2)
    assert client.query("lost-delete") is None  # gone from the relay
    assert store.relay_session("lost-delete") is None  # and from Redis
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", port))  # the port is free again


def test_kill_9_restart_resumes_media_within_2_s(relays, client, store, phones):
    relays.start(0, media_timeout="30")
    wait_for_relays(client, 1)
    a, b = phones
    natted = Phone()
    try:
        to_a, to_b = call(client, a, b)
        for seq in range(1, 51):  # a sends from a NAT port: the latching must survive
            natted.rtp.sendto(rtp(seq), ("127.0.0.1", to_a.port))
            assert receive(b.rtp) is not None
        b.rtp.sendto(rtp(1, ssrc=0x22), ("127.0.0.1", to_b.port))
        assert receive(natted.rtp) is not None
        deadline = time.monotonic() + 5.0  # figures are saved every couple of seconds
        while time.monotonic() < deadline:
            saved = store.relay_session("call-1")["legs"][0]["sides"][0]
            if saved["stats"]["packets"] == 50 and saved["latched"]:
                break
            time.sleep(0.1)
        assert saved["latched"] == ["127.0.0.1", natted.port]

        killed = time.monotonic()
        relays.kill(0)
        relays.start(0, media_timeout="30")
        seq, resumed = 50, None
        while time.monotonic() - killed < 3.0:
            seq += 1
            natted.rtp.sendto(rtp(seq), ("127.0.0.1", to_a.port))
            if receive(b.rtp, 0.02) is not None:
                resumed = time.monotonic() - killed
                break
        assert resumed is not None and resumed < 2.0, resumed
        drain(b.rtp)
        b.rtp.sendto(rtp(2, ssrc=0x22), ("127.0.0.1", to_b.port))
        assert receive(natted.rtp)[0] == rtp(2, ssrc=0x22)  # latched address kept
        a.rtp.sendto(rtp(999), ("127.0.0.1", to_a.port))  # still no bleed after the restart
        assert receive(b.rtp, 0.2) is None
        stream = client.query("call-1")["legs"][0]["streams"][0]
        assert stream["packets"] >= 51  # counting went on from the saved figures
        assert stream["latched"] == ["127.0.0.1", natted.port]
    finally:
        natted.close()


def test_new_calls_fall_back_to_a_relay_that_answers(relays, client, phones):
    first, second = relays.start(0), relays.start(1)
    wait_for_relays(client, 2)
    a, _ = phones
    used = {client.offer(f"spread-{i}", "a", [a.spec()]).relay for i in range(4)}
    assert used == {f"{HOST}/relay-0", f"{HOST}/relay-1"}  # least loaded first
    first.send_signal(signal.SIGSTOP)  # alive in Redis for a moment, but deaf
    try:
        started = time.monotonic()
        for i in range(3):
            result = client.offer(f"fallback-{i}", "a", [a.spec()])
            assert result.relay == f"{HOST}/relay-1"
        assert time.monotonic() - started < 2.0  # one timeout, then the deaf relay is skipped
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.poll() is None


def test_a_session_made_while_redis_refused_writes_is_kept(relay, client, store, phones):
    """A relay answers offers while Redis is unavailable (the call goes on); once Redis is
    back it must create the session's record, not take the missing record for a session
    deleted meanwhile and drop it (which broke the first calls after a Redis failover)."""
    a, b = phones
    store.redis.execute_command("CLIENT", "PAUSE", 2000, "WRITE")  # reads still answer
    try:
        time.sleep(0.7)  # a heartbeat has timed out: the relay backs off from Redis
        offered = client.offer("made-in-outage", "a", [a.spec()])
        client.answer("made-in-outage", "b", [b.spec()], relay=offered.relay)
        assert store.relay_session("made-in-outage") is None  # nothing written yet
    finally:
        store.redis.execute_command("CLIENT", "UNPAUSE")
    assert wait_for(lambda: store.relay_session("made-in-outage"), 5.0, step=0.1)
    time.sleep(2.0)  # flushes and heartbeats after the outage
    assert client.query("made-in-outage", relay=offered.relay) is not None
    assert store.relay_session("made-in-outage")["relay"] == offered.relay
