"""Keepalives that share the SIP port (RFC 5626 section 3.5.2, RFC 5389).

Phones behind NAT send bare CRLF datagrams or STUN binding requests to keep
their NAT binding open.  Neither is SIP: CRLFs are dropped silently, a STUN
binding request gets a binding success response with XOR-MAPPED-ADDRESS.
"""

from __future__ import annotations

import ipaddress
import struct

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
XOR_MAPPED_ADDRESS = 0x0020


def is_crlf_keepalive(data: bytes) -> bool:
    return len(data) <= 8 and not data.strip(b"\r\n \t\x00")


def is_stun(data: bytes) -> bool:
    return (len(data) >= 20 and data[0] < 2
            and struct.unpack_from("!I", data, 4)[0] == MAGIC_COOKIE)


def binding_response(request: bytes, ip: str, port: int) -> bytes | None:
    """The answer to a STUN binding request from (ip, port), or None for other STUN."""
    msg_type, length = struct.unpack_from("!HH", request, 0)
    if msg_type != BINDING_REQUEST or length + 20 != len(request):
        return None
    transaction_id = request[8:20]
    addr = ipaddress.ip_address(ip)
    xport = port ^ (MAGIC_COOKIE >> 16)
    if addr.version == 4:
        xaddr = struct.pack("!I", int(addr) ^ MAGIC_COOKIE)
        value = struct.pack("!BBH", 0, 1, xport) + xaddr
    else:
        mask = int.from_bytes(struct.pack("!I", MAGIC_COOKIE) + transaction_id, "big")
        xaddr = (int(addr) ^ mask).to_bytes(16, "big")
        value = struct.pack("!BBH", 0, 2, xport) + xaddr
    attribute = struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value
    header = struct.pack("!HHI", BINDING_SUCCESS, len(attribute), MAGIC_COOKIE)
    return header + transaction_id + attribute
