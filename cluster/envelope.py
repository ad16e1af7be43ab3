"""How datagrams travel between the dispatcher and the workers.

Inbound (dispatcher -> worker, UDP on loopback): a small fixed header with the
sender's address and the index of the SIP socket that received it, then the
datagram unchanged.  A worker takes an envelope only from the dispatcher's
forwarding socket (127.0.0.1:<port>, named in the welcome below): on loopback a
process without CAP_NET_RAW cannot send with another socket's source port, nor
bind a port the dispatcher holds, so the source address is proof enough on one
host and costs next to nothing per envelope (recvfrom and a tuple comparison:
+0.3 to +0.4 us over recv, 5.30 -> 5.74 us per envelope sent and read in
bench/bench_envelope.py; an HMAC-SHA256 per envelope, computed by the dispatcher
and checked by the worker, 10.19 us: +4.9 us on a hop of ~6.6 us).  Anything
else is dropped and counted (``envelopes_refused``).  Unix datagram sockets with
peer credentials would serve too, but are no cheaper and drop bursts at the
default net.unix.max_dgram_qlen (design.md).

Streams (TCP, TLS, WebSocket: cluster/streams.py): the dispatcher holds the connections.  A
message read from one travels like a datagram, but its envelope names the connection
(an id of at least ``STREAM_BASE``) where a datagram's names the socket index; the
workers carry that number wherever they carry a socket index (a leg, a binding), so
whatever they send there goes back to the dispatcher over the control connection
(``stream_out``) and leaves through that connection.  An id is never used twice by
one host: its upper bits are drawn at random when the dispatcher starts.

Egress (worker on another host -> this host's dispatcher): the same header
naming the destination, so the datagram leaves from the SIP socket the phone
registered through (design invariant 12).

Control (worker <-> dispatcher, a Unix stream socket): msgpack maps.  On
connect the dispatcher passes its SIP sockets with SCM_RIGHTS, so workers send
from the SIP port without ever reading from it; the worker then says hello
(its name and the UDP port it reads from) and sends heartbeats.  The socket file
is mode 0600, and each end checks the other's peer credentials (SO_PEERCRED):
only a process of the same user (or root) is served, or trusted.  The welcome
names the dispatcher's forwarding address; a restarted dispatcher has a new one,
which its welcome tells every worker that reconnects.

The workers' copies keep the SIP sockets open when the dispatcher dies, so a
restarted dispatcher cannot bind the port again.  It takes the very same
sockets back instead: its first message to a connecting worker is then a
reclaim request, and the worker answers with the sockets it holds (SCM_RIGHTS
again).  Datagrams that arrived while no dispatcher read them wait in those
sockets' buffers and are not lost.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import msgpack

from .sip.ids import affinity_slot

SLOTS = 1024  # affinity slots the dispatcher deals out to live workers


def affinity_key(call_id: bytes) -> int:
    """The slot of a Call-ID.  A B-leg carries its A-leg's slot (cluster/sip/ids.py)."""
    return affinity_slot(call_id, SLOTS)


_V4 = struct.Struct("!BBH4s")
_V6 = struct.Struct("!BBH16s")
_S4 = struct.Struct("!BQH4s")  # a stream's message: the connection id instead of the index
_S6 = struct.Struct("!BQH16s")
# Socket numbers from here up are stream connections; below, indexes of the UDP sockets.
# Ids stay below 2**53: they ride in records that Redis's Lua reads as numbers.
STREAM_BASE = 1 << 16
STREAM_LIMIT = 1 << 53


def is_stream(sock_index: int) -> bool:
    return sock_index >= STREAM_BASE


# The two lowest bits of a connection id say its transport (cluster/streams.py).
TRANSPORT_CODES = {"TCP": 0, "TLS": 1, "WS": 2, "WSS": 3}
_TRANSPORTS = tuple(TRANSPORT_CODES)


def stream_transport(conn: int) -> str:
    """"TCP", "TLS", "WS" or "WSS": what connection ``conn`` is."""
    return _TRANSPORTS[conn & 3]


def wrap(addr: tuple, sock_index: int, payload: bytes) -> bytes:
    ip, port = addr[0], addr[1]
    if sock_index >= STREAM_BASE:
        if ":" in ip:
            return _S6.pack(0x16, sock_index, port,
                            socket.inet_pton(socket.AF_INET6, ip)) + payload
        return _S4.pack(0x14, sock_index, port, socket.inet_aton(ip)) + payload
    if ":" in ip:
        return _V6.pack(6, sock_index, port, socket.inet_pton(socket.AF_INET6, ip)) + payload
    return _V4.pack(4, sock_index, port, socket.inet_aton(ip)) + payload


def unwrap(data: bytes) -> tuple[tuple[str, int], int, bytes]:
    """(address, socket index, payload); ValueError for anything else."""
    if data[:1] == b"\x04":
        _, index, port, raw = _V4.unpack_from(data)
        return (socket.inet_ntoa(raw), port), index, data[_V4.size:]
    if data[:1] == b"\x06":
        _, index, port, raw = _V6.unpack_from(data)
        return (socket.inet_ntop(socket.AF_INET6, raw), port), index, data[_V6.size:]
    if data[:1] == b"\x14" and len(data) >= _S4.size:
        _, conn, port, raw = _S4.unpack_from(data)
        return (socket.inet_ntoa(raw), port), conn, data[_S4.size:]
    if data[:1] == b"\x16" and len(data) >= _S6.size:
        _, conn, port, raw = _S6.unpack_from(data)
        return (socket.inet_ntop(socket.AF_INET6, raw), port), conn, data[_S6.size:]
    raise ValueError("not an envelope")


