"""HEP version 3 (the Homer Encapsulation Protocol): one SIP message and where it went, as
Homer's capture server (heplify-server) and sngrep's HEP listener read them.

A packet is "HEP3", its total length (16 bits), then chunks: vendor id (0: generic), chunk
type, chunk length (16 bits each, the 6 header bytes included), value.  Sans-IO: bytes in,
bytes out.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAGIC = b"HEP3"
PROTO_SIP = 1
UDP = 17
_CHUNK = struct.Struct("!HHH")
# Chunk types of the generic vendor (0).
IP_FAMILY, IP_PROTO, IPV4_SRC, IPV4_DST, IPV6_SRC, IPV6_DST = 1, 2, 3, 4, 5, 6
SRC_PORT, DST_PORT, TIME_SEC, TIME_USEC, PROTO_TYPE, CAPTURE_ID = 7, 8, 9, 10, 11, 12
AUTH_KEY, PAYLOAD, CORRELATION_ID = 14, 15, 17


@dataclass(frozen=True)
class Packet:
    payload: bytes
    src: tuple[str, int]
    dst: tuple[str, int]
    time: float  # epoch seconds
    capture_id: int = 0
    auth_key: str = ""
    correlation_id: bytes = b""  # Homer joins the packets that share it


def encode(packet: Packet) -> bytes:
    src, dst = ipaddress.ip_address(packet.src[0]), ipaddress.ip_address(packet.dst[0])
    if src.version != dst.version:  # a v4-mapped peer on a v6 socket: say both in v6
        src, dst = _v6(src), _v6(dst)
    v4 = src.version == 4
    seconds = int(packet.time)
    chunks = [
        _chunk(IP_FAMILY, bytes([2 if v4 else 10])),
        _chunk(IP_PROTO, bytes([UDP])),
        _chunk(IPV4_SRC if v4 else IPV6_SRC, src.packed),
        _chunk(IPV4_DST if v4 else IPV6_DST, dst.packed),
        _chunk(SRC_PORT, struct.pack("!H", packet.src[1])),
        _chunk(DST_PORT, struct.pack("!H", packet.dst[1])),
        _chunk(TIME_SEC, struct.pack("!I", seconds)),
        _chunk(TIME_USEC, struct.pack("!I", int((packet.time - seconds) * 1_000_000))),
        _chunk(PROTO_TYPE, bytes([PROTO_SIP])),
        _chunk(CAPTURE_ID, struct.pack("!I", packet.capture_id)),
    ]
    if packet.auth_key:
        chunks.append(_chunk(AUTH_KEY, packet.auth_key.encode()))
    if packet.correlation_id:
        chunks.append(_chunk(CORRELATION_ID, packet.correlation_id))
    chunks.append(_chunk(PAYLOAD, packet.payload))
    body = b"".join(chunks)
    return MAGIC + struct.pack("!H", 6 + len(body)) + body


def decode(data: bytes) -> Packet:
    """The packet ``encode`` made (ValueError for anything else)."""
    if len(data) < 6 or data[:4] != MAGIC or struct.unpack_from("!H", data, 4)[0] != len(data):
        raise ValueError("not a HEP3 packet")
    values: dict[int, bytes] = {}
    at = 6
    while at < len(data):
        if at + 6 > len(data):
            raise ValueError("truncated chunk")
        vendor, kind, length = _CHUNK.unpack_from(data, at)
        if length < 6 or at + length > len(data):
            raise ValueError("bad chunk length")
        if vendor == 0:
            values[kind] = data[at + 6:at + length]
        at += length
    v4 = values.get(IP_FAMILY) == bytes([2])
    src = ipaddress.ip_address(values[IPV4_SRC if v4 else IPV6_SRC])
    dst = ipaddress.ip_address(values[IPV4_DST if v4 else IPV6_DST])
    seconds = struct.unpack("!I", values[TIME_SEC])[0]
    micros = struct.unpack("!I", values.get(TIME_USEC, b"\0\0\0\0"))[0]
    return Packet(payload=values.get(PAYLOAD, b""),
                  src=(str(src), struct.unpack("!H", values[SRC_PORT])[0]),
                  dst=(str(dst), struct.unpack("!H", values[DST_PORT])[0]),
                  time=seconds + micros / 1_000_000,
                  capture_id=struct.unpack("!I", values.get(CAPTURE_ID, b"\0\0\0\0"))[0],
                  auth_key=values.get(AUTH_KEY, b"").decode("utf-8", "replace"),
                  correlation_id=values.get(CORRELATION_ID, b""))


def _chunk(kind: int, value: bytes) -> bytes:
    return _CHUNK.pack(0, kind, 6 + len(value)) + value


def _v6(address):
    return address if address.version == 6 else ipaddress.IPv6Address(f"::ffff:{address}")
