"""Retransmissions per transport (RFC 3261 section 17): over a connection (TCP) the
cluster's transactions send a request or a non-2xx final once, the connection being
reliable; over UDP the same message goes again on Timer A, E or G.  The 2xx to an INVITE
goes again until the ACK over any transport (13.3.1.4).

Each phone here answers late (``LATE`` seconds after the message came) and counts the
copies that came meanwhile: with T1 = 0.5 s, UDP copies come at 0.5 and 1.5 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from calls_helpers import PASSWORD, callee, caller, provision, register, start_listening
from harness import running_cluster
from sipua import UA
from streamua import SDP, StreamUA, header_of, tag

DB = 1  # this module's Redis database on the session's redis-server
USERS = range(3200, 3220)
LATE = 2.2  # seconds: past Timer A/E's first two firings (0.5 s, 1.5 s) and G's


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp("reliable")
    redis_server.client(db=DB).flushdb()
    with running_cluster(folder, f"redis://127.0.0.1:{redis_server.port}/{DB}",
                         workers=2) as running:
        provision(running, USERS)
        yield running


@dataclass
class DatagramPhone(UA):
    """The stream UA's phone side over UDP: what it receives from the cluster is read
    into ``inbox`` the same way."""

    transport: str = field(default="UDP", init=False)
    inbox: list[bytes] = field(default_factory=list, init=False)

    def _read(self, deadline: float) -> bool:
        """Read one datagram within the deadline into the inbox; False when none came."""
        data = self.datagram(deadline)
        if data is not None:
            self.inbox.append(data)
        return data is not None

    next_message = StreamUA.next_message
    next_request = StreamUA.next_request
    answer = StreamUA.answer


def copies_of(phone, first: bytes, seconds: float) -> list[bytes]:
    """The copies of ``first`` (same start line, Call-ID, CSeq and top Via) that reach
    ``phone`` within ``seconds``."""
    key = _identity(first)
    deadline = time.monotonic() + seconds
    copies = []
    while (left := deadline - time.monotonic()) > 0:
        data = phone.next_message(lambda d: _identity(d) == key, left)
        if data is None:
            break
        copies.append(data)
    return copies


def _identity(data: bytes) -> tuple:
    return (data.split(b"\r\n", 1)[0], header_of(data, "Call-ID"), header_of(data, "CSeq"),
            header_of(data, "Via"))


def register_phone(phone) -> None:
    contact = f"<sip:{phone.user}@127.0.0.1:{phone.port};transport={phone.transport.lower()}>"
    reply = phone.register(PASSWORD, contacts=[contact])
    assert reply is not None and reply.status == 200, reply


def late_callee(cluster, tmp_path, phone, caller_user: str) -> tuple[int, int]:
    """A SIPp caller over UDP calls ``phone``, which answers the INVITE ``LATE`` s after it
    came, then answers the caller's BYE ``LATE`` s after it came: the copies of each
    that came meanwhile (INVITE, BYE)."""
    uac = caller(cluster, tmp_path / "uac", caller_user, phone.user, hold_ms=300)
    uac.sipp.start()
    try:
        invite = phone.next_request("INVITE", timeout=10)
        assert invite is not None, "no INVITE reached the phone"
        invites = copies_of(phone, invite, LATE)
        to_tag = tag()
        phone.answer(invite, 180, "Ringing", to_tag=to_tag)
        phone.answer(invite, 200, "OK", to_tag=to_tag,
                     headers=["Content-Type: application/sdp"], body=SDP)
        assert phone.next_request("ACK") is not None, "no ACK for the 200"
        bye = phone.next_request("BYE", timeout=10)
        assert bye is not None, "no BYE reached the phone"
        byes = copies_of(phone, bye, LATE)
        phone.answer(bye, 200, "OK")
        uac.result = uac.sipp.wait()
    finally:
        uac.sipp.stop()
    assert uac.ok, uac.report()
    return len(invites), len(byes)


def test_a_tcp_callee_answering_late_gets_one_invite_and_one_bye(cluster, tmp_path):
    with StreamUA(cluster.address, user="3200") as phone:
        register_phone(phone)
        assert late_callee(cluster, tmp_path, phone, "3201") == (0, 0)


def test_a_udp_callee_answering_late_gets_the_invite_and_the_bye_again(cluster, tmp_path):
    """The same call over UDP: Timer A's copies at 0.5 and 1.5 s, Timer E's too."""
    with DatagramPhone(cluster.address, user="3202") as phone:
        register_phone(phone)
        assert late_callee(cluster, tmp_path, phone, "3203") == (2, 2)


def tcp_call(cluster, ua: StreamUA, callee_user: str) -> tuple[str, bytes, list[str]]:
    """A TCP caller's INVITE, with the 407 answered: (uri, its headers, the request)."""
    uri = f"sip:{callee_user}@127.0.0.1"
    headers = [f"Contact: <sip:{ua.user}@127.0.0.1:{ua.port};transport=tcp>",
               "Content-Type: application/sdp"]
    ua.send(ua.request("INVITE", uri, headers, SDP, cseq=1))
    challenge = ua.receive(5)
    assert challenge is not None and challenge.status == 407, challenge
    ua.send(ack(ua, challenge.header("To"), uri, 1, ua.last_sent))
    challenge.headers = [("WWW-Authenticate" if k.lower() == "proxy-authenticate" else k, v)
                         for k, v in challenge.headers]
    auth = ua.authorization(challenge, "INVITE", uri, PASSWORD)
    invite = ua.request("INVITE", uri, headers + [f"Proxy-Authorization: {auth}"], SDP, cseq=2)
    ua.send(invite)
    return uri, invite, headers


