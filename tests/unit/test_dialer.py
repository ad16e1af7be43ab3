"""Connections the dispatcher opens itself (cluster/dialer.py), on loopback sockets in this
process: connected in the selector, reused, refused (the UDP copy or a report), timed out."""

from __future__ import annotations

import dataclasses
import queue
import selectors
import socket
import time

import pytest

from cluster.config import Config, SipConfig, StreamsConfig
from cluster.dialer import Dialer
from cluster.streams import Streams

INVITE = b"INVITE sip:b@h SIP/2.0\r\nCall-ID: d\r\nContent-Length: 0\r\n\r\n"
OK = b"SIP/2.0 200 OK\r\nCall-ID: d\r\nContent-Length: 0\r\n\r\n"


class Rig:
    def __init__(self, **streams):
        config = Config(sip=SipConfig(bind="127.0.0.1", port=0),
                        streams=dataclasses.replace(StreamsConfig(tcp=False), **streams))
        self.selector = selectors.DefaultSelector()
        self.delivered: list[tuple[int, tuple, bytes]] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.streams = Streams(config, self.selector, self.deliver, lambda ip, now: False,
                               self.events)
        self.udp: list[tuple[tuple, bytes]] = []
        self.reported: list[tuple[object, tuple, bytes]] = []
        self.dialer = Dialer(self.streams, lambda dest, data: self.udp.append((dest, data)),
                             lambda origin, dest, data: self.reported.append((origin, dest,
                                                                              data)))

    def deliver(self, conn, peer, data) -> bool:
        self.delivered.append((conn, peer, data))
        return True

    def pump(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            for key, mask in self.selector.select(timeout=0.02):
                kind, arg = key.data
                if kind == "stream-dial":
                    self.dialer.ready(arg)
                else:
                    self.streams.ready(arg, mask)

    def drain_events(self) -> list:
        out = []
        while not self.events.empty():
            out.append(self.events.get())
        return out


@pytest.fixture
def server():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(2)
    yield sock
    sock.close()


def closed_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connected_in_the_selector_used_and_reused(server):
    rig = Rig()
    dest = server.getsockname()
    rig.dialer.send(dest, INVITE, b"udp copy", origin=7)
    rig.dialer.send(dest, INVITE, b"udp copy", origin=7)  # waits for the same connect
    assert rig.dialer.dialing and not rig.streams.connections  # connect() did not block
    peer, _ = server.accept()
    rig.pump()
    peer.settimeout(2)
    got = b""
    while len(got) < 2 * len(INVITE):
        got += peer.recv(65536)
    assert got == INVITE * 2
    (conn_id,) = rig.streams.connections
    assert rig.streams.connections[conn_id].peer == dest
    assert rig.drain_events() == [("open", conn_id, {"transport": "TCP", "peer": list(dest),
                                                     "dialed": True})]
    # The answer comes back like any stream message, naming the connection.
    peer.sendall(OK)
    rig.pump()
    assert rig.delivered == [(conn_id, dest, OK)]
    # A later request reuses the connection.
    rig.dialer.send(dest, INVITE, None, origin=7)
    rig.pump()
    assert peer.recv(65536) == INVITE
    assert rig.streams.counters["dial_reused"] == 1
    assert rig.streams.counters["dial_connected"] == 1
    assert rig.udp == [] and rig.reported == []
    peer.close()
    rig.pump()
    assert conn_id not in rig.streams.connections
    assert rig.drain_events() == [("close", conn_id, None)]
    rig.streams.close_all()


def test_refused_sends_the_udp_copy_or_reports(server):
    rig = Rig()
    dest = ("127.0.0.1", closed_port())
    rig.dialer.send(dest, INVITE, b"udp copy", origin=3)
    rig.dialer.send(dest, b"BYE", None, origin=4)
    rig.pump()
    assert rig.udp == [(dest, b"udp copy")]
    assert rig.reported == [(4, dest, b"BYE")]
    assert rig.streams.counters["dial_failed"] == 1
    assert rig.streams.counters["dial_fallback_udp"] == 1
    assert rig.streams.counters["dial_transport_errors"] == 1
    assert not rig.dialer.dialing and not rig.streams.connections
    assert rig.drain_events() == []  # never listed: it never opened
    # Within FAILED_MEMORY the target is not tried again: at once over UDP, or reported.
    rig.dialer.send(dest, INVITE, b"udp again", origin=3)
    rig.dialer.send(dest, b"BYE", None, origin=4)
    assert not rig.dialer.dialing
    assert rig.udp[1:] == [(dest, b"udp again")] and rig.reported[1:] == [(4, dest, b"BYE")]
    assert rig.streams.counters["dial_opening"] == 1
    assert rig.streams.counters["dial_failed"] == 1


def test_a_connect_with_no_answer_gives_up_after_connect_timeout():
    rig = Rig(connect_timeout=0.5)
    # A listener whose backlog is full takes no more connections: the SYN goes unanswered.
    full = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    held = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            held.append(s)
        rig.dialer.send(full.getsockname(), INVITE, None, origin=1)
        started = time.monotonic()
        while rig.dialer.dialing and time.monotonic() - started < 3:
            rig.pump(1)
            rig.dialer.tick()
        if rig.reported == [] and rig.streams.connections:
            pytest.skip("this kernel accepted past the backlog")
        assert rig.reported == [(1, full.getsockname(), INVITE)]
        assert 0.5 <= time.monotonic() - started < 1.5
    finally:
        for s in held:
            s.close()
        full.close()
        rig.streams.close_all()


def test_a_closed_dialed_connection_is_opened_anew(server):
    rig = Rig()
    dest = server.getsockname()
    rig.dialer.send(dest, INVITE, None, origin=1)
    first, _ = server.accept()
    rig.pump()
    (conn_id,) = rig.streams.connections
    rig.streams.close(rig.streams.connections[conn_id], "idle", quiet=True)
    rig.dialer.send(dest, INVITE, None, origin=1)
    second, _ = server.accept()
    rig.pump()
    (new_id,) = rig.streams.connections
    assert new_id != conn_id
    second.settimeout(2)
    assert second.recv(65536) == INVITE
    first.close()
    second.close()
    rig.streams.close_all()
