"""The control messages and the SIP socket hand-back between dispatcher and workers."""

from __future__ import annotations

import socket

import msgpack
import pytest

from cluster import envelope

V4, V6, DGRAM, STREAM = socket.AF_INET, socket.AF_INET6, socket.SOCK_DGRAM, socket.SOCK_STREAM


def test_reclaim_request_parses_as_reclaim():
    assert envelope.parse_control(envelope.reclaim_request()) == {"type": "reclaim"}


def test_sockets_message_names_the_worker_and_each_socket():
    payload = envelope.sockets_message("worker-1", [(V4, ("127.0.0.1", 5060)),
                                                    (V6, ("::1", 5060, 0, 0))])
    assert envelope.parse_control(payload) == {
        "type": "sockets", "name": "worker-1",
        "sockets": [[int(V4), ["127.0.0.1", 5060]], [int(V6), ["::1", 5060]]]}


def test_sockets_message_with_nothing_held():
    assert envelope.parse_control(envelope.sockets_message("worker-0", []))["sockets"] == []


def test_welcome_names_the_host_families_and_forwarding_address():
    message = envelope.parse_control(envelope.welcome("h1", ["AF_INET"], ("127.0.0.1", 4321)))
    assert message == {"type": "welcome", "host": "h1", "sockets": ["AF_INET"],
                       "forward": ["127.0.0.1", 4321]}
    assert envelope.forward_of(message) == ("127.0.0.1", 4321)


@pytest.mark.parametrize("forward", [None, [], ["127.0.0.1"], [1, 2], ["127.0.0.1", "5"]])
def test_a_welcome_without_a_forwarding_address_is_refused(forward):
    with pytest.raises(ValueError):
        envelope.forward_of({"type": "welcome", "host": "h", "sockets": [], "forward": forward})


def test_peer_credentials_of_a_unix_socket_are_this_user():
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert envelope.peer_trusted(a)


@pytest.mark.parametrize("payload", [
    b"",  # the peer closed the connection
    b"\xc1",  # never used in msgpack
    msgpack.packb([1, 2]),
    msgpack.packb({"type": "hb"}),  # a worker's heartbeat is no handshake message
    msgpack.packb({"host": "h1"}),
    envelope.reclaim_request() + b"\x00",  # trailing bytes
])
def test_anything_else_is_refused(payload):
    with pytest.raises(ValueError):
        envelope.parse_control(payload)


WANTED = [(V4, "127.0.0.1", 5060), (V6, "::1", 5060)]


def test_match_puts_the_offered_sockets_in_the_wanted_order():
    offered = [(V6, DGRAM, ("::1", 5060, 0, 0)), (V4, DGRAM, ("127.0.0.1", 5060))]
    assert envelope.match_sockets(WANTED, offered) == [1, 0]


def test_match_takes_an_address_written_another_way():
    offered = [(V4, DGRAM, ("127.0.0.1", 5060)), (V6, DGRAM, ("0:0::1", 5060, 0, 0))]
    assert envelope.match_sockets(WANTED, offered) == [0, 1]


@pytest.mark.parametrize("offered", [
    [],
    [(V4, DGRAM, ("127.0.0.1", 5060))],  # the IPv6 one is missing
    [(V4, DGRAM, ("127.0.0.1", 5070)), (V6, DGRAM, ("::1", 5060, 0, 0))],  # another port
    [(V4, DGRAM, ("127.0.0.2", 5060)), (V6, DGRAM, ("::1", 5060, 0, 0))],  # another address
    [(V4, STREAM, ("127.0.0.1", 5060)), (V6, DGRAM, ("::1", 5060, 0, 0))],  # not UDP
    [(V4, DGRAM, ("127.0.0.1", 5060)), (V4, DGRAM, ("127.0.0.1", 5060))],  # wrong family
])
def test_match_refuses_anything_short_of_every_wanted_socket(offered):
    assert envelope.match_sockets(WANTED, offered) is None


def test_match_uses_each_offered_socket_once():
    wanted = [(V4, "127.0.0.1", 5060), (V4, "127.0.0.1", 5060)]
    assert envelope.match_sockets(wanted, [(V4, DGRAM, ("127.0.0.1", 5060))]) is None


def test_a_bound_socket_handed_over_a_unix_socket_matches():
    """The real thing: a bound UDP socket passed with SCM_RIGHTS is recognised."""
    left, right = socket.socketpair()
    with socket.socket(V4, DGRAM) as sip, left, right:
        sip.bind(("127.0.0.1", 0))
        port = sip.getsockname()[1]
        envelope.send_fds(left, envelope.sockets_message("w", [(V4, sip.getsockname())]),
                          [sip.fileno()])
        payload, fds = envelope.recv_fds(right)
        with socket.socket(fileno=fds[0]) as back:
            assert envelope.parse_control(payload)["name"] == "w"
            offered = [(back.family, back.type, back.getsockname())]
            assert envelope.match_sockets([(V4, "127.0.0.1", port)], offered) == [0]
            assert envelope.match_sockets([(V4, "127.0.0.1", port + 1)], offered) is None