def ack(ua: StreamUA, to: str, uri: str, cseq: int, invite: bytes | None = None) -> bytes:
    """An ACK: for a non-2xx final with ``invite``'s Via (same branch), else a new one."""
    data = ua.request("ACK", uri, [], cseq=cseq)
    data = data.replace(b"To: <sip:%s@127.0.0.1>" % ua.user.encode(), b"To: " + to.encode(), 1)
    if invite is not None:
        data = data.replace(b"Via: " + header_of(data, "Via").encode(),
                            b"Via: " + header_of(invite, "Via").encode(), 1)
    return data


def test_a_tcp_caller_acking_late_gets_one_busy_and_the_200_again(cluster, tmp_path):
    """Timer G is not started over TCP (17.2.1): one 486 however late the ACK.  The 2xx
    is sent again until the ACK whatever the transport (13.3.1.4)."""
    busy = start_listening(callee(cluster, tmp_path / "busy", scenario="call_uas_busy.xml"))
    register(cluster, "3205", [busy.port])
    with StreamUA(cluster.address, user="3204") as ua:
        ua.skip_provisional = True
        uri, invite, _ = tcp_call(cluster, ua, "3205")
        final = ua.next_message(lambda d: d.startswith(b"SIP/2.0 486 "), 10)
        assert final is not None, "no 486"
        assert copies_of(ua, final, LATE) == []  # over UDP: at 0.5, 1.5 s
        ua.send(ack(ua, header_of(final, "To"), uri, 2, invite))
    busy.result = busy.sipp.wait()
    assert busy.ok, busy.report()

    answering = start_listening(callee(cluster, tmp_path / "answering"))
    register(cluster, "3207", [answering.port])
    with StreamUA(cluster.address, user="3206") as ua:
        uri, invite, _ = tcp_call(cluster, ua, "3207")
        ok = ua.next_message(lambda d: d.startswith(b"SIP/2.0 200 ")
                             and header_of(d, "CSeq") == "2 INVITE", 10)
        assert ok is not None, "no 200"
        assert len(copies_of(ua, ok, 0.9)) == 1  # at 0.5 s, though over TCP
        ua.send(ack(ua, header_of(ok, "To"), uri, 2))
        assert copies_of(ua, ok, 1.5) == []  # the ACK stopped them
        bye = ua.request("BYE", uri, [], cseq=3).replace(
            b"To: <sip:3206@127.0.0.1>", b"To: " + header_of(ok, "To").encode(), 1)
        ua.send(bye)
        bye_ok = ua.receive(5)
        assert bye_ok is not None and bye_ok.status == 200, bye_ok
    answering.result = answering.sipp.wait()
    assert answering.ok, answering.report()
