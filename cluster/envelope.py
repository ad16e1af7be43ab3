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
"""

from __future__ import annotations

import socket
import struct
import zlib

SLOTS = 1024  # affinity slots the dispatcher deals out to live workers


def affinity_key(call_id: bytes) -> int:
    """The slot of a Call-ID.  A B-leg carries its A-leg's slot: ``sc<slot>.<rest>``."""
    if call_id[:2] == b"sc":
        dot = call_id.find(b".", 2, 8)
        if dot > 2 and call_id[2:dot].isdigit():
            return int(call_id[2:dot]) % SLOTS
    return zlib.crc32(call_id) % SLOTS


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
