"""Registrations: the user directory, bindings (the registrar's script), OPTIONS ping
counts, nonce counts and stored transaction answers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from ..sip.uri import SipURI, parse_uri
from .connection import PIPELINE_BATCH, batches, pack, unpack
from .schema import (
    REG_AORS_INDEX,
    REG_CONTACTS_INDEX,
    aor_of,
    nc_key,
    ping_key,
    reg_key,
    tx_key,
    user_key,
)


class NonceAsk(NamedTuple):
    """A nonce count to check (``accept_nonce_count``: the caller's AOR, the nonce, its
    count, the nonce's lifetime, the request's transaction key) with the callee (user,
    realm) whose record and bindings the call needs next (``nonce_count_and_user``)."""

    aor: str
    nonce: str
    nc: int
    ttl: float
    tx: str
    user: str
    realm: str


@dataclass
class Binding:
    """One registered contact of an AOR (RFC 3261 section 10)."""

    key: str
    contact: bytes  # the Contact URI as the phone sent it
    expires_at: float  # epoch seconds
    call_id: str
    cseq: int
    source: tuple[str, int]  # where the REGISTER came from
    host: str  # host id whose SIP socket received it (invariant 12)
    nat: bool = False  # the REGISTER came from elsewhere than its Via said: reach it at source
    q: float | None = None
    instance: str | None = None
    reg_id: int | None = None
    user_agent: str = ""
    transport: str = "udp"
    # The stream connection the REGISTER came over (cluster/envelope.py), held by ``host``'s
    # dispatcher; 0 for UDP.  Requests for the contact go back through it while it is open.
    conn: int = 0
    registered_at: float = 0.0
    params: dict = field(default_factory=dict)

    @property
    def destination(self) -> tuple[str, int] | None:
        """Where requests for this contact go: the NAT's address, or the flow's (RFC 5626:
        a binding with a reg-id is reached where its REGISTER came from), else the
        Contact's."""
        if self.nat or self.reg_id is not None:
            return self.source
        uri = parse_uri(self.contact)
        if not isinstance(uri, SipURI):
            return None
        return (uri.param("maddr") or uri.host_bare, uri.port or 5060)

    def to_record(self) -> dict:
        """Text and numbers only: the registrar's Lua script reads these records."""
        record = {f.name: getattr(self, f.name) for f in _BINDING_FIELDS}  # asdict deep-copies
        record["params"] = dict(self.params)
        record["contact"] = self.contact.decode("latin-1")
        record["source"] = list(self.source)
        record["expires_at"] = int(self.expires_at * 1000)  # Lua compares integers
        if not self.conn:
            del record["conn"]  # a UDP binding's record stays as it was before streams
        return record

    @classmethod
    def from_record(cls, record: dict) -> Binding:
        record = dict(record)
        record["contact"] = record["contact"].encode("latin-1")
        record["source"] = tuple(record["source"])
        record["expires_at"] = record["expires_at"] / 1000.0
        # A field a newer version added is left out, so hosts of two versions share Redis.
        return cls(**{k: v for k, v in record.items() if k in _BINDING_NAMES})


_BINDING_FIELDS = fields(Binding)
_BINDING_NAMES = frozenset(f.name for f in _BINDING_FIELDS)


@dataclass
class RegisterResult:
    outcome: str  # "ok", "dup" (a retransmission), "replay", "stale-cseq", "too-many"
    bindings: list[Binding] = field(default_factory=list)
    response: bytes | None = None  # for "dup": the stored answer (None while in progress)


