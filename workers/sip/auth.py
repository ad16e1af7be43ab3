"""Digest authentication of requests against the directory in Redis.

The core (cluster.sip.digest) does the arithmetic; this module adds what needs
the outside world: the clock, random salts, HA1 look-ups (cached briefly, so a
registration storm does not read the directory on every request), and the
throttling of sources that keep failing.  Unknown users and wrong passwords
take the same path and get the same answer.
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
from cluster.sip import digest
from cluster.sip.message import Request
from cluster.store import Store

log = logging.getLogger("auth")
HA1_CACHE_SECONDS = 30.0  # how long a password change may take to apply


class Verdict(Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # no usable credentials: 401/407
    STALE = "stale"  # an old nonce: 401/407 with stale=true
    FORBIDDEN = "forbidden"  # wrong password or unknown user: 403
    THROTTLED = "throttled"  # too many failures from this source: 403 without checking


@dataclass
class AuthResult:
    verdict: Verdict
    username: str = ""
    credentials: digest.Credentials | None = None


class Authenticator:
    def __init__(self, store: Store, *, realm: str, secret: bytes, algorithms: tuple[str, ...],
                 nonce_lifetime: float, max_failures: int, failure_window: float,
                 counters: Counter | None = None):
        self.store = store
        self.realm = realm
        self.secret = secret
        self.algorithms = algorithms
        self.nonce_lifetime = nonce_lifetime
        self.max_failures = max_failures
        self.failure_window = failure_window
        self._ha1: dict[str, tuple[float, dict | None]] = {}
        self._throttled: dict[str, float] = {}
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

    def check(self, req: Request, source_ip: str, *, proxy: bool) -> AuthResult:
        creds = self._credentials(req, proxy)
        if creds is None:
            return AuthResult(Verdict.CHALLENGE)
        if self._is_throttled(source_ip):
            self.counters["auth_throttled"] += 1
            return AuthResult(Verdict.THROTTLED, creds.username, creds)
        state = digest.check_nonce(self.secret, creds.nonce, time.time(), self.nonce_lifetime)
        algorithm = digest.ha1_algorithm(creds.algorithm)
        if (state is digest.NonceState.INVALID or algorithm is None
                or algorithm not in self.algorithms or creds.qop is None):
            # Our challenges always ask for qop=auth: credentials without it carry no
            # nonce-count, so they could be replayed for the nonce's lifetime.
            return AuthResult(Verdict.CHALLENGE, creds.username, creds)
        ha1 = self._ha1_of(creds.username, algorithm)
        if not digest.verify(creds, req.method, ha1, body=req.body):
            self.counters["auth_forbidden"] += 1
            self._note_failure(source_ip)
            return AuthResult(Verdict.FORBIDDEN, creds.username, creds)
        if state is digest.NonceState.STALE:  # RFC 7616 3.3: stale only for a right digest
            return AuthResult(Verdict.STALE, creds.username, creds)
        return AuthResult(Verdict.OK, creds.username, creds)

    def _credentials(self, req: Request, proxy: bool) -> digest.Credentials | None:
        """The Digest credentials for our realm, if the request carries any."""
        for value in req.header_lines("proxy-authorization" if proxy else "authorization"):
            creds = digest.parse_credentials(value)
            if creds.is_digest and creds.realm == self.realm:
                return creds
        return None

    def _ha1_of(self, user: str, algorithm: str) -> str:
        now = time.monotonic()
        cached = self._ha1.get(user)
        if cached is None or cached[0] < now:
            record = self.store.get_user(user, self.realm)
            cached = (now + HA1_CACHE_SECONDS, record["ha1"] if record else None)
            if len(self._ha1) > 100_000:
                self._ha1.clear()
            self._ha1[user] = cached
        known = cached[1]
        if not known or algorithm not in known:
            return self._decoy[algorithm]
        return known[algorithm]

    def _is_throttled(self, ip: str) -> bool:
        until = self._throttled.get(ip)
        if until is None:
            return False
        if until < time.monotonic():
            del self._throttled[ip]
            return False
        return True

    def _note_failure(self, ip: str) -> None:
        failures = self.store.note_auth_failure(ip, self.failure_window)
        if failures >= self.max_failures:
            self.block(ip, self.failure_window)
            self.store.announce_block(ip, self.failure_window)  # the other workers too

    def block(self, ip: str, seconds: float) -> None:
        self._throttled[ip] = time.monotonic() + seconds

    def follow_blocks(self) -> None:
        """Apply the blocks other workers announce (run in its own greenlet).  Whatever
        ends the subscription (Redis gone, restarted, paused), it is made anew."""
        backoff = Backoff(log, "authblock subscription")
        while True:
            try:
                for ip, seconds in self.store.blocks():
                    backoff.ok()
                    self.block(ip, seconds)
            except Exception as exc:  # whatever it is, the subscription is made again
                gevent.sleep(backoff.failed(exc))

