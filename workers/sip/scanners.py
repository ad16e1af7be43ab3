"""Scanner detection: a source that asks for many user names, or collects many 403/404
answers, is banned cluster-wide (``Store.ban``), so every dispatcher drops it.

The workers follow the bans too, so that no answer leaves for a banned source: what
the dispatcher handed over before the ban (a flood's first bursts) may still be in a
worker's queue, and a loaded worker answered it up to 0.65 s after the ban
(tests/integration/test_flood.py on a busy machine).

The counts must span the workers (affinity spreads one source's Call-IDs over all of
them) and the hosts, so they live in Redis (``scanusers:{ip}``, ``scanerrors:{ip}``).
What a worker notes is written in batches, one pipeline every ``FLUSH_SECONDS``, and
a user name this worker has already sent for a source in the current window is not
sent again: a phone that registers as itself or calls the same few numbers costs
nothing after its first request.

A source from which a request authenticated is trusted (``note_trusted``): the scanner
counts skip it, and every dispatcher gives it ``limits.trusted_factor`` times the
rates (cluster/limits.py).  A source trusted for the first time is written and
announced at once, not at the next flush: until the dispatchers hear of it, a
benchmark's first requests spend its plain buckets (400 new INVITEs a second at 200
calls/s with digest), and a 0.2 s wait would be 80 of them.  Refreshes (a success
when less than nine tenths of ``limits.trust_seconds`` is left) wait for the flush.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import gevent
from gevent.event import Event

from cluster.backoff import Backoff
from cluster.limits import AllowList, Bans, ban_line
from cluster.store import Store

log = logging.getLogger("ban")  # the security line of a ban (deploy/fail2ban/)
FLUSH_SECONDS = 0.2
LOCAL_SOURCES_MAX = 50_000  # sources remembered per window: made-up ones must not grow it
TRUSTED_MAX = 200_000  # trusted sources known per worker (each one proved a password)
USER_CHARS = 64  # of a user name counted: a distinct prefix is distinct enough


class ScanWatch:
    def __init__(self, store: Store, limits, *, by: str, counters: Counter | None = None):
        self.store = store
        self.max_users = limits.scan_users  # 0: not counted
        self.max_errors = limits.scan_errors
        self.window = float(limits.scan_window)
        self.ban_seconds = float(limits.ban_seconds)
        self.allow = AllowList(limits.allow)
        self.by = by
        self.counters = Counter() if counters is None else counters
        self._seen: dict[str, set[str]] = {}  # ip -> names already sent this window
        self._window_ends = time.monotonic() + self.window
        self._users: dict[str, set[str]] = {}  # waiting for the next flush
        self._errors: Counter[str] = Counter()
        self._ports: dict[str, int] = {}  # ip -> a source port, for the log line
        self._noted = Event()  # counts are waiting: the loop flushes them
        self.bans = Bans()
        self.trust_seconds = float(limits.trust_seconds)  # 0: nobody is trusted
        self.trusted: dict[str, float] = {}  # ip -> monotonic end of its trust (as known here)
        self._trust: set[str] = set()  # waiting to be written
        self._trust_due = Event()  # sources are waiting: written at the next flush
        self._trust_now = Event()  # a new source is waiting: write it at once

    def is_trusted(self, ip: str) -> bool:
        until = self.trusted.get(ip)
        return until is not None and until > time.monotonic()

    def note_trusted(self, ip: str) -> None:
        """A request from ``ip`` authenticated (its digest was accepted)."""
        if not self.trust_seconds:
            return
        now = time.monotonic()
        until = self.trusted.get(ip)
        if until is not None and until - now > 0.9 * self.trust_seconds:
            return  # written (here or by another process) within the last tenth
        if until is None and not self._room_for_trust(now):
            return  # full of live trust: this source is merely counted like any other
        self.trusted[ip] = now + self.trust_seconds
        self._trust.add(ip)
        self._trust_due.set()
        if until is None or until <= now:
            self._trust_now.set()

    def _heard_trust(self, ip: str, seconds: float) -> None:
        now = time.monotonic()
        if ip not in self.trusted and not self._room_for_trust(now):
            return
        self.trusted[ip] = max(self.trusted.get(ip, 0.0), now + seconds)

    def _room_for_trust(self, now: float) -> bool:
        """Whether another source fits (the lapsed ones are dropped when it is full)."""
        if len(self.trusted) < TRUSTED_MAX:
            return True
        self.trusted = {k: v for k, v in self.trusted.items() if v > now}
        return len(self.trusted) < TRUSTED_MAX

    def note_request(self, addr: tuple[str, int], user: str) -> None:
        """An out-of-dialog request from ``addr`` for ``user``."""
        if not self.max_users or not user:
            return
        ip = addr[0]
        user = user[:USER_CHARS]
        if time.monotonic() >= self._window_ends:
            self._seen.clear()
            self._window_ends = time.monotonic() + self.window
        seen = self._seen.get(ip)
        if seen is None:
            if ip in self.allow:
                return
            if len(self._seen) >= LOCAL_SOURCES_MAX:
                self._seen.clear()
            seen = self._seen[ip] = set()
        if user in seen or len(seen) > self.max_users or self.is_trusted(ip):
            return
        seen.add(user)
        self._users.setdefault(ip, set()).add(user)
        self._ports[ip] = addr[1]
        self._noted.set()

    def note_answer(self, data: bytes, dest: tuple[str, int]) -> bool:
        """Every datagram the worker sends: whether it may leave (no response goes to a
        banned source); 403 and 404 answers are counted."""
        if data[:8] != b"SIP/2.0 ":
            return True
        if self.bans.until and self.bans.banned(dest[0], time.monotonic()):
            self.counters["banned_unanswered"] += 1
            return False
        if self.max_errors and data[8:12] in (b"403 ", b"404 "):
            ip = dest[0]
            if ip not in self.allow and not self.is_trusted(ip):
                self._errors[ip] += 1
                self._ports[ip] = dest[1]
                self._noted.set()
        return True

    def follow_bans(self) -> None:
        """Keep the bans issued anywhere (own greenlet); the subscription is made anew
        whatever ends it."""
        backoff = Backoff(log, "ban subscription")
        while True:
            try:
                for event, ip, seconds, _reason in self.store.ban_events():
                    backoff.ok()
                    if event == "trust":
                        self._heard_trust(ip, seconds)
                    elif event == "unban":
                        self.bans.remove(ip)
                    elif ip not in self.allow:
                        self.bans.add(ip, seconds)
            except Exception as exc:  # whatever it is, the subscription is made again
                gevent.sleep(backoff.failed(exc))

    def loop(self) -> None:
        """Write what was noted, ban the sources past a threshold (own greenlet).  It
        sleeps until something is noted: woken every FLUSH_SECONDS for nothing, this loop
        and trust_loop were 29 of 185 ms of an idle worker's CPU in 40 s (py-spy)."""
        backoff = Backoff(log, "scanner counting")
        while True:
            self._noted.wait()
            gevent.sleep(FLUSH_SECONDS)  # what comes meanwhile goes in the same pipeline
            self._noted.clear()
            if not self._users and not self._errors:
                continue
            users, errors, ports = self._users, self._errors, self._ports
            self._users, self._errors, self._ports = {}, Counter(), {}
            try:
                self.flush(users, errors, ports)
            except Exception as exc:  # the counts of one batch are lost; the loop goes on
                gevent.sleep(backoff.failed(exc))
            else:
                backoff.ok()

    def trust_loop(self) -> None:
        """Write and announce the trusted sources (own greenlet): a new one at once, the
        refreshes every ``FLUSH_SECONDS``."""
        backoff = Backoff(log, "trust announcement")
        while True:
            self._trust_due.wait()
            self._trust_now.wait(FLUSH_SECONDS)
            self._trust_now.clear()
            self._trust_due.clear()
            if not self._trust:
                continue
            ips, self._trust = sorted(self._trust), set()
            try:
                self.store.trust(ips, self.trust_seconds, self.by)
            except Exception as exc:  # kept for the next attempt
                self._trust.update(ips)
                self._trust_due.set()
                gevent.sleep(backoff.failed(exc))
            else:
                backoff.ok()
                self.counters["trust_written"] += len(ips)

    def flush(self, users: dict[str, set[str]], errors: Counter, ports: dict[str, int]) -> None:
        distinct, failed = self.store.note_scan(users, dict(errors), self.window)
        for ip, count in distinct.items():
            if count >= self.max_users:
                self._ban((ip, ports.get(ip, 0)), "scan-users")
        for ip, count in failed.items():
            if count >= self.max_errors and distinct.get(ip, 0) < self.max_users:
                self._ban((ip, ports.get(ip, 0)), "scan-errors")

    def _ban(self, addr: tuple[str, int], reason: str) -> None:
        if self.store.ban(addr[0], self.ban_seconds, reason, self.by):
            self.counters["bans_" + reason.replace("-", "_")] += 1
            log.warning("%s", ban_line(addr, reason, self.ban_seconds))
