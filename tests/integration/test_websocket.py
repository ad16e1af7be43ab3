"""SIP over WebSocket (RFC 7118): browser phones on WS and WSS listeners of the dispatcher.

The browser phone is tests/integration/wsua.py: the upgrade offering ``sip``, masked
frames, and a Via and Contact naming a ``<random>.invalid`` host as SIP.js and JsSIP do,
so a request for it that went anywhere but its connection would be lost.  The UDP phone
is rtp_phone.Phone.  The cluster runs its media through a relay: the calls carry real
paced RTP both ways, and an offer the relay cannot carry (DTLS-SRTP) gets 488.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time

import pytest
from harness import running_cluster, wait_for
from rtp_phone import Media, Phone
from streamua import header_of, self_signed
from wsua import WsUA, answer_ws_call, take_media, ws_offer

from cluster import envelope
from cluster.sip import websocket as ws
from conftest import ROOT, free_tcp_port

DB = 13
PASSWORD = "1234"
USERS = range(3100, 3140)
RTP_MIN, RTP_MAX = 25000, 25199
FRAME_RATE = 50
MAX_HEADER, MAX_BODY = 8192, 8192
PATH = "/sip"
HOST = "test-host"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp("websocket")
    cert, key = self_signed(folder)
    redis_server.client(db=DB).flushdb()
    settings = {
        "streams": {"tls_port": free_tcp_port(), "tls_cert": cert, "tls_key": key,
                    "ws": True, "ws_port": free_tcp_port(), "wss": True,
                    "wss_port": free_tcp_port(), "ws_path": PATH, "ws_frame_rate": FRAME_RATE,
                    "message_timeout": 2.0, "max_header_bytes": MAX_HEADER,
                    "max_body_bytes": MAX_BODY},
        "media": {"mode": "relay", "rtp_port_min": RTP_MIN, "rtp_port_max": RTP_MAX,
                  "relays": 1},
    }
    with running_cluster(folder, f"redis://127.0.0.1:{redis_server.port}/{DB}", workers=2,
                         settings=settings) as running:
        running.cert = cert
        for user in USERS:
            running.add_user(str(user), PASSWORD)
        yield running


def ws_port(cluster) -> int:
    return cluster.config.streams.ws_port


def wss_port(cluster) -> int:
    return cluster.config.streams.wss_port


def ws_ua(cluster, user: str, *, secure: bool = False, **kwargs) -> WsUA:
    if secure:
        return WsUA(("127.0.0.1", wss_port(cluster)), user=user, cafile=cluster.cert,
                    path=PATH, **kwargs)
    return WsUA(("127.0.0.1", ws_port(cluster)), user=user, path=PATH, **kwargs)


def registered(ua: WsUA):
    assert ua.status == 101, ua.answer_head
    reply = ua.register_digest(PASSWORD)
    assert reply is not None and reply.status == 200, reply
    return reply


def the_binding(cluster, user: str):
    (binding,) = cluster.store.bindings(f"{user}@127.0.0.1")
    return binding


def cdrs_of(cluster, caller: str) -> list[dict]:
    return [c for c in cluster.store.cdrs_after() if c.get("caller") == caller]


def relayed(address_port: tuple[str, int]) -> bool:
    return address_port[0] == "127.0.0.1" and RTP_MIN <= address_port[1] <= RTP_MAX


def sdp_port(body: bytes) -> int:
    (line,) = [ln for ln in body.split(b"\r\n") if ln.startswith(b"m=audio ")]
    return int(line.split()[1])


def dispatcher_figures(cluster) -> dict:
    (proc,) = cluster.store.processes("dispatcher")
    return proc


# ------------------------------------------------------------------ registration
def test_register_over_ws_with_digest(cluster):
    with ws_ua(cluster, "3100") as ua:
        assert b"Sec-WebSocket-Protocol: sip\r\n" in ua.answer_head + b"\r\n"
        ok = registered(ua)
        # The 200 came back over the connection with the phone's own .invalid Via.
        assert ok.header("Via").startswith(f"SIP/2.0/WS {ua.host};")
        binding = the_binding(cluster, "3100")
        assert binding.transport == "ws" and binding.host == HOST
        assert envelope.stream_transport(binding.conn) == "WS"
        assert binding.source == ("127.0.0.1", ua.port)
        assert cluster.store.stream_open(HOST, binding.conn)
        ua.ping(b"hello")
        assert wait_for(lambda: ua._read(time.monotonic() + 0.2) or ua.pongs, 3)
        assert ua.pongs == 1
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "--config",
                               str(cluster.config_path), "regs", "3100", "--json"], cwd=ROOT,
                              capture_output=True, text=True, env=cluster.env, timeout=30)
        assert done.returncode == 0, done.stderr
        (reg,) = json.loads(done.stdout)
        assert reg["transport"] == "ws"
    assert wait_for(lambda: not cluster.store.stream_open(HOST, binding.conn), 5)
    figures = wait_for(lambda: (f := dispatcher_figures(cluster)).get("streams_closed_ws")
                       and f, 3)
    assert figures["streams_opened_ws"] >= 1 and figures["streams_messages_ws"] >= 2
    assert figures["streams_bytes_in_ws"] > 0 and figures["streams_bytes_out_ws"] > 0


# ------------------------------------------------------------------ calls, both ways
def test_a_ws_phone_calls_a_udp_phone_through_the_relay_and_hangs_up(cluster):
    callee = Phone(cluster.address, "3102", PASSWORD)
    media = Media()
    try:
        assert callee.register() == 200
        answered: dict = {}

        def answer():
            invite = callee.wait_call(10)
            answered["invite"] = invite
            callee.answer(invite, media_from="ack")

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        with ws_ua(cluster, "3101") as ua:
            registered(ua)
            offer = ws_offer(media)
            ok = ua.invite("3102", PASSWORD, offer)
            assert ok is not None and ok.status == 200, ok
            ua.ack()
            answering.join(10)
            # Our Contact towards the WS leg names the WS listener.
            assert ok.header("Contact") == (
                f"<sip:3102@127.0.0.1:{ws_port(cluster)};transport=ws>")
            b_invite = answered["invite"]
            assert b_invite.header("Via").startswith("SIP/2.0/UDP "), "the UDP leg stays UDP"
            # Both sides were given the relay, and real RTP flows both ways through it.
            body = ok.raw.split(b"\r\n\r\n", 1)[1]
            assert RTP_MIN <= sdp_port(body) <= RTP_MAX
            take_media(media, ok)
            got = media.wait_packets(25, 5)
            assert len(got) >= 25 and all(relayed(p.source) for p in got)
            assert len(callee.media.wait_packets(25, 5)) >= 25
            assert all(relayed(p.source) for p in callee.media.packets())
            bye_ok = ua.bye()
            assert bye_ok is not None and bye_ok.status == 200, bye_ok
        assert callee.wait_request("BYE", 5) is not None
    finally:
        callee.close()
        media.close()
    cdrs = wait_for(lambda: cdrs_of(cluster, "3101"), 5)
    assert len(cdrs) == 1, cdrs
    assert cdrs[0]["callee"] == "3102" and cdrs[0]["hangup_side"] == "caller"


def test_a_udp_phone_calls_a_ws_phone_and_hangs_up(cluster):
    caller = Phone(cluster.address, "3104", PASSWORD)
    media = Media()
    try:
        with ws_ua(cluster, "3103") as ua:
            registered(ua)
            placed: dict = {}
            calling = threading.Thread(
                target=lambda: placed.setdefault("ok", caller.call("3103", timeout=10)),
                daemon=True)
            calling.start()
            invite, ack = answer_ws_call(ua, media)
            calling.join(10)
            assert placed["ok"].status == 200
            # Sent to the phone's .invalid Contact, over its connection, and ours says WS.
            assert invite.startswith(f"INVITE sip:3103@{ua.host};transport=ws SIP/2.0".encode())
            assert header_of(invite, "Via").startswith(
                f"SIP/2.0/WS 127.0.0.1:{ws_port(cluster)};")
            assert header_of(invite, "Contact") == (
                f"<sip:3104@127.0.0.1:{ws_port(cluster)};transport=ws>")
            assert RTP_MIN <= sdp_port(invite.split(b"\r\n\r\n", 1)[1]) <= RTP_MAX
            assert header_of(ack, "Via").startswith("SIP/2.0/WS ")
            got = media.wait_packets(25, 5)
            assert len(got) >= 25 and all(relayed(p.source) for p in got)
            assert len(caller.media.wait_packets(25, 5)) >= 25
            # The UDP phone hangs up: the BYE comes over the WebSocket.
            hanging = threading.Thread(target=lambda: placed.setdefault("bye", caller.hangup()),
                                       daemon=True)
            hanging.start()
            bye = ua.next_request("BYE", timeout=10)
            assert bye is not None, "no BYE over the WebSocket"
            ua.answer(bye, 200, "OK")
            hanging.join(10)
            assert placed["bye"] is not None and placed["bye"].status == 200
    finally:
        caller.close()
        media.close()
    cdrs = wait_for(lambda: cdrs_of(cluster, "3104"), 5)
    assert len(cdrs) == 1, cdrs
    assert cdrs[0]["callee"] == "3103" and cdrs[0]["hangup_side"] == "caller"


def test_wss_with_the_self_signed_certificate(cluster):
    caller = Phone(cluster.address, "3106", PASSWORD)
    media = Media()
    try:
        with ws_ua(cluster, "3105", secure=True) as ua:
            registered(ua)
            binding = the_binding(cluster, "3105")
            assert binding.transport == "wss"
            assert envelope.stream_transport(binding.conn) == "WSS"
            placed: dict = {}
            calling = threading.Thread(
                target=lambda: placed.setdefault("ok", caller.call("3105", timeout=10)),
                daemon=True)
            calling.start()
            invite, _ack = answer_ws_call(ua, media)
            calling.join(10)
            assert placed["ok"].status == 200
            assert header_of(invite, "Via").startswith(
                f"SIP/2.0/WSS 127.0.0.1:{wss_port(cluster)};")
            assert header_of(invite, "Contact").endswith(
                f"@127.0.0.1:{wss_port(cluster)};transport=wss>")
            # The WSS phone hangs up.
            ua.send(_bye_from_callee(ua, invite))
            reply = ua.receive(5)
            assert reply is not None and reply.status == 200, reply
        assert caller.wait_request("BYE", 5) is not None
    finally:
        caller.close()
        media.close()
    cdrs = wait_for(lambda: cdrs_of(cluster, "3106"), 5)
    assert len(cdrs) == 1 and cdrs[0]["hangup_side"] == "callee", cdrs


def _bye_from_callee(ua: WsUA, invite: bytes) -> bytes:
    """The callee's BYE: From and To of the INVITE swapped (with our tag on From)."""
    frm, to = header_of(invite, "From"), header_of(invite, "To")
    target = header_of(invite, "Contact").strip("<>").split(">")[0]
    lines = [f"BYE {target} SIP/2.0",
             f"Via: SIP/2.0/{ua.transport} {ua.host};branch=z9hG4bK{os.urandom(6).hex()}",
             "Max-Forwards: 70", f"From: {to};tag={ua.answered_tag}", f"To: {frm}",
             f"Call-ID: {header_of(invite, 'Call-ID')}", "CSeq: 1 BYE", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------ media the relay cannot carry
def test_a_dtls_srtp_offer_gets_488_with_a_warning(cluster):
    callee = Phone(cluster.address, "3108", PASSWORD)
    try:
        assert callee.register() == 200
        with ws_ua(cluster, "3107") as ua:
            registered(ua)
            offer = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
                     b"t=0 0\r\na=group:BUNDLE 0\r\n"
                     b"m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\na=mid:0\r\na=rtcp-mux\r\n"
                     b"a=ice-ufrag:abcd\r\na=ice-pwd:0123456789012345678901\r\n"
                     b"a=fingerprint:sha-256 AA:BB\r\na=setup:actpass\r\n"
                     b"a=rtpmap:111 opus/48000/2\r\n")
            refused = ua.invite("3108", PASSWORD, offer)
            assert refused is not None and refused.status == 488, refused
            assert refused.header("Warning") == (
                '302 127.0.0.1 "Incompatible transport protocol: UDP/TLS/RTP/SAVPF '
                '(the media relay carries RTP/AVP(F) and RTP/SAVP(F) over UDP only)"')
            # The connection carries on.
            assert ua.options(timeout=3).status == 200
        assert callee.wait_request("INVITE", 1) is None  # nothing rang
    finally:
        callee.close()
    cdrs = wait_for(lambda: cdrs_of(cluster, "3107"), 5)
    assert len(cdrs) == 1 and int(cdrs[0]["sip_status"]) == 488, cdrs
    assert (cdrs[0]["hangup_cause"], int(cdrs[0]["q850"])) == ("INCOMPATIBLE_DESTINATION", 88)


