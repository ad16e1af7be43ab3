"""The running cluster's answers to everything that is not a registration.

One cluster (dispatcher + 2 workers under supervisord) serves the whole module;
it has a Redis database of its own on the session's redis-server.  These tests
write no bindings, and each checks that none appeared.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time

import pytest
from harness import running_cluster
from sipua import UA

from conftest import FIXTURES

DB = 3  # this module's Redis database (other modules use others, so clusters never meet)
AOR = "1002@127.0.0.1"
STUN_COOKIE = 0x2112A442


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    redis_server.client(db=DB).flushdb()
    with running_cluster(tmp_path_factory.mktemp("basics"), url, workers=2) as running:
        running.add_user("1002", "1234")
        yield running


@pytest.fixture
def ua(cluster):
    with UA(cluster.address) as agent:
        yield agent
    assert cluster.store.bindings(AOR) == []  # nothing here may register anything


def new_call_id() -> str:
    return os.urandom(8).hex() + "@basics"


def raw_request(ua: UA, method: str, uri: str | None = None, headers: list[str] = (),
                call_id: str | None = None) -> bytes:
    ua.call_id = call_id or new_call_id()
    return ua.request(method, uri or f"sip:{ua.domain}", list(headers))


def ask(ua: UA, data: bytes, timeout: float = 2.0):
    ua.send(data)
    reply = ua.receive(timeout)
    assert reply is not None, f"no answer to {data[:60]!r}"
    return reply


def assert_silence(sock: socket.socket, seconds: float) -> None:
    """Nothing at all arrives on ``sock`` for ``seconds``."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(65535)
    except TimeoutError:
        return
    pytest.fail(f"unexpected answer: {data[:200]!r}")


# ------------------------------------------------------------------ methods


def test_options_answered_200_with_capabilities(ua):
    reply = ask(ua, raw_request(ua, "OPTIONS"))
    assert (reply.status, reply.reason) == (200, "OK")
    allow = {m.strip() for m in reply.header("Allow").split(",")}
    assert {"REGISTER", "OPTIONS", "ACK", "CANCEL"} <= allow
    assert "application/sdp" in reply.header("Accept")
    assert reply.header("Supported") is not None
    assert ";tag=" in reply.header("To")
    assert reply.header("Call-ID") == ua.call_id
    # RFC 3261 18.2.1: received (and rport, which we asked for) name where it came from
    assert f"rport={ua.port}" in reply.header("Via")
    assert "received=127.0.0.1" in reply.header("Via")


def test_unknown_method_gets_501(ua):
    reply = ask(ua, raw_request(ua, "FOO"))
    assert reply.status == 501
    assert reply.reason
    assert reply.header("CSeq").endswith("FOO")


def test_known_unsupported_method_gets_405_with_allow(ua):
    reply = ask(ua, raw_request(ua, "SUBSCRIBE", headers=["Event: presence", "Expires: 60"]))
    assert reply.status == 405
    allow = {m.strip() for m in reply.header("Allow").split(",")}
    assert "REGISTER" in allow and "SUBSCRIBE" not in allow


def test_register_with_max_forwards_zero_gets_483(ua):
    data = raw_request(ua, "REGISTER", headers=[f"Contact: <sip:1002@127.0.0.1:{ua.port}>"])
    data = data.replace(b"Max-Forwards: 70", b"Max-Forwards: 0")
    reply = ask(ua, data)
    assert reply.status == 483
    assert reply.reason


def test_require_of_unknown_extension_gets_420_with_unsupported(ua):
    reply = ask(ua, raw_request(ua, "OPTIONS", headers=["Require: foo"]))
    assert reply.status == 420
    assert reply.header("Unsupported") == "foo"


def test_unknown_uri_scheme_gets_416(ua):
    reply = ask(ua, raw_request(ua, "OPTIONS", uri="nobodyKnowsThisScheme:totallyopaquecontent"))
    assert reply.status == 416
    assert reply.reason


# ------------------------------------------------------------------ RFC 4475 torture messages


def torture(name: str, port: int) -> bytes:
    """An RFC 4475 message whose top Via sent-by is the test socket (anything after the
    sent-by, e.g. badinv01's stray ``;;,;,,``, is kept as it is)."""
    data = (FIXTURES / "rfc4475" / f"{name}.dat").read_bytes()
    return re.sub(rb"(?m)^(Via:\s*SIP/\S+/)\S+(\s+)[^;\r\n]+",
                  rb"\g<1>UDP\g<2>127.0.0.1:%d" % port, data, count=1)


@pytest.mark.parametrize(("name", "status"), [
    ("badinv01", 400),  # stray ; and , in Via and Contact
    ("ltgtruri", 400),  # <> around the Request-URI
    ("escruri", 400),  # escaped headers in the Request-URI
    ("badvers", 505),  # SIP/7.0
    ("unkscm", 416),  # valid message, unknown Request-URI scheme
])
def test_torture_message_gets_an_error_with_a_reason(ua, name, status):
    data = torture(name, ua.port)
    assert b"127.0.0.1:%d" % ua.port in data
    reply = ask(ua, data)
    assert reply.status == status, reply.raw.decode(errors="replace")
    assert reply.reason.strip()
    call_id = re.search(rb"(?m)^(?:Call-ID|i):\s*(\S+)", data).group(1).decode()
    assert reply.header("Call-ID") == call_id


