"""Source and user limits: authentication failure counts and lockouts, bans, trusted
sources, the scanner counters, and the pub/sub announcements that apply them everywhere."""

from __future__ import annotations

import time

import redis

from .connection import PIPELINE_BATCH, REDIS_ERRORS, as_text, batches, pack, unpack
from .schema import (
    AUTHBLOCK_CHANNEL,
    AUTHLOCK_CHANNEL,
    BAN_CHANNEL,
    BLOCKS_POLL,
    TRUST_ANNOUNCE_MAX,
    TRUST_CHANNEL,
    authfail_key,
    authlock_key,
    authuser_key,
    ban_key,
    scanerrors_key,
    scanusers_key,
    trust_key,
)


class Limits:
    # ---------------------------------------------------------------- announcements
    def _messages(self, channels: tuple[str, ...], errors: tuple):
        """Yield None once subscribed to ``channels``, then (channel, text) of every message
        published on them (blocking)."""
        # Confirmations are not ignored: an ignored one reads as None, which is silence.
        pubsub = self.redis.pubsub()
        try:
            pubsub.subscribe(*channels)
            yield None
            pinged = False
            while True:
                # Not listen(): its reads end at the socket timeout, which is short, and
                # every resubscription would miss what is published meanwhile.
                message = pubsub.get_message(timeout=BLOCKS_POLL)
                if message is None:
                    # Silence for BLOCKS_POLL: ask.  A Redis host that vanished without a
                    # FIN (powered off, cut off) leaves a connection that only a write can
                    # find dead, and a subscriber that only reads would wait on it forever,
                    # deaf to every announcement: no answer by the next poll ends it.
                    if pinged:
                        raise redis.ConnectionError(
                            f"no answer to a PING on the subscription in {BLOCKS_POLL} s")
                    pubsub.ping()
                    pinged = True
                    continue
                pinged = False  # anything that arrives proves the connection
                if message.get("type") != "message":
                    continue
                yield as_text(message["channel"]), message["data"].decode("utf-8", "replace")
        except errors as exc:
            self._raise_unavailable(exc)
        finally:
            pubsub.close()

    # ---------------------------------------------------------------- auth throttling
    def auth_failures(self, ip: str) -> int:
        value = self._call(self.redis.get, authfail_key(ip))
        return int(value or 0)

    def announce_block(self, ip: str, seconds: float) -> None:
        self._call(self.redis.publish, AUTHBLOCK_CHANNEL, f"{ip} {seconds}")

    def blocks(self):
        """Yield (ip, seconds) as workers announce throttled sources (blocking)."""
        for kind, subject, seconds in self.auth_events():
            if kind == "source":
                yield subject, seconds

    def auth_events(self):
        """Yield ("source", ip, seconds) as workers announce throttled sources and
        ("user", "<user>@<realm>", seconds) as they lock users out (blocking)."""
        messages = self._messages((AUTHBLOCK_CHANNEL, AUTHLOCK_CHANNEL), REDIS_ERRORS)
        try:
            next(messages)
            for channel, text in messages:
                if channel == AUTHLOCK_CHANNEL:
                    seconds, _, aor = text.partition(" ")  # a user name may hold spaces
                    yield "user", aor, float(seconds or 0)
                else:
                    ip, _, seconds = text.partition(" ")
                    yield "source", ip, float(seconds or 0)
        finally:
            messages.close()

    # ---------------------------------------------------------------- bans
    def ban(self, ip: str, seconds: float, reason: str, by: str) -> bool:
        """Ban ``ip`` cluster-wide for ``seconds`` and tell every dispatcher; False when it
        was banned already (that ban stands, and whoever issued it logged it)."""
        record = {"ip": ip, "reason": reason, "at": time.time(), "seconds": seconds, "by": by}
        created = self._call(self.redis.set, ban_key(ip), pack(record),
                             ex=max(1, int(seconds)), nx=True)
        if created:
            self._call(self.redis.publish, BAN_CHANNEL, f"{ip} {seconds} {reason}")
        return bool(created)

    def unban(self, ip: str) -> bool:
        """Lift a ban (and forget what the scanner counters hold); whether there was one."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(ban_key(ip))
        pipe.delete(scanusers_key(ip))
        pipe.delete(scanerrors_key(ip))
        existed, _, _ = self._call(pipe.execute)
        self._call(self.redis.publish, BAN_CHANNEL, f"{ip} 0 unban")
        return bool(existed)

    def bans(self) -> list[dict]:
        """The bans in force, each with "left" (seconds), soonest to end first."""
        found = []
        for key in self._scan("ban:*"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            data, pttl = self._call(pipe.execute)
            if data is not None and pttl is not None and int(pttl) > 0:
                found.append({**unpack(data), "left": int(pttl) / 1000.0})
        return sorted(found, key=lambda b: (b["left"], b["ip"]))

    def trust(self, ips: list[str], seconds: float, by: str) -> None:
        """Trust ``ips`` cluster-wide for ``seconds`` (or refresh it) and tell every
        dispatcher and worker, in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        ttl = max(1, int(seconds))
        record = {"at": time.time(), "by": by}
        for ip in ips:
            pipe.set(trust_key(ip), pack({"ip": ip, **record}), ex=ttl)
        for start in range(0, len(ips), TRUST_ANNOUNCE_MAX):
            batch = ips[start:start + TRUST_ANNOUNCE_MAX]
            pipe.publish(TRUST_CHANNEL, " ".join([str(ttl), *batch]))
        self._call(pipe.execute)

    def trusted(self) -> list[dict]:
        """The trusted sources, each with "left" (seconds), soonest to end first."""
        found = []
        for keys in batches(self._scan("trust:*"), PIPELINE_BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            replies = self._call(pipe.execute)
            for data, pttl in zip(replies[::2], replies[1::2], strict=True):
                if data is not None and pttl is not None and int(pttl) > 0:
                    found.append({**unpack(data), "left": int(pttl) / 1000.0})
        return sorted(found, key=lambda t: (t["left"], t["ip"]))

    def ban_events(self):
        """Yield ("ban", ip, seconds, reason), ("unban", ip, 0, "") and ("trust", ip,
        seconds, "") as they are announced, after ("ban", ...) for every ban in force and
        ("trust", ...) for every trusted source (blocking)."""
        messages = self._messages((BAN_CHANNEL, TRUST_CHANNEL), (redis.RedisError, OSError))
        try:
            next(messages)  # first: what is issued during the listing is heard
            for ban in self.bans():
                yield "ban", ban["ip"], ban["left"], ban["reason"]
            for trust in self.trusted():
                yield "trust", trust["ip"], trust["left"], ""
            for channel, text in messages:
                if channel == TRUST_CHANNEL:
                    seconds, *ips = text.split(" ")
                    for ip in ips:
                        yield "trust", ip, float(seconds or 0), ""
                    continue
                ip, seconds, reason = (text.split(" ") + ["", ""])[:3]
                if reason == "unban":
                    yield "unban", ip, 0.0, ""
                else:
                    yield "ban", ip, float(seconds or 0), reason
        finally:
            messages.close()

    # ---------------------------------------------------------------- scanners, users
    def note_scan(self, users: dict[str, set[str]], errors: dict[str, int],
                  window: float) -> tuple[dict[str, int], dict[str, int]]:
        """Add the user names each source asked for and the 403/404 answers it got, in
        one pipeline; (distinct users per source, errors per source) within the window."""
        pipe = self.redis.pipeline(transaction=False)
        user_ips, error_ips = list(users), list(errors)
        for ip in user_ips:
            pipe.sadd(scanusers_key(ip), *users[ip])
            pipe.expire(scanusers_key(ip), int(window), nx=True)
            pipe.scard(scanusers_key(ip))
        for ip in error_ips:
            pipe.incrby(scanerrors_key(ip), errors[ip])
            pipe.expire(scanerrors_key(ip), int(window), nx=True)
        replies = self._call(pipe.execute)
        distinct = {ip: int(replies[3 * i + 2]) for i, ip in enumerate(user_ips)}
        base = 3 * len(user_ips)
        failed = {ip: int(replies[base + 2 * i]) for i, ip in enumerate(error_ips)}
        return distinct, failed

    def note_user_auth_failure(self, aor: str, window: float, threshold: int,
                               lockout: float) -> float:
        """Count a failure for ``aor``; seconds its lockout has left (0: not locked).
        The lockout starts once, when ``threshold`` is reached, and is announced then;
        later failures (from the user's own addresses) do not extend it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(authuser_key(aor))
        pipe.expire(authuser_key(aor), int(window), nx=True)
        count, _ = self._call(pipe.execute)
        if int(count) < threshold:
            return 0.0
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(authlock_key(aor), "1", ex=max(1, int(lockout)), nx=True)
        pipe.ttl(authlock_key(aor))
        created, left = self._call(pipe.execute)
        if created:
            self._call(self.redis.publish, AUTHLOCK_CHANNEL, f"{lockout} {aor}")
        return float(max(left, 0))

    def user_locked(self, aor: str) -> float:
        """Seconds ``aor``'s lockout has left (0: not locked)."""
        return float(max(self._call(self.redis.ttl, authlock_key(aor)), 0))

    def note_auth_failure(self, ip: str, window: float) -> int:
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(authfail_key(ip))
        pipe.expire(authfail_key(ip), int(window), nx=True)
        count, _ = self._call(pipe.execute)
        return int(count)

