"""Calls through the B2BUA in media mode "relay", between two Python test phones.

Each phone (rtp_phone.py) sends real, paced G.711 RTP and RTCP and records
what it receives with the source address, so the tests see the media path
itself: the SDP each phone gets names relay ports, the other phone's packets
arrive from those ports, in order and complete, and the relay's figures
(``RelayClient.query``) and the CDR count what was sent.  Then: rtcp-mux, a
hold and resume by re-INVITE, the media timeout, a relay killed with kill -9
mid-call, and codecs passing through untouched.

One cluster serves the module (two workers, two relays, media timeout 3 s);
every test has its own caller and callee users.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from harness import Cluster, running_cluster
from rtp_phone import Call, Media, Phone, SipMessage, in_order_without_loss

from cluster.relayctl import RelayClient, control_key

DB = 14  # this module's Redis database on the session's redis-server
PORT_MIN, PORT_MAX = 27000, 27999  # the relays' range: below the kernel's ephemeral ports
MEDIA_TIMEOUT = 3  # seconds
RELAY_ADDRESS = "127.0.0.1"
PASSWORD = "1234"
SETTINGS = {"media": {"mode": "relay", "rtp_port_min": PORT_MIN, "rtp_port_max": PORT_MAX,
                      "relays": 2, "media_timeout": MEDIA_TIMEOUT}}
USERS = range(2100, 2120)
MEDIA_TIMEOUT_REASON = 'Q.850;cause=102;text="MEDIA_TIMEOUT"'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server) -> Iterator[Cluster]:
    redis_server.client(db=DB).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    with running_cluster(tmp_path_factory.mktemp("calls-relay"), url, workers=2,
                         settings=SETTINGS) as running:
        for user in USERS:
            running.add_user(str(user), PASSWORD)
        yield running


@pytest.fixture(scope="module")
def relays(cluster) -> RelayClient:
    return RelayClient(cluster.store, key=control_key(cluster.config.auth.secret))


# ------------------------------------------------------------------ a call between two phones
@contextmanager
def call_between(cluster: Cluster, caller_user: int, callee_user: int, *,
                 caller_kwargs: dict | None = None,
                 callee_kwargs: dict | None = None, media_from: str = "ack") -> Iterator[Call]:
    """Two phones, the callee registered, in an answered call; both closed afterwards
    (hanging up first if the call is still up).  The callee starts its media when the
    ACK arrives unless ``media_from`` says "answer" (see Phone.answer)."""
    caller = Phone(cluster.address, str(caller_user), PASSWORD, **(caller_kwargs or {}))
    callee = Phone(cluster.address, str(callee_user), PASSWORD, **(callee_kwargs or {}))
    try:
        assert callee.register() == 200
        answered: dict = {}

        def answer():
            try:
                invite = callee.wait_call()
                answered["invite"] = invite
                callee.answer(invite, media_from=media_from)
            except AssertionError as exc:
                answered["error"] = exc

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        ok = caller.call(str(callee_user))
        answering.join(timeout=10)
        assert "error" not in answered, answered.get("error")
        invite = answered["invite"]
        tag = invite.call_id.split(".")[1]  # B-leg Call-IDs are "sc<slot>.<tag>.<n>"
        yield Call(caller, callee, invite, ok, tag)
        if not caller.requests("BYE") and not callee.requests("BYE"):
            caller.hangup()
    finally:
        caller.close()
        callee.close()


def trace_of(cluster: Cluster, tag: str) -> str:
    """The call's SIP messages as the cluster kept them, for failure messages."""
    lines = []
    for entry in cluster.store.trace(tag):
        lines.append(f"  {entry['dir']} {entry['leg']} {entry['first']}")
    return "\n".join(lines)


