"""SIP over TCP and TLS (RFC 3261 section 18): the dispatcher holds the connections, the
workers stay stateless.

SIPp speaks TCP (``-t t1``: one connection to the cluster) but not TLS here, so TLS is
tested with the stream UA (tests/integration/streamua.py) and a certificate made with the
openssl CLI; the stream UA is also the phone registered over a connection that a call
reaches (SIPp cannot take a call over the connection it opened itself).
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from calls_helpers import PASSWORD, callee, caller, flow, provision, register, start_listening
from harness import free_sip_port, running_cluster, wait_for
from sipp import Sipp
from streamua import SDP, StreamUA, header_of, self_signed, tag

from cluster import store as st
from conftest import free_tcp_port

DB = 12
USERS = range(3000, 3030)
MESSAGE_TIMEOUT = 2.0
IDLE_TIMEOUT = 8.0
MAX_PER_SOURCE = 6
MAX_HEADER, MAX_BODY = 8192, 8192


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp("streams")
    cert, key = self_signed(folder)
    redis_server.client(db=DB).flushdb()
    settings = {"streams": {"tls_port": free_tcp_port(), "tls_cert": cert, "tls_key": key,
                            "message_timeout": MESSAGE_TIMEOUT, "idle_timeout": IDLE_TIMEOUT,
                            "max_per_source": MAX_PER_SOURCE,
                            "max_header_bytes": MAX_HEADER, "max_body_bytes": MAX_BODY}}
    with running_cluster(folder, f"redis://127.0.0.1:{redis_server.port}/{DB}", workers=2,
                         settings=settings) as running:
        running.cert = cert
        provision(running, USERS)
        yield running


def over_tcp(sipp: Sipp) -> None:
    """SIPp on one TCP connection, from a port free for TCP too (SIPp binds it)."""
    sipp.transport, sipp.port = "t1", free_sip_port()


def tls_address(cluster) -> tuple[str, int]:
    return ("127.0.0.1", cluster.config.streams.tls_port)


def stream_ua(cluster, user: str, *, tls: bool = False, **kwargs) -> StreamUA:
    if tls:
        return StreamUA(tls_address(cluster), user=user, cafile=cluster.cert, **kwargs)
    return StreamUA(cluster.address, user=user, **kwargs)


def the_binding(cluster, user: str):
    (binding,) = cluster.store.bindings(f"{user}@127.0.0.1")
    return binding


def dispatcher_figures(cluster) -> dict:
    (proc,) = cluster.store.processes("dispatcher")
    return proc


def stream_register(ua: StreamUA) -> None:
    contact = f"<sip:{ua.user}@127.0.0.1:{ua.port};transport={ua.transport.lower()}>"
    reply = ua.register(PASSWORD, contacts=[contact])
    assert reply is not None and reply.status == 200, reply


def answer_call(ua: StreamUA, *, hold: bool = False) -> tuple[bytes, bytes]:
    """Take an INVITE over the connection: 180, 200 with SDP, and the ACK; the INVITE and
    the ACK."""
    invite = ua.next_request("INVITE", timeout=10)
    assert invite is not None, "no INVITE over the connection"
    to_tag = tag()
    ua.answer(invite, 180, "Ringing", to_tag=to_tag)
    ua.answer(invite, 200, "OK", to_tag=to_tag, headers=["Content-Type: application/sdp"],
              body=SDP)
    ack = ua.next_request("ACK")
    assert ack is not None, "no ACK for the 200"
    return invite, ack


def caller_hangs_up(ua: StreamUA, uac) -> None:
    """The SIPp caller's BYE reaches the phone over its connection; 200; SIPp succeeded."""
    bye = ua.next_request("BYE", timeout=10)
    assert bye is not None, "no BYE over the connection"
    ua.answer(bye, 200, "OK")
    uac.result = uac.sipp.wait()
    assert uac.ok, uac.report()