# ------------------------------------------------------------------ bad input
def test_an_upgrade_without_the_sip_subprotocol_is_refused(cluster):
    for protocol in (None, "chat"):
        with ws_ua(cluster, "3109", protocol=protocol) as ua:
            assert ua.status == 400, ua.answer_head
            assert ua.closed_within(3)
    with WsUA(("127.0.0.1", ws_port(cluster)), user="3109", path="/elsewhere") as ua:
        assert ua.status == 404 and ua.closed_within(3)
    # A SIP/TCP listener is no WebSocket: nor the other way round.
    with ws_ua(cluster, "3109", upgrade=False) as ua:
        ua.send_raw(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nContent-Length: 0\r\n\r\n")
        answer = b""
        ua.sock.settimeout(3)
        while chunk := ua.sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    log = cluster.read_log("dispatcher")
    assert log.count("handshake without Sec-WebSocket-Protocol: sip (RFC 7118)") == 2
    assert "handshake path b'/elsewhere' is not '/sip' (streams.ws_path)" in log


def test_each_violation_closes_only_its_connection(cluster):
    with ws_ua(cluster, "3110") as bystander:
        registered(bystander)
        with ws_ua(cluster, "3111") as unmasked:
            unmasked.send_raw(ws.frame(ws.TEXT, b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n\r\n"))
            assert unmasked.closed_within(3)
            assert [c[:2] for c in unmasked.close_frames] == [struct.pack("!H", 1002)]
        with ws_ua(cluster, "3112") as oversized:
            # Announces 1 MB: refused from the frame's header, the payload never read.
            oversized.send_raw(struct.pack("!BBQ", 0x81, 0xFF, 1 << 20) + b"abcd")
            assert oversized.closed_within(3)
            assert [c[:2] for c in oversized.close_frames] == [struct.pack("!H", 1009)]
        with ws_ua(cluster, "3113") as flood:
            ping = ws.frame(ws.PING, b"", mask=b"abcd")
            try:
                for _ in range(50):  # 5,000 frames at most, 100 in each write
                    flood.send_raw(ping * 100)
                    time.sleep(0.001)
            except OSError:
                pass  # cut off
            assert flood.closed_within(3)
        # The bystander carries on, registered and answered.
        assert bystander.options(timeout=3).status == 200
        assert cluster.store.stream_open(HOST, the_binding(cluster, "3110").conn)
    log = cluster.read_log("dispatcher")
    assert log.count("an unmasked frame from the client (RFC 6455 5.1)") == 1
    assert log.count(f"a message of more than {MAX_HEADER + MAX_BODY} bytes") == 1
    assert log.count(f"more than {FRAME_RATE} frames a second (streams.ws_frame_rate)") == 1


def test_the_dispatchers_descriptors_come_back_to_their_count(cluster):
    pid = cluster.pid_of("dispatcher")

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))
    time.sleep(0.5)
    baseline = descriptors()
    opened = [ws_ua(cluster, str(3120 + i), secure=bool(i % 2)) for i in range(10)]
    try:
        for ua in opened:
            assert ua.options(timeout=3).status == 200
        assert descriptors() >= baseline + 10
        refused = ws_ua(cluster, "3130", protocol=None)
        assert refused.closed_within(3)
        refused.sock.close()
    finally:
        for ua in opened:
            ua.sock.close()
    assert wait_for(lambda: descriptors() == baseline, 5), (descriptors(), baseline)
