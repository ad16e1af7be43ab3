"""Per-source limits: token buckets per source address, bans, and the allow-list.

Pure bookkeeping (no sockets, no Redis): the dispatcher calls ``Limiter.check``
for every datagram before it does anything else, and ``Bans`` says whether a
source is banned.  Counting happens in the dispatcher because it is the one
place that sees a source's whole traffic on a host before any work is done for
it; it needs only the first bytes of the datagram (request or response, the
method) and, for INVITE and the other methods, one header search for a To-tag:

  REGISTER                                     -> the "register" bucket
  INVITE without a To-tag                      -> the "invite" bucket
  ACK, BYE, CANCEL, PRACK, UPDATE, INFO, and   -> the "dialog" bucket: they carry on
  any request with a To-tag (re-INVITE...)        something begun, so a caller's
                                                   in-dialog traffic never spends the
                                                   tokens of its new calls
  any other request (OPTIONS, MESSAGE...)      -> the "other" bucket
  responses                                    -> not counted (they answer our requests)

A source that empties a bucket is banned (``flood-<bucket>``) for
``limits.ban_seconds``: every datagram from it is dropped unanswered, by the
dispatcher, before anything else is looked at.  Sources in ``limits.allow``
(trunks, NAT gateways of many phones) are never rate-banned.

A source from which a request authenticated (a digest the registrar or the B2BUA
accepted) is *trusted* for ``limits.trust_seconds``: its buckets fill
``limits.trusted_factor`` times as fast and hold that many times more, so a SIPp
benchmark, a PBX or a trunk that proves its password is not banned for its load,
while a flood far past even those rates still is.  ``Trusted`` holds them; the
workers mark them and announce them over Redis (workers/sip/scanners.py).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable

from .sip import scan

MAX_SOURCES = 200_000  # buckets kept per class: a spoofed-source flood must not grow them
MAX_BANS = 200_000
KINDS = ("register", "invite", "other", "dialog")
# Methods that exist only within a dialog or a transaction begun elsewhere.
_DIALOG_HEADS = frozenset((b"ACK ", b"BYE ", b"CANC", b"PRAC", b"UPDA", b"INFO"))


def reason_of(kind: str) -> str:
    return f"flood-{kind}"


class AllowList:
    """CIDRs never rate-banned; the verdict per address is cached."""

    def __init__(self, cidrs: Iterable[str]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._cache: dict[str, bool] = {}

    def __contains__(self, ip: str) -> bool:
        known = self._cache.get(ip)
        if known is None:
            if not self.networks:
                return False
            try:
                address = ipaddress.ip_address(ip.split("%", 1)[0])
                known = any(address in net for net in self.networks)
            except ValueError:
                known = False
            if len(self._cache) >= MAX_SOURCES:
                self._cache.clear()
            self._cache[ip] = known
        return known


class Expiring:
    """Source addresses -> when their standing ends (monotonic), at most ``limit`` of them:
    past it, ended entries are forgotten, and a new address is refused while the table is
    full of live ones (the rate limits still hold it)."""

    def __init__(self, limit: int = MAX_SOURCES, clock=time.monotonic):
        self.until: dict[str, float] = {}
        self.limit = limit
        self.clock = clock

    def add(self, ip: str, seconds: float, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if len(self.until) >= self.limit and ip not in self.until:
            self.until = {k: v for k, v in list(self.until.items()) if v > now}
            if len(self.until) >= self.limit:
                return
        self.until[ip] = max(self.until.get(ip, 0.0), now + seconds)

    def remove(self, ip: str) -> None:
        self.until.pop(ip, None)

    def holds(self, ip: str, now: float) -> bool:
        until = self.until.get(ip)
        if until is None:
            return False
        if until <= now:
            self.until.pop(ip, None)
            return False
        return True

    def live(self, now: float) -> int:
        return sum(1 for until in list(self.until.values()) if until > now)


class Trusted(Expiring):
    """Proven sources: their digest was accepted within limits.trust_seconds."""

    trusted = Expiring.holds


class Limiter:
    """Token buckets per (class, source address); trusted sources get ``factor`` times
    the rate and the burst of each class."""

    def __init__(self, rates: dict[str, tuple[float, int]], allow: AllowList | None = None,
                 clock=time.monotonic, trusted: Trusted | None = None, factor: float = 1.0):
        # kind -> (rate per second, burst, {ip: [tokens, last refill]}, trusted rate,
        # trusted burst); rate 0: unlimited
        factor = max(1.0, float(factor))
        self.buckets = {kind: (float(rate), int(burst), {}, rate * factor, burst * factor)
                        for kind, (rate, burst) in rates.items() if rate > 0}
        self.allow = allow or AllowList(())
        self.clock = clock
        self.trusted = trusted or Trusted()

    @classmethod
    def from_config(cls, limits, trusted: Trusted | None = None) -> Limiter:
        return cls({kind: (getattr(limits, f"{kind}_rate"), getattr(limits, f"{kind}_burst"))
                    for kind in KINDS}, AllowList(limits.allow), trusted=trusted,
                   factor=limits.trusted_factor)

    @staticmethod
    def kind_of(data: bytes) -> str | None:
        """The bucket a datagram draws from; None when it draws from none."""
        head = data[:4]
        if head == b"SIP/":
            return None
        if head == b"REGI":
            return "register"
        if head in _DIALOG_HEADS:
            return "dialog"
        if scan.has_to_tag(data):
            return "dialog"
        return "invite" if head == b"INVI" else "other"

    def check(self, ip: str, data: bytes, now: float) -> str | None:
        """None when the datagram may pass; else the bucket ``ip`` has emptied."""
        kind = self.kind_of(data)
        if kind is None:
            return None
        entry = self.buckets.get(kind)
        if entry is None:
            return None
        rate, burst, buckets, trusted_rate, trusted_burst = entry
        if self.trusted.until and self.trusted.trusted(ip, now):
            rate, burst = trusted_rate, trusted_burst
        bucket = buckets.get(ip)
        if bucket is None:
            if ip in self.allow:
                return None
            if len(buckets) >= MAX_SOURCES:
                _forget_full(buckets, now, burst / rate)
            buckets[ip] = [burst - 1.0, now]
            return None
        tokens = bucket[0] + (now - bucket[1]) * rate
        if tokens > burst:
            tokens = burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            if ip in self.allow:
                return None
            return kind
        bucket[0] = tokens - 1.0
        return None

    def forget(self, ip: str) -> None:
        """A source unbanned starts with full buckets."""
        for _rate, _burst, buckets, _trusted_rate, _trusted_burst in self.buckets.values():
            buckets.pop(ip, None)


def _forget_full(buckets: dict, now: float, refill: float) -> None:
    """Drop the buckets that have refilled (a new one would be the same); all of them
    when that frees nothing."""
    stale = [ip for ip, (_tokens, last) in list(buckets.items()) if now - last >= refill]
    for ip in stale:
        del buckets[ip]
    if len(buckets) >= MAX_SOURCES:
        buckets.clear()


class Bans(Expiring):
    """Banned sources: dropped unanswered until the ban ends."""

    def __init__(self, clock=time.monotonic):
        super().__init__(MAX_BANS, clock)

    banned = Expiring.holds


def ban_line(addr: tuple, reason: str, seconds: float) -> str:
    """``source banned: source=192.0.2.7:5060 reason=flood-invite seconds=300`` (one line;
    deploy/fail2ban/filter.d/sipcluster-ban.conf parses it).  Every field is ours: the
    address comes from the socket, the reason from a fixed list."""
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"source banned: source={host}:{addr[1]} reason={reason} seconds={int(seconds)}"
