"""What the cluster calls things on the wire: Call-IDs of B-legs, call keys, our Via,
fresh tags and branches, and the methods we allow.  One home, so the dispatcher, the
B2BUA, the pinger, the registrar and the operator CLI cannot disagree.

B-leg Call-IDs are ``sc<slot>.<tag>.<n>``: the dispatcher reads the slot, so both legs
of a call land on the same worker; the tag (24 hex digits) is the call's key, which
finds its record; ``n`` is the fork.  An A-leg's key is a hash of its Call-ID.

Pure: the random bytes behind tags and branches come from the caller (``Ids``).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

B_LEG_PREFIX = b"sc"
TAG_DIGITS = 24  # a call key: 12 bytes of blake2b, in hex
MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 8.1.1.7: branches that are unique by construction
# What this cluster answers; every other known method is 405, an unknown one 501.  The
# B2BUA relays PRACK and UPDATE in a dialog, so they are allowed there too.
ALLOWED = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "UPDATE", "INFO",
           "MESSAGE", "NOTIFY", "REFER", "PRACK")
ALLOW = ", ".join(ALLOWED).encode()


# ---------------------------------------------------------------- Call-IDs and call keys
def b_leg_call_id(slot: int, tag: str, index: int) -> bytes:
    """The Call-ID of fork ``index`` of call ``tag`` whose A-leg is in ``slot``."""
    return b"%s%d.%s.%d" % (B_LEG_PREFIX, slot, tag.encode(), index)


def b_leg_slot(call_id: bytes) -> int | None:
    """The slot a B-leg Call-ID carries, read from its first bytes only (the dispatcher
    does this for every datagram): None when it does not start ``sc<digits>.``."""
    if call_id[:2] == B_LEG_PREFIX:
        dot = call_id.find(b".", 2, 8)
        if dot > 2 and call_id[2:dot].isdigit():
            return int(call_id[2:dot])
    return None


def affinity_slot(call_id: bytes, slots: int) -> int:
    """The slot of a Call-ID.  A B-leg carries its A-leg's slot."""
    slot = b_leg_slot(call_id)
    return (slot if slot is not None else zlib.crc32(call_id)) % slots


def b_leg_parts(call_id: bytes) -> tuple[str, str] | None:
    """(call key, fork index) of one of our B-leg Call-IDs, None for any other."""
    if call_id[:2] != B_LEG_PREFIX:
        return None
    parts = call_id.split(b".")
    if len(parts) == 3 and parts[0][2:].isdigit() and len(parts[1]) == TAG_DIGITS:
        return parts[1].decode("latin-1"), parts[2].decode("latin-1")
    return None


def call_tag(call_id: bytes) -> str:
    """The call a Call-ID belongs to: B-legs say it, A-legs hash to it."""
    parts = b_leg_parts(call_id)
    if parts is not None:
        return parts[0]
    return hashlib.blake2b(call_id, digest_size=TAG_DIGITS // 2).hexdigest()


def leg_name(call_id: bytes) -> str:
    """"a" for a caller's Call-ID, "b<n>" for fork n's."""
    parts = b_leg_parts(call_id)
    return "a" if parts is None else "b" + parts[1]


# ---------------------------------------------------------------- our address
def host_part(address: str) -> str:
    """``address`` as the host of a Via or a SIP URI: an IPv6 address in brackets."""
    if ":" in address and not address.startswith("["):
        return f"[{address}]"
    return address


def via(address: str, port: int, branch: str) -> bytes:
    """Our Via header value (UDP, asking for rport)."""
    return b"SIP/2.0/UDP %s:%d;branch=%s;rport" % (host_part(address).encode(), port,
                                                     branch.encode())


# ---------------------------------------------------------------- fresh identifiers
class Ids:
    """Where fresh tags and branches come from: ``random_bytes(n)`` is ``os.urandom`` in
    the processes (globally unique by construction, never a per-process counter); tests
    pass something deterministic or override the methods."""

    def __init__(self, random_bytes: Callable[[int], bytes] | None = None) -> None:
        self._random = random_bytes

    def token(self, size: int) -> str:
        """``size`` random bytes in hex."""
        if self._random is None:
            raise NotImplementedError("an Ids without a random source")
        return self._random(size).hex()

    def tag(self) -> str:
        return self.token(8)

    def branch(self) -> str:
        return MAGIC_COOKIE + self.token(10)
