"""The dispatcher's connections (cluster/streams.py), on loopback sockets in this process:
messages out whole, pongs, output queued, and every reason a connection is closed."""

from __future__ import annotations

import dataclasses
import queue
import selectors
import socket
import time

import pytest

from cluster.config import Config, SipConfig, StreamsConfig
from cluster.streams import Streams

OPTIONS = b"OPTIONS sip:a@h SIP/2.0\r\nCall-ID: x\r\nContent-Length: 2\r\n\r\nhi"


class Rig:
    def __init__(self, **streams):
        config = Config(sip=SipConfig(bind="127.0.0.1", port=0),
                        streams=dataclasses.replace(StreamsConfig(), **streams))
        self.selector = selectors.DefaultSelector()
        self.delivered: list[tuple[int, tuple, bytes]] = []
        self.banned_ips: set[str] = set()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.streams = Streams(config, self.selector, self.deliver,
                               lambda ip, now: ip in self.banned_ips, self.events)
        self.streams.listen()
        self.address = self.streams.listeners[0][0].getsockname()
        self.clients: list[socket.socket] = []

    def deliver(self, conn, peer, data) -> bool:
        self.delivered.append((conn, peer, data))
        return True

    def connect(self) -> socket.socket:
        client = socket.create_connection(self.address, timeout=1)
        self.clients.append(client)
        self.pump()
        return client

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
    made: list[Rig] = []

    def make(**streams) -> Rig:
        made.append(Rig(**streams))
        return made[-1]
    yield make
    for one in made:
        one.close()


def closed(client: socket.socket) -> bool:
    client.settimeout(0.5)
    try:
        while True:
            if client.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_messages_reach_deliver_with_their_connection(rig):
    r = rig()
    client = r.connect()
    client.sendall(OPTIONS + OPTIONS[:10])
    r.pump()
    client.sendall(OPTIONS[10:])
    r.pump()
    (conn,) = r.streams.connections
    assert r.delivered == [(conn, client.getsockname(), OPTIONS)] * 2
    assert r.events.get_nowait() == ("open", conn, {"transport": "TCP",
                                                    "peer": list(client.getsockname())})
    assert conn >= 1 << 32 and not conn & 1  # an id of this dispatcher's epoch, TCP


def test_a_ping_gets_a_pong_and_output_goes_out(rig):
    r = rig()
    client = r.connect()
    client.sendall(b"\r\n\r\n")
    r.pump()
    assert client.recv(10) == b"\r\n"
    (conn,) = r.streams.connections
    assert r.streams.send(conn, b"SIP/2.0 200 OK\r\n\r\n")
    assert client.recv(100) == b"SIP/2.0 200 OK\r\n\r\n"


def test_the_peer_closing_ends_the_connection(rig):
    r = rig()
    client = r.connect()
    (conn,) = r.streams.connections
    client.close()
    r.pump()
    assert not r.streams.connections and not r.streams.send(conn, b"x")
    r.events.get_nowait()
    assert r.events.get_nowait() == ("close", conn, None)


@pytest.mark.parametrize("data", [
    b"OPTIONS sip:a@h SIP/2.0\r\nContent-Length: 99999\r\n\r\n",  # body past the limit
    b"OPTIONS sip:a@h SIP/2.0\r\n" + b"X: y\r\n" * 400,  # headers past the limit
    b"OPTIONS sip:a@h SIP/2.0\r\nCall-ID: x\r\n\r\n",  # no Content-Length
])
def test_a_framing_violation_closes_that_connection_only(rig, data):
    r = rig(max_header_bytes=1024, max_body_bytes=1024)
    bystander, bad = r.connect(), r.connect()
    bad.sendall(data)
    r.pump()
    assert closed(bad)
    bystander.sendall(OPTIONS)
    r.pump()
    assert len(r.streams.connections) == 1 and r.delivered[-1][2] == OPTIONS
    assert r.streams.figures()["streams_closed_framing"] == 1


def test_a_message_not_whole_in_time_closes_the_connection(rig):
    r = rig(message_timeout=5)
    client = r.connect()
    client.sendall(OPTIONS[:20])
    r.pump()
    r.streams.tick(time.monotonic() + 4)
    assert r.streams.connections
    r.streams.tick(time.monotonic() + 6)
    assert not r.streams.connections and closed(client)
    assert r.streams.figures()["streams_closed_slow"] == 1


def test_an_idle_connection_is_closed_and_messages_keep_it_open(rig):
    r = rig(idle_timeout=10)
    idle, busy = r.connect(), r.connect()
    for conn in r.streams.connections.values():
        conn.last_message -= 9  # both opened 9 s ago
    busy.sendall(b"\r\n\r\n")  # a keep-alive counts as traffic
    r.pump()
    r.streams.tick(time.monotonic() + 0.5)
    assert len(r.streams.connections) == 2
    r.streams.tick(time.monotonic() + 2)  # idle for 11 s, busy for 2
    assert closed(idle)
    assert [c.peer for c in r.streams.connections.values()] == [busy.getsockname()]
    assert r.streams.figures()["streams_closed_idle"] == 1


def test_connections_per_source_and_banned_sources_are_refused(rig):
    r = rig(max_per_source=2)
    r.connect(), r.connect()
    third = r.connect()
    assert closed(third) and len(r.streams.connections) == 2
    assert r.streams.figures()["streams_refused_per_source"] == 1
    r.banned_ips.add("127.0.0.1")
    assert closed(r.connect())


def test_figures_count_open_connections_by_transport(rig):
    r = rig()
    r.connect(), r.connect()
    figures = r.streams.figures()
    assert figures["streams_open_tcp"] == 2 and figures["streams_open_tls"] == 0
    assert figures["streams_opened_tcp"] == 2


def test_unusable_tls_files_are_one_error_naming_them(tmp_path):
    config = Config(sip=SipConfig(bind="127.0.0.1", port=0),
                    streams=dataclasses.replace(StreamsConfig(), tcp=False,
                                                tls_cert=str(tmp_path / "none.pem"),
                                                tls_key=str(tmp_path / "none.key")))
    streams = Streams(config, selectors.DefaultSelector(), None, lambda ip, now: False)
    with pytest.raises(OSError, match="cannot load the TLS certificate .*none.pem"):
        streams.listen()
