"""Two hosts, one Redis: calls across hosts work as on one host, and only the cluster
talks to the cluster.

Each host is a network namespace with its own address (10.77.0.11, 10.77.0.12) and
its own cluster under supervisord (dispatcher, 2 workers, 2 relays in relay mode), the
same SIP port 5060, hand-off port 5070 and relay port range on both, so a relay
command sent to the wrong host's loopback would reach that host's relay of the same
index.  The phones and the shared Redis sit on the LAN (10.77.0.1) in a namespace of
their own (tests/integration/netns.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from harness import SECRET, Cluster, wait_for
from hostbed import host_bed
from netns import LAN_ADDRESS, Topology, require_netns
from rtp_phone import Call, Phone, RtpPacket, in_order_without_loss

from cluster import clusterauth, envelope
from cluster import store as st
from cluster.relayctl import RelayClient, control_key, encode
from cluster.store import Store
from conftest import ROOT, require_redis_server
from workers.relay.relay import HEARTBEAT_INTERVAL
from workers.sip.media import DEAD_HOST_AFTER

REALM = "mh.test"
PASSWORD = "1234"
SIP_PORT, HANDOFF_PORT = 5060, 5070
REDIS_PORT = 6390
REDIS_PASSWORD = "multihost-redis-password"
RTP_MIN, RTP_MAX = 20000, 20399
USERS = [str(u) for u in range(1002, 1012)]
NORMAL_CLEARING = "cause=16"


@dataclass
class Hosts:
    topology: Topology
    clusters: list[Cluster]
    store: Store
    relays: RelayClient

    def cluster(self, index: int) -> Cluster:
        return self.clusters[index - 1]

    def address(self, index: int) -> tuple[str, int]:
        return (Topology.host_address(index), SIP_PORT)

    def relay_ids(self) -> list[str]:
        return sorted(n["id"] for n in self.store.relay_nodes())

    def sessions_of(self, tag: str) -> list[str]:
        """Every relay (of both hosts) that has a session for ``tag``, asked directly."""
        return [relay for relay in self.relay_ids() if self.relays.query(tag, relay=relay)]

    def dispatcher(self, index: int, since: float = 0.0) -> dict:
        """Host ``index``'s dispatcher heartbeat (counters), one published after ``since``
        (epoch seconds; they come every second)."""
        def fresh() -> dict | None:
            return next((p for p in self.store.processes("dispatcher")
                         if p.get("host") == f"h{index}" and p.get("seen", 0) > since), None)
        proc = wait_for(fresh, 3.0)
        assert proc is not None, f"no dispatcher heartbeat of h{index} after {since}"
        return proc

    def relay_node(self, relay_id: str) -> dict:
        return next(n for n in self.store.relay_nodes() if n["id"] == relay_id)


def host_settings(index: int) -> dict:
    address = Topology.host_address(index)
    return {"sip": {"bind": address, "port": SIP_PORT, "host_id": f"h{index}"},
            "dispatcher": {"inter_host_port": HANDOFF_PORT, "inter_host_address": address},
            "auth": {"realm": REALM},
            "media": {"mode": "relay", "bind": address, "relays": 2,
                      "rtp_port_min": RTP_MIN, "rtp_port_max": RTP_MAX},
            "calls": {"no_answer_timeout": 15}}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator[Hosts]:
    require_redis_server()
    require_netns()
    tmp = tmp_path_factory.mktemp("multihost")
    with host_bed(Topology().up(), tmp, host_settings, redis_port=REDIS_PORT,
                  redis_password=REDIS_PASSWORD) as bed:
        clusters = bed.clusters
        store = Store(bed.url, timeout=2.0)
        for user in USERS:
            clusters[0].add_user(user, PASSWORD)
        relays = RelayClient(store, key=control_key(SECRET))
        running = Hosts(bed.topology, clusters, store, relays)

        def ready() -> bool:
            live = [n for n in store.relay_nodes() if time.time() - n["seen"] < 2.0]
            known = store.hosts()
            return len(live) == 4 and {"h1", "h2"} <= set(known)
        assert wait_for(ready, 20.0, step=0.1), (store.relay_nodes(),
                                                  clusters[0].log_tail())
        time.sleep(1.5)  # each dispatcher reads the hosts it takes hand-offs from every 1 s
        yield running


# ------------------------------------------------------------------ calls between hosts
def phone(hosts: Hosts, host: int, user: str, **kwargs) -> Phone:
    return Phone(hosts.address(host), user, PASSWORD, domain=REALM, host=LAN_ADDRESS, **kwargs)


@contextmanager
def cross_call(hosts: Hosts, caller_host: int, callee_host: int, caller_user: str,
               callee_user: str) -> Iterator[Call]:
    """The callee registered through ``callee_host``, called through ``caller_host``.

    Both phones answer requests to where they came from, not to the Via: the callee's
    200 reaches the host whose socket sent it the INVITE (its own, through a hand-off),
    not the host that took the call, as behind a NAT that lets in only that host."""
    caller = phone(hosts, caller_host, caller_user, respond_to_source=True)
    callee = phone(hosts, callee_host, callee_user, respond_to_source=True)
    try:
        assert callee.register() == 200
        answered: dict = {}

        def answer():
            try:
                invite = callee.wait_call(10.0)
                answered["invite"] = invite
                callee.answer(invite, 10.0)
            except AssertionError as exc:
                answered["error"] = exc

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        ok = caller.call(callee_user, timeout=10.0)
        answering.join(timeout=15)
        assert "error" not in answered, answered.get("error")
        invite = answered["invite"]
        yield Call(caller, callee, invite, ok, invite.call_id.split(".")[1])
    finally:
        caller.close()
        callee.close()


def media_window(*phones: Phone, seconds: float = 1.5) -> float:
    """Let media flow ``seconds``; the monotonic time it started counting from."""
    since = time.monotonic()
    time.sleep(seconds)
    return since


def assert_media_through(receiver: Phone, sender: Phone, relay: tuple[str, int],
                         since: float = 0.0) -> list[RtpPacket]:
    """``receiver`` got ``sender``'s stream, from the relay port its SDP named, in order,
    every packet sent after the first one seen (no one-way audio)."""
    packets = [p for p in receiver.media.packets() if p.at >= since]
    assert len(packets) >= 40, (f"{receiver.user} got {len(packets)} RTP packets from "
                                f"{sender.user} (one-way audio?)")
    assert {p.source for p in packets} == {relay}, {p.source for p in packets}
    assert {p.ssrc for p in packets} == {sender.media.ssrc}
    assert in_order_without_loss(packets), [p.seq for p in packets]
    return packets


def relay_of(sdp) -> tuple[str, int]:
    return (sdp.address(), sdp.media[0].port)


def wait_cdr(hosts: Hosts, a_call_id: str, timeout: float = 5.0) -> dict | None:
    return wait_for(lambda: next((c for c in hosts.store.cdrs_after()
                                  if c.get("a_call_id") == a_call_id), None), timeout)


def sipctl(hosts: Hosts, index: int, *args: str) -> list[dict]:
    """`sipctl <args> --json` run on host ``index`` (in its namespace, with its config)."""
    listing = subprocess.run(
        ["ip", "netns", "exec", hosts.topology.host_ns(index), sys.executable, "-m",
         "cluster.cli", *args, "--json"], capture_output=True, text=True, cwd=ROOT,
        env=hosts.cluster(index).env, timeout=30)
    assert listing.returncode == 0, listing.stderr
    return json.loads(listing.stdout)


def test_every_worker_of_every_host_is_its_own_media_events_consumer(hosts):
    """A consumer shows in the group once it got an event: events nobody acts on (not a
    media timeout) are added until each of the 4 workers got one (200 at most)."""
    expected = {f"h{h}/worker-{w}" for h in (1, 2) for w in (0, 1)}
    found: set[str] = set()
    for _ in range(200):
        hosts.store.redis.xadd(st.RELAY_EVENTS_STREAMS[0], {"event": "probe", "call_id": "none"})
        time.sleep(0.02)
        found = {c["name"].decode() for c in hosts.store.redis.xinfo_consumers(
            st.RELAY_EVENTS_STREAMS[0], "b2bua")}
        if expected <= found:
            break
    assert found == expected


def test_registrations_through_each_host_are_seen_from_every_host(hosts):
    one, two = phone(hosts, 1, "1010"), phone(hosts, 2, "1011")
    try:
        assert one.register() == 200 and two.register() == 200
        for index in (1, 2):
            rows = {(r["aor"], r["host"], r["source"]) for r in sipctl(hosts, index, "regs")}
            assert (f"1010@{REALM}", "h1", f"{LAN_ADDRESS}:{one.port}") in rows, rows
            assert (f"1011@{REALM}", "h2", f"{LAN_ADDRESS}:{two.port}") in rows, rows
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize(("caller_host", "callee_host", "hangs_up"),
                         [(1, 2, "caller"), (1, 2, "callee"), (2, 1, "caller"),
                          (2, 1, "callee")])
def test_calls_across_hosts_carry_media_both_ways_and_end_from_either_side(
        hosts, caller_host, callee_host, hangs_up):
    with cross_call(hosts, caller_host, callee_host, "1002", "1009") as call:
        owner = hosts.store.relay_session(call.tag)["relay"]
        # The session is on the relays of the host that took the INVITE, and only there.
        assert owner.startswith(f"h{caller_host}/"), owner
        assert hosts.sessions_of(call.tag) == [owner]
        address = Topology.host_address(caller_host)
        assert call.ok.sdp.address() == call.invite.sdp.address() == address
        since = media_window(call.caller, call.callee)
        assert_media_through(call.caller, call.callee, relay_of(call.ok.sdp), since)
        assert_media_through(call.callee, call.caller, relay_of(call.invite.sdp), since)

        ender, other = ((call.caller, call.callee) if hangs_up == "caller"
                        else (call.callee, call.caller))
        reply = ender.hangup(timeout=5.0)
        assert reply is not None and reply.status == 200
        bye = other.wait_request("BYE", 5.0)
        assert bye is not None and NORMAL_CLEARING in bye.header("Reason"), bye
        cdr = wait_cdr(hosts, call.caller.call_id)
        assert cdr is not None and cdr["hangup_cause"] == "NORMAL_CLEARING", cdr
        assert wait_for(lambda: not hosts.sessions_of(call.tag), 3.0), hosts.sessions_of(call.tag)
        assert hosts.store.relay_session(call.tag) is None


def retarget(target: str, host: int) -> str:
    """A dialog's remote target URI sent to host ``host`` instead (as a phone that fails
    over to another address of the service would)."""
    prefix, _, rest = target.partition("@")
    _hostport, sep, params = rest.partition(";")
    return f"{prefix}@{Topology.host_address(host)}:{SIP_PORT}{sep}{params}"


def test_a_reinvite_and_a_bye_entering_the_other_host_reach_the_session_owner(hosts):
    with cross_call(hosts, 1, 2, "1003", "1008") as call:
        owner = hosts.store.relay_session(call.tag)["relay"]
        assert owner.startswith("h1/") and hosts.sessions_of(call.tag) == [owner]
        before = (relay_of(call.ok.sdp), relay_of(call.invite.sdp))
        listed = [c for c in sipctl(hosts, 2, "calls") if c["call"] == call.tag]
        assert [(c["host"], c["relay"]) for c in listed] == [("h1", owner)], listed

        # A command from a client's address, not sealed with the cluster's key, is ignored.
        control = tuple(hosts.relay_node(owner)["control"])
        assert control[0] == Topology.host_address(1)
        unauthenticated = hosts.relay_node(owner).get("control_unauthenticated", 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LAN_ADDRESS, 0))
            sock.settimeout(0.5)
            sock.sendto(encode({"id": b"forged-1", "cmd": "delete", "call_id": call.tag}),
                        control)
            with pytest.raises(TimeoutError):
                sock.recv(65535)
        assert hosts.sessions_of(call.tag) == [owner]
        assert wait_for(lambda: hosts.relay_node(owner).get("control_unauthenticated", 0)
                        == unauthenticated + 1, 3.0)

        # The re-INVITE enters host 2, whose relays have the same ports: the session is
        # changed at its owner on host 1, no new one appears, media goes on both ways.
        call.caller.remote_target = retarget(call.caller.remote_target, 2)
        reinvite_ok = call.caller.reinvite("sendrecv", timeout=10.0)
        assert relay_of(reinvite_ok.sdp) == before[0]
        # Answered from the host it was sent to (a NAT lets in only that one), not handed
        # to host 1 where the call was set up.
        assert reinvite_ok.source == hosts.address(2)
        reoffer = call.callee.requests("INVITE")[-1]
        assert reoffer.call_id == call.invite.call_id and relay_of(reoffer.sdp) == before[1]
        assert hosts.sessions_of(call.tag) == [owner]
        since = media_window(call.caller, call.callee)
        assert_media_through(call.caller, call.callee, before[0], since)
        assert_media_through(call.callee, call.caller, before[1], since)

        # The BYE enters host 2 as well: the owner's session is deleted, the callee hung up.
        reply = call.caller.hangup(timeout=5.0)
        assert reply is not None and reply.status == 200 and reply.source == hosts.address(2)
        bye = call.callee.wait_request("BYE", 5.0)
        assert bye is not None and NORMAL_CLEARING in bye.header("Reason")
        cdr = wait_cdr(hosts, call.caller.call_id)
        assert cdr is not None and cdr["hangup_cause"] == "NORMAL_CLEARING", cdr
        assert wait_for(lambda: not hosts.sessions_of(call.tag), 3.0), hosts.sessions_of(call.tag)
        assert hosts.store.relay_session(call.tag) is None


def test_a_200_whose_answer_the_relay_refuses_is_logged_with_its_call_id(hosts):
    """The callee's 200 lands on host 2 and its SDP cannot be given to the relay (the
    session was deleted meanwhile): the response is not carried out, and the worker says
    so with the Call-ID instead of counting it as a bad request silently."""
    caller, callee = phone(hosts, 1, "1005"), phone(hosts, 2, "1006", respond_to_source=True)
    try:
        assert callee.register() == 200
        calling = threading.Thread(target=lambda: _expect_no_answer(caller, "1006"),
                                   daemon=True)
        calling.start()
        invite = callee.wait_call(10.0)
        tag = invite.call_id.split(".")[1]
        assert hosts.relays.delete(tag) is not None  # (at its owner on host 1, sealed)
        before = sum(p.get("response_errors", 0) for p in hosts.store.processes("worker")
                     if p.get("host") == "h2")
        callee._respond(invite, 200, "OK", callee._answer_sdp(invite.sdp))

        def logged() -> list[str]:
            text = (hosts.cluster(2).read_log("worker-0") + hosts.cluster(2).read_log("worker-1"))
            return [line for line in text.splitlines()
                    if invite.call_id in line and "not carried out" in line]
        lines = wait_for(logged, 5.0)
        assert lines and all("200 OK from" in line and "no relay session" in line
                             for line in lines), lines
        assert callee.wait_request("ACK", 1.0) is None  # nothing was carried out
        calling.join(timeout=10)

        def counted() -> int:
            return sum(p.get("response_errors", 0) for p in hosts.store.processes("worker")
                       if p.get("host") == "h2") - before
        # One count and one line per copy of the 200 (the phone repeats it to each copy of
        # the INVITE the cluster repeats, unanswered as it stays).
        # (The workers' heartbeats carry their counters every second.)
        assert wait_for(lambda: counted() == len(logged()) >= 1, 3.0), (counted(), logged())
    finally:
        caller.close()
        callee.close()


def _expect_no_answer(caller: Phone, callee: str) -> None:
    try:
        caller.call(callee, timeout=4.0)
    except AssertionError:
        pass  # (no final answer: the call is cancelled by its no-answer timer later)


# ------------------------------------------------------------------ the hand-off port
def forged_bye(listener_port: int) -> bytes:
    return (f"BYE sip:victim@{LAN_ADDRESS}:{listener_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LAN_ADDRESS}:{listener_port};branch=z9hG4bKforged\r\n"
            "From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: forged-bye\r\n"
            "CSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n").encode()


def test_an_envelope_sent_to_the_hand_off_port_by_a_client_is_not_forwarded(hosts):
    key = clusterauth.handoff_key(SECRET)
    target = (Topology.host_address(1), HANDOFF_PORT)
    before = hosts.dispatcher(1, since=time.time())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind((LAN_ADDRESS, 0))
        listener.settimeout(1.0)
        wrapped = envelope.wrap((LAN_ADDRESS, listener.getsockname()[1]), 0,
                                forged_bye(listener.getsockname()[1]))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind((LAN_ADDRESS, 0))
            client.sendto(wrapped, target)  # the envelope as it was before the keys
            client.sendto(clusterauth.seal(clusterauth.handoff_key("guessed"), wrapped), target)
            client.sendto(clusterauth.seal(key, wrapped), target)  # even with the key
        # From host 2's address: unsealed is refused; sealed is forwarded once, not twice.
        with hosts.topology.enter(hosts.topology.host_ns(2)):
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with peer:
            peer.bind((Topology.host_address(2), 0))
            peer.sendto(wrapped, target)
            sealed = clusterauth.seal(key, wrapped)
            peer.sendto(sealed, target)
            peer.sendto(sealed, target)
        data, source = listener.recvfrom(65535)
        assert data == forged_bye(listener.getsockname()[1])
        assert source == (Topology.host_address(1), SIP_PORT)  # left from the SIP port
        with pytest.raises(TimeoutError):
            listener.recvfrom(65535)  # nothing else came through

    after = hosts.dispatcher(1, since=time.time())
    # (What was forwarded is what the listener got, exactly one: the dispatcher's "egress"
    # also counts the hand-offs of the calls of the tests before, a 2xx repeated late.)
    delta = {k: after.get(k, 0) - before.get(k, 0)
             for k in ("handoff_foreign", "handoff_unauthenticated", "handoff_replayed")}
    assert delta == {"handoff_foreign": 3, "handoff_unauthenticated": 1, "handoff_replayed": 1}
    log = hosts.cluster(1).read_log("dispatcher")
    assert f"hand-off from {LAN_ADDRESS}:" in log and "not a host of the cluster" in log


# ------------------------------------------------------------------ a host dies (it stays dead)
def test_the_calls_of_a_dead_host_end_on_the_surviving_side(hosts):
    """Every process of host 2 killed at once: its announcement lapses within 3 s (the
    send path stops handing off to it 1 s later at most), and its calls are ended by host
    1: BYE with cause 38 to the callee registered through host 1, and to the caller (from
    host 1's socket, since host 2 is gone), one CDR with the cause."""
    with cross_call(hosts, 2, 1, "1004", "1007") as call:
        owner = hosts.store.relay_session(call.tag)["relay"]
        assert owner.startswith("h2/")
        since = media_window(call.caller, call.callee, seconds=1.0)
        assert_media_through(call.callee, call.caller, relay_of(call.invite.sdp), since)

        victims = hosts.topology.pids(hosts.topology.host_ns(2))
        assert len(victims) >= 6  # supervisord, dispatcher, 2 workers, 2 relays
        killed = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        (hosts.cluster(2).run_dir / "supervisord.pid").unlink(missing_ok=True)
        assert wait_for(lambda: hosts.store.host_info("h2") is None, 5.0, step=0.05)
        lapsed = time.monotonic() - killed
        assert lapsed <= 3.5, lapsed

        bye = call.callee.wait_request("BYE", 20.0)
        ended = time.monotonic() - killed
        assert bye is not None, hosts.cluster(1).log_tail()
        assert "cause=38" in bye.header("Reason"), bye.header("Reason")
        assert bye.source == (Topology.host_address(1), SIP_PORT)
        to_caller = call.caller.wait_request("BYE", 5.0)
        assert to_caller is not None and to_caller.source == (Topology.host_address(1),
                                                              SIP_PORT)
        cdr = wait_cdr(hosts, call.caller.call_id)
        assert cdr is not None and cdr["hangup_cause"] == "NETWORK_OUT_OF_ORDER", cdr
        assert hosts.store.relay_session(call.tag) is None
        # Relays silent for 10 s (DEAD_HOST_AFTER), looked at every second; their last
        # heartbeat came up to one heartbeat interval before the kill.
        assert DEAD_HOST_AFTER - HEARTBEAT_INTERVAL <= ended <= DEAD_HOST_AFTER + 4.0, ended
        print(f"host 2 killed: announcement gone after {lapsed:.2f} s, "
              f"its call ended after {ended:.2f} s")