# ------------------------------------------------------------------ registration
def test_register_over_tcp_with_digest_records_the_connection(cluster):
    with stream_ua(cluster, "3000") as ua:
        stream_register(ua)
        binding = the_binding(cluster, "3000")
        assert binding.transport == "tcp"
        assert binding.conn and binding.host == "test-host"
        assert binding.source == ("127.0.0.1", ua.port)
        # The 200 came back over the connection, through its Via (18.2.2).
        assert cluster.store.stream_open("test-host", binding.conn)
        # A CRLF ping is answered with a pong (RFC 5626 3.5.1).
        ua.send(b"\r\n\r\n")
        assert wait_for(lambda: ua._read(time.monotonic() + 0.2) or ua.pongs, 3)
        assert ua.pongs == 1
    # The phone hung up: the connection is gone, and the binding is not used.
    assert wait_for(lambda: not cluster.store.stream_open("test-host", binding.conn), 5)
    # The dispatcher's heartbeat (metrics) counts the connections by transport.
    assert wait_for(lambda: dispatcher_figures(cluster).get("streams_closed_tcp", 0) >= 1, 3)
    assert dispatcher_figures(cluster)["streams_opened_tcp"] >= 1


def test_sipp_registers_over_tcp(cluster, tmp_path):
    result = Sipp("register_md5.xml", cluster.address, tmp_path, 1, transport="t1",
                  port=free_sip_port(), users=[("3001", PASSWORD)], timeout=15).run()
    assert result.returncode == 0 and result.successful == 1, result.summary()
    assert the_binding(cluster, "3001").transport == "tcp"
    (reg,) = cluster.sipctl_json("regs", "3001")
    assert reg["transport"] == "tcp"


def test_tls_register_and_a_call_reaches_it(cluster, tmp_path):
    with stream_ua(cluster, "3002", tls=True) as ua:
        stream_register(ua)
        binding = the_binding(cluster, "3002")
        assert binding.transport == "tls" and binding.conn & 1
        uac = caller(cluster, tmp_path / "uac", "3003", "3002", hold_ms=300)
        uac.sipp.start()
        invite, ack = answer_call(ua)
        via = header_of(invite, "Via")
        assert via.startswith(f"SIP/2.0/TLS 127.0.0.1:{tls_address(cluster)[1]};"), via
        assert header_of(invite, "Contact") == (
            f"<sip:3003@127.0.0.1:{tls_address(cluster)[1]};transport=tls>")
        assert header_of(ack, "Via").startswith("SIP/2.0/TLS ")
        caller_hangs_up(ua, uac)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl.TLSVersion.TLSv1_1
def test_tls_older_than_1_2_is_refused(cluster):
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        StreamUA(tls_address(cluster), user="3004", cafile=cluster.cert,
                 tls_version=ssl.TLSVersion.TLSv1_1)
    with StreamUA(tls_address(cluster), user="3004", cafile=cluster.cert,
                  tls_version=ssl.TLSVersion.TLSv1_2) as ua:
        assert ua.options(timeout=3).status == 200


# ------------------------------------------------------------------ calls, both ways
def test_sipp_over_tcp_calls_a_udp_callee(cluster, tmp_path):
    uas = start_listening(callee(cluster, tmp_path / "uas"))
    register(cluster, "3006", [uas.port])
    uac = caller(cluster, tmp_path / "uac", "3005", "3006", hold_ms=300)
    over_tcp(uac.sipp)
    uac.result = uac.sipp.run()
    uas.result = uas.sipp.wait()
    assert uac.ok and uas.ok, uac.report() + uas.report()
    assert flow(uac.messages) == [
        "> INVITE", "< 407 INVITE", "> ACK", "> INVITE", "< 100 INVITE", "< 180 INVITE",
        "< 200 INVITE", "> ACK", "> BYE", "< 200 BYE"]
    (ok,) = [m for m in uac.messages if m.is_response and m.status == 200
             and m.header("CSeq").endswith("INVITE")]
    # Our Contact towards the TCP caller says TCP, so its in-dialog requests stay on it.
    assert ok.header("Contact") == f"<sip:3006@127.0.0.1:{cluster.sip_port};transport=tcp>"
    (b_invite,) = [m for m in uas.messages if m.direction == "received"
                   and m.method == "INVITE"]
    assert b_invite.header("Via").startswith("SIP/2.0/UDP "), "the UDP leg stays UDP"


def test_a_udp_caller_calls_a_phone_registered_over_tcp(cluster, tmp_path):
    with stream_ua(cluster, "3007") as ua:
        stream_register(ua)
        uac = caller(cluster, tmp_path / "uac", "3008", "3007", hold_ms=300)
        uac.sipp.start()
        invite, _ack = answer_call(ua)
        assert header_of(invite, "Via").startswith(f"SIP/2.0/TCP 127.0.0.1:{cluster.sip_port};")
        assert header_of(invite, "Contact").endswith(";transport=tcp>")
        caller_hangs_up(ua, uac)


