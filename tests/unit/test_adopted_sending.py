"""The worker's side of an adopted address (workers/sip/transport.py): which host a datagram
came in for, and where a message "from the dead host" goes."""

from __future__ import annotations

import socket

import pytest

from cluster import clusterauth, envelope
from cluster.adoption import virtual_base
from workers.sip.transport import Transport

KEY = clusterauth.handoff_key("adoption-unit-secret")


class Hosts:
    """The hosts' announcements as Redis would give them."""

    def __init__(self, announced: dict[str, dict]):
        self.announced = announced
        self.reads = 0

    def hosts(self) -> dict[str, dict]:
        self.reads += 1
        return self.announced

    def host_info(self, host: str) -> dict | None:
        return self.announced.get(host)


@pytest.fixture
def egress():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def transport(store: Hosts, host: str = "h2") -> Transport:
    return Transport("/nonexistent", "worker-0", host, 1.0, store, lambda *a: None,
                     handoff_key=KEY)


def handed_off(sock: socket.socket) -> tuple[tuple[str, int], int, bytes]:
    data, _ = sock.recvfrom(65535)
    return envelope.unwrap(clusterauth.unseal(KEY, data)[1])


def test_a_datagram_on_an_adopted_socket_came_in_for_the_dead_host():
    store = Hosts({"h1": {"sip": ["10.0.0.111", 5060], "by": "h2"},
                   "h2": {"sip": ["10.0.0.112", 5060]}})
    t = transport(store)
    try:
        assert t.origin(0) == t.origin(1) == "h2"  # its own sockets: no Redis read
        assert store.reads == 0
        assert t.origin(virtual_base("h1")) == t.origin(virtual_base("h1") + 1) == "h1"
        assert store.reads == 1  # then from the cache
        assert t.origin(envelope.STREAM_BASE + 7) == "h2"
    finally:
        t.inbound.close()
        t.egress.close()


def test_a_message_from_an_adopted_host_goes_to_its_adopter_with_its_socket_there(egress):
    port = egress.getsockname()[1]
    base = virtual_base("h1")
    store = Hosts({"h1": {"sip": ["10.0.0.111", 5060], "by": "h3", "base": base,
                          "egress": ["127.0.0.1", port]}})
    t = transport(store)
    try:
        t.send(b"OPTIONS sip:a SIP/2.0\r\n\r\n", ("10.0.0.9", 5060), host="h1")
        assert handed_off(egress) == (("10.0.0.9", 5060), base, b"OPTIONS sip:a SIP/2.0\r\n\r\n")
        # A leg recorded on an adopted socket keeps its index as it is.
        t.send(b"BYE sip:a SIP/2.0\r\n\r\n", ("10.0.0.9", 5060), host="h1",
               sock_index=base + 1)
        assert handed_off(egress)[1] == base + 1
    finally:
        t.inbound.close()
        t.egress.close()


def test_a_reply_on_an_adopted_socket_goes_through_this_hosts_dispatcher(egress):
    port = egress.getsockname()[1]
    store = Hosts({"h2": {"sip": ["10.0.0.112", 5060], "egress": ["127.0.0.1", port]}})
    t = transport(store, host="h2")
    try:
        index = virtual_base("h1")
        t.send(b"SIP/2.0 200 OK\r\n\r\n", ("10.0.0.9", 5062), sock_index=index)
        assert handed_off(egress) == (("10.0.0.9", 5062), index, b"SIP/2.0 200 OK\r\n\r\n")
    finally:
        t.inbound.close()
        t.egress.close()
