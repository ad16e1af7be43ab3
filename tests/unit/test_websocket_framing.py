"""SIP over WebSocket (cluster/sip/websocket.py): the upgrade, frames in, SIP messages and
replies out, every limit closing the connection with the right close code."""

from __future__ import annotations

import base64
import struct

import pytest

from cluster import envelope
from cluster.sip import websocket as ws
from cluster.sip.framing import Ping
from cluster.sip.websocket import Reply, WebSocket, frame, server_frames

KEY = base64.b64encode(b"0123456789abcdef")
MASK = b"\x11\x22\x33\x44"
OPTIONS = (b"OPTIONS sip:a@h SIP/2.0\r\nVia: SIP/2.0/WSS x.invalid;branch=z9hG4bK1\r\n"
           b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\n\r\n")


def upgrade(path: bytes = b"/", protocol: bytes | None = b"sip", version: bytes = b"13",
            key: bytes = KEY, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1:8443",
             b"Upgrade: websocket", b"Connection: keep-alive, Upgrade",
             b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: " + version,
             b"Origin: https://phone.example"]
    if protocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + protocol)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(**kwargs) -> WebSocket:
    session = WebSocket("/", max_header=1024, max_body=2048, **kwargs)
    (reply,) = session.feed(upgrade())
    assert reply.close is None and reply.data.startswith(b"HTTP/1.1 101 ")
    return session


def status_of(reply: Reply) -> int:
    return int(reply.data.split(b" ", 2)[1])


def close_code(reply: Reply) -> int:
    ((opcode, payload),) = server_frames(bytearray(reply.data))
    assert opcode == ws.CLOSE
    return struct.unpack("!H", payload[:2])[0]


# ------------------------------------------------------------------ handshake
def test_the_upgrade_is_answered_with_the_sip_subprotocol():
    session = WebSocket("/")
    assert session.partial  # until the upgrade is done, the message timeout runs
    (reply,) = session.feed(upgrade(protocol=b"chat, sip"))
    head = reply.data.decode()
    assert head.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    # RFC 6455 section 1.3's worked example: this key gives this accept value.
    assert ws.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert f"Sec-WebSocket-Accept: {ws.accept_key(KEY).decode()}\r\n" in head
    assert "Sec-WebSocket-Protocol: sip\r\n" in head and "Upgrade: websocket\r\n" in head
    assert session.open and not session.partial and reply.close is None


def test_the_upgrade_in_pieces_and_a_frame_right_behind_it():
    session = WebSocket("/")
    data = upgrade() + frame(ws.TEXT, OPTIONS, mask=MASK)
    out = []
    for i in range(0, len(data), 7):
        out += session.feed(data[i:i + 7])
    assert [type(item) for item in out] == [Reply, bytes]
    assert out[1] == OPTIONS


@pytest.mark.parametrize("request_bytes, status, why", [
    (upgrade(protocol=None), 400, "without Sec-WebSocket-Protocol: sip"),
    (upgrade(protocol=b"chat"), 400, "without Sec-WebSocket-Protocol: sip"),
    (upgrade(path=b"/other"), 404, "is not '/'"),
    (upgrade(version=b"8"), 426, "Sec-WebSocket-Version: 13"),
    (upgrade(key=b"short"), 400, "valid Sec-WebSocket-Key"),
    (upgrade(method=b"POST"), 405, "is not GET"),
    (b"OPTIONS sip:a@h SIP/2.0\r\nCall-ID: x\r\n\r\n", 400, "not an HTTP request"),
    (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "without Upgrade: websocket"),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 2000 + b"\r\n", 400, "handshake longer than"),
])
def test_a_bad_upgrade_is_refused_and_closed(request_bytes, status, why):
    session = WebSocket("/", max_header=1024)
    (reply,) = session.feed(request_bytes)
    assert status_of(reply) == status
    assert why in reply.close and not reply.quiet
    assert b"Connection: close\r\n" in reply.data
    assert session.feed(frame(ws.TEXT, OPTIONS, mask=MASK)) == []  # nothing after it


def test_the_426_names_the_version():
    (reply,) = WebSocket("/").feed(upgrade(version=b"8"))
    assert b"Sec-WebSocket-Version: 13\r\n" in reply.data


def test_a_query_string_does_not_change_the_path():
    (reply,) = WebSocket("/ws").feed(upgrade(path=b"/ws?user=1"))
    assert status_of(reply) == 101


# ------------------------------------------------------------------ messages
def test_text_and_binary_frames_each_carry_one_message():
    session = opened()
    out = session.feed(frame(ws.TEXT, OPTIONS, mask=MASK) + frame(ws.BINARY, b"\xff" + OPTIONS,
                                                                  mask=b"\0\0\0\0"))
    assert out == [OPTIONS, b"\xff" + OPTIONS]
    assert not session.partial


def test_a_fragmented_message_is_reassembled_around_a_ping():
    session = opened()
    first = bytearray(frame(ws.TEXT, OPTIONS[:20], mask=MASK))
    first[0] &= 0x7F  # FIN clear
    middle = bytearray(frame(ws.CONTINUATION, OPTIONS[20:40], mask=MASK))
    middle[0] &= 0x7F
    last = frame(ws.CONTINUATION, OPTIONS[40:], mask=MASK)
    out = session.feed(bytes(first) + frame(ws.PING, b"hi", mask=MASK) + bytes(middle))
    assert out == [Reply(frame(ws.PONG, b"hi"))]
    assert session.partial
    assert session.feed(last) == [OPTIONS]


