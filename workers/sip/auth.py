"""Digest authentication of requests against the directory in Redis.

The core (cluster.sip.digest) does the arithmetic; this module adds what needs
the outside world: the clock, random salts, HA1 look-ups (cached briefly, so a
registration storm does not read the directory on every request), the
throttling of sources that keep failing, the lockout of users whose password is
being guessed from many sources, and the security log line of every refusal.
Unknown users and wrong passwords take the same path and get the same answer.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from enum import Enum

import gevent

from cluster.backoff import Backoff
from cluster.bounded import BoundedCache
from cluster.sip import digest
from cluster.sip.errors import SipError
from cluster.sip.message import Request
from cluster.store import Store, aor_of

log = logging.getLogger("auth")
HA1_CACHE_SECONDS = 30.0  # how long a password change may take to apply
# How long a locked user's registered source addresses are trusted without reading the
# bindings again: a phone that moves is let through this much later.
REGISTERED_SOURCES_SECONDS = 5.0
LOCAL_ENTRIES_MAX = 100_000  # per cache: an attacker's made-up names must not grow it forever
# ... nor their length: a user name comes off the wire and may be 60 KB long.  A real entry
# (a name, two hex HA1s or a few addresses, ~200 B of objects) costs ~400 B, so 100,000 fit
# in 40 MB; 8 MB keeps ~20,000 users' HA1 for HA1_CACHE_SECONDS (30 s), more than the REGISTERs
# a worker carries in that time (~3,500/s at most: a miss costs one Redis read), and keeps
# what a flood of 60 KB names takes to 8 MB per cache.
LOCAL_CACHE_BYTES = 8 * 1024 * 1024


class Verdict(Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # no usable credentials: 401/407
    STALE = "stale"  # an old nonce: 401/407 with stale=true
    FORBIDDEN = "forbidden"  # wrong password or unknown user: 403
    THROTTLED = "throttled"  # too many failures from this source: 403 without checking
    LOCKED = "locked"  # too many failures for this user from anywhere: 403 without checking


@dataclass
class AuthResult:
    verdict: Verdict
    username: str = ""
    credentials: digest.Credentials | None = None


class Authenticator:
    def __init__(self, store: Store, *, realm: str, secret: bytes, algorithms: tuple[str, ...],
                 nonce_lifetime: float, max_failures: int, failure_window: float,
                 user_max_failures: int = 0, user_failure_window: float = 600.0,
                 user_lockout: float = 600.0, counters: Counter | None = None):
        self.store = store
        self.realm = realm
        self.secret = secret
        self.algorithms = algorithms
        self.nonce_lifetime = nonce_lifetime
        self.max_failures = max_failures
        self.failure_window = failure_window
        self.user_max_failures = user_max_failures  # 0: no per-user lockout
        self.user_failure_window = user_failure_window
        self.user_lockout = user_lockout
        # user -> (until, {algorithm: HA1} or None for an unknown user)
        self._ha1 = BoundedCache(LOCAL_ENTRIES_MAX, LOCAL_CACHE_BYTES)
        self._throttled = BoundedCache(LOCAL_ENTRIES_MAX, LOCAL_CACHE_BYTES)  # IP -> until
        self._locked = BoundedCache(LOCAL_ENTRIES_MAX, LOCAL_CACHE_BYTES)  # AOR -> until
        # AOR -> (until, the source IPs of its live bindings)
        self._registered = BoundedCache(LOCAL_ENTRIES_MAX, LOCAL_CACHE_BYTES)
        self.counters = Counter() if counters is None else counters  # auth_<outcome> failures
        # Unknown users are checked against this, so they cost what a real user costs.
        self._decoy = {alg: digest.ha1("-", realm, os.urandom(16).hex(), alg)
                       for alg in ("MD5", "SHA-256")}

    def challenge_headers(self, *, proxy: bool, stale: bool = False) -> list[tuple[bytes, bytes]]:
        """One challenge per offered algorithm, preferred first (RFC 8760)."""
        name = b"Proxy-Authenticate" if proxy else b"WWW-Authenticate"
        nonce = digest.make_nonce(self.secret, time.time(), os.urandom(12))
        return [(name, digest.build_challenge(self.realm, nonce, algorithm=alg, stale=stale))
                for alg in self.algorithms]

    def check(self, req: Request, source: tuple[str, int], *, proxy: bool) -> AuthResult:
        creds = self._credentials(req, proxy)
        if creds is None:
            return AuthResult(Verdict.CHALLENGE)
        if not digest.uri_matches(creds.uri, req.uri_raw):
            # Credentials computed for another target (RFC 7616 3.4.6, RFC 3261 22.4) were
            # lifted from elsewhere: a bad request, not a reason to challenge again.
            self.refused(req, source, creds.username, "uri-mismatch")
            raise SipError(400, "Digest uri does not match the Request-URI")
        ip = source[0]
        if self._is_throttled(ip):
            self.counters["auth_throttled"] += 1
            self.refused(req, source, creds.username, "throttled-source")
            return AuthResult(Verdict.THROTTLED, creds.username, creds)
        if self._is_locked(aor_of(creds.username, self.realm), ip):
            self.counters["auth_locked"] += 1
            self.refused(req, source, creds.username, "locked-user")
            return AuthResult(Verdict.LOCKED, creds.username, creds)
        state, algorithm = self._usable(creds)
        if algorithm is None:
            return AuthResult(Verdict.CHALLENGE, creds.username, creds)
        ha1, known = self._ha1_of(creds.username, algorithm)
        if not digest.verify(creds, req.method, ha1, body=req.body):
            self.counters["auth_forbidden"] += 1
            self.refused(req, source, creds.username,
                         "wrong-password" if known else "unknown-user")
            self._note_failure(ip, creds.username)
            return AuthResult(Verdict.FORBIDDEN, creds.username, creds)
        if state is digest.NonceState.STALE:  # RFC 7616 3.3: stale only for a right digest
            return AuthResult(Verdict.STALE, creds.username, creds)
        return AuthResult(Verdict.OK, creds.username, creds)

    def precheck(self, req: Request, source: tuple[str, int], *, proxy: bool
                 ) -> AuthResult | None:
        """``check``'s verdict when it is OK on what this worker already holds (the user's
        HA1 cached, nothing throttled or locked), with none of ``check``'s reads or
        records; None when ``check`` has to decide.  The caller may then read what comes
        after a pass (the nonce count) with its first reads."""
        creds = self._credentials(req, proxy)
        if creds is None or not creds.username or not digest.uri_matches(creds.uri,
                                                                         req.uri_raw):
            return None
        ip, now = source[0], time.monotonic()
        if ip in self._throttled or aor_of(creds.username, self.realm) in self._locked:
            return None
        state, algorithm = self._usable(creds)
        cached = self._ha1.get(creds.username)
        if (algorithm is None or state is not digest.NonceState.VALID or cached is None
                or cached[0] < now or not cached[1] or algorithm not in cached[1]):
            return None
        if not digest.verify(creds, req.method, cached[1][algorithm], body=req.body):
            return None
        return AuthResult(Verdict.OK, creds.username, creds)

    def _usable(self, creds: digest.Credentials) -> tuple[digest.NonceState, str | None]:
        """The nonce's state and the HA1 algorithm to check ``creds`` with; no algorithm
        when they are to be challenged whatever the digest."""
        state = digest.check_nonce(self.secret, creds.nonce, time.time(), self.nonce_lifetime)
        algorithm = digest.ha1_algorithm(creds.algorithm)
        if (state is digest.NonceState.INVALID or algorithm is None
                or algorithm not in self.algorithms or creds.qop is None
                or creds.qop.lower() not in ("auth", "auth-int")):
            # Our challenges always ask for qop=auth: credentials without it carry no
            # nonce-count, so they could be replayed for the nonce's lifetime.  (nc and
            # cnonce with a qop, and nc's format, are checked when the header is parsed;
            # we send no opaque, so there is none to compare.)
            return state, None
        return state, algorithm

    def refused(self, req: Request, source: tuple[str, int], user: str, reason: str) -> None:
        """The security log line of a refused authentication, in the one format the
        fail2ban filter (deploy/fail2ban/) reads.  Never carries credentials; every value
        from the wire is quoted and escaped, so it cannot forge fields or lines."""
        log.warning("%s", auth_failed_line(user, self.realm, source, reason, req.call_id))

    def _credentials(self, req: Request, proxy: bool) -> digest.Credentials | None:
        """The Digest credentials for our realm, if the request carries any."""
        for value in req.header_lines("proxy-authorization" if proxy else "authorization"):
            creds = digest.parse_credentials(value)
            if creds.is_digest and creds.realm == self.realm:
                return creds
        return None

    def carries_credentials(self, req: Request, *, proxy: bool) -> bool:
        """Whether ``req`` has credentials for our realm (else ``check`` challenges it)."""
        return self._credentials(req, proxy) is not None

    def user_to_read(self, req: Request, *, proxy: bool) -> str | None:
        """The user whose record ``check`` would read for ``req`` (its credentials are for
        our realm, its HA1 is not cached): the caller may read it with its own reads and
        hand it over (``read_user``) first."""
        creds = self._credentials(req, proxy)
        if creds is None or not creds.username:
            return None
        cached = self._ha1.get(creds.username)
        return creds.username if cached is None or cached[0] < time.monotonic() else None

    def read_user(self, user: str, record: dict | None) -> None:
        """``user``'s record (None: no such user), just read from the store."""
        self._cache_user(user, record, time.monotonic())

    def _cache_user(self, user: str, record: dict | None, now: float) -> tuple:
        ha1 = record["ha1"] if record else None
        cached = (now + HA1_CACHE_SECONDS, ha1)
        self._ha1.put(user, cached, len(user) + (sum(map(len, ha1.values())) if ha1 else 0))
        return cached

    def _ha1_of(self, user: str, algorithm: str) -> tuple[str, bool]:
        """The HA1 to check against, and whether the user is known (else a decoy's)."""
        now = time.monotonic()
        cached = self._ha1.get(user)
        if cached is None or cached[0] < now:
            cached = self._cache_user(user, self.store.get_user(user, self.realm), now)
        known = cached[1]
        if not known or algorithm not in known:
            return self._decoy[algorithm], False
        return known[algorithm], True

    def _is_throttled(self, ip: str) -> bool:
        until = self._throttled.get(ip)
        if until is None:
            return False
        if until < time.monotonic():
            self._throttled.pop(ip)
            return False
        return True

    def _is_locked(self, aor: str, ip: str) -> bool:
        """Whether ``aor`` is locked out for requests from ``ip``: the user's own phones
        (the addresses its live bindings registered from) are never locked out."""
        until = self._locked.get(aor)
        if until is None:
            return False
        if until < time.monotonic():
            self._locked.pop(aor)
            return False
        return ip not in self._registered_sources(aor)

    def _registered_sources(self, aor: str) -> frozenset[str]:
        # Read only for a locked user, and cached briefly: a guessing storm against one
        # user costs one HGETALL per few seconds, not one per guess.
        now = time.monotonic()
        cached = self._registered.get(aor)
        if cached is None or cached[0] < now:
            sources = frozenset(b.source[0] for b in self.store.bindings(aor))
            cached = (now + REGISTERED_SOURCES_SECONDS, sources)
            self._registered.put(aor, cached, len(aor) + sum(len(ip) + 60 for ip in sources))
        return cached[1]

    def _note_failure(self, ip: str, user: str) -> None:
        failures = self.store.note_auth_failure(ip, self.failure_window)
        if failures >= self.max_failures:
            self.block(ip, self.failure_window)
            self.store.announce_block(ip, self.failure_window)  # the other workers too
        if self.user_max_failures:
            # Unknown users are counted and locked the same way: a lockout must not tell
            # a guesser which names exist.
            aor = aor_of(user, self.realm)
            left = self.store.note_user_auth_failure(
                aor, self.user_failure_window, self.user_max_failures, self.user_lockout)
            if left > 0:
                self.lock(aor, left)

    def block(self, ip: str, seconds: float) -> None:
        self._throttled.put(ip, time.monotonic() + seconds, len(ip))

    def lock(self, aor: str, seconds: float) -> None:
        self._locked.put(aor, time.monotonic() + seconds, len(aor))

    def follow_blocks(self) -> None:
        """Apply the source blocks and user lockouts other workers announce (run in its
        own greenlet).  Whatever ends the subscription (Redis gone, restarted, paused), it
        is made anew."""
        backoff = Backoff(log, "authblock subscription")
        while True:
            try:
                for kind, subject, seconds in self.store.auth_events():
                    backoff.ok()
                    if kind == "user":
                        self.lock(subject, seconds)
                    else:
                        self.block(subject, seconds)
            except Exception as exc:  # whatever it is, the subscription is made again
                gevent.sleep(backoff.failed(exc))


def auth_failed_line(user: str, realm: str, source: tuple[str, int], reason: str,
                     call_id: bytes | str) -> str:
    """``auth failed: user="1002" realm="example.com" source=192.0.2.7:5060
    reason=wrong-password call-id="..."`` (one line; deploy/fail2ban/ parses it)."""
    host = f"[{source[0]}]" if ":" in source[0] else source[0]
    return (f"auth failed: user={_quoted(user)} realm={_quoted(realm)} "
            f"source={host}:{source[1]} reason={reason} call-id={_quoted(call_id)}")


_LOGGED_MAX = 200  # characters kept of one value: a 60 KB Call-ID makes no useful log line


def _quoted(value: bytes | str) -> str:
    """A wire value as a double-quoted string that stays on its line and cannot close
    its quotes early: backslash and quote escaped, controls and other unprintable
    characters (CR, LF, ESC, NUL, C1, U+2028...) as \\xHH / \\uHHHH."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    cut = len(value) > _LOGGED_MAX
    out = []
    for ch in value[:_LOGGED_MAX]:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + ("..." if cut else "") + '"'
