"""SIP over a stream (cluster/sip/framing.py): bytes in, whole messages out; the transport
written into what leaves over a stream."""

from __future__ import annotations

import pytest

from cluster import envelope
from cluster.sip.framing import PONG, Framer, FramingError, Ping, content_length, stamp

OPTIONS = (b"OPTIONS sip:a@h SIP/2.0\r\nVia: SIP/2.0/TCP 1.2.3.4:5;branch=z9hG4bK1\r\n"
           b"Call-ID: c1\r\nContent-Length: 0\r\n\r\n")
BODY = b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n"
INVITE = (b"INVITE sip:b@h SIP/2.0\r\nCall-ID: c2\r\nContent-Type: application/sdp\r\n"
          b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


def feed_all(framer: Framer, *chunks: bytes) -> list:
    out = []
    for chunk in chunks:
        out += framer.feed(chunk)
    return out


@pytest.mark.parametrize("chunks, expected", [
    # one message, whole
    ((OPTIONS,), [OPTIONS]),
    # a message with a body
    ((INVITE,), [INVITE]),
    # two messages in one read
    ((OPTIONS + INVITE,), [OPTIONS, INVITE]),
    # byte by byte
    (tuple(bytes([b]) for b in INVITE), [INVITE]),
    # split in the blank line, then in the body
    ((INVITE[:INVITE.find(b"\r\n\r\n") + 2], INVITE[INVITE.find(b"\r\n\r\n") + 2:-5],
      INVITE[-5:]), [INVITE]),
    # a keep-alive ping between messages (RFC 5626 3.5.1)
    ((OPTIONS + b"\r\n\r\n" + OPTIONS,), [OPTIONS, Ping(), OPTIONS]),
    # a ping split over two reads
    ((b"\r\n", b"\r\n"), [Ping()]),
    # two pings
    ((b"\r\n\r\n\r\n\r\n",), [Ping(), Ping()]),
    # a lone CRLF before a start line is ignored (RFC 3261 7.5)
    ((b"\r\n" + OPTIONS,), [OPTIONS]),
    # the compact form of Content-Length, any case
    ((OPTIONS.replace(b"Content-Length", b"l"),), [OPTIONS.replace(b"Content-Length", b"l")]),
    ((OPTIONS.replace(b"Content-Length", b"CONTENT-length"),),
     [OPTIONS.replace(b"Content-Length", b"CONTENT-length")]),
    # nothing whole yet
    ((INVITE[:-1],), []),
    ((b"\r\n",), []),
])
def test_framing(chunks, expected):
    assert feed_all(Framer(), *chunks) == expected


def test_the_rest_of_a_message_completes_it():
    framer = Framer()
    assert framer.feed(INVITE[:-3]) == []
    assert framer.partial
    assert framer.feed(INVITE[-3:] + OPTIONS[:10]) == [INVITE]
    assert framer.partial
    assert framer.feed(OPTIONS[10:]) == [OPTIONS]
    assert not framer.partial


def test_a_ping_half_read_is_not_a_partial_message():
    framer = Framer()
    framer.feed(b"\r\n")
    assert not framer.partial


@pytest.mark.parametrize("data, why", [
    # headers that never end, past the limit
    (b"OPTIONS sip:a@h SIP/2.0\r\nX: " + b"a" * 2000, "headers longer than 1024"),
    # headers that end, but past the limit
    (b"OPTIONS sip:a@h SIP/2.0\r\nX: " + b"a" * 1100 + b"\r\nContent-Length: 0\r\n\r\n",
     "headers longer than 1024"),
    # a body announced past the limit: closed before it is read
    (b"OPTIONS sip:a@h SIP/2.0\r\nContent-Length: 4097\r\n\r\n", "Content-Length 4097 over"),
    # no Content-Length: a stream cannot tell where the message ends (18.3)
    (b"OPTIONS sip:a@h SIP/2.0\r\nCall-ID: x\r\n\r\n", "no Content-Length"),
    # not a number
    (b"OPTIONS sip:a@h SIP/2.0\r\nContent-Length: 1x\r\n\r\n", "not a number"),
    (b"OPTIONS sip:a@h SIP/2.0\r\nContent-Length: -1\r\n\r\n", "not a number"),
    (b"OPTIONS sip:a@h SIP/2.0\r\nContent-Length: 99999999999\r\n\r\n", "not a number"),
    # two values that differ
    (b"OPTIONS sip:a@h SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\n", "two different"),
])
def test_violations_close_the_connection(data, why):
    with pytest.raises(FramingError, match=why):
        Framer(max_header=1024, max_body=4096).feed(data)


def test_the_header_limit_holds_across_reads():
    framer = Framer(max_header=1024)
    framer.feed(b"OPTIONS sip:a@h SIP/2.0\r\n")
    with pytest.raises(FramingError):
        for _ in range(100):
            framer.feed(b"X: " + b"a" * 20 + b"\r\n")


def test_the_same_content_length_twice_is_taken():
    head = b"OPTIONS sip:a@h SIP/2.0\r\nContent-Length: 3\r\nContent-Length: 3"
    assert content_length(head) == 3


def test_a_message_at_the_limits_is_taken():
    body = b"x" * 100
    head = b"MESSAGE sip:a@h SIP/2.0\r\nContent-Length: 100\r\nX: "
    head += b"a" * (200 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == 200
    assert Framer(max_header=200, max_body=100).feed(head + body) == [head + body]


def test_pong_is_one_crlf():
    assert PONG == b"\r\n"


REQUEST = (b"INVITE sip:bob@10.0.0.9:5070 SIP/2.0\r\n"
           b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx;rport\r\n"
           b"Via: SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKy\r\n"
           b"Contact: <sip:alice@127.0.0.1:5060>\r\n"
           b"Content-Length: 4\r\n\r\nbody")


@pytest.mark.parametrize("transport, port, via, contact", [
    ("TCP", 5060, b"Via: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKx;rport",
     b"Contact: <sip:alice@127.0.0.1:5060;transport=tcp>"),
    ("TLS", 5061, b"Via: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKx;rport",
     b"Contact: <sip:alice@127.0.0.1:5061;transport=tls>"),
    ("WS", 8080, b"Via: SIP/2.0/WS 127.0.0.1:8080;branch=z9hG4bKx;rport",
     b"Contact: <sip:alice@127.0.0.1:8080;transport=ws>"),
    ("WSS", 8443, b"Via: SIP/2.0/WSS 127.0.0.1:8443;branch=z9hG4bKx;rport",
     b"Contact: <sip:alice@127.0.0.1:8443;transport=wss>"),
])
def test_stamp_writes_the_transport_into_our_via_and_contact(transport, port, via, contact):
    out = stamp(REQUEST, transport, "127.0.0.1", 5060, port)
    lines = out.split(b"\r\n")
    assert lines[1] == via
    assert lines[2] == b"Via: SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKy"  # not ours
    assert lines[3] == contact
    assert out.endswith(b"\r\n\r\nbody")


def test_stamp_leaves_a_responses_via_and_others_contacts():
    response = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\n"
                b"Contact: <sip:bob@10.0.0.9:5070>\r\nContent-Length: 0\r\n\r\n")
    assert stamp(response, "TCP", "127.0.0.1", 5060, 5060) == response
    ours = response.replace(b"bob@10.0.0.9:5070", b"bob@127.0.0.1:5060")
    assert b"<sip:bob@127.0.0.1:5060;transport=tcp>" in stamp(ours, "TCP", "127.0.0.1",
                                                                5060, 5060)
    # a Via of another port of ours (50600) is not ours
    other = REQUEST.replace(b"127.0.0.1:5060;branch", b"127.0.0.1:50600;branch")
    assert stamp(other, "TCP", "127.0.0.1", 5060, 5060).split(b"\r\n")[1] == \
        b"Via: SIP/2.0/UDP 127.0.0.1:50600;branch=z9hG4bKx;rport"


@pytest.mark.parametrize("addr", [("10.1.2.3", 40000), ("2001:db8::7", 5060)])
def test_a_streams_envelope_names_its_connection(addr):
    conn = (123 << 32) | (7 << 2) | 1  # the two lowest bits: the transport
    assert envelope.is_stream(conn) and not envelope.is_stream(1)
    assert envelope.stream_transport(conn) == "TLS"
    assert envelope.stream_transport(conn - 1) == "TCP"
    assert envelope.stream_transport(conn + 1) == "WS"
    assert envelope.stream_transport(conn + 2) == "WSS"
    assert envelope.unwrap(envelope.wrap(addr, conn, b"SIP")) == (addr, conn, b"SIP")
    assert envelope.unwrap(envelope.wrap(addr, 1, b"SIP")) == (addr, 1, b"SIP")
