"""Out-of-dialog MESSAGE (RFC 3428) between registered users, relayed by the cluster."""

from __future__ import annotations

import pytest
from harness import Cluster
from sipua import UA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    redis_server.client().flushall()
    running = Cluster(tmp_path_factory.mktemp("message"), redis_server.url).start()
    for user in ("1002", "1009", "1010"):
        running.add_user(user, "1234")
    try:
        yield running
    finally:
        running.stop()


def send_message(caller: UA, to: str, auth: str | None = None) -> None:
    headers = ["Content-Type: text/plain"] + ([f"Proxy-Authorization: {auth}"] if auth else [])
    data = caller.request("MESSAGE", f"sip:{to}@127.0.0.1", headers, body=b"hello")
    caller.send(data.replace(b"To: <sip:1002@127.0.0.1>", f"To: <sip:{to}@127.0.0.1>".encode()))
    caller.cseq += 1


def authorized(caller: UA, challenge, to: str) -> str:
    challenge.headers = [("WWW-Authenticate", v) for k, v in challenge.headers
                         if k == "Proxy-Authenticate"]
    return caller.authorization(challenge, "MESSAGE", f"sip:{to}@127.0.0.1", "1234")


def answer(callee: UA, data: bytes, addr, status: str) -> None:
    lines = data.decode().split("\r\n")
    copied = [line for line in lines if line.split(":")[0] in ("Via", "From", "Call-ID", "CSeq")]
    to = next(line for line in lines if line.startswith("To:")) + ";tag=callee"
    reply = "\r\n".join([f"SIP/2.0 {status}", *copied, to, "Content-Length: 0", "", ""])
    callee.sock.sendto(reply.encode(), addr)


def test_message_is_challenged_then_relayed_and_answered(cluster):
    with UA(cluster.address, user="1009") as callee, UA(cluster.address, user="1002") as caller:
        assert callee.register("1234").status == 200
        send_message(caller, "1009")
        challenge = caller.receive()
        assert challenge.status == 407
        send_message(caller, "1009", authorized(caller, challenge, "1009"))
        callee.sock.settimeout(3)
        data, addr = callee.sock.recvfrom(65535)
        assert data.startswith(b"MESSAGE sip:1009@127.0.0.1:")
        assert data.endswith(b"\r\n\r\nhello")
        assert b"Content-Type: text/plain" in data
        # A fresh Call-ID on the callee's side; the caller's only in X-Call-ID (sngrep).
        head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        assert b"X-Call-ID: " + caller.call_id.encode() in head
        assert caller.call_id.encode() not in b"\r\n".join(
            line for line in head if not line.startswith(b"X-Call-ID:"))
        answer(callee, data, addr, "200 OK")
        reply = caller.receive()
        assert reply is not None and reply.status == 200


def test_message_failure_is_relayed(cluster):
    with UA(cluster.address, user="1010") as callee, UA(cluster.address, user="1002") as caller:
        assert callee.register("1234").status == 200
        send_message(caller, "1010")
        challenge = caller.receive()
        send_message(caller, "1010", authorized(caller, challenge, "1010"))
        callee.sock.settimeout(3)
        data, addr = callee.sock.recvfrom(65535)
        answer(callee, data, addr, "486 Busy Here")
        reply = caller.receive()
        assert reply is not None and reply.status == 486


def test_message_to_an_unknown_user_is_404(cluster):
    with UA(cluster.address, user="1002") as caller:
        send_message(caller, "7777")
        challenge = caller.receive()
        send_message(caller, "7777", authorized(caller, challenge, "7777"))
        reply = caller.receive()
        assert reply is not None and reply.status == 404