class Registrations:
    # ---------------------------------------------------------------- directory
    def put_user(self, user: str, realm: str, ha1: dict[str, str]) -> None:
        record = {"user": user, "realm": realm, "ha1": ha1, "created": int(time.time())}
        self._call(self.redis.set, user_key(aor_of(user, realm)), pack(record))

    def put_users(self, entries: Iterable[tuple[str, str, dict[str, str]]], batch=500) -> int:
        """Write many users with pipelining; returns how many were written."""
        count, now = 0, int(time.time())
        pipe = self.redis.pipeline(transaction=False)
        for user, realm, ha1 in entries:
            record = {"user": user, "realm": realm, "ha1": ha1, "created": now}
            pipe.set(user_key(aor_of(user, realm)), pack(record))
            count += 1
            if count % batch == 0:
                self._call(pipe.execute)
        self._call(pipe.execute)
        return count

    def get_user(self, user: str, realm: str) -> dict | None:
        data = self._call(self.redis.get, user_key(aor_of(user, realm)))
        return None if data is None else unpack(data)

    def delete_user(self, user: str, realm: str) -> bool:
        aor = aor_of(user, realm)
        bound = self._call(self.redis.hkeys, reg_key(aor))
        deleted = bool(self._call(self.redis.delete, user_key(aor), reg_key(aor)))
        self.unindex_registrations(aor, [k.decode() for k in bound])
        return deleted

    def has_users(self) -> bool:
        """Whether the directory holds any user, of any realm."""
        return next(self._scan("user:*"), None) is not None

    def list_users(self, realm: str | None = None) -> list[dict]:
        users = []
        for key in self._scan("user:*"):
            data = self._call(self.redis.get, key)
            if data is not None:
                record = unpack(data)
                if realm is None or record["realm"] == realm:
                    users.append(record)
        return sorted(users, key=lambda r: (r["realm"], r["user"]))

    # ---------------------------------------------------------------- registrar
    def register(self, aor: str, tx: str, *, now: float, nonce: str | None, nc: int | None,
                 nonce_ttl: float, tx_ttl: float, max_contacts: int, call_id: str, cseq: int,
                 set_bindings: list[Binding], remove_keys: list[str], star: bool
                 ) -> RegisterResult:
        ops = {"star": star, "call_id": call_id, "cseq": cseq, "remove": remove_keys,
               "aor": aor}
        keys = [reg_key(aor), nc_key(aor, nonce or "-"), tx, *self.registration_index_keys()]
        args = [int(now * 1000), "" if nc is None else nc, int(nonce_ttl * 1000),
                int(tx_ttl * 1000), max_contacts, pack(ops)]
        for binding in set_bindings:
            args += [binding.key, pack(binding.to_record())]
        reply = self._script(self._register, keys, args)
        outcome = reply[0].decode()
        if outcome == "ok":
            bindings = [Binding.from_record(unpack(b)) for b in reply[1]]
            return RegisterResult("ok", sorted(bindings, key=lambda b: b.registered_at))
        if outcome == "dup":
            return RegisterResult("dup", response=reply[1] or None)
        return RegisterResult(outcome)

    def bindings(self, aor: str, now: float | None = None) -> list[Binding]:
        now = time.time() if now is None else now
        return _live(self._call(self.redis.hgetall, reg_key(aor)).values(), now)

    def user_and_bindings(self, user: str, realm: str,
                          now: float | None = None) -> tuple[dict | None, list[Binding]]:
        """``get_user`` and ``bindings`` of one user in one round trip (one slot: the AOR's)."""
        now = time.time() if now is None else now
        aor = aor_of(user, realm)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(user_key(aor))
        pipe.hgetall(reg_key(aor))
        data, raw = self._call(pipe.execute)
        if data is None:
            return None, []
        return unpack(data), _live(raw.values(), now)

    def raw_bindings(self, aor: str) -> dict[str, bytes]:
        """Binding key -> packed record, for callers that may drop a binding later."""
        raw = self._call(self.redis.hgetall, reg_key(aor))
        return {k.decode(): v for k, v in raw.items()}

    def drop_binding(self, aor: str, key: str, packed: bytes) -> bool:
        return bool(self._script(self._drop_binding,
                                 [reg_key(aor), *self.registration_index_keys()],
                                 [key, packed, aor]))

    def count_ping(self, aor: str, field: str, ttl: float) -> int:
        """One more unanswered ping of a binding; returns how many are unanswered."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(ping_key(aor), field, 1)
        pipe.expire(ping_key(aor), int(ttl))
        count, _ = self._call(pipe.execute)
        return int(count)

    def ping_answered(self, aor: str, field: str) -> None:
        self._call(self.redis.hdel, ping_key(aor), field)

    def registered_aors(self) -> list[str]:
        if not self.indexed:
            return sorted(key[len("reg:{"):-1] for key in self._scan("reg:*"))
        return sorted(self.indexed_aors())

    def accept_nonce_count(self, aor: str, nonce: str, nc: int, ttl: float, tx: str) -> bool:
        """NonceCounter for requests outside REGISTER: False for a replayed count.  ``tx``
        is the request's server transaction key: its retransmissions are accepted again."""
        return bool(self._script(self._nc, [nc_key(aor, nonce)], [nc, int(ttl * 1000), tx]))

    def nonce_count_and_user(self, aor: str, nonce: str, nc: int, ttl: float, tx: str,
                             user: str, realm: str, now: float | None = None
                             ) -> tuple[bool, dict | None, list[Binding]]:
        """``accept_nonce_count`` and ``user_and_bindings(user, realm)`` in one round trip
        (an INVITE's caller's count and its callee: what the call needs next)."""
        ask = NonceAsk(aor, nonce, nc, ttl, tx, user, realm)
        return self._nonce_replies(self._pipelined(lambda pipe: self._queue_nonce(pipe, ask)),
                                   now)

    def _queue_nonce(self, pipe, ask: NonceAsk) -> None:
        """Queue ``nonce_count_and_user``'s commands (three) in ``pipe``."""
        self._evalsha(pipe, self._nc, [nc_key(ask.aor, ask.nonce)],
                      [ask.nc, int(ask.ttl * 1000), ask.tx])
        callee = aor_of(ask.user, ask.realm)
        pipe.get(user_key(callee))
        pipe.hgetall(reg_key(callee))

    @staticmethod
    def _nonce_replies(replies: list, now: float | None = None
                       ) -> tuple[bool, dict | None, list[Binding]]:
        accepted, data, raw = replies
        if data is None:
            return bool(accepted), None, []
        return bool(accepted), unpack(data), _live(raw.values(), time.time() if now is None
                                                   else now)

    # ---------------------------------------------------------------- transactions
    def store_answers(self, answers: list[tuple[str, bytes, float]]) -> None:
        """Many transaction answers in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for tx, data, ttl in answers:
            pipe.set(tx, data, px=int(ttl * 1000))
        self._call(pipe.execute)

    def stored_answer(self, tx: str) -> bytes | None:
        return self._call(self.redis.get, tx) or None

    def registration_index_keys(self) -> list[str]:
        """The indexes the registrar's scripts update (none on a Redis Cluster: see Store)."""
        return [REG_CONTACTS_INDEX, REG_AORS_INDEX] if self.indexed else []

    def unindex_registrations(self, aor: str, binding_keys: list[str]) -> None:
        """Take a deleted AOR's bindings out of the indexes (``sipctl users del``)."""
        if not self.indexed:
            return
        pipe = self.redis.pipeline(transaction=False)
        if binding_keys:
            pipe.zrem(REG_CONTACTS_INDEX, *(f"{aor}|{k}" for k in binding_keys))
        pipe.zrem(REG_AORS_INDEX, aor)
        self._call(pipe.execute)

    def provision_bindings(self, bindings: Iterable[tuple[str, Binding]],
                           now: float | None = None, batch: int = PIPELINE_BATCH) -> int:
        """Write many bindings through the registrar's own script, pipelined (bulk loading and
        tests): the indexes follow exactly as for a REGISTER.  Returns how many were written."""
        now_ms = int((time.time() if now is None else now) * 1000)
        count = 0

        def build(pipe, chunk) -> None:
            for aor, binding in chunk:
                ops = {"star": False, "call_id": binding.call_id, "cseq": binding.cseq,
                       "remove": [], "aor": aor}
                keys = [reg_key(aor), nc_key(aor, "-"),
                        tx_key(aor, f"provision-{binding.call_id}-{binding.cseq}"),
                        *self.registration_index_keys()]
                self._evalsha(pipe, self._register, keys,
                              [now_ms, "", 0, 1000, 1 << 30, pack(ops), binding.key,
                               pack(binding.to_record())])

        for chunk in batches(bindings, batch):
            self._pipelined(lambda pipe, c=chunk: build(pipe, c))
            count += len(chunk)
        return count

    def bindings_of(self, aors: list[str], now: float | None = None
                    ) -> dict[str, list[Binding]]:
        """The live bindings of many AORs, pipelined (``sipctl regs`` over the whole index)."""
        now = time.time() if now is None else now
        found: dict[str, list[Binding]] = {}
        for batch in batches(aors, PIPELINE_BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for aor in batch:
                pipe.hvals(reg_key(aor))
            for aor, values in zip(batch, self._call(pipe.execute), strict=True):
                live = (Binding.from_record(unpack(v)) for v in values)
                found[aor] = sorted((b for b in live if b.expires_at > now),
                                    key=lambda b: b.registered_at)
        return found


def _live(packed: Iterable[bytes], now: float) -> list[Binding]:
    """The bindings not lapsed at ``now``, oldest registration first."""
    found = (Binding.from_record(unpack(v)) for v in packed)
    return sorted((b for b in found if b.expires_at > now), key=lambda b: b.registered_at)
