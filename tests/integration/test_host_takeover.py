"""A host dies and its floating address moves to the other host: its calls go on there.

Two hosts in network namespaces (tests/integration/netns.py), one Redis, each host with a
fixed address (hand-offs, relay control) and a floating service address for SIP and media
(10.77.0.111 on host 1, 10.77.0.112 on host 2), as keepalived gives.  Calls are set up
through host 1 (relay mode, media both ways); every process of host 1 is killed with
SIGKILL; the test moves host 1's floating address to host 2 as keepalived would (address
deleted there, added here, the LAN's neighbour cache flushed as a gratuitous ARP does).
Host 2 adopts host 1 by itself (cluster/adoption.py, workers/relay/relay.py ``adopt``):
every call goes on with media both ways from the same relay address and ports, takes a
re-INVITE, ends with a BYE from either side answered 200, and has exactly one CDR; a phone
registered through host 1 gets a new call, sent from host 1's address.  Host 1 restarted
meanwhile (its address still on host 2) stays passive and takes nothing back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import Cluster, wait_for
from hostbed import host_bed
from netns import LAN_ADDRESS, Topology, _ip, require_netns
from rtp_phone import Call, Phone, RtpPacket

from cluster.store import Store
from conftest import require_redis_server

REALM = "takeover.test"
PASSWORD = "1234"
SIP_PORT, HANDOFF_PORT = 5060, 5070
REDIS_PORT = 6391
REDIS_PASSWORD = "takeover-redis-password"
RTP_MIN, RTP_MAX = 21000, 21399
CALLS = 4  # calls up through host 1 when it dies
USERS = [str(u) for u in range(2001, 2001 + 2 * CALLS + 4)]
# Media stops at the kill and resumes once host 2 has the address and has noticed the
# dead relays (heartbeat older than 1.5 s, looked at every 0.5 s): measured ~2 s.
MAX_MEDIA_GAP = 5.0


def floating(index: int) -> str:
    return f"10.77.0.{110 + index}"


@dataclass
class Hosts:
    topology: Topology
    clusters: list[Cluster]
    store: Store


def host_settings(index: int) -> dict:
    fixed, service = Topology.host_address(index), floating(index)
    return {"sip": {"bind": service, "port": SIP_PORT, "host_id": f"h{index}"},
            "dispatcher": {"inter_host_port": HANDOFF_PORT, "inter_host_address": fixed},
            "auth": {"realm": REALM},
            "media": {"mode": "relay", "bind": service, "relays": 2,
                      "rtp_port_min": RTP_MIN, "rtp_port_max": RTP_MAX},
            "calls": {"no_answer_timeout": 15}}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator[Hosts]:
    require_redis_server()
    require_netns()
    tmp = tmp_path_factory.mktemp("takeover")
    def floating_addresses(topology: Topology) -> None:
        for index in (1, 2):
            _ip("-n", topology.host_ns(index), "addr", "add", f"{floating(index)}/32",
                "dev", "eth0")

    with host_bed(Topology(prefix=f"scmh{os.getpid()}-t").up(), tmp, host_settings,
                  redis_port=REDIS_PORT, redis_password=REDIS_PASSWORD,
                  prepare=floating_addresses) as bed:
        clusters = bed.clusters
        store = Store(bed.url, timeout=2.0)
        for user in USERS:
            clusters[0].add_user(user, PASSWORD)

        def ready() -> bool:
            live = [n for n in store.relay_nodes() if time.time() - n["seen"] < 2.0]
            return len(live) == 4 and {"h1", "h2"} <= set(store.hosts())
        assert wait_for(ready, 20.0, step=0.1), clusters[0].log_tail()
        time.sleep(1.5)  # each dispatcher reads the hosts it takes hand-offs from every 1 s
        yield Hosts(bed.topology, clusters, store)


def phone(host: int, user: str) -> Phone:
    # Answering to where requests came from: behind a NAT that lets in only that address.
    return Phone((floating(host), SIP_PORT), user, PASSWORD, domain=REALM, host=LAN_ADDRESS,
                 respond_to_source=True)


def place_call(caller_user: str, callee: Phone, via_host: int) -> Call:
    caller = phone(via_host, caller_user)
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
    ok = caller.call(callee.user, timeout=10.0)
    answering.join(timeout=15)
    assert "error" not in answered, answered.get("error")
    invite = answered["invite"]
    return Call(caller, callee, invite, ok, invite.call_id.split(".")[1])


def relay_of(sdp) -> tuple[str, int]:
    return (sdp.address(), sdp.media[0].port)


def longest_gap(packets: list[RtpPacket], start: float, end: float) -> float:
    times = [start] + sorted(p.at for p in packets if start <= p.at <= end) + [end]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def flowing(receiver: Phone, sender: Phone, relay: tuple[str, int], since: float) -> int:
    """Packets ``receiver`` got from ``sender`` through ``relay`` since ``since``, in order
    and without loss; 0 when any came from elsewhere or out of order."""
    packets = [p for p in receiver.media.packets() if p.at >= since]
    if {p.source for p in packets} - {relay} or {p.ssrc for p in packets} - {sender.media.ssrc}:
        return 0
    seqs = [p.seq for p in packets]
    if any((b - a) % 65536 != 1 for a, b in zip(seqs, seqs[1:], strict=False)):
        return 0
    return len(packets)


def cdrs_of(store: Store, a_call_id: str) -> list[dict]:
    return [c for c in store.cdrs_after() if c.get("a_call_id") == a_call_id]


def test_calls_of_a_dead_host_go_on_on_the_host_its_address_moved_to(hosts):
    topology, store = hosts.topology, hosts.store
    callees = [phone(1, u) for u in USERS[CALLS:2 * CALLS]]
    idle = phone(1, USERS[2 * CALLS])  # registered through host 1, called after the move
    calls: list[Call] = []
    try:
        for callee in [*callees, idle]:
            assert callee.register() == 200
        for caller_user, callee in zip(USERS[:CALLS], callees, strict=True):
            calls.append(place_call(caller_user, callee, via_host=1))
        assert len(calls) == CALLS
        before = {}
        for call in calls:
            owner = store.relay_session(call.tag)["relay"]
            assert owner.startswith("h1/"), owner
            before[call.tag] = (relay_of(call.ok.sdp), relay_of(call.invite.sdp))
            assert call.ok.sdp.address() == call.invite.sdp.address() == floating(1)
        time.sleep(1.0)
        for call in calls:
            to_caller, to_callee = before[call.tag]
            assert flowing(call.caller, call.callee, to_caller, time.monotonic() - 0.8) >= 30
            assert flowing(call.callee, call.caller, to_callee, time.monotonic() - 0.8) >= 30

        # ---- host 1 dies; keepalived moves its address to host 2
        victims = topology.pids(topology.host_ns(1))
        assert len(victims) >= 6  # supervisord, dispatcher, 2 workers, 2 relays
        killed = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        (hosts.clusters[0].run_dir / "supervisord.pid").unlink(missing_ok=True)
        _ip("-n", topology.host_ns(1), "addr", "del", f"{floating(1)}/32", "dev", "eth0")
        _ip("-n", topology.host_ns(2), "addr", "add", f"{floating(1)}/32", "dev", "eth0")
        _ip("-n", topology.lan, "neigh", "flush", "dev", "br0")  # (the gratuitous ARP)

        def adopted() -> bool:
            info = store.host_info("h1")
            owners = [(store.relay_session(c.tag) or {}).get("relay", "") for c in calls]
            return bool(info and info.get("by") == "h2"
                        and all(o.startswith("h2/") for o in owners))
        assert wait_for(adopted, 10.0, step=0.05), hosts.clusters[1].log_tail()
        took_over = time.monotonic() - killed

        # ---- media goes on both ways, from the same relay address and ports
        def resumed() -> bool:
            since = time.monotonic() - 0.5
            return all(flowing(c.caller, c.callee, before[c.tag][0], since) >= 15
                       and flowing(c.callee, c.caller, before[c.tag][1], since) >= 15
                       for c in calls)
        assert wait_for(resumed, 8.0, step=0.1), hosts.clusters[1].log_tail()
        now = time.monotonic()
        gaps = [longest_gap(p.media.packets(), killed - 0.5, now)
                for c in calls for p in (c.caller, c.callee)]
        assert max(gaps) <= MAX_MEDIA_GAP, gaps
        kept = sum(1 for c in calls if store.relay_session(c.tag)["relay"].startswith("h2/"))
        assert kept == CALLS

        # ---- a re-INVITE from each side: answered from host 1's address, same relay ports
        for call in calls:
            for side, other, mine, theirs in ((call.caller, call.callee, 0, 1),
                                             (call.callee, call.caller, 1, 0)):
                offers = len(other.requests("INVITE"))
                reply = side.reinvite("sendrecv", timeout=10.0)
                assert reply.status == 200 and reply.source == (floating(1), SIP_PORT)
                assert relay_of(reply.sdp) == before[call.tag][mine]
                assert len(other.requests("INVITE")) == offers + 1
                reoffer = other.requests("INVITE")[-1]
                assert reoffer.call_id == other.call_id
                assert reoffer.source == (floating(1), SIP_PORT)
                assert relay_of(reoffer.sdp) == before[call.tag][theirs]

        # ---- host 1 comes back while its address stays on host 2: it stays passive
        hosts.clusters[0].start(30.0)
        line = f"{floating(1)} is not on this host: passive"
        assert wait_for(lambda: line in hosts.clusters[0].read_log("dispatcher"), 10.0), \
            hosts.clusters[0].log_tail()
        for _ in range(6):  # three of its would-be announcements
            assert store.host_info("h1")["by"] == "h2"
            time.sleep(0.5)

        # ---- a new call to the phone registered through host 1: from host 1's address
        late = place_call(USERS[2 * CALLS + 1], idle, via_host=2)
        assert late.invite.source == (floating(1), SIP_PORT)
        assert store.relay_session(late.tag)["relay"].startswith("h2/")
        assert wait_for(lambda: flowing(late.callee, late.caller, relay_of(late.invite.sdp),
                                        time.monotonic() - 0.5) >= 15, 5.0)
        calls.append(late)

        # ---- a phone registering through host 1's address now is reached from it as well
        fresh = phone(1, USERS[2 * CALLS + 2])
        callees.append(fresh)
        assert fresh.register() == 200
        # Recorded as through host 1 (its address), whichever host serves that address.
        assert [b.host for b in store.bindings(f"{fresh.user}@{REALM}")] == ["h1"]
        newest = place_call(USERS[2 * CALLS + 3], fresh, via_host=2)
        assert newest.invite.source == (floating(1), SIP_PORT)
        assert wait_for(lambda: flowing(newest.callee, newest.caller,
                                        relay_of(newest.invite.sdp),
                                        time.monotonic() - 0.5) >= 15, 5.0)
        calls.append(newest)

        # ---- every call ends with a BYE from either side, answered 200, one CDR each
        ended = 0
        for n, call in enumerate(calls):
            ender, other = (call.caller, call.callee) if n % 2 else (call.callee, call.caller)
            reply = ender.hangup(timeout=5.0)
            assert reply is not None and reply.status == 200, (call.tag, reply)
            bye = other.wait_request("BYE", 5.0)
            assert bye is not None and "cause=16" in bye.header("Reason"), bye
            ended += 1
        assert ended == CALLS + 2
        for call in calls:
            assert wait_for(lambda c=call: cdrs_of(store, c.caller.call_id), 5.0)
        time.sleep(1.0)  # a second CDR, if any were written, would be there by now
        counts = [len(cdrs_of(store, c.caller.call_id)) for c in calls]
        causes = [cdrs_of(store, c.caller.call_id)[0]["hangup_cause"] for c in calls]
        assert counts == [1] * (CALLS + 2), counts
        assert causes == ["NORMAL_CLEARING"] * (CALLS + 2), causes
        assert all(store.relay_session(c.tag) is None for c in calls)
        print(f"host 1 killed: adopted by host 2 after {took_over:.2f} s; {CALLS} of {CALLS} "
              f"calls kept; longest media gap {max(gaps):.2f} s")
    finally:
        for call in calls:
            call.caller.close()
        for p in [*callees, idle]:
            p.close()
