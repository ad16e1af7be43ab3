"""RFC 5626 outbound: a phone's registrations tied to its flows (the connection it
registered over, or over UDP the address it came from), one flow per instance rung, a
closed flow never dialed again; keep-alives on both transports."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from calls_helpers import PASSWORD, provision
from harness import running_cluster, wait_for
from sipua import UA
from streamua import SDP, StreamUA, header_of, tag
from test_stream_dial import Caller

DB = 5
USERS = range(3200, 3230)
INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-00a0c91e6bf6>"'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp("outbound")
    redis_server.client(db=DB).flushdb()
    with running_cluster(folder, f"redis://127.0.0.1:{redis_server.port}/{DB}", workers=2,
                         settings={"streams": {"idle_timeout": 30.0}}) as running:
        provision(running, USERS)
        yield running


def flow_contact(ua, reg_id: int, transport: str = "tcp") -> str:
    return (f"<sip:{ua.user}@127.0.0.1:{ua.port};transport={transport};ob>"
            f";+sip.instance={INSTANCE};reg-id={reg_id}")


def register_flow(ua, reg_id: int, transport: str = "tcp"):
    reply = ua.register(PASSWORD, contacts=[flow_contact(ua, reg_id, transport)],
                        extra=["Supported: outbound, path"])
    assert reply is not None and reply.status == 200, reply
    return reply


def bindings(cluster, user: str):
    return sorted(cluster.store.bindings(f"{user}@127.0.0.1"), key=lambda b: b.reg_id or 0)


def call_and_see(cluster, caller_user: str, callee: str, phones: list[StreamUA]):
    """Place a call to ``callee``; the phone (of ``phones``) that got the INVITE answers
    it and the call ends; returns that phone, or the caller's final answer when none rang."""
    caller = Caller(cluster, caller_user, callee)
    try:
        caller.invite()
        rung = []

        def watch(phone):
            invite = phone.next_request("INVITE", timeout=4)
            if invite is not None:
                rung.append((phone, invite))
        watchers = [threading.Thread(target=watch, args=(p,)) for p in phones]
        for w in watchers:
            w.start()
        for w in watchers:
            w.join(10)
        if not rung:
            return caller.final(10)
        assert len(rung) == 1, f"{len(rung)} flows of one instance rung"
        phone, invite = rung[0]
        to_tag = tag()
        phone.answer(invite, 200, "OK", to_tag=to_tag,
                     headers=["Content-Type: application/sdp"],
                     body=SDP)
        final = caller.final()
        assert final is not None and final.status == 200, final
        assert phone.next_request("ACK", timeout=5) is not None
        bye_answered = threading.Thread(target=lambda: (
            (bye := phone.next_request("BYE", timeout=10)) and phone.answer(bye, 200, "OK")))
        bye_answered.start()
        bye_ok = caller.bye()
        bye_answered.join(15)
        assert bye_ok is not None and bye_ok.status == 200, bye_ok
        return phone
    finally:
        caller.close()


def test_a_register_over_tcp_with_outbound_is_tied_to_its_flow(cluster):
    with StreamUA(cluster.address, user="3200") as ua:
        ok = register_flow(ua, 1)
        assert ok.header("Require") == "outbound"
        (binding,) = bindings(cluster, "3200")
        assert binding.reg_id == 1 and binding.conn
        assert binding.destination == ("127.0.0.1", ua.port)
        # The 200 names the flow's contact with its instance and reg-id.
        assert "reg-id=1" in ok.header("Contact") and "+sip.instance" in ok.header("Contact")
        # CRLF keep-alive on the flow (RFC 5626 3.5.1): a pong.
        ua.send(b"\r\n\r\n")
        assert wait_for(lambda: ua._read(time.monotonic() + 0.2) or ua.pongs, 3)
        assert ua.pongs == 1


def test_without_supported_outbound_no_require(cluster):
    with StreamUA(cluster.address, user="3201") as ua:
        reply = ua.register(PASSWORD, contacts=[flow_contact(ua, 1)])
        assert reply is not None and reply.status == 200, reply
        assert reply.header("Require") is None


