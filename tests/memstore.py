"""An in-memory stand-in for the part of cluster.store.Store the registrar, the
authenticator and the B2BUA use, for unit tests of those shells.

It mirrors the real methods' return types and edge cases (the registration script's
order of checks, nonce-count parsing, key TTLs, Redis's TTL rounding), records go through
the same msgpack round trip, and time is a clock passed in, so a test moves it instead of
sleeping.  tests/integration/test_store_contract.py runs one suite against this and a real
redis-server: a behaviour added here needs a contract test there.  A Store method not
mirrored here raises NotImplementedError.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable

from cluster.store import (
    AUTHBLOCK_CHANNEL,
    AUTHLOCK_CHANNEL,
    TIMER_LEASE,
    TIMER_SHARDS,
    VERSION_STEP,
    Arrival,
    Binding,
    NonceAsk,
    RegisterResult,
    Store,
    TimerClaim,
    aor_of,
    authfail_key,
    authlock_key,
    authuser_key,
    call_key,
    cdr_id,
    cdr_position,
    counted_state,
    nc_key,
    pack,
    reg_key,
    stream_shard,
    streams_key,
    timer_member,
    timer_shard,
    unpack,
    user_key,
)

_LEADING_INT = re.compile(r"-?\d+")  # Lua: string.match(stored, '^%-?%d+')
_NC_TX = re.compile(r"\S+ (.*)", re.S)  # Lua: string.match(stored, '^%S+ (.*)$')


class MemoryStore:
    """Keys, values and expiry times (seconds on ``clock``) in dicts."""

    indexed = True  # as a single redis-server: registered_aors reads the AORs index

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._strings: dict[str, bytes] = {}
        self._hashes: dict[str, dict[str, bytes]] = {}
        self._expiry: dict[str, float] = {}  # key -> clock time it lapses at
        self._aors: dict[str, int] = {}  # the AORs index: aor -> latest expiry (ms)
        self.published: list[tuple[str, str]] = []  # (channel, message), oldest first
        self._timers: dict[str, tuple[float, str, str, float]] = {}  # member -> score, entry
        self._cdrs: dict[int, list[dict[str, str]]] = {}  # shard -> its CDRs, oldest first

    def __getattr__(self, name: str):
        if hasattr(Store, name):
            raise NotImplementedError(f"MemoryStore does not mirror Store.{name}")
        raise AttributeError(name)

    # ---------------------------------------------------------------- keys
    def _alive(self, key: str) -> bool:
        at = self._expiry.get(key)
        if at is not None and self.clock() > at:  # Redis: expired once now > the deadline
            self._delete(key)
        return key in self._strings or key in self._hashes

    def _delete(self, key: str) -> bool:
        self._expiry.pop(key, None)
        return (self._strings.pop(key, None) is not None) | (self._hashes.pop(key, None)
                                                             is not None)

    def _get(self, key: str) -> bytes | None:
        return self._strings[key] if self._alive(key) else None

    def _set(self, key: str, value: bytes | str | int, ttl: float | None = None) -> None:
        self._delete(key)
        self._strings[key] = value if isinstance(value, bytes) else str(value).encode()
        if ttl is not None:
            self._expire(key, ttl)

    def _expire(self, key: str, seconds: float) -> None:
        if seconds <= 0:  # EXPIRE/PEXPIRE with a time not in the future deletes the key
            self._delete(key)
        else:
            self._expiry[key] = self.clock() + seconds

    def _hash(self, key: str) -> dict[str, bytes]:
        return self._hashes[key] if self._alive(key) else {}

    def _ttl(self, key: str) -> int:
        """Redis TTL: whole seconds rounded to nearest, -2 no key, -1 no expiry."""
        if not self._alive(key):
            return -2
        at = self._expiry.get(key)
        if at is None:
            return -1
        return (int((at - self.clock()) * 1000) + 500) // 1000

    def _incr_with_window(self, key: str, window: float) -> int:
        """INCR, then EXPIRE int(window) NX (the window starts at the first count)."""
        count = int(self._get(key) or 0) + 1
        ttl = self._expiry.get(key) if self._alive(key) else None
        self._strings[key] = str(count).encode()
        if ttl is not None:
            self._expiry[key] = ttl
        else:
            self._expire(key, int(window))
        return count

    # ---------------------------------------------------------------- directory
    def put_user(self, user: str, realm: str, ha1: dict[str, str]) -> None:
        record = {"user": user, "realm": realm, "ha1": ha1, "created": int(self.clock())}
        self._set(user_key(aor_of(user, realm)), pack(record))

    def put_users(self, entries: Iterable[tuple[str, str, dict[str, str]]], batch=500) -> int:
        count = 0
        for user, realm, ha1 in entries:
            self.put_user(user, realm, ha1)
            count += 1
        return count

    def get_user(self, user: str, realm: str) -> dict | None:
        data = self._get(user_key(aor_of(user, realm)))
        return None if data is None else unpack(data)

    def delete_user(self, user: str, realm: str) -> bool:
        aor = aor_of(user, realm)
        found = [self._alive(key) for key in (user_key(aor), reg_key(aor))]
        self._delete(user_key(aor))
        self._delete(reg_key(aor))
        self._aors.pop(aor, None)
        return any(found)

    def has_users(self) -> bool:
        return any(self._alive(k) for k in list(self._strings) if k.startswith("user:"))

    def list_users(self, realm: str | None = None) -> list[dict]:
        users = [unpack(self._strings[k]) for k in list(self._strings)
                 if k.startswith("user:") and self._alive(k)]
        return sorted((u for u in users if realm is None or u["realm"] == realm),
                      key=lambda r: (r["realm"], r["user"]))

    # ---------------------------------------------------------------- registrar
    def register(self, aor: str, tx: str, *, now: float, nonce: str | None, nc: int | None,
                 nonce_ttl: float, tx_ttl: float, max_contacts: int, call_id: str, cseq: int,
                 set_bindings: list[Binding], remove_keys: list[str], star: bool
                 ) -> RegisterResult:
        """The registration script, step by step in its order: like the script, every
        check comes before the first write, so a refusal changes nothing."""
        answer = self._get(tx)
        if answer is not None:
            return RegisterResult("dup", response=answer or None)
        nkey = nc_key(aor, nonce or "-")
        if nc is not None and nc <= _leading_int(self._get(nkey)):
            return RegisterResult("replay")
        now_ms = int(now * 1000)
        rkey = reg_key(aor)
        stored = self._hash(rkey)
        current: dict[str, tuple[dict, bytes]] = {}
        expired: list[str] = []
        for key, packed in stored.items():
            record = unpack(packed)
            if record["expires_at"] <= now_ms:
                expired.append(key)
            else:
                current[key] = (record, packed)

        def stale(record: dict) -> bool:
            return record["call_id"] == call_id and cseq <= record["cseq"]

        gone: set[str] = set()  # the current bindings this request removes
        if star:
            if any(stale(r) for r, _ in current.values()):
                return RegisterResult("stale-cseq")
            gone = set(current)
        for key in remove_keys:
            if key in current and key not in gone:
                if stale(current[key][0]):
                    return RegisterResult("stale-cseq")
                gone.add(key)
        added = 0
        for binding in set_bindings:
            if binding.key in current and binding.key not in gone:
                if stale(current[binding.key][0]):
                    return RegisterResult("stale-cseq")
            else:
                added += 1
        if added > 0 and len(current) - len(gone) + added > max_contacts:
            return RegisterResult("too-many")
        for key in [*expired, *gone]:
            stored.pop(key, None)
            current.pop(key, None)
        self._drop_if_empty(rkey)

        def index_aor() -> int:
            latest = max((r["expires_at"] for r, _ in current.values()), default=0)
            if latest > 0:
                self._aors[aor] = latest
            else:
                self._aors.pop(aor, None)
            for other, at in list(self._aors.items()):  # ZREMRANGEBYSCORE -inf now
                if at <= now_ms:
                    del self._aors[other]
            return latest

        for binding in set_bindings:
            packed = pack(binding.to_record())
            self._hashes.setdefault(rkey, {})[binding.key] = packed
            current[binding.key] = (unpack(packed), packed)
        latest = index_aor()
        if latest > 0:
            self._expire(rkey, (latest - now_ms + 60_000) / 1000)
        if nc is not None:
            self._set(nkey, nc, int(nonce_ttl * 1000) / 1000)
        self._set(tx, b"", int(tx_ttl * 1000) / 1000)
        found = [Binding.from_record(unpack(p)) for _, p in current.values()]
        return RegisterResult("ok", sorted(found, key=lambda b: b.registered_at))

    def _drop_if_empty(self, key: str) -> None:
        if key in self._hashes and not self._hashes[key]:  # a hash without fields is no key
            self._delete(key)

    def bindings(self, aor: str, now: float | None = None) -> list[Binding]:
        now = self.clock() if now is None else now
        found = (Binding.from_record(unpack(v)) for v in self._hash(reg_key(aor)).values())
        return sorted((b for b in found if b.expires_at > now), key=lambda b: b.registered_at)

    def user_and_bindings(self, user: str, realm: str,
                          now: float | None = None) -> tuple[dict | None, list[Binding]]:
        record = self.get_user(user, realm)
        if record is None:
            return None, []
        return record, self.bindings(aor_of(user, realm), now)

    def raw_bindings(self, aor: str) -> dict[str, bytes]:
        return dict(self._hash(reg_key(aor)))

    def drop_binding(self, aor: str, key: str, packed: bytes) -> bool:
        rkey = reg_key(aor)
        stored = self._hash(rkey)
        if stored.get(key) != packed:
            return False
        del stored[key]
        self._drop_if_empty(rkey)
        latest = max((unpack(p)["expires_at"] for p in stored.values()), default=0)
        if latest > 0:
            self._aors[aor] = latest
        else:
            self._aors.pop(aor, None)
        return True

    def registered_aors(self) -> list[str]:
        now_ms = int(self.clock() * 1000)
        return sorted(aor for aor, at in self._aors.items() if at > now_ms)

    def accept_nonce_count(self, aor: str, nonce: str, nc: int, ttl: float, tx: str) -> bool:
        key = nc_key(aor, nonce)
        stored = (self._get(key) or b"-1").decode()
        last = _leading_int(stored.encode())
        if nc < last:
            return False
        if nc == last:
            m = _NC_TX.match(stored)
            return m is not None and m[1] == tx
        self._set(key, f"{nc} {tx}", int(ttl * 1000) / 1000)
        return True

    def nonce_count_and_user(self, aor: str, nonce: str, nc: int, ttl: float, tx: str,
                             user: str, realm: str, now: float | None = None
                             ) -> tuple[bool, dict | None, list[Binding]]:
        return (self.accept_nonce_count(aor, nonce, nc, ttl, tx),
                *self.user_and_bindings(user, realm, now))

    # ---------------------------------------------------------------- transactions
    def store_answers(self, answers: list[tuple[str, bytes, float]]) -> None:
        for tx, data, ttl in answers:
            self._set(tx, data, int(ttl * 1000) / 1000)

    def stored_answer(self, tx: str) -> bytes | None:
        return self._get(tx) or None

    # ---------------------------------------------------------------- calls
    def load_call(self, tag: str) -> tuple[int, dict] | None:
        fields = self._hash(call_key(tag))
        if "d" not in fields:
            return None
        return int(fields["v"]), unpack(fields["d"])

    def load_call_and_answer(self, tag: str, tx: str, relayed: bool = False,
                             user: tuple[str, str] | None = None,
                             nonce: NonceAsk | None = None) -> Arrival:
        """Relay sessions are not mirrored: never one."""
        return Arrival(self.load_call(tag), self.stored_answer(tx), None,
                       None if user is None else self.get_user(*user),
                       None if nonce is None else self.nonce_count_and_user(*nonce))

    def save_call(self, tag: str, version: int, record: dict, ttl: float,
                  arm: list[tuple[str, str, float]] = (),
                  disarm: list[tuple[str, str, float]] = (),
                  packed: bytes | None = None) -> int | None:
        """The timers are armed and disarmed first, whether the compare-and-set then wins
        or not (as the real store's pipeline does); the counting indexes are not
        mirrored."""
        for timer_tag, name, due in arm:
            self._timers[timer_member(timer_tag, name, due)] = (due, timer_tag, name, due)
        self.remove_timers(disarm)
        key = call_key(tag)
        if int(self._hash(key).get("v", b"0")) != version:
            return None
        new = version + random.randrange(1, VERSION_STEP)
        self._hashes[key] = {"v": str(new).encode(),
                             "d": pack(record) if packed is None else packed,
                             "s": counted_state(record).encode()}
        self._expire(key, int(ttl * 1000) / 1000)
        return new

    def call_version(self, tag: str) -> int:
        return int(self._hash(call_key(tag)).get("v", b"0"))

    def remove_timers(self, entries: list[tuple[str, str, float]]) -> None:
        for tag, name, due in entries:
            self._timers.pop(timer_member(tag, name, due), None)

    def claim_due_timers(self, now: float, lease: float = TIMER_LEASE,
                         limit: int = 100) -> TimerClaim:
        """Per shard in order, up to ``limit`` due entries, earliest first (ties by
        member, as a sorted set); each comes due again ``lease`` after ``now``; and the
        earliest due time left."""
        claimed = []
        for shard in range(TIMER_SHARDS):
            due = sorted((score, member) for member, (score, tag, _, _) in self._timers.items()
                         if timer_shard(tag) == shard and score <= now)[:limit]
            for _, member in due:
                _, tag, name, at = self._timers[member]
                self._timers[member] = (now + lease, tag, name, at)
                claimed.append((tag, name, at))
        left = [score for score, _, _, _ in self._timers.values()]
        return TimerClaim(claimed, min(left) if left else None)

    def add_cdr(self, record: dict) -> None:
        fields = {k: ("" if v is None else str(v)) for k, v in record.items()}
        shard = stream_shard(fields.get("a_call_id", ""))
        stream = self._cdrs.setdefault(shard, [])
        ms = int(self.clock() * 1000)
        last = stream[-1]["entry"] if stream else "0-0"
        last_ms, last_seq = map(int, last.split("-"))
        entry = f"{last_ms}-{last_seq + 1}" if ms <= last_ms else f"{ms}-0"  # XADD's ids
        stream.append({"entry": entry, "id": cdr_id(shard, entry), **fields})

    def cdrs_after(self, after: str = "0-0", count: int = 10_000) -> list[dict]:
        found = sorted((entry for stream in self._cdrs.values() for entry in stream
                        if cdr_position(entry["id"]) > cdr_position(after)),
                       key=lambda entry: cdr_position(entry["id"]))
        return [{k: v for k, v in entry.items() if k != "entry"} for entry in found[:count]]

    # ---------------------------------------------------------------- auth throttling
    def auth_failures(self, ip: str) -> int:
        return int(self._get(authfail_key(ip)) or 0)

    def note_auth_failure(self, ip: str, window: float) -> int:
        return self._incr_with_window(authfail_key(ip), window)

    def announce_block(self, ip: str, seconds: float) -> None:
        self.published.append((AUTHBLOCK_CHANNEL, f"{ip} {seconds}"))

    def note_user_auth_failure(self, aor: str, window: float, threshold: int,
                               lockout: float) -> float:
        if self._incr_with_window(authuser_key(aor), window) < threshold:
            return 0.0
        lock = authlock_key(aor)
        created = not self._alive(lock)
        if created:
            self._set(lock, b"1", max(1, int(lockout)))
            self.published.append((AUTHLOCK_CHANNEL, f"{lockout} {aor}"))
        return float(max(self._ttl(lock), 0))

    def streams_reset(self, host: str) -> None:
        self._delete(streams_key(host))

    def stream_opened(self, host: str, conn: int, info: dict) -> None:
        self._alive(streams_key(host))
        self._hashes.setdefault(streams_key(host), {})[str(conn)] = pack(info)

    def stream_closed(self, host: str, conn: int) -> None:
        self._hash(streams_key(host)).pop(str(conn), None)

    def stream_open(self, host: str, conn: int) -> bool:
        return str(conn) in self._hash(streams_key(host))

    def user_locked(self, aor: str) -> float:
        return float(max(self._ttl(authlock_key(aor)), 0))


def _leading_int(stored: bytes | None) -> int:
    if stored is None:
        return -1
    m = _LEADING_INT.match(stored.decode())
    return int(m[0]) if m else -1
