"""A phone registered over TCP through one host, called through the other.

Two hosts in network namespaces with one shared Redis (the topology of
tests/integration/test_multihost.py, its ``hosts`` fixture).  The phone's connection lives
in host 1's dispatcher; a call entering host 2 reaches it through host 1 (host 2's worker
hands the INVITE off to host 1's dispatcher, sealed, naming the connection), the phone's
answers come back over that connection, and the call ends from either side.
"""

from __future__ import annotations

import threading

import pytest
import test_multihost
from harness import wait_for
from netns import LAN_ADDRESS, Topology
from streamua import StreamUA, header_of, tag
from test_multihost import NORMAL_CLEARING, PASSWORD, REALM, SIP_PORT, phone, wait_cdr

hosts = test_multihost.hosts  # the two hosts and their Redis, this module's own (module scope)


def sdp() -> bytes:
    return (f"v=0\r\no=phone 1 1 IN IP4 {LAN_ADDRESS}\r\ns=-\r\nc=IN IP4 {LAN_ADDRESS}\r\n"
            "t=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()


def tcp_phone(hosts, host: int, user: str) -> StreamUA:
    """A phone on the LAN registered over TCP through host ``host``."""
    ua = StreamUA(hosts.address(host), user=user, domain=REALM, bind=LAN_ADDRESS)
    contact = f"<sip:{user}@{LAN_ADDRESS}:{ua.port};transport=tcp>"
    reply = ua.register(PASSWORD, contacts=[contact])
    assert reply is not None and reply.status == 200, reply
    return ua


def in_dialog_bye(ua: StreamUA, invite: bytes, to_tag: str) -> bytes:
    """The callee's BYE in the dialog an INVITE it answered made (over its connection)."""
    target = header_of(invite, "Contact").strip("<>").split(">")[0]
    lines = [f"BYE {target} SIP/2.0",
             f"Via: SIP/2.0/TCP {LAN_ADDRESS}:{ua.port};branch=z9hG4bK{tag()}{tag()}",
             "Max-Forwards: 70",
             f"From: {header_of(invite, 'To')};tag={to_tag}",
             f"To: {header_of(invite, 'From')}",
             f"Call-ID: {header_of(invite, 'Call-ID')}",
             "CSeq: 1 BYE", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("hangs_up", ["caller", "callee"])
def test_a_call_entering_host_2_reaches_a_phone_connected_to_host_1(hosts, hangs_up):
    callee_user, caller_user = ("1002", "1003") if hangs_up == "caller" else ("1004", "1005")
    callee = tcp_phone(hosts, 1, callee_user)
    caller = phone(hosts, 2, caller_user, respond_to_source=True)
    try:
        (binding,) = hosts.store.bindings(f"{callee_user}@{REALM}")
        assert binding.host == "h1" and binding.conn and binding.transport == "tcp"
        assert hosts.store.stream_open("h1", binding.conn)
        before = hosts.dispatcher(1)
        answered: dict = {}

        def answer():
            invite = callee.next_request("INVITE", timeout=10)
            if invite is None:
                return
            answered["invite"] = invite
            answered["tag"] = to_tag = tag()
            callee.answer(invite, 180, "Ringing", to_tag=to_tag)
            callee.answer(invite, 200, "OK", to_tag=to_tag,
                          headers=["Content-Type: application/sdp"], body=sdp())
            answered["ack"] = callee.next_request("ACK", timeout=5)

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        ok = caller.call(callee_user, timeout=10.0)
        answering.join(15)
        assert ok.status == 200, ok
        invite = answered.get("invite")
        assert invite is not None, "no INVITE over the connection to host 1"
        assert answered.get("ack") is not None, "no ACK over the connection"
        # Sent by host 2's worker (its Via names host 2, over TCP: the stream's transport),
        # carried by host 1's dispatcher over the phone's connection.
        via = header_of(invite, "Via")
        assert via.startswith(f"SIP/2.0/TCP {Topology.host_address(2)}:{SIP_PORT};"), via
        # The INVITE was handed off to host 1 once (answered at once: no retransmission);
        # the 200 came back over the connection to host 1, whose worker sent the ACK.
        assert wait_for(lambda: hosts.dispatcher(1)["egress"] - before["egress"] == 1, 3.0), (
            before["egress"], hosts.dispatcher(1)["egress"])

        if hangs_up == "caller":
            bye_answered: dict = {}

            def answer_bye():
                bye = callee.next_request("BYE", timeout=10)
                if bye is not None:
                    bye_answered["bye"] = bye
                    callee.answer(bye, 200, "OK")

            answering = threading.Thread(target=answer_bye, daemon=True)
            answering.start()
            reply = caller.hangup(timeout=5.0)
            answering.join(15)
            assert reply is not None and reply.status == 200, reply
            assert "bye" in bye_answered, "no BYE over the connection to host 1"
            assert NORMAL_CLEARING in header_of(bye_answered["bye"], "Reason")
        else:
            callee.send(in_dialog_bye(callee, invite, answered["tag"]))
            reply = callee.receive(5.0)
            assert reply is not None and reply.status == 200, reply
            bye = caller.wait_request("BYE", 5.0)
            assert bye is not None and NORMAL_CLEARING in bye.header("Reason"), bye
        cdr = wait_cdr(hosts, caller.call_id)
        assert cdr is not None and cdr["hangup_cause"] == "NORMAL_CLEARING", cdr
        call_tag = header_of(invite, "Call-ID").split(".")[1]
        assert wait_for(lambda: hosts.store.relay_session(call_tag) is None, 3.0)
    finally:
        caller.close()
        callee.sock.close()