# ------------------------------------------------------------------ keepalives, STUN, garbage


def test_crlf_keepalives_get_no_answer(ua):
    for keepalive in (b"\r\n\r\n", b"\r\n"):
        ua.send(keepalive)
    assert_silence(ua.sock, 0.7)


def test_stun_binding_request_gets_xor_mapped_address(ua):
    transaction_id = os.urandom(12)
    ua.sock.sendto(struct.pack("!HHI", 0x0001, 0, STUN_COOKIE) + transaction_id, ua.server)
    ua.sock.settimeout(2.0)
    data, source = ua.sock.recvfrom(2048)
    assert source == ua.server  # from the SIP port, like every answer
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    assert (msg_type, cookie) == (0x0101, STUN_COOKIE)
    assert data[8:20] == transaction_id
    assert len(data) == 20 + length
    attributes = stun_attributes(data[20:])
    family, xport = struct.unpack_from("!xBH", attributes[0x0020])
    assert family == 0x01  # IPv4
    port = xport ^ (STUN_COOKIE >> 16)
    ip = struct.unpack_from("!I", attributes[0x0020], 4)[0] ^ STUN_COOKIE
    assert (socket.inet_ntoa(struct.pack("!I", ip)), port) == ("127.0.0.1", ua.port)


def stun_attributes(body: bytes) -> dict[int, bytes]:
    found, offset = {}, 0
    while offset + 4 <= len(body):
        kind, length = struct.unpack_from("!HH", body, offset)
        found[kind] = body[offset + 4:offset + 4 + length]
        offset += 4 + (length + 3) // 4 * 4  # attributes are padded to 4 bytes
    return found


GARBAGE = [
    b"\x00" * 64,
    b"\xff" * 1500,
    bytes(range(256)) * 4,
    b"REGISTER",  # a method and nothing else
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\n\r\n",  # no Via/From/To/Call-ID/CSeq to answer to
    b"SIP/2.0 200 OK\r\nCall-ID: stray\r\n\r\n",  # a response nobody asked for
    b"\x01\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12,  # a STUN *response*
    b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12,  # STUN with a lying length
    b"Call-ID: " + b"x" * 60000,  # large, with an affinity key
    b"\r\n" * 3 + b"\x00",
]


def test_garbage_never_gets_an_answer_and_never_kills_a_process(ua, cluster):
    before = cluster.processes()
    assert before and all(state == "RUNNING" for state, _ in before.values()), before
    rng = os.urandom(4096)
    datagrams = GARBAGE + [rng[i:i + n] for i, n in ((0, 1), (1, 13), (14, 512), (526, 3000))]
    for data in datagrams:
        ua.sock.sendto(data, ua.server)
    assert_silence(ua.sock, 1.0)
    reply = ask(ua, raw_request(ua, "OPTIONS"))  # still serving
    assert reply.status == 200
    assert cluster.processes() == before  # same programs, all RUNNING, same pids


# ------------------------------------------------------------------ dispatcher affinity


def worker_counts(cluster, counter: str = "requests_OPTIONS") -> dict[str, int]:
    """Each worker's counter from a heartbeat published after this call began."""
    start = time.time()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        beats = {p["name"]: p for p in cluster.store.processes("worker")}
        if len(beats) == 2 and all(p["seen"] > start for p in beats.values()):
            return {name: int(p.get(counter, 0)) for name, p in beats.items()}
        time.sleep(0.1)
    raise AssertionError(f"no fresh heartbeats from both workers: {beats}")


def counts_after(cluster, before: dict[str, int], sent: int
                 ) -> tuple[dict[str, int], dict[str, int]]:
    """(per-worker increase, new totals) once all ``sent`` requests show in the heartbeats."""
    deadline = time.monotonic() + 5
    while True:
        now = worker_counts(cluster)
        grown = {name: now[name] - before.get(name, 0) for name in now}
        if sum(grown.values()) >= sent or time.monotonic() > deadline:
            return grown, now
        time.sleep(0.2)


def test_dispatcher_spreads_call_ids_over_workers_and_keeps_one_call_id_on_one(ua, cluster):
    totals = worker_counts(cluster)
    sent = 40
    for _ in range(sent):
        assert ask(ua, raw_request(ua, "OPTIONS")).status == 200
    grown, totals = counts_after(cluster, totals, sent)
    assert sum(grown.values()) == sent
    assert sorted(grown) == ["worker-0", "worker-1"]
    assert min(grown.values()) >= 5, f"40 Call-IDs were not spread: {grown}"

    for _ in range(2):
        call_id = new_call_id()
        for _ in range(10):  # one Call-ID, a new transaction (branch, CSeq) each time
            assert ask(ua, raw_request(ua, "OPTIONS", call_id=call_id)).status == 200
            ua.cseq += 1
        grown, totals = counts_after(cluster, totals, 10)
        assert sorted(grown.values()) == [0, 10], f"Call-ID {call_id} was split: {grown}"