def test_a_long_message_uses_the_16_bit_length():
    session = opened()
    body = b"x" * 1500
    message = OPTIONS.replace(b"\r\n\r\n", b"\r\nContent-Length: 1500\r\n\r\n") + body
    data = frame(ws.TEXT, message, mask=MASK)
    assert data[1] & 0x7F == 126
    assert session.feed(data[:3]) == [] and session.feed(data[3:]) == [message]


def test_outgoing_messages_are_unmasked_text_or_binary():
    session = opened()
    ((opcode, payload),) = server_frames(bytearray(session.message(OPTIONS)))
    assert (opcode, payload) == (ws.TEXT, OPTIONS)
    ((opcode, payload),) = server_frames(bytearray(session.message(b"\xff\xfe")))
    assert opcode == ws.BINARY
    big = b"y" * 70000
    assert server_frames(bytearray(session.message(big))) == [(ws.TEXT, big)]


def test_a_pong_gives_nothing_and_a_crlf_keepalive_a_ping():
    session = opened()
    assert session.feed(frame(ws.PONG, b"", mask=MASK)) == []
    assert session.feed(frame(ws.TEXT, b"\r\n\r\n", mask=MASK)) == [Ping()]
    assert session.feed(frame(ws.TEXT, b"\r\n", mask=MASK)) == []


def test_the_close_handshake_echoes_the_code_quietly():
    session = opened()
    (reply,) = session.feed(frame(ws.CLOSE, struct.pack("!H", 1001) + b"bye", mask=MASK))
    assert close_code(reply) == 1001 and reply.quiet
    assert reply.close == "closed by the peer (WebSocket close 1001)"
    (reply,) = opened().feed(frame(ws.CLOSE, b"", mask=MASK))
    assert close_code(reply) == 1000


# ------------------------------------------------------------------ violations
def unmasked(opcode: int, payload: bytes) -> bytes:
    return frame(opcode, payload)


@pytest.mark.parametrize("data, code, why", [
    (unmasked(ws.TEXT, OPTIONS), ws.PROTOCOL_ERROR, "unmasked frame"),
    (bytes([0xC1]) + frame(ws.TEXT, OPTIONS, mask=MASK)[1:], ws.PROTOCOL_ERROR, "RSV bits"),
    (frame(0x3, b"x", mask=MASK), ws.PROTOCOL_ERROR, "unknown data opcode"),
    (frame(0xB, b"x", mask=MASK), ws.PROTOCOL_ERROR, "unknown control opcode"),
    (frame(ws.PING, b"p" * 126, mask=MASK), ws.PROTOCOL_ERROR, "long control frame"),
    (frame(ws.CONTINUATION, b"x", mask=MASK), ws.PROTOCOL_ERROR, "no message begun"),
    (frame(ws.TEXT, b"\xff" + OPTIONS, mask=MASK), ws.INVALID_DATA, "not UTF-8"),
    (frame(ws.CLOSE, b"\x03", mask=MASK), ws.PROTOCOL_ERROR, "one-byte body"),
    # Announced past the limit: refused from the header, before the payload is read.
    (frame(ws.TEXT, b"z" * 4000, mask=MASK)[:8], ws.TOO_BIG, "more than 3072 bytes"),
    (struct.pack("!BBQ", 0x81, 0xFF, 1 << 62) + MASK, ws.TOO_BIG, "more than 3072 bytes"),
    (frame(ws.TEXT, b"X: " + b"h" * 1100 + b"\r\n\r\n", mask=MASK), ws.TOO_BIG,
     "headers longer than 1024"),
    (frame(ws.TEXT, OPTIONS + b"b" * 2049, mask=MASK), ws.TOO_BIG, "body of more than 2048"),
])
def test_a_violation_closes_with_its_code(data, code, why):
    session = opened()
    (reply,) = session.feed(data)
    assert close_code(reply) == code
    assert why in reply.close and not reply.quiet
    assert session.feed(frame(ws.TEXT, OPTIONS, mask=MASK)) == []


def test_fragments_adding_up_past_the_limit_close():
    session = opened()
    part = bytearray(frame(ws.TEXT, b"a" * 2000, mask=MASK))
    part[0] &= 0x7F
    assert session.feed(bytes(part)) == []
    (reply,) = session.feed(frame(ws.CONTINUATION, b"a" * 1100, mask=MASK)[:4])
    assert close_code(reply) == ws.TOO_BIG


def test_a_frame_flood_closes_with_policy_violation():
    clock = Clock()
    session = opened(frame_rate=10, clock=clock)
    ping = frame(ws.PING, b"", mask=MASK)
    assert len(session.feed(ping * 20)) == 20  # the burst: twice the rate
    clock.now += 1.0  # refills 10
    assert len(session.feed(ping * 10)) == 10
    out = session.feed(ping * 5)
    assert close_code(out[-1]) == ws.POLICY and "more than 10 frames a second" in out[-1].close
    assert len(out) == 1 and session.frames == 31


def test_a_steady_rate_is_never_cut():
    clock = Clock()
    session = opened(frame_rate=10, clock=clock)
    for _ in range(200):
        clock.now += 0.1
        assert session.feed(frame(ws.TEXT, OPTIONS, mask=MASK)) == [OPTIONS]


def test_connection_ids_say_the_transport():
    for transport, code in envelope.TRANSPORT_CODES.items():
        conn = (7 << 32) | (5 << 2) | code
        assert envelope.stream_transport(conn) == transport


def test_going_away_is_said_once_and_only_on_an_open_connection():
    assert WebSocket("/").goodbye("idle") is None  # no handshake yet: nothing to close
    session = opened()
    assert server_frames(bytearray(session.goodbye("idle"))) == [(ws.CLOSE, b"\x03\xe9idle")]
    assert session.goodbye("idle") is None and session.feed(b"more") == []
