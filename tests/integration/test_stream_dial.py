"""TCP connections the cluster opens itself (RFC 3261 18.1.1; cluster/dialer.py).

The phone here listens on one port for UDP and TCP, as a SIP phone does: a request too
long for UDP reaches it over a connection the dispatcher opened (or over UDP when it takes
no connection), and so does every request for a Contact that says ;transport=tcp.  A
connection that cannot be had, and a send over a connection that has closed, are transport
errors to the request's transaction: the caller gets the B2BUA's answer at once, not after
Timer B (32 s).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest
from calls_helpers import PASSWORD, provision
from harness import Cluster, wait_for
from sipua import UA, Reply
from streamua import SDP, StreamUA, header_of, tag

from cluster.sip.framing import Framer
from cluster.store import unpack
from cluster.store.schema import streams_key

DB = 4
USERS = range(3100, 3130)
HOST = "test-host"
PADDING = b"".join(b"a=x-padding:%04d%s\r\n" % (i, b"p" * 40) for i in range(40))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    """The cluster, and a trunk (``trunk``, a TCP listener) its route table sends 8... to
    with ;transport=tcp."""
    folder = tmp_path_factory.mktemp("dial")
    redis_server.client(db=DB).flushdb()
    settings = {"streams": {"connect_timeout": 2.0, "idle_timeout": 30.0}}
    trunk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    trunk.bind(("127.0.0.1", 0))
    trunk.listen(4)
    running = Cluster(folder, f"redis://127.0.0.1:{redis_server.port}/{DB}", workers=2,
                      settings=settings)
    with running.config_path.open("a") as config:  # the harness writes no [[routes]]
        config.write(f'\n[[routes]]\nmatch = "^8"\n'
                     f'uri = "sip:{{user}}@127.0.0.1:{trunk.getsockname()[1]};transport=tcp"\n')
    try:
        running.start()
        provision(running, USERS)
        running.trunk = trunk
        yield running
    finally:
        running.stop()
        trunk.close()


# ------------------------------------------------------------------ the phone
@dataclass
class Accepted(StreamUA):
    """The phone's end of a connection the cluster opened to it."""

    accepted: socket.socket | None = None
    listening_port: int = 0

    def __post_init__(self):
        self.sock = self.accepted
        self.port = self.listening_port
        self.transport = "TCP"
        self.framer = Framer(max_header=65536, max_body=65536)
        self.pongs = 0


class Phone:
    """A phone on 127.0.0.1:<port>, UDP (``udp``, a test UA) and, unless ``tcp`` is
    False, TCP on the same port."""

    def __init__(self, cluster, user: str, *, tcp: bool = True):
        self.user = user
        for _ in range(50):
            self.udp = UA(cluster.address, user=user)
            self.port = self.udp.port
            if not tcp:
                self.listener = None
                return
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.listener.bind(("127.0.0.1", self.port))
                self.listener.listen(4)
                return
            except OSError:  # that port is taken for TCP: another one
                self.listener.close()
                self.udp.sock.close()
        raise RuntimeError("no port free for both UDP and TCP")

    def register(self, contact_params: str = "") -> None:
        reply = self.udp.register(PASSWORD, contacts=[
            f"<sip:{self.user}@127.0.0.1:{self.port}{contact_params}>"])
        assert reply is not None and reply.status == 200, reply

    def accept(self, timeout: float = 10.0) -> Accepted:
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        return Accepted(("127.0.0.1", 0), user=self.user, accepted=sock,
                        listening_port=self.port)

    def udp_request(self, method: str, timeout: float = 5.0) -> tuple[bytes, tuple] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.udp.sock.settimeout(left)
            try:
                data, addr = self.udp.sock.recvfrom(65535)
            except TimeoutError:
                return None
            if data.startswith(method.encode() + b" "):
                return data, addr
        return None

    def udp_answer(self, request: bytes, addr: tuple, status: int, reason: str, *,
                   to_tag: str = "", headers: list[str] = (), body: bytes = b"") -> None:
        self.udp.sock.sendto(response(request, status, reason, self.user, self.port, to_tag,
                                      headers, body, "udp"), addr)

    def close(self) -> None:
        self.udp.sock.close()
        if self.listener is not None:
            self.listener.close()