def test_a_binding_whose_connection_closed_is_not_used(cluster, tmp_path):
    """An RFC 5626 flow (reg-id) that closed is not dialed again: the phone makes a new one
    (a binding without reg-id is dialed at its Contact: tests/integration/
    test_stream_dial.py)."""
    with stream_ua(cluster, "3009") as ua:
        contact = (f"<sip:3009@127.0.0.1:{ua.port};transport=tcp;ob>"
                   f';+sip.instance="<urn:uuid:3009>";reg-id=1')
        reply = ua.register(PASSWORD, contacts=[contact])
        assert reply is not None and reply.status == 200, reply
        conn = the_binding(cluster, "3009").conn
    assert wait_for(lambda: not cluster.store.stream_open("test-host", conn), 5)
    uac = caller(cluster, tmp_path / "uac", "3010", "3009", scenario="call_uac_fail.xml",
                 timeout=15)
    uac.result = uac.sipp.run()
    assert uac.ok, uac.report()
    assert "< 480 INVITE" in flow(uac.messages)


def test_a_4kb_invite_over_tcp(cluster, tmp_path):
    uas = start_listening(callee(cluster, tmp_path / "uas"))
    register(cluster, "3012", [uas.port])
    padding = b"".join(b"a=x-padding:%04d%s\r\n" % (i, b"p" * 40) for i in range(70))
    body = SDP + padding
    assert len(body) > 4000
    with stream_ua(cluster, "3011") as ua:
        uri = "sip:3012@127.0.0.1"
        headers = [f"Contact: <sip:3011@127.0.0.1:{ua.port};transport=tcp>",
                   "Content-Type: application/sdp"]
        ua.send(ua.request("INVITE", uri, headers, body, cseq=1))
        challenge = ua.receive(5)
        assert challenge is not None and challenge.status == 407, challenge
        ua.send(ack_for(ua, challenge, uri, 1))
        auth = ua.authorization(_as_www(challenge), "INVITE", uri, PASSWORD)
        ua.send(ua.request("INVITE", uri, headers + [f"Proxy-Authorization: {auth}"], body,
                           cseq=2))
        ok = ua.receive(10)
        assert ok is not None and ok.status == 200, ok
        ua.send(ack_for(ua, ok, uri, 2))
        ua.send(ua.request("BYE", uri, [f"To: {ok.header('To')}"], cseq=3)
                .replace(b"To: <sip:3011@127.0.0.1>\r\n", b"", 1))
        bye_ok = ua.receive(5)
        assert bye_ok is not None and bye_ok.status == 200, bye_ok
    uas.result = uas.sipp.wait()
    assert uas.ok, uas.report()
    (b_invite,) = [m for m in uas.messages if m.direction == "received" and m.method == "INVITE"]
    assert "x-padding:0069" in b_invite.body


def _as_www(challenge):
    """The 407's Proxy-Authenticate offered as WWW-Authenticate (sipua reads that one)."""
    challenge.headers = [("WWW-Authenticate" if k.lower() == "proxy-authenticate" else k, v)
                         for k, v in challenge.headers]
    return challenge


def ack_for(ua: StreamUA, reply, uri: str, cseq: int) -> bytes:
    data = ua.request("ACK", uri, [], cseq=cseq)
    return data.replace(b"To: <sip:%s@127.0.0.1>" % ua.user.encode(),
                        b"To: " + reply.header("To").encode(), 1)