def stream_out(conn: int, data: bytes, dest: tuple[str, int] | None = None) -> bytes:
    """Worker -> dispatcher on the control connection: send ``data`` over connection
    ``conn`` (to ``dest``, named back in a ``stream_failed`` when it has closed)."""
    message = {"type": "out", "conn": conn, "data": data}
    if dest is not None:
        message["dest"] = [dest[0], int(dest[1])]
    return msgpack.packb(message, use_bin_type=True)


# Connections the cluster opens itself (cluster/dialer.py).  A worker that must reach a
# target over TCP without a connection to it (a request too long for UDP, RFC 3261 18.1.1;
# a URI saying ;transport=tcp) carries this number where a socket index goes (a leg, an
# Out action): it is no connection's id (those have random upper bits from 2**32 up) and
# reads as TCP (its lowest bit is 0).
DIAL_TCP = STREAM_BASE


def stream_dial(dest: tuple[str, int], data: bytes, fallback: bytes | None) -> bytes:
    """Worker -> dispatcher on the control connection: send ``data`` to ``dest`` over a TCP
    connection of the dispatcher's own (reused, or opened now); when it cannot be had,
    send ``fallback`` over UDP instead (None: report the failure, ``stream_failed``)."""
    return msgpack.packb({"type": "dial", "dest": [dest[0], int(dest[1])], "data": data,
                          "fallback": fallback}, use_bin_type=True)


def stream_failed(dest: tuple[str, int], data: bytes) -> bytes:
    """Dispatcher -> worker: ``data`` could not be sent to ``dest`` over a stream (the
    connection closed, or it could not be opened): a transport error (RFC 3261 8.1.3.1)."""
    return msgpack.packb({"type": "failed", "dest": [dest[0], int(dest[1])], "data": data},
                         use_bin_type=True)


def send_fds(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    socket.send_fds(sock, [payload], fds)


def recv_fds(sock: socket.socket, maxfds: int = 4) -> tuple[bytes, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, maxfds)
    return data, fds


# ---------------------------------------------------------------- SIP socket hand-back
def reclaim_request() -> bytes:
    """Dispatcher -> worker, instead of the welcome: send back the SIP sockets you hold."""
    return msgpack.packb({"type": "reclaim"})


def sockets_message(name: str, sockets: list[tuple[int, tuple]]) -> bytes:
    """Worker -> dispatcher, with the sockets' descriptors: (family, bound address) of each."""
    return msgpack.packb({"type": "sockets", "name": name,
                          "sockets": [[int(family), list(addr[:2])] for family, addr in sockets]})


def welcome(host: str, families: list[str], forward: tuple[str, int]) -> bytes:
    """Dispatcher -> worker, with the SIP sockets' descriptors; ``forward`` is the address
    the envelopes come from (the only source the worker takes them from)."""
    return msgpack.packb({"type": "welcome", "host": host, "sockets": families,
                          "forward": [forward[0], int(forward[1])]})


def forward_of(welcome_message: dict) -> tuple[str, int]:
    """The forwarding address a welcome names; ValueError when it names none."""
    forward = welcome_message.get("forward")
    if (not isinstance(forward, (list, tuple)) or len(forward) != 2
            or not isinstance(forward[0], str) or not isinstance(forward[1], int)):
        raise ValueError("the welcome names no forwarding address")
    return forward[0], forward[1]


def peer_trusted(sock: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket runs as this process's user
    (or as root): SO_PEERCRED, filled in by the kernel at connect time."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid in (os.getuid(), 0)


def parse_control(payload: bytes) -> dict:
    """One control message; ValueError when it is not a msgpack map with a known type."""
    if not payload:
        raise ValueError("connection closed")
    try:
        message = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several kinds, not all of them ValueError
        raise ValueError(f"not a control message: {exc}") from exc
    if not isinstance(message, dict) or message.get("type") not in (
            "reclaim", "sockets", "welcome"):
        raise ValueError(f"not a control message: {message!r:.80}")
    return message


def match_sockets(wanted: list[tuple[int, str, int]],
                  offered: list[tuple[int, int, tuple]]) -> list[int] | None:
    """Which offered socket serves each wanted SIP socket, in the wanted order.

    ``wanted``: (family, bind address, port) from the configuration; ``offered``:
    (family, type, getsockname()) of each socket handed back.  None unless every wanted
    socket is there: a UDP socket of that family bound to that very address and port
    (an address written another way, ``::0001`` for ``::1``, is the same address).
    """
    order = []
    for family, host, port in wanted:
        index = next((i for i, (fam, kind, addr) in enumerate(offered)
                      if fam == family and kind == socket.SOCK_DGRAM and addr[1] == port
                      and _same_address(addr[0], host) and i not in order), None)
        if index is None:
            return None
        order.append(index)
    return order


def is_address(host: str) -> bool:
    """Whether ``host`` is an IP address (not a name, which would need a DNS lookup)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b