def test_two_flows_of_one_instance_one_rung_then_the_other_then_480(cluster):
    first = StreamUA(cluster.address, user="3202")
    second = StreamUA(cluster.address, user="3202")
    try:
        register_flow(first, 1)
        time.sleep(0.05)  # the second flow registers later: the newest
        register_flow(second, 2)
        assert [b.reg_id for b in bindings(cluster, "3202")] == [1, 2]
        assert call_and_see(cluster, "3203", "3202", [first, second]) is second
        # The newest flow closes: the other flow carries the next call.
        conn2 = bindings(cluster, "3202")[1].conn
        second.sock.close()
        assert wait_for(lambda: not cluster.store.stream_open("test-host", conn2), 5)
        assert call_and_see(cluster, "3204", "3202", [first]) is first
        # Both closed: nothing is dialed (the phone makes a new flow), the caller gets 480.
        conn1 = bindings(cluster, "3202")[0].conn
        first.sock.close()
        assert wait_for(lambda: not cluster.store.stream_open("test-host", conn1), 5)
        final = call_and_see(cluster, "3205", "3202", [])
        assert final is not None and final.status == 480, final
    finally:
        first.sock.close()
        second.sock.close()


def test_a_register_over_udp_with_reg_id_uses_its_source_as_the_flow(cluster):
    with UA(cluster.address, user="3206") as phone:
        # The Contact names a port nothing listens on: only the flow reaches the phone.
        contact = (f"<sip:3206@127.0.0.1:9;ob>;+sip.instance={INSTANCE};reg-id=1")
        ok = phone.register(PASSWORD, contacts=[contact], extra=["Supported: outbound"])
        assert ok is not None and ok.status == 200 and ok.header("Require") == "outbound", ok
        (binding,) = bindings(cluster, "3206")
        assert binding.destination == ("127.0.0.1", phone.port) and not binding.conn
        caller = Caller(cluster, "3207", "3206")
        try:
            caller.invite()
            phone.sock.settimeout(5)
            while True:
                invite, addr = phone.sock.recvfrom(65535)
                if invite.startswith(b"INVITE "):
                    break
            assert header_of(invite, "Via").startswith("SIP/2.0/UDP ")
            head = invite.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
            keep = [line for line in head if line.split(":", 1)[0].lower() in
                    ("via", "from", "to", "call-id", "cseq")]
            keep = [line + f";tag={tag()}" if line.lower().startswith("to:") else line
                    for line in keep]
            phone.sock.sendto(("\r\n".join(["SIP/2.0 486 Busy Here", *keep,
                                            "Content-Length: 0"]) + "\r\n\r\n").encode(), addr)
            final = caller.final()
            assert final is not None and final.status == 486, final
        finally:
            caller.close()


def test_a_register_for_a_flow_through_a_proxy_gets_439(cluster):
    with UA(cluster.address, user="3208") as phone:
        contact = f"<sip:3208@127.0.0.1:{phone.port};ob>;+sip.instance={INSTANCE};reg-id=1"
        extra = ["Supported: outbound",
                 f"Via: SIP/2.0/UDP 127.0.0.1:{phone.port};branch=z9hG4bK{os.urandom(4).hex()}"]
        reply = phone.register(PASSWORD, contacts=[contact], extra=extra)
    assert reply is not None and reply.status == 439, reply
    assert bindings(cluster, "3208") == []


def stun_binding_request() -> tuple[bytes, bytes]:
    transaction = os.urandom(12)
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + transaction, transaction


def test_udp_keep_alives_are_answered_or_dropped_and_counted(cluster):
    def figures():
        (proc,) = cluster.store.processes("dispatcher")
        return proc
    before = figures()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        request, transaction = stun_binding_request()
        sock.sendto(request, cluster.address)
        answer, _ = sock.recvfrom(2048)
        # A STUN binding success response (0x0101) to our transaction, naming our address.
        assert answer[:2] == b"\x01\x01" and answer[8:20] == transaction
        for _ in range(3):
            sock.sendto(b"\r\n\r\n", cluster.address)
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):  # a CRLF keep-alive is not answered over UDP
            sock.recvfrom(2048)

    def moved():
        now = figures()
        return (now.get("stun", 0) - before.get("stun", 0) == 1
                and now.get("keepalives", 0) - before.get("keepalives", 0) == 3) and now
    assert wait_for(moved, 4), (before, figures())
