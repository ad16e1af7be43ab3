"""A dead host's floating SIP address, taken over by the host it moved to.

keepalived (or any VRRP agent) moves a dead host's service address to a surviving
host.  The surviving host's dispatcher notices it within a second (the address has
become local: a bind to it succeeds) and adopts the dead host: it binds the dead
host's SIP port on that address, reads it like its own, sends from it, and announces
the dead host in its stead (``host:<dead id>``, marked ``by``, naming its own egress
port and the virtual index ``base`` the dead host's sockets have there), so every worker
of the cluster that sends "from the dead host" (a phone registered through it, a call
leg set up through it) hands it to this dispatcher, which sends it from that address.
The relays do the same for media (workers/relay/relay.py ``adopt``).

Only a host whose own announcement is older than ``ADOPT_AFTER`` is adopted (a live
host renews it every second), and only an address that is neither a wildcard nor
loopback: hosts sharing a machine (tests, a single host) never adopt each other.
A dispatcher whose own address is not on its host (it came back while the other host
still holds its address) stays passive: it does not announce itself, so it does not
take its calls and phones back from the host that serves them.
"""

from __future__ import annotations

import ipaddress
import socket
import zlib
from dataclasses import dataclass, field

# Virtual SIP socket indexes for the adopted addresses' sockets, in envelopes between
# a dispatcher and its workers and in hand-offs to it: one byte there (cluster/envelope.py),
# above the host's own sockets (one per family).  Two hosts whose ids hash to one slot
# cannot both be adopted by one host at once (logged when it happens).
ADOPTED_BASE = 16
SOCKETS_PER_HOST = 2
ADOPTED_SLOTS = (256 - ADOPTED_BASE) // SOCKETS_PER_HOST
ADOPT_AFTER = 1.5  # seconds without the host's own announcement (renewed every second)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # (Linux's numbers)
IPV6_FREEBIND = 78


@dataclass
class Adopted:
    host: str
    address: tuple[str, int]
    base: int  # virtual index of its first socket
    sockets: list[socket.socket] = field(default_factory=list)
    stop: object = None  # threading.Event ending its reading thread


def virtual_base(host: str) -> int:
    """The first virtual socket index of an adopted host: stable across restarts of the
    adopting dispatcher, so the bindings and legs recorded with it stay valid."""
    return ADOPTED_BASE + SOCKETS_PER_HOST * (zlib.crc32(host.encode()) % ADOPTED_SLOTS)


def adoptable_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_loopback)


def is_local(address: str) -> bool:
    """Whether ``address`` is one of this host's (network namespace's) addresses now."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((address, 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def wanted(hosts: dict[str, dict], me: str, now: float,
           local=is_local) -> dict[str, tuple[str, int]]:
    """The hosts this one should serve now: host id -> its SIP address.  ``hosts``: the
    cluster's announcements (store.hosts()); ``local``: the address test."""
    chosen: dict[str, tuple[str, int]] = {}
    for host, info in hosts.items():
        sip = info.get("sip")
        if host == me or not sip or not adoptable_address(str(sip[0])):
            continue
        ours = info.get("by") == me
        if not ours and now - float(info.get("seen", 0)) < ADOPT_AFTER:
            continue  # its own host (or another adopter) announced it lately
        if local(str(sip[0])):
            chosen[host] = (str(sip[0]), int(sip[1]))
    return chosen


def freebind(sock: socket.socket) -> None:
    """Let ``sock`` bind an address that is not on this host yet (a floating address
    another host holds): it receives, or accepts, once the address is here."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


def standby(address: str) -> bool:
    """Whether a dispatcher bound on ``address`` is passive: a floating address that is
    not on this host now."""
    return adoptable_address(address) and not is_local(address)