def response(request: bytes, status: int, reason: str, user: str, port: int, to_tag: str,
             headers, body: bytes, transport: str) -> bytes:
    head = request.split(b"\r\n\r\n", 1)[0].decode()
    keep = []
    for line in head.split("\r\n")[1:]:
        name = line.split(":", 1)[0].strip().lower()
        if name in ("via", "from", "call-id", "cseq"):
            keep.append(line)
        elif name == "to":
            keep.append(line + (f";tag={to_tag}" if to_tag and "tag=" not in line else ""))
    lines = [f"SIP/2.0 {status} {reason}", *keep, *headers,
             f"Contact: <sip:{user}@127.0.0.1:{port};transport={transport}>",
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ------------------------------------------------------------------ the caller
class Caller:
    """A UDP caller (the test UA) placing one call with a body of its choice."""

    def __init__(self, cluster, user: str, callee: str):
        self.ua = UA(cluster.address, user=user)
        self.uri = f"sip:{callee}@127.0.0.1"
        self.contact = f"Contact: <sip:{user}@127.0.0.1:{self.ua.port}>"
        self.ok: Reply | None = None

    def invite(self, body: bytes = SDP) -> None:
        """The INVITE, its 407, and the INVITE with credentials (answers read later)."""
        headers = [self.contact, "Content-Type: application/sdp"]
        self.ua.send(self.ua.request("INVITE", self.uri, headers, body, cseq=1))
        challenge = self.ua.receive(5)
        assert challenge is not None and challenge.status == 407, challenge
        self.ua.send(self._in_dialog("ACK", challenge, 1))
        challenge.headers = [("WWW-Authenticate" if k.lower() == "proxy-authenticate" else k,
                              v) for k, v in challenge.headers]
        auth = self.ua.authorization(challenge, "INVITE", self.uri, PASSWORD)
        self.ua.send(self.ua.request("INVITE", self.uri, headers + [
            f"Proxy-Authorization: {auth}"], body, cseq=2))

    def final(self, timeout: float = 10.0) -> Reply | None:
        reply = self.ua.receive(timeout)
        if reply is not None and reply.status == 200:
            self.ok = reply
        if reply is not None:
            self.ua.send(self._in_dialog("ACK", reply, 2))
        return reply

    def bye(self, timeout: float = 10.0) -> Reply | None:
        self.ua.send(self._in_dialog("BYE", self.ok, 3))
        return self.ua.receive(timeout)

    def _in_dialog(self, method: str, reply: Reply, cseq: int) -> bytes:
        data = self.ua.request(method, self.uri, [], cseq=cseq)
        return data.replace(b"To: <sip:%s@127.0.0.1>" % self.ua.user.encode(),
                            b"To: " + reply.header("To").encode(), 1)

    def close(self) -> None:
        self.ua.sock.close()


def dialed_connections(cluster) -> dict[int, dict]:
    raw = cluster.store.redis.hgetall(streams_key(HOST))
    return {int(k): info for k, v in raw.items() if (info := unpack(v)).get("dialed")}


def workers_log(cluster) -> str:
    return cluster.read_log("worker-0") + cluster.read_log("worker-1")


def dispatcher_figures(cluster) -> dict:
    (proc,) = cluster.store.processes("dispatcher")
    return proc


def answer_over(conn: Accepted) -> bytes:
    """Take an INVITE over the connection, answer 180 and 200 on it, take the ACK."""
    invite = conn.next_request("INVITE", timeout=10)
    assert invite is not None, "no INVITE over the connection"
    to_tag = tag()
    conn.answer(invite, 180, "Ringing", to_tag=to_tag)
    conn.answer(invite, 200, "OK", to_tag=to_tag, headers=["Content-Type: application/sdp"],
                body=SDP)
    return invite


# ------------------------------------------------------------------ the tests
def test_a_long_request_for_a_udp_contact_goes_over_a_connection_the_cluster_opens(cluster):
    phone, caller = Phone(cluster, "3100"), Caller(cluster, "3101", "3100")
    try:
        phone.register()  # over UDP, a Contact without transport: UDP
        caller.invite(SDP + PADDING)
        conn = phone.accept()
        invite = answer_over(conn)
        assert len(invite) > 1300
        assert b"x-padding:0039" in invite
        # The Via says TCP (18.1.1), on the cluster's own SIP port, and so does our Contact.
        assert header_of(invite, "Via").startswith(f"SIP/2.0/TCP 127.0.0.1:{cluster.sip_port};")
        assert header_of(invite, "Contact").endswith(";transport=tcp>")
        final = caller.final()
        assert final is not None and final.status == 200, final
        # The connection is listed in Redis like an accepted one, named as ours.
        (info,) = dialed_connections(cluster).values()
        assert info["transport"] == "TCP"
        assert info["peer"] == ["127.0.0.1", phone.port]
        # The short ACK and BYE go over UDP: each request's transport is chosen by its size.
        assert phone.udp_request("ACK", 5) is not None, "no ACK over UDP"
        reply_to = {}

        def answer_bye():
            got = phone.udp_request("BYE", 10)
            if got:
                reply_to["bye"] = got
                phone.udp_answer(got[0], got[1], 200, "OK")
        answering = threading.Thread(target=answer_bye)
        answering.start()
        bye_ok = caller.bye()
        answering.join(15)
        assert bye_ok is not None and bye_ok.status == 200, bye_ok
        assert header_of(reply_to["bye"][0], "Via").startswith("SIP/2.0/UDP ")
        figures = wait_for(lambda: (f := dispatcher_figures(cluster)).get(
            "streams_dial_connected") and f, 3)
        assert figures["streams_dial_connected"] == 1
        assert figures.get("streams_dial_failed", 0) == 0
        conn.sock.close()
    finally:
        phone.close()
        caller.close()
    assert wait_for(lambda: not dialed_connections(cluster), 5), dialed_connections(cluster)


def test_a_long_request_is_retried_over_udp_when_the_target_takes_no_connection(cluster):
    before = dispatcher_figures(cluster)
    phone, caller = Phone(cluster, "3102", tcp=False), Caller(cluster, "3103", "3102")
    try:
        phone.register()
        caller.invite(SDP + PADDING)
        got = phone.udp_request("INVITE", 10)
        assert got is not None, "the INVITE did not come over UDP after the refusal"
        invite, addr = got
        assert b"x-padding:0039" in invite
        assert header_of(invite, "Via").startswith(f"SIP/2.0/UDP 127.0.0.1:{cluster.sip_port};")
        phone.udp_answer(invite, addr, 486, "Busy Here", to_tag=tag())
        final = caller.final()
        assert final is not None and final.status == 486, final
    finally:
        phone.close()
        caller.close()
    log = cluster.read_log("dispatcher")
    assert (f"TCP connection to 127.0.0.1:{phone.port} failed: connect failed: ECONNREFUSED;"
            " 1 message(s) retried over UDP, 0 reported") in log

    def counted():
        f = dispatcher_figures(cluster)
        return f.get("streams_dial_fallback_udp", 0) > before.get(
            "streams_dial_fallback_udp", 0) and f
    figures = wait_for(counted, 3)
    assert figures, "no fallback counted"
    # One connection failed; its retransmissions (Timer A, should the 486 be slow) would go
    # over UDP at once, without connecting again (cluster/dialer.py FAILED_MEMORY).
    assert figures["streams_dial_failed"] - before.get("streams_dial_failed", 0) == 1
    assert log.count(f"TCP connection to 127.0.0.1:{phone.port} failed") == 1


def test_a_contact_with_transport_tcp_gets_a_connection_and_keeps_it(cluster):
    phone, caller = Phone(cluster, "3104"), Caller(cluster, "3105", "3104")
    try:
        phone.register(";transport=tcp")  # registered over UDP: no connection of its own
        caller.invite()
        conn = phone.accept()
        invite = answer_over(conn)
        assert header_of(invite, "Via").startswith(f"SIP/2.0/TCP 127.0.0.1:{cluster.sip_port};")
        final = caller.final()
        assert final is not None and final.status == 200, final
        assert conn.next_request("ACK", timeout=5) is not None
        # The BYE, short as it is, takes the same connection: the Contact asks for TCP.
        answered = {}

        def answer_bye():
            bye = conn.next_request("BYE", timeout=10)
            if bye is not None:
                answered["bye"] = bye
                conn.answer(bye, 200, "OK")
        answering = threading.Thread(target=answer_bye)
        answering.start()
        bye_ok = caller.bye()
        answering.join(15)
        assert bye_ok is not None and bye_ok.status == 200, bye_ok
        assert "bye" in answered, "the BYE did not come over the connection"
        with pytest.raises(socket.timeout):  # no second connection was opened
            phone.listener.settimeout(0.3)
            phone.listener.accept()
        conn.sock.close()
    finally:
        phone.close()
        caller.close()


def test_a_tcp_contact_that_refuses_is_a_transport_error_not_a_timeout(cluster):
    phone, caller = Phone(cluster, "3106", tcp=False), Caller(cluster, "3107", "3106")
    try:
        phone.register(";transport=tcp")
        started = time.monotonic()
        caller.invite()
        final = caller.final(timeout=10)
        took = time.monotonic() - started
    finally:
        phone.close()
        caller.close()
    assert final is not None and final.status == 503, final
    assert took < 5, f"answered after {took:.1f} s: a timeout, not a transport error"
    # Nothing reached the phone over UDP: its Contact asked for TCP.
    log = cluster.read_log("dispatcher")
    assert (f"TCP connection to 127.0.0.1:{phone.port} failed: connect failed: ECONNREFUSED;"
            " 0 message(s) retried over UDP, 1 reported to the worker") in log
    assert f"INVITE to 127.0.0.1:{phone.port} not sent (transport error): taken as a 503" \
        in workers_log(cluster)


def test_a_send_over_a_connection_closed_meanwhile_is_a_transport_error(cluster):
    """The callee's connection closes during the call: the caller's BYE cannot reach it,
    and the transaction learns it at once (not after Timer F)."""
    callee_ua = StreamUA(cluster.address, user="3108")
    with callee_ua:
        contact = f"<sip:3108@127.0.0.1:{callee_ua.port};transport=tcp>"
        reply = callee_ua.register(PASSWORD, contacts=[contact])
        assert reply is not None and reply.status == 200, reply
        caller = Caller(cluster, "3109", "3108")
        try:
            caller.invite()
            answer_over(callee_ua)
            final = caller.final()
            assert final is not None and final.status == 200, final
            assert callee_ua.next_request("ACK", timeout=5) is not None
        except BaseException:
            caller.close()
            raise
    # The phone's connection is gone (closed by it); the dispatcher notices at once.
    time.sleep(0.5)
    try:
        started = time.monotonic()
        bye_ok = caller.bye()
        took = time.monotonic() - started
    finally:
        caller.close()
    assert bye_ok is not None and bye_ok.status == 200, bye_ok
    assert took < 5, took
    line = f"BYE to 127.0.0.1:{callee_ua.port} not sent (transport error): taken as a 503"
    assert wait_for(lambda: line in workers_log(cluster), 3), workers_log(cluster)[-2000:]


def test_a_binding_whose_connection_closed_is_dialed_at_its_contact(cluster):
    """Registered over TCP without RFC 5626 (no reg-id), the phone's connection closed: its
    Contact (;transport=tcp) is dialed, as for a phone that registered over UDP."""
    phone, caller = Phone(cluster, "3110"), Caller(cluster, "3111", "3110")
    try:
        with StreamUA(cluster.address, user="3110") as registering:
            reply = registering.register(PASSWORD, contacts=[
                f"<sip:3110@127.0.0.1:{phone.port};transport=tcp>"])
            assert reply is not None and reply.status == 200, reply
            (binding,) = cluster.store.bindings("3110@127.0.0.1")
            assert binding.conn
        assert wait_for(lambda: not cluster.store.stream_open(HOST, binding.conn), 5)
        caller.invite()
        conn = phone.accept()
        answer_over(conn)
        final = caller.final()
        assert final is not None and final.status == 200, final
        assert conn.next_request("ACK", timeout=5) is not None
        answering = threading.Thread(target=lambda: (
            (bye := conn.next_request("BYE", timeout=10)) and conn.answer(bye, 200, "OK")))
        answering.start()
        bye_ok = caller.bye()
        answering.join(15)
        assert bye_ok is not None and bye_ok.status == 200, bye_ok
        conn.sock.close()
    finally:
        phone.close()
        caller.close()


def test_a_trunk_whose_route_says_transport_tcp_is_reached_over_a_connection(cluster):
    caller = Caller(cluster, "3112", "8123")
    port = cluster.trunk.getsockname()[1]
    try:
        caller.invite()
        cluster.trunk.settimeout(10)
        sock, _ = cluster.trunk.accept()
        conn = Accepted(("127.0.0.1", 0), user="8123", accepted=sock, listening_port=port)
        invite = answer_over(conn)
        assert invite.startswith(f"INVITE sip:8123@127.0.0.1:{port};transport=tcp ".encode())
        assert header_of(invite, "Via").startswith(f"SIP/2.0/TCP 127.0.0.1:{cluster.sip_port};")
        final = caller.final()
        assert final is not None and final.status == 200, final
        assert conn.next_request("ACK", timeout=5) is not None
        answering = threading.Thread(target=lambda: (
            (bye := conn.next_request("BYE", timeout=10)) and conn.answer(bye, 200, "OK")))
        answering.start()
        bye_ok = caller.bye()
        answering.join(15)
        assert bye_ok is not None and bye_ok.status == 200, bye_ok
        peers = [info["peer"] for info in dialed_connections(cluster).values()]
        assert peers.count(["127.0.0.1", port]) == 1
        sock.close()
    finally:
        caller.close()
