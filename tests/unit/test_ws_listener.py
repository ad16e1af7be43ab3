"""The dispatcher's WebSocket connections (cluster/streams.py with cluster/sip/websocket.py),
on loopback sockets in this process: the upgrade, messages in and out in frames, the
figures by transport, and a broken rule closing that connection only."""

from __future__ import annotations

import base64
import dataclasses
import logging
import queue
import selectors
import socket

import pytest

from cluster import envelope
from cluster.config import Config, SipConfig, StreamsConfig
from cluster.sip import websocket as ws
from cluster.sip.websocket import frame, server_frames
from cluster.streams import Streams

OPTIONS = b"OPTIONS sip:a@h SIP/2.0\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n"
MASK = b"\x01\x02\x03\x04"
UPGRADE = (b"GET /sip HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: " + base64.b64encode(b"k" * 16) + b"\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n\r\n")


class Rig:
    def __init__(self):
        config = Config(sip=SipConfig(bind="127.0.0.1", port=0),
                        streams=dataclasses.replace(StreamsConfig(), tcp=False, ws=True,
                                                    ws_port=0, ws_path="/sip"))
        self.selector = selectors.DefaultSelector()
        self.delivered: list[tuple[int, tuple, bytes]] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.streams = Streams(config, self.selector, self.deliver, lambda ip, now: False,
                               self.events)
        self.streams.listen()
        ((listener, transport),) = self.streams.listeners
        assert transport == "WS"
        self.address = listener.getsockname()
        self.clients: list[socket.socket] = []

    def deliver(self, conn, peer, data) -> bool:
        self.delivered.append((conn, peer, data))
        return True

    def connect(self, upgrade: bytes = UPGRADE) -> tuple[socket.socket, bytes]:
        client = socket.create_connection(self.address, timeout=1)
        self.clients.append(client)
        self.pump()
        client.sendall(upgrade)
        self.pump()
        return client, client.recv(4096)

    def pump(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            for key, mask in self.selector.select(timeout=0.02):
                kind, arg = key.data
                if kind == "stream-accept":
                    self.streams.accept(*arg)
                else:
                    self.streams.ready(arg, mask)

    def close(self) -> None:
        self.streams.close_all()
        for client in self.clients:
            client.close()


@pytest.fixture
def rig():
    made = Rig()
    yield made
    made.close()


def read_frames(client: socket.socket) -> tuple[list[tuple[int, bytes]], bool]:
    """The frames the server sent, and whether it closed the connection after them."""
    buffer = bytearray()
    client.settimeout(0.5)
    try:
        while True:
            data = client.recv(65536)
            if not data:
                return server_frames(buffer), True
            buffer += data
    except TimeoutError:
        return server_frames(buffer), False


def test_a_message_in_a_frame_reaches_deliver_and_the_answer_goes_back_framed(rig):
    client, answer = rig.connect()
    assert answer.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Protocol: sip\r\n" in answer
    client.sendall(frame(ws.TEXT, OPTIONS, mask=MASK))
    rig.pump()
    (conn,) = rig.streams.connections
    assert rig.delivered == [(conn, client.getsockname(), OPTIONS)]
    assert envelope.stream_transport(conn) == "WS"
    assert rig.events.get_nowait() == ("open", conn, {"transport": "WS",
                                                      "peer": list(client.getsockname())})
    assert rig.streams.send(conn, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    frames, closed = read_frames(client)
    assert frames == [(ws.TEXT, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")] and not closed
    figures = rig.streams.figures()
    assert figures["streams_open_ws"] == 1 and figures["streams_opened_ws"] == 1
    assert figures["streams_messages_ws"] == 1
    assert figures["streams_bytes_in_ws"] == len(UPGRADE) + len(frame(ws.TEXT, OPTIONS,
                                                                      mask=MASK))
    assert figures["streams_bytes_out_ws"] == len(answer) + len(
        frame(ws.TEXT, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"))


def test_without_the_sip_subprotocol_the_upgrade_gets_400_and_a_close(rig, caplog):
    caplog.set_level(logging.INFO, "streams")
    client, answer = rig.connect(UPGRADE.replace(b"Protocol: sip", b"Protocol: chat"))
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert read_frames(client) == ([], True)
    assert not rig.streams.connections and rig.delivered == []
    (line,) = [r.getMessage() for r in caplog.records if "closed" in r.getMessage()]
    assert "without Sec-WebSocket-Protocol: sip (RFC 7118)" in line


def test_an_unmasked_frame_closes_that_connection_only(rig, caplog):
    caplog.set_level(logging.INFO, "streams")
    good, _ = rig.connect()
    bad, _ = rig.connect()
    bad.sendall(frame(ws.TEXT, OPTIONS))
    rig.pump()
    frames, closed = read_frames(bad)
    assert closed and len(frames) == 1 and frames[0][0] == ws.CLOSE
    assert frames[0][1][:2] == b"\x03\xea"  # 1002, protocol error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "an unmasked frame from the client" in warnings[0]
    good.sendall(frame(ws.BINARY, OPTIONS, mask=MASK))
    rig.pump()
    assert [d[2] for d in rig.delivered] == [OPTIONS]
    assert rig.streams.figures()["streams_closed_websocket"] == 1


def test_a_ping_gets_its_pong_and_a_close_its_close(rig):
    client, _ = rig.connect()
    client.sendall(frame(ws.PING, b"are you there", mask=MASK))
    rig.pump()
    assert read_frames(client) == ([(ws.PONG, b"are you there")], False)
    # A CRLF keep-alive (SIP.js) gets a CRLF in a frame and counts as activity.
    (conn,) = rig.streams.connections.values()
    conn.last_message = 0.0
    client.sendall(frame(ws.TEXT, b"\r\n\r\n", mask=MASK))
    rig.pump()
    assert read_frames(client) == ([(ws.TEXT, b"\r\n")], False)
    assert conn.last_message > 0 and rig.delivered == []
    client.sendall(frame(ws.CLOSE, b"\x03\xe8", mask=MASK))
    rig.pump()
    assert read_frames(client) == ([(ws.CLOSE, b"\x03\xe8")], True)
    assert rig.events.get_nowait()[0] == "open"
    assert rig.events.get_nowait()[0] == "close"


def test_an_upgrade_never_sent_is_closed_at_the_message_timeout(rig):
    client = socket.create_connection(rig.address, timeout=1)
    rig.clients.append(client)
    rig.pump()
    (conn,) = rig.streams.connections.values()
    rig.streams.tick(conn.opened + rig.streams.settings.message_timeout + 0.1)
    assert not rig.streams.connections
    assert read_frames(client) == ([], True)  # no close frame: it never was a WebSocket


def test_an_idle_connection_is_told_going_away_before_it_is_closed(rig):
    client, _ = rig.connect()
    (conn,) = rig.streams.connections.values()
    rig.streams.tick(conn.last_message + rig.streams.settings.idle_timeout + 0.1)
    assert not rig.streams.connections
    assert read_frames(client) == ([(ws.CLOSE, b"\x03\xe9idle")], True)


def test_stopping_tells_every_open_connection_going_away(rig):
    client, _ = rig.connect()
    rig.streams.close_all()
    assert read_frames(client) == ([(ws.CLOSE, b"\x03\xe9shutting down")], True)