def test_a_worker_killed_during_a_tcp_call(cluster, tmp_path):
    """The connection lives in the dispatcher: the worker that holds the call killed, the
    TCP caller's BYE (over the same connection) still ends the call on both sides."""
    uas = start_listening(callee(cluster, tmp_path / "uas"))
    register(cluster, "3014", [uas.port])
    uac = caller(cluster, tmp_path / "uac", "3013", "3014", hold_ms=6000, timeout=30)
    over_tcp(uac.sipp)
    uac.sipp.start()
    try:
        def answered():
            return next((rec for _, rec in cluster.store.call_records()
                         if rec.get("caller") == "3013" and rec.get("state") == "answered"),
                        None)
        record = wait_for(answered, 10)
        assert record, "the call was not answered"
        # sipctl names each leg's transport, and the host (and connection) it leaves by.
        call_id = record["a"]["call_id"]
        legs = cluster.sipctl_json("call", call_id.decode() if isinstance(call_id, bytes)
                           else call_id)["legs"]
        assert [(leg["name"], leg["transport"], leg["host"]) for leg in legs] == [
            ("a", "tcp", "test-host"), ("b0", "udp", "test-host")], legs
        assert legs[0]["conn"] in {int(c) for c in cluster.store.redis.hkeys(
            st.streams_key("test-host"))} and legs[1]["conn"] is None
        cluster.kill9(f"worker:{record['worker']}")
        uac.result = uac.sipp.wait()
        uas.result = uas.sipp.wait()
    finally:
        uac.sipp.stop()
        uas.sipp.stop()
    assert uac.ok and uas.ok, uac.report() + uas.report()


# ------------------------------------------------------------------ bad input
def options_over_tcp(cluster) -> int | None:
    with stream_ua(cluster, "3015") as ua:
        reply = ua.options(timeout=3)
        return None if reply is None else reply.status


def test_bad_input_closes_that_connection_only(cluster):
    with stream_ua(cluster, "3016") as bystander:
        assert bystander.options(timeout=3).status == 200
        # A slowloris: a message begun and dribbled, never whole.
        with stream_ua(cluster, "3017") as slow:
            slow.send(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n")
            started = time.monotonic()
            closed = False
            while time.monotonic() - started < MESSAGE_TIMEOUT + 3:
                try:
                    slow.send(b"X-Slow: 1\r\n")
                except OSError:
                    closed = True
                    break
                if slow.closed_within(0.5):
                    closed = True
                    break
            assert closed, "a slowloris connection stayed open"
            assert time.monotonic() - started >= MESSAGE_TIMEOUT - 0.5
        # 10 MB of header: closed at the limit, long before the end.
        with stream_ua(cluster, "3018") as big:
            sent = 0
            chunk = b"X-Big: " + b"b" * 4089 + b"\r\n"
            with pytest.raises(OSError):
                big.send(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n")
                while sent < 10 * 1024 * 1024:
                    big.sock.sendall(chunk)
                    sent += len(chunk)
                big.closed_within(3)
                raise OSError("not closed")
            assert sent < 10 * 1024 * 1024
        # A Content-Length past the limit: closed before the body is read.
        with stream_ua(cluster, "3019") as long_body:
            long_body.send(b"MESSAGE sip:3016@127.0.0.1 SIP/2.0\r\nCall-ID: big@x\r\n"
                           b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
            assert long_body.closed_within(3)
        # No Content-Length on a stream.
        with stream_ua(cluster, "3020") as no_length:
            no_length.send(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nCall-ID: nolen@x\r\n\r\n")
            assert no_length.closed_within(3)
        # The bystander carries on, and so do new connections.
        assert bystander.options(timeout=3).status == 200
        assert options_over_tcp(cluster) == 200
    log = cluster.read_log("dispatcher")
    assert "not complete within 2 s (streams.message_timeout)" in log
    assert f"headers longer than {MAX_HEADER} bytes" in log
    assert f"Content-Length {MAX_BODY + 1} over {MAX_BODY} bytes" in log
    assert "no Content-Length (required on a stream)" in log


def test_an_idle_connection_is_closed(cluster):
    with stream_ua(cluster, "3021") as idle:
        started = time.monotonic()
        assert idle.closed_within(IDLE_TIMEOUT + 3)
        assert time.monotonic() - started >= IDLE_TIMEOUT - 0.5


def test_connections_per_source_are_limited(cluster):
    held = [socket.create_connection(cluster.address, timeout=3)
            for _ in range(MAX_PER_SOURCE)]
    try:
        with stream_ua(cluster, "3022") as one_too_many:
            assert one_too_many.closed_within(3)
        # Another source address (127.0.0.2 is loopback too) is not held back.
        with StreamUA(cluster.address, user="3023", bind="127.0.0.2") as other:
            assert other.options(timeout=3).status == 200
    finally:
        for sock in held:
            sock.close()
    assert "refused: 6 open from that address (streams.max_per_source)" in \
        cluster.read_log("dispatcher")
