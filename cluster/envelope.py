"""How datagrams travel between the dispatcher and the workers.

Inbound (dispatcher -> worker, UDP on loopback): a small fixed header with the
sender's address and the index of the SIP socket that received it, then the
datagram unchanged.  Egress (worker on another host -> this host's dispatcher):
the same header naming the destination, so the datagram leaves from the SIP
socket the phone registered through (design invariant 12).

Control (worker <-> dispatcher, a Unix stream socket): msgpack maps.  On
connect the dispatcher passes its SIP sockets with SCM_RIGHTS, so workers send
from the SIP port without ever reading from it; the worker then says hello
(its name and the UDP port it reads from) and sends heartbeats.

The workers' copies keep the SIP sockets open when the dispatcher dies, so a
restarted dispatcher cannot bind the port again.  It takes the very same
sockets back instead: its first message to a connecting worker is then a
reclaim request, and the worker answers with the sockets it holds (SCM_RIGHTS
again).  Datagrams that arrived while no dispatcher read them wait in those
sockets' buffers and are not lost.
"""

from __future__ import annotations

import ipaddress
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


def wrap(addr: tuple, sock_index: int, payload: bytes) -> bytes:
    ip, port = addr[0], addr[1]
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
    raise ValueError("not an envelope")


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


def welcome(host: str, families: list[str]) -> bytes:
    """Dispatcher -> worker, with the SIP sockets' descriptors."""
    return msgpack.packb({"type": "welcome", "host": host, "sockets": families})


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


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b