def wait_cdr(cluster: Cluster, a_call_id: str, timeout: float = 5.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cdr in cluster.store.cdrs_after():
            if cdr.get("a_call_id") == a_call_id:
                return cdr
        time.sleep(0.05)
    return None


def stream(figures: dict, leg: str) -> dict:
    """Leg ``leg``'s audio stream in a relay query answer."""
    for entry in figures["legs"]:
        if entry["name"] == leg:
            return entry["streams"][0]
    raise AssertionError(f"no leg {leg!r} in {figures}")


def in_relay_range(port: int) -> bool:
    return PORT_MIN <= port <= PORT_MAX


def settle_and_stop(*phones: Phone, settle: float = 0.3) -> None:
    """Stop sending and let the last packets arrive."""
    for phone in phones:
        phone.media.stop()
    time.sleep(settle)


def assert_received_all(receiver: Phone, sender: Phone, relay_port: int) -> None:
    """``receiver`` got every packet ``sender`` sent, in order, from relay port ``relay_port``."""
    packets = receiver.media.packets()
    assert packets, f"{receiver.user} received no RTP"
    sources = {p.source for p in packets}
    assert sources == {(RELAY_ADDRESS, relay_port)}, sources
    assert {p.ssrc for p in packets} == {sender.media.ssrc}
    assert in_order_without_loss(packets), [p.seq for p in packets]
    first = sender.media.first_seq
    missing = sorted({(first + i) & 0xFFFF for i in range(sender.media.sent)}
                     - {p.seq for p in packets})
    assert not missing, (f"{receiver.user} missed {len(missing)} of the {sender.media.sent} "
                         f"packets {sender.user} sent: {missing[:10]} (first sent {first})")


# ------------------------------------------------------------------ 1. the media path
def test_rtp_and_rtcp_flow_both_ways_through_the_relay_ports_the_sdp_names(cluster, relays):
    # The callee leaves a=rtcp out (RTCP on port + 1), the caller names it.
    with call_between(cluster, 2100, 2101, callee_kwargs={"announce_rtcp": False}) as call:
        caller, callee = call.caller, call.callee
        for sdp, other in ((call.invite.sdp, caller), (call.ok.sdp, callee)):
            assert sdp.address() == RELAY_ADDRESS
            port, rtcp_port = sdp.media[0].port, sdp.rtcp_port()
            assert in_relay_range(port) and in_relay_range(rtcp_port), sdp.lines
            assert port % 2 == 0 and rtcp_port == port + 1, sdp.lines
            assert port not in (other.media.port, other.media.rtcp_port)
        assert call.caller_relay_port != call.callee_relay_port

        time.sleep(2.0)
        settle_and_stop(caller, callee)
        assert caller.media.sent >= 90 and callee.media.sent >= 90
        assert_received_all(caller, callee, call.caller_relay_port)
        assert_received_all(callee, caller, call.callee_relay_port)
        for receiver, sender, sdp in ((caller, callee, call.ok.sdp),
                                      (callee, caller, call.invite.sdp)):
            reports = receiver.media.rtcp_packets()
            assert len(reports) == sender.media.rtcp_sent >= 3, (len(reports),
                                                                 sender.media.rtcp_sent)
            assert {(r.source, r.socket, r.packet_type, r.ssrc) for r in reports} == {
                ((RELAY_ADDRESS, sdp.rtcp_port()), "rtcp", 200, sender.media.ssrc)}

        figures = relays.query(call.tag)
        assert figures is not None, trace_of(cluster, call.tag)
        for leg, phone, relay_port in (("a", caller, call.caller_relay_port),
                                       ("b", callee, call.callee_relay_port)):
            counted = stream(figures, leg)
            assert counted["port"] == relay_port
            assert counted["latched"] == [phone.media.host, phone.media.port]
            assert counted["packets"] == phone.media.sent
            assert counted["bytes"] == phone.media.sent_bytes == phone.media.sent * 172
            assert counted["lost"] == 0 and counted["dropped"] == 0
            assert counted["rtcp_packets"] == phone.media.rtcp_sent
            assert 0.0 <= counted["jitter_ms"] < 10.0, counted
            assert counted["ssrc"] == phone.media.ssrc

        assert caller.hangup().status == 200
        cdr = wait_cdr(cluster, caller.call_id)
        assert cdr is not None and cdr["hangup_cause"] == "NORMAL_CLEARING", cdr
        # The relay's figures, one field each (a billing import takes them as columns).
        assert int(cdr["media_a_packets"]) == caller.media.sent
        assert int(cdr["media_b_packets"]) == callee.media.sent
        assert int(cdr["media_a_bytes"]) == caller.media.sent_bytes
        assert int(cdr["media_a_lost"]) == int(cdr["media_b_lost"]) == 0
        assert "media" not in cdr
        assert relays.query(call.tag) is None  # deleted at the end of the call


def test_callee_media_sent_as_its_200_ok_leaves_is_forwarded(cluster, relays):
    with call_between(cluster, 2112, 2113, media_from="answer") as call:
        time.sleep(0.3)
        settle_and_stop(call.caller, call.callee)
        assert stream(relays.query(call.tag), "b")["dropped"] == 0
        assert_received_all(call.caller, call.callee, call.caller_relay_port)


# ------------------------------------------------------------------ 2. rtcp-mux
def test_rtcp_mux_carries_rtcp_on_the_rtp_ports(cluster, relays):
    with call_between(cluster, 2102, 2103, caller_kwargs={"media": Media(rtcp_mux=True)},
                      callee_kwargs={"media": Media(rtcp_mux=True)}) as call:
        caller, callee = call.caller, call.callee
        for sdp in (call.invite.sdp, call.ok.sdp):
            line = sdp.media[0]
            assert line.attribute("rtcp-mux") == "", sdp.lines
            assert in_relay_range(line.port)
            assert sdp.rtcp_port() == line.port, sdp.lines  # a=rtcp, if any, names the RTP port
        time.sleep(1.2)
        settle_and_stop(caller, callee)
        assert_received_all(caller, callee, call.caller_relay_port)
        assert_received_all(callee, caller, call.callee_relay_port)
        for receiver, sender, relay_port in ((caller, callee, call.caller_relay_port),
                                             (callee, caller, call.callee_relay_port)):
            reports = receiver.media.rtcp_packets()
            assert len(reports) == sender.media.rtcp_sent >= 2
            assert {(r.source, r.socket, r.ssrc) for r in reports} == {
                ((RELAY_ADDRESS, relay_port), "rtp", sender.media.ssrc)}
        figures = relays.query(call.tag)
        for leg, phone in (("a", caller), ("b", callee)):
            counted = stream(figures, leg)
            assert counted["rtcp_mux"] is True
            assert counted["packets"] == phone.media.sent  # RTCP is not counted as RTP
            assert counted["rtcp_packets"] == phone.media.rtcp_sent


# ------------------------------------------------------------------ 3. hold and resume
def test_hold_and_resume_by_reinvite_keep_the_relay_ports(cluster, relays):
    with call_between(cluster, 2104, 2105) as call:
        caller, callee = call.caller, call.callee
        time.sleep(0.5)

        held_at = time.monotonic()
        answer = caller.reinvite("sendonly").sdp
        offer = callee.wait_request("INVITE", since=held_at).sdp
        assert offer.media[0].direction == "sendonly" and answer.media[0].direction == "recvonly"
        assert offer.media[0].port == call.callee_relay_port, offer.lines
        assert answer.media[0].port == call.caller_relay_port, answer.lines
        assert offer.address() == answer.address() == RELAY_ADDRESS
        time.sleep(0.3)  # packets the callee sent before it heard of the hold arrive
        quiet_from = time.monotonic()
        time.sleep(0.7)
        assert caller.media.packets(quiet_from) == []  # the callee, receiving only, is silent
        held = callee.media.packets(quiet_from)
        assert len(held) >= 25 and {p.source for p in held} == {
            (RELAY_ADDRESS, call.callee_relay_port)}  # the held party still hears the caller
        assert stream(relays.query(call.tag), "a")["packets"] == caller.media.sent

        resumed_at = time.monotonic()
        answer = caller.reinvite("sendrecv").sdp
        offer = callee.wait_request("INVITE", since=resumed_at).sdp
        assert offer.media[0].direction == answer.media[0].direction == "sendrecv"
        assert offer.media[0].port == call.callee_relay_port
        assert answer.media[0].port == call.caller_relay_port
        to_caller = caller.media.wait_packets(25, 2.0, since=resumed_at)
        to_callee = callee.media.wait_packets(25, 2.0, since=resumed_at)
        assert len(to_caller) >= 25 and len(to_callee) >= 25
        assert {p.source for p in to_caller} == {(RELAY_ADDRESS, call.caller_relay_port)}
        assert {p.source for p in to_callee} == {(RELAY_ADDRESS, call.callee_relay_port)}
        settle_and_stop(caller, callee)
        # No packet lost or reordered in the whole call, hold included.
        assert_received_all(caller, callee, call.caller_relay_port)
        assert_received_all(callee, caller, call.callee_relay_port)


# ------------------------------------------------------------------ 4. media timeout
def test_silent_media_hangs_the_call_up_with_bye_on_both_legs(cluster, relays):
    with call_between(cluster, 2106, 2107) as call:
        caller, callee = call.caller, call.callee
        time.sleep(0.5)
        assert caller.media.packets() and callee.media.packets()
        silent_from = time.monotonic()
        caller.media.stop()
        callee.media.stop()

        byes = [phone.wait_request("BYE", MEDIA_TIMEOUT + 4) for phone in (caller, callee)]
        assert all(byes), trace_of(cluster, call.tag)
        for bye in byes:
            assert bye.header("Reason") == MEDIA_TIMEOUT_REASON, bye.headers
            waited = bye.at - silent_from
            assert MEDIA_TIMEOUT - 0.2 <= waited <= MEDIA_TIMEOUT + 2.5, waited
        cdr = wait_cdr(cluster, caller.call_id)
        assert cdr is not None, trace_of(cluster, call.tag)
        assert cdr["hangup_cause"] == "MEDIA_TIMEOUT" and cdr["q850"] == "102", cdr
        assert int(cdr["media_a_packets"]) == caller.media.sent
        assert relays.query(call.tag) is None
        assert cluster.store.relay_session(call.tag) is None


# ------------------------------------------------------------------ 5. relay killed mid-call
def test_a_relay_killed_mid_call_is_restarted_and_media_resumes(cluster, relays):
    with call_between(cluster, 2108, 2109) as call:
        caller, callee = call.caller, call.callee
        time.sleep(1.0)
        record = cluster.store.relay_session(call.tag)
        assert record is not None
        program = "relay:" + record["relay"].rsplit("/", 1)[1]  # "test-host/relay-1"
        before = relays.query(call.tag)
        killed_pid = cluster.kill9(program)
        killed_at = time.monotonic()

        # The first packet after the kill that did not leave the relay before it died.
        resumed = [phone.media.wait_packets(1, 5.0, since=killed_at + 0.05)
                   for phone in (caller, callee)]
        assert all(resumed), cluster.log_tail(10)
        for phone, packets in zip((caller, callee), resumed, strict=True):
            gap = packets[0].at - killed_at
            assert gap < 2.0, f"{phone.user}: RTP resumed {gap:.2f} s after the kill"
        assert cluster.pid_of(program) not in (0, killed_pid)  # supervisord restarted it

        time.sleep(1.0)
        # Packets forwarded since the restart, each counted by the relay before it left.
        forwarded = {"a": len(callee.media.packets(killed_at + 0.05)),
                     "b": len(caller.media.packets(killed_at + 0.05))}
        after = relays.query(call.tag)
        assert after is not None
        for leg in ("a", "b"):
            counted_before, counted_after = (stream(before, leg)["packets"],
                                             stream(after, leg)["packets"])
            assert counted_after > counted_before, (leg, counted_before, counted_after)
            assert counted_after >= forwarded[leg] >= 40, (leg, counted_after, forwarded)
        settle_and_stop(caller, callee)
        for receiver, relay_port in ((caller, call.caller_relay_port),
                                     (callee, call.callee_relay_port)):
            packets = receiver.media.packets()
            assert {p.source for p in packets} == {(RELAY_ADDRESS, relay_port)}
            seqs = [p.seq for p in packets]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # in order, no copies
        assert caller.hangup().status == 200


# ------------------------------------------------------------------ 6. codecs untouched
def assert_only_media_address_changed(sent: bytes, received: SipMessage, relay_port: int) -> None:
    """``received``'s SDP is ``sent`` with c=, the m= port and a=rtcp pointing at the relay
    (and the o= version bumped, RFC 3264 section 8): nothing else differs, in order."""
    sent_lines = sent.decode().split("\r\n")[:-1]
    got_lines = received.body.decode().split("\r\n")[:-1]
    assert len(got_lines) == len(sent_lines), (sent_lines, got_lines)
    for mine, theirs in zip(sent_lines, got_lines, strict=True):
        kind = mine[:2]
        if kind == "c=":
            assert theirs == f"c=IN IP4 {RELAY_ADDRESS}"
        elif kind == "m=":
            media, _port, *rest = mine.split()
            assert theirs == " ".join([media, str(relay_port), *rest])
        elif mine.startswith("a=rtcp:"):
            assert theirs == f"a=rtcp:{relay_port + 1}"
        elif kind == "o=":
            origin = mine.split()
            assert theirs.split()[:2] + theirs.split()[3:] == origin[:2] + origin[3:]
        else:
            assert theirs == mine


def test_codecs_and_telephone_event_pass_through_untouched(cluster):
    with call_between(cluster, 2110, 2111, caller_kwargs={"codecs": (0, 8, 18, 101)},
                      callee_kwargs={"codecs": (8, 101)}) as call:
        assert_only_media_address_changed(call.caller.sent_sdp[0], call.invite,
                                          call.callee_relay_port)
        assert_only_media_address_changed(call.callee.sent_sdp[0], call.ok,
                                          call.caller_relay_port)
        answered = call.ok.sdp.media[0]
        assert answered.formats == ["8", "101"]
        assert answered.attribute("rtpmap") == "8 PCMA/8000"
        assert "rtpmap:101 telephone-event/8000" in answered.attributes
        assert "fmtp:101 0-16" in answered.attributes
        assert call.invite.sdp.media[0].formats == ["0", "8", "18", "101"]
        assert "fmtp:18 annexb=no" in call.invite.sdp.media[0].attributes
        assert call.caller.hangup().status == 200
