"""The Redis store: the one module that knows every key.

Key schema (values are msgpack unless said otherwise; ``{...}`` is the hash tag
that keeps one AOR's or one call's keys in one Redis Cluster slot):

  user:{<user>@<realm>}            directory entry: {"user", "realm", "ha1": {"MD5": hex,
                                   "SHA-256": hex}, "created": epoch}.  No TTL; deleted by
                                   ``sipctl users del``.
  reg:{<user>@<realm>}             hash of bindings, field = binding key (``+sip.instance``
                                   and reg-id when given, else the Contact URI), value = a
                                   Binding record.  TTL: the latest binding's expiry + 60 s;
                                   expired bindings are purged on every REGISTER and ignored
                                   on every read.
  ping:{<user>@<realm>}            hash: binding key hash -> OPTIONS pings sent and not answered
                                   (registrar.ping_interval > 0).  TTL: 10 ping intervals.
  nc:{<user>@<realm>}:<nonce>      last nonce-count accepted for that nonce: "<count>" (from
                                   REGISTER) or "<count> <transaction key>" (other requests).
                                   TTL: the nonce lifetime.  A count not above it is a replay,
                                   except the same count from the same transaction: that is a
                                   retransmission whose first copy reached a worker that died.
  tx:{<tag>}:<transaction key>     a server transaction's answer (raw SIP bytes; empty while the
                                   request is being worked on), so a retransmission is answered
                                   from here and never processed twice.  Tag: the AOR for
                                   REGISTER, the Call-ID otherwise.  TTL: 64*T1 (Timer J).
  call:{<call tag>}                a live call: hash {"v": version, "s": its state, "d":
                                   msgpack Call record with both legs' dialogs, their
                                   transactions and the call's progress}.  Written
                                   compare-and-set on "v" (Lua), which grows by a random
                                   step at each write.  TTL: 6 h while
                                   the call lives (refreshed), 2 min once it ended.
                                   The tag is a hash of the A-leg Call-ID; B-leg Call-IDs
                                   carry it as "sc<slot>.<tag>.<n>".
  timers:{<shard>}                 sorted set of due timers, score = due time (epoch s),
                                   member "<call tag>|<timer name>|<due time>".  A worker
                                   claims a due entry atomically (ZREM wins); the call record
                                   says whether the timer is still pending.  No TTL: entries
                                   leave when they fire.  Each shard (0-3) is its own hash
                                   tag, so on a Redis Cluster the shards sit in different
                                   slots (13907, 9842, 5649, 1584: spread over the primaries
                                   of an evenly split cluster) instead of all on one node.
  trace:{<call tag>}               list of the call's SIP messages in order (msgpack each:
                                   {"t", "dir": "in"/"out", "leg", "peer", "first", "data"}),
                                   capped at calls.trace_max; TTL calls.trace_ttl, extended
                                   by every write and never shortened.  An attempt that is no
                                   call yet (INVITE, 407, ACK) is kept 64*T1 until the call
                                   exists.  ``sipctl call <Call-ID>`` draws it as a ladder.
  cdr                              Redis Stream of call detail records (XADD, capped with
                                   MAXLEN ~ 1,000,000); read with ``sipctl cdr`` or XRANGE.
  hangup                           Redis Stream of operator hangup requests {"tag", "call_id",
                                   "by", "at"} (``sipctl hangup``), read by the workers with
                                   the consumer group "workers" (XREADGROUP, XACK, XAUTOCLAIM)
                                   so one live worker ends the call.  MAXLEN ~ 10,000.
  authfail:{<ip>}                  failed authentications from one source (plain counter).
                                   TTL: the failure window.
  authblock (channel)              pub/sub: "<ip> <seconds>" when a source is throttled, so
                                   every worker refuses it at once (nothing is stored).
  authuser:{<user>@<realm>}        failed authentications for one user name from any source,
                                   unknown names alike (plain counter).  TTL: the user
                                   failure window (auth.user_failure_window), from the first.
  authlock:{<user>@<realm>}        "1" while that user is locked out (auth.user_max_failures
                                   reached): refused unchecked except from its registered
                                   addresses.  TTL: auth.user_lockout.
  authlock (channel)               pub/sub: "<seconds> <user>@<realm>" when a user is locked,
                                   so every worker refuses it at once.
  ban:{<ip>}                       a banned source: {"ip", "reason", "at", "seconds", "by"}.
                                   Its datagrams are dropped unanswered by every dispatcher.
                                   TTL: limits.ban_seconds; deleted by ``sipctl bans unban``.
  ban (channel)                    pub/sub: "<ip> <seconds> <reason>" when a source is banned,
                                   "<ip> 0 unban" when it is let in again, so every host's
                                   dispatcher drops it at once.
  scanusers:{<ip>}                 set of the user names one source asked for out of dialog
                                   (REGISTER To, INVITE/OPTIONS/MESSAGE Request-URI), counted
                                   against limits.scan_users.  TTL: limits.scan_window, from
                                   the first.
  scanerrors:{<ip>}                403/404 answers sent to one source (plain counter), counted
                                   against limits.scan_errors.  TTL: limits.scan_window.
  trust:{<ip>}                     a proven source (a request from it authenticated):
                                   {"ip", "at", "by"}.  Its dispatcher buckets are
                                   limits.trusted_factor times larger and the scanner counts
                                   skip it.  TTL: limits.trust_seconds, refreshed by later
                                   successes (at most every tenth of it).
  trust (channel)                  pub/sub: "<seconds> <ip> <ip>..." when sources are trusted
                                   or their trust refreshed, so every dispatcher and worker
                                   applies it at once (heard on the ban subscription).
  proc:<role>:<host>:<name>        a live process's heartbeat: {"role", "host", "name", "pid",
                                   "started", "seen", ...counters}.  TTL: a few heartbeats.
  procs                            sorted set indexing the heartbeats: member
                                   proc:<role>:<host>:<name>, score its expiry (epoch ms).
                                   Read instead of a SCAN; expired members trimmed by every
                                   heartbeat.
  stats:reg:contacts               counting indexes (sorted sets, score = expiry in epoch ms,
  stats:reg:aors                   trimmed by the writers; see "counting indexes" below):
  stats:calls                      live bindings ("<aor>|<binding key>"), AORs with one,
  stats:calls:<state>              calls created in the last minute (score = creation), calls
                                   by state (trying, ringing, early, answered).  Written by the
                                   same scripts as reg:{...} and call:{...}.
  host:<host id>                   a host's dispatcher: {"egress": [ip, port], "sip": [ip, port]}
                                   so other hosts can send through it (invariant 12).  TTL: idem.
  streams:<host id>                hash of the SIP connections (TCP, TLS) open at that host's
                                   dispatcher: field = connection id, value {"transport",
                                   "peer"}.  A binding made over one names it (Binding.conn);
                                   workers skip a binding whose connection is gone.  Emptied by
                                   a starting dispatcher.  TTL: a day, refreshed by every write.
  hosts                            hash of every host announced: field = host id, value the same
                                   map plus "seen"; a dispatcher takes hand-offs only from the
                                   egress addresses of hosts seen lately.  TTL: a day, refreshed
                                   by every announcement.
  relay:nodes                      hash of RTP relays, field = relay id "<host>/relay-<n>", value
                                   {"id", "host", "name", "pid", "control": [ip, port],
                                   "addresses": {"4": ip, "6": ip}, "ports": [lo, hi], "sessions",
                                   "streams", "pps", "started", "seen", ...counters}.  Readers
                                   skip entries not seen lately.  TTL: a day, refreshed by
                                   every heartbeat; relays HDEL entries silent for a day.
  relay:session:{<call id>}        one relay session (both legs, ports, latched addresses,
                                   per-stream counters): {"relay", "control", "call_id", "legs",
                                   ...}.  TTL: the session's idle limit (its media timeout +
                                   a grace period), refreshed while media flows and by every
                                   command; deleted by the relay's `delete`.
  relay:owned:{<relay id>}         sorted set of the call ids a relay serves, score = expiry
                                   (epoch ms); read when the relay restarts.  TTL: a day (or
                                   the longest idle limit), refreshed with every write.
  relay:events                     Redis Stream of media events {"event": "media-timeout",
                                   "call_id", "relay", "idle", "hold", "at"}, read by the
                                   B2BUA with a consumer group (XREADGROUP, XACK, XAUTOCLAIM).
                                   Capped with MAXLEN ~ 100,000.

Every function turns Redis trouble into ``StoreUnavailable`` so callers can
answer 503 instead of crashing.

On a Redis Cluster (``redis+cluster://``, cluster/clusterclient.py) every script and every
multi-key command touches the keys of one hash tag (tests/unit/test_cluster_slots.py); a
pipeline may span slots (each primary gets its share, one round trip); the keys without a
tag (the streams, ``relay:nodes``, ``proc:``/``host:``) are one slot each.
"""

from __future__ import annotations

import random
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields

import msgpack
import redis

from . import redisclient
from .sip.uri import SipURI, parse_uri

TX_PREFIX = "tx"


def _evalsha(pipe, script, keys: list, args: list) -> None:
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def timer_member(tag: str, name: str, due: float) -> str:
    """A timer's entry: the due time written exactly (repr), as the call compares it."""
    return f"{tag}|{name}|{due!r}"


def parse_timer_member(member: bytes | str) -> tuple[str, str, float]:
    text = member.decode() if isinstance(member, bytes) else member
    tag, _, rest = text.partition("|")
    name, _, due = rest.rpartition("|")
    return tag, name, float(due)


def timer_shard(tag: str) -> int:
    return zlib.crc32(tag.encode()) % TIMER_SHARDS


class StoreUnavailable(Exception):
    """Redis did not answer in time, or is gone."""


# Redis error replies that say "not now" rather than "wrong command": the request may work
# once Redis has loaded its data, a replica was promoted, memory was freed, a script ended
# or a cluster slot moved.  Everything else a ResponseError says is a bug here, re-raised.
# (redis-py strips the code off the classes it knows, hence classes and codes both.)
_UNAVAILABLE_CLASSES = (
    redis.ConnectionError,  # also BusyLoadingError (LOADING), AuthenticationError (NOAUTH...)
    redis.TimeoutError, OSError, redis.exceptions.InvalidResponse,
    redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterError,  # also ClusterDownError, MasterDownError (MASTERDOWN)
    redis.exceptions.AskError,  # also MovedError
    redis.exceptions.TryAgainError, redis.exceptions.NoPermissionError,
    redis.exceptions.SlotNotCoveredError)  # a Redis Cluster slot without a primary (failover)
# What a Redis client raises: RedisCluster's own trouble is no RedisError.
REDIS_ERRORS = (redis.RedisError, OSError, redis.exceptions.RedisClusterException)
_UNAVAILABLE_CODES = frozenset((
    "BUSY", "MISCONF", "NOREPLICAS", "LOADING", "READONLY", "OOM", "MASTERDOWN", "CLUSTERDOWN",
    "TRYAGAIN", "MOVED", "ASK", "NOPERM", "NOAUTH", "WRONGPASS", "UNBLOCKED"))
_PIPELINE_PREFIX = "of pipeline caused error: "


def error_code(exc: BaseException) -> str:
    """The code an error reply starts with ("NOGROUP", "BUSY"...), pipelines' prefix skipped."""
    text = str(exc.args[0]) if exc.args else ""
    at = text.find(_PIPELINE_PREFIX)
    if at >= 0:
        text = text[at + len(_PIPELINE_PREFIX):]
    return text.split(" ", 1)[0]


def is_unavailable(exc: BaseException) -> bool:
    """Whether a Redis error means "unavailable for now" (503), not a bug."""
    return isinstance(exc, _UNAVAILABLE_CLASSES) or (
        isinstance(exc, redis.ResponseError) and error_code(exc) in _UNAVAILABLE_CODES) or (
        # RedisCluster when no node gives it a slot map, or a command no node to go to;
        # a cross-slot command (a bug here) says "hash to the same slot" and is not this.
        isinstance(exc, redis.exceptions.RedisClusterException)
        and any(text in str(exc) for text in ("cannot be connected", "No targets",
                                              "could not agree", "are not covered",
                                              "has no redis_connection")))


def is_nogroup(exc: BaseException) -> bool:
    """A consumer group (or its stream) is missing: Redis restarted empty, or it was deleted."""
    return isinstance(exc, redis.ResponseError) and error_code(exc) == "NOGROUP"


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


# --------------------------------------------------------------------------- keys


def aor_of(user: str, realm: str) -> str:
    return f"{user}@{realm}"


def user_key(aor: str) -> str:
    return f"user:{{{aor}}}"


def reg_key(aor: str) -> str:
    return f"reg:{{{aor}}}"


def ping_key(aor: str) -> str:
    return f"ping:{{{aor}}}"


def nc_key(aor: str, nonce: str) -> str:
    return f"nc:{{{aor}}}:{nonce}"


def tx_key(tag: str, key: str) -> str:
    return f"{TX_PREFIX}:{{{tag}}}:{key}"


def call_key(tag: str) -> str:
    return f"call:{{{tag}}}"


def trace_key(tag: str) -> str:
    return f"trace:{{{tag}}}"


def timer_key(shard: int) -> str:
    return f"timers:{{{shard}}}"


CDR_STREAM = "cdr"
AUTHBLOCK_CHANNEL = "authblock"
AUTHLOCK_CHANNEL = "authlock"
BAN_CHANNEL = "ban"
TRUST_CHANNEL = "trust"
TRUST_ANNOUNCE_MAX = 500  # addresses per trust message
BLOCKS_POLL = 1.0  # seconds a wait for an authblock message lasts before it starts again
TIMER_SHARDS = 4
# Seconds a claimed timer waits for its claimant before it comes due again: far above
# the few ms a firing takes, so a live claimant is not doubled (a double would be harmless:
# the call fires a timer only at the exact due time it holds).
TIMER_LEASE = 3.0


def authfail_key(ip: str) -> str:
    return f"authfail:{{{ip}}}"


def authuser_key(aor: str) -> str:
    return f"authuser:{{{aor}}}"


def authlock_key(aor: str) -> str:
    return f"authlock:{{{aor}}}"


def ban_key(ip: str) -> str:
    return f"ban:{{{ip}}}"


def trust_key(ip: str) -> str:
    return f"trust:{{{ip}}}"


def scanusers_key(ip: str) -> str:
    return f"scanusers:{{{ip}}}"


def scanerrors_key(ip: str) -> str:
    return f"scanerrors:{{{ip}}}"


def proc_key(role: str, host: str, name: str) -> str:
    return f"proc:{role}:{host}:{name}"


def host_key(host: str) -> str:
    return f"host:{host}"


def streams_key(host: str) -> str:
    return f"streams:{host}"


HOSTS_KEY = "hosts"
HOSTS_TTL = 86_400  # seconds; refreshed by every announcement


# --------------------------------------------------------------------------- records


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
        """Where requests for this contact go: the NAT's address, else the Contact's."""
        if self.nat:
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


# One atomic step per REGISTER (design: one Lua call per registration).
# KEYS: reg, nc, tx, then the counting indexes (contacts, aors: see "counting indexes").
# ARGV: now_ms, nc ('' = none), nc_ttl_ms, tx_ttl_ms, max_contacts,
# ops (msgpack: {star=bool, call_id=, cseq=, remove={key,...}, aor=}), then pairs of binding
# key and packed binding to set.  Lua's msgpack has no binary type: records hold text only.
# Every change to the hash is mirrored in the indexes by the same script.
_REGISTER_LUA = """
local tx = redis.call('GET', KEYS[3])
if tx then return {'dup', tx} end
if ARGV[2] ~= '' then
  local last = tonumber(string.match(redis.call('GET', KEYS[2]) or '-1', '^%-?%d+'))
  if tonumber(ARGV[2]) <= last then return {'replay'} end
end
local now = tonumber(ARGV[1])
local ops = cmsgpack.unpack(ARGV[6])
-- Every check comes before the first write: a refused REGISTER leaves the AOR as it was.
-- current[key] = {b = decoded record, p = packed bytes as stored (never re-packed, so
-- binary fields keep their msgpack type)}
local current, count, expired, gone = {}, 0, {}, {}  -- gone: the bindings it removes
local indexed = #KEYS >= 5  -- without the index keys (another slot), no counting here
local function unindex(k)
  if indexed then redis.call('ZREM', KEYS[4], ops.aor .. '|' .. k) end
end
local function index_aor()
  local latest = 0
  for _, entry in pairs(current) do
    if entry.b.expires_at > latest then latest = entry.b.expires_at end
  end
  if not indexed then return latest end
  if latest > 0 then redis.call('ZADD', KEYS[5], latest, ops.aor)
  else redis.call('ZREM', KEYS[5], ops.aor) end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  return latest
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local b = cmsgpack.unpack(all[i + 1])
  if b.expires_at <= now then
    table.insert(expired, all[i])
  else
    current[all[i]] = {b = b, p = all[i + 1]}
    count = count + 1
  end
end
local function stale(entry)
  return entry.b.call_id == ops.call_id and ops.cseq <= entry.b.cseq
end
if ops.star then
  for k, entry in pairs(current) do
    if stale(entry) then return {'stale-cseq'} end
    gone[k] = true
  end
  count = 0
end
for _, k in ipairs(ops.remove) do
  if current[k] and not gone[k] then
    if stale(current[k]) then return {'stale-cseq'} end
    gone[k] = true
    count = count - 1
  end
end
local added = 0
for i = 7, #ARGV, 2 do
  local k = ARGV[i]
  if current[k] and not gone[k] then
    if stale(current[k]) then return {'stale-cseq'} end
  else
    added = added + 1
  end
end
if added > 0 and count + added > tonumber(ARGV[5]) then return {'too-many'} end
for _, k in ipairs(expired) do
  redis.call('HDEL', KEYS[1], k)
  unindex(k)
end
for k, _ in pairs(gone) do
  redis.call('HDEL', KEYS[1], k)
  unindex(k)
  current[k] = nil
end
for i = 7, #ARGV, 2 do
  local k, packed = ARGV[i], ARGV[i + 1]
  redis.call('HSET', KEYS[1], k, packed)
  current[k] = {b = cmsgpack.unpack(packed), p = packed}
  if indexed then redis.call('ZADD', KEYS[4], current[k].b.expires_at, ops.aor .. '|' .. k) end
end
local out = {}
for k, entry in pairs(current) do table.insert(out, entry.p) end
local latest = index_aor()
if latest > 0 then
  redis.call('PEXPIRE', KEYS[1], latest - now + 60000)
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
redis.call('SET', KEYS[3], '', 'PX', ARGV[4])
return {'ok', out}
"""

# Compare-and-set of a call record.  KEYS: call, then the counting indexes (see "counting
# indexes": calls created, then one per counted state).  ARGV: expected version (0 = must not
# exist), new data, ttl ms, new version, counted state ('' = not counted), tag, now ms.
# Returns the new version, or -1 when someone else wrote first.  The state is kept beside
# the record ("s") so the script moves the call between state indexes without unpacking it.
_CALL_CAS_LUA = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -1 end
local old = redis.call('HGET', KEYS[1], 's') or ''
redis.call('HSET', KEYS[1], 'v', ARGV[4], 'd', ARGV[2], 's', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local now = tonumber(ARGV[7])
if v == 0 and ARGV[5] ~= '' and #KEYS >= 2 then
  redis.call('ZADD', KEYS[2], now, ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
end
for i = 3, #KEYS do
  if KEYS[i] == KEYS[2] .. ':' .. ARGV[5] then
    redis.call('ZADD', KEYS[i], now + tonumber(ARGV[3]), ARGV[6])
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  elseif KEYS[i] == KEYS[2] .. ':' .. old then
    redis.call('ZREM', KEYS[i], ARGV[6])
  end
end
return tonumber(ARGV[4])
"""
# A new version is the old one plus a random step, not plus one: when Redis comes back
# without its last writes (the AOF's last second after a power loss, a replica promoted
# before it had them), the next write does not reuse the lost version number, so a worker
# still holding the lost record in its cache fails its compare-and-set and reads Redis's,
# instead of writing from a state Redis no longer has.
VERSION_STEP = 1 << 20

# Claim up to ARGV[2] timers due at ARGV[1] from one shard for ARGV[3] seconds.  A claim
# is a lease, not a removal: the worker removes the entry once the call has seen it, and
# an entry whose claimant never did comes due again.  A claim sent to a paused Redis runs
# when it resumes, after the worker's read timed out; removing there lost the timer (the
# only BYE retransmission of a call whose end was written in that pause: one CI run).
# KEYS: timers shard.
_POP_TIMERS_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local again = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', again, member) end
return due
"""

# Remove a binding only if it is still the one the caller looked at (a REGISTER may have
# refreshed it meanwhile).  KEYS: reg, then the counting indexes (contacts, aors).
# ARGV: binding key, the packed record read, the AOR.
_DROP_BINDING_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if #KEYS < 3 then return 1 end
  redis.call('ZREM', KEYS[2], ARGV[3] .. '|' .. ARGV[1])
  local latest = 0
  for _, packed in ipairs(redis.call('HVALS', KEYS[1])) do
    local at = cmsgpack.unpack(packed).expires_at
    if at > latest then latest = at end
  end
  if latest > 0 then redis.call('ZADD', KEYS[3], latest, ARGV[3])
  else redis.call('ZREM', KEYS[3], ARGV[3]) end
  return 1
end
return 0
"""

# KEYS: nc.  ARGV: nonce-count, ttl ms, transaction key.  1 accepted, 0 a replay.  The same
# count from the same transaction is accepted again: a retransmission is not a replay (the
# worker that took the first copy may have died before the request's work was written).
_NC_LUA = """
local stored = redis.call('GET', KEYS[1]) or '-1'
local last = tonumber(string.match(stored, '^%-?%d+'))
local count = tonumber(ARGV[1])
if count < last then return 0 end
if count == last then
  if string.match(stored, '^%S+ (.*)$') == ARGV[3] then return 1 end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[3], 'PX', ARGV[2])
return 1
"""


class Store:
    # (replicas, milliseconds): WAIT after every call write and CDR when replicas > 0
    # (redis.wait_replicas); set by the SIP workers, the only writers of either.  Writes
    # that WAIT saw on fewer replicas are counted in ``wait_counters["replica_wait_short"]``.
    replica_wait: tuple[int, int] = (0, 0)
    wait_counters: dict | None = None

    def __init__(self, url: str, timeout: float = 0.25, max_connections: int = 64):
        self.url = url
        # The counting indexes are single keys the registrar's and the call's scripts update
        # beside the AOR's or call's own keys: on a Redis Cluster they sit in another slot,
        # which a script may not touch, so there the counts and listings are surveyed
        # (SCAN over every primary) instead.
        self.indexed = not redisclient.is_cluster_url(url)
        self.redis = redisclient.connect(url, timeout, max_connections)  # or via Sentinel
        self._register = self.redis.register_script(_REGISTER_LUA)
        self._nc = self.redis.register_script(_NC_LUA)
        self._call_cas = self.redis.register_script(_CALL_CAS_LUA)
        self._drop_binding = self.redis.register_script(_DROP_BINDING_LUA)
        self._pop_timers = self.redis.register_script(_POP_TIMERS_LUA)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except REDIS_ERRORS as exc:
            if not self._unavailable(exc):
                raise  # a bug (wrong type, bad arguments...): not Redis's state
            raise StoreUnavailable(str(exc)) from exc

    def _unavailable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is Redis trouble that passes; mends what can be mended first."""
        if isinstance(exc, redis.exceptions.ReadOnlyError):
            # A primary demoted to a replica: drop every connection, so the next command
            # connects anew (and finds the new primary when it is discovered).  (A Redis
            # Cluster answers MOVED instead, which its client follows.)
            pool = getattr(self.redis, "connection_pool", None)
            if pool is not None:
                pool.disconnect(inuse_connections=False)
        elif isinstance(exc, redis.exceptions.NoScriptError):
            # Redis restarted or SCRIPT FLUSH: load them again; the caller retries.
            self._reload_scripts()
            return True
        return is_unavailable(exc)

    def _reload_scripts(self) -> None:
        scripts = [s for s in vars(self).values() if isinstance(s, redis.commands.core.Script)]
        try:
            for script in scripts:
                script.sha = self.redis.script_load(script.script)  # every primary of a cluster
        except REDIS_ERRORS:
            pass  # Redis is away again: the next NOSCRIPT loads them

    def ping(self) -> bool:
        return bool(self._call(self.redis.ping))

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
        unindex_registrations(self, aor, [k.decode() for k in bound])
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

    def _scan(self, pattern: str) -> Iterator[str]:
        try:
            # On a Redis Cluster, scan_iter walks every primary in turn.
            for key in self.redis.scan_iter(match=pattern, count=1000):
                yield key.decode()
        except REDIS_ERRORS as exc:
            if not self._unavailable(exc):
                raise
            raise StoreUnavailable(str(exc)) from exc

    # ---------------------------------------------------------------- registrar
    def register(self, aor: str, tx: str, *, now: float, nonce: str | None, nc: int | None,
                 nonce_ttl: float, tx_ttl: float, max_contacts: int, call_id: str, cseq: int,
                 set_bindings: list[Binding], remove_keys: list[str], star: bool
                 ) -> RegisterResult:
        ops = {"star": star, "call_id": call_id, "cseq": cseq, "remove": remove_keys,
               "aor": aor}
        keys = [reg_key(aor), nc_key(aor, nonce or "-"), tx, *registration_index_keys(self)]
        args = [int(now * 1000), "" if nc is None else nc, int(nonce_ttl * 1000),
                int(tx_ttl * 1000), max_contacts, pack(ops)]
        for binding in set_bindings:
            args += [binding.key, pack(binding.to_record())]
        reply = self._call(self._register, keys=keys, args=args)
        outcome = reply[0].decode()
        if outcome == "ok":
            bindings = [Binding.from_record(unpack(b)) for b in reply[1]]
            return RegisterResult("ok", sorted(bindings, key=lambda b: b.registered_at))
        if outcome == "dup":
            return RegisterResult("dup", response=reply[1] or None)
        return RegisterResult(outcome)

    def bindings(self, aor: str, now: float | None = None) -> list[Binding]:
        now = time.time() if now is None else now
        raw = self._call(self.redis.hgetall, reg_key(aor))
        found = (Binding.from_record(unpack(v)) for v in raw.values())
        return sorted((b for b in found if b.expires_at > now), key=lambda b: b.registered_at)

    def raw_bindings(self, aor: str) -> dict[str, bytes]:
        """Binding key -> packed record, for callers that may drop a binding later."""
        raw = self._call(self.redis.hgetall, reg_key(aor))
        return {k.decode(): v for k, v in raw.items()}

    def drop_binding(self, aor: str, key: str, packed: bytes) -> bool:
        return bool(self._call(self._drop_binding, keys=[reg_key(aor),
                                                          *registration_index_keys(self)],
                               args=[key, packed, aor]))

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
        return sorted(indexed_aors(self))

    def accept_nonce_count(self, aor: str, nonce: str, nc: int, ttl: float, tx: str) -> bool:
        """NonceCounter for requests outside REGISTER: False for a replayed count.  ``tx``
        is the request's server transaction key: its retransmissions are accepted again."""
        return bool(self._call(self._nc, keys=[nc_key(aor, nonce)],
                               args=[nc, int(ttl * 1000), tx]))

    # ---------------------------------------------------------------- transactions
    def store_answers(self, answers: list[tuple[str, bytes, float]]) -> None:
        """Many transaction answers in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for tx, data, ttl in answers:
            pipe.set(tx, data, px=int(ttl * 1000))
        self._call(pipe.execute)

    def stored_answer(self, tx: str) -> bytes | None:
        return self._call(self.redis.get, tx) or None

    # ---------------------------------------------------------------- calls
    def load_call(self, tag: str) -> tuple[int, dict] | None:
        """(version, record) of a call, or None."""
        version, data = self._call(self.redis.hmget, call_key(tag), "v", "d")
        if data is None:
            return None
        return int(version), unpack(data)

    def save_call(self, tag: str, version: int, record: dict, ttl: float,
                  arm: list[tuple[str, str, float]] = ()) -> int | None:
        """Write a call record if it is still at ``version``; the new version, or None.

        ``arm``: timers (tag, name, due) to add first, in the same round trip (their keys
        are in other slots, so not in the same script: arming first is the safe order).
        """
        def build(pipe):
            for timer_tag, name, due in arm:
                pipe.zadd(timer_key(timer_shard(timer_tag)),
                          {timer_member(timer_tag, name, due): due})
            _evalsha(pipe, self._call_cas, [call_key(tag), *call_index_keys(self)],
                     [version, pack(record), int(ttl * 1000),
                      version + random.randrange(1, VERSION_STEP), counted_state(record),
                      tag, int(time.time() * 1000)])
            self._wait_replicas(pipe)
        replies = self._pipelined(build)
        self._waited(replies)
        new = replies[len(arm)]
        return None if new < 0 else int(new)

    def call_version(self, tag: str) -> int:
        return int(self._call(self.redis.hget, call_key(tag), "v") or 0)

    def remove_timers(self, entries: list[tuple[str, str, float]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for tag, name, due in entries:
            pipe.zrem(timer_key(timer_shard(tag)), timer_member(tag, name, due))
        self._call(pipe.execute)

    def live_calls(self) -> list[tuple[str, dict]]:
        found = []
        for key in self._scan("call:*"):
            data = self._call(self.redis.hget, key, "d")
            if data is not None:
                found.append((key[len("call:{"):-1], unpack(data)))
        return found

    def claim_due_timers(self, now: float, lease: float = TIMER_LEASE,
                         limit: int = 100) -> list[tuple[str, str, float]]:
        """Claim the due timers of every shard: (call tag, timer name, due).  Each comes
        due again ``lease`` seconds after ``now`` unless ``remove_timers`` takes it out."""
        def build(pipe):
            for shard in range(TIMER_SHARDS):
                _evalsha(pipe, self._pop_timers, [timer_key(shard)], [now, limit, lease])
        return [parse_timer_member(m) for members in self._pipelined(build) for m in members]

    def _pipelined(self, build) -> list:
        """Run the pipeline ``build`` fills.  Scripts go in as plain EVALSHA: redis-py
        would ask SCRIPT EXISTS before every pipeline holding a Script, an extra round
        trip each time; after a Redis restart (NOSCRIPT) the scripts are loaded again."""
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            try:
                return self._call(pipe.execute)
            except StoreUnavailable as exc:  # _call has loaded the scripts again: retry
                if attempt == 2 or not isinstance(exc.__cause__,
                                                  redis.exceptions.NoScriptError):
                    raise
        return []

    def add_trace(self, tag: str, entries: list[dict], limit: int, ttl: float) -> None:
        self.add_traces({tag: (entries, ttl)}, limit)

    def add_traces(self, pending: dict[str, tuple[list[dict], float]], limit: int) -> None:
        """Append the entries of several calls' traces (tag -> (entries in order, TTL))
        in one pipeline: per call one RPUSH, one LTRIM and the two EXPIREs below."""
        pipe = self.redis.pipeline(transaction=False)
        for tag, (entries, ttl) in pending.items():
            if not entries:
                continue
            key = trace_key(tag)
            pipe.rpush(key, *(pack(e) for e in entries))
            pipe.ltrim(key, -limit, -1)
            # Extend, never shorten: a short-lived entry (an attempt's challenge) written
            # after the call's own must not cut the call's trace short (EXPIRE GT leaves a
            # key without a TTL alone, hence NX first).
            pipe.expire(key, int(ttl), nx=True)
            pipe.expire(key, int(ttl), gt=True)
        if len(pipe):
            self._call(pipe.execute)

    def trace(self, tag: str) -> list[dict]:
        return [unpack(e) for e in self._call(self.redis.lrange, trace_key(tag), 0, -1)]

    def add_cdr(self, record: dict) -> None:
        fields = {k: ("" if v is None else str(v)) for k, v in record.items()}
        if self.replica_wait[0] <= 0:
            self._call(self.redis.xadd, CDR_STREAM, fields, maxlen=1_000_000, approximate=True)
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(CDR_STREAM, fields, maxlen=1_000_000, approximate=True)
        self._wait_replicas(pipe)
        self._waited(self._call(pipe.execute))

    def _wait_replicas(self, pipe) -> None:
        """Asynchronous replication loses what the primary acknowledged and had not sent
        on when it died; WAIT holds the answer until a replica has it too (or the timeout
        passed: best effort, the write stands either way).  Last in the pipeline."""
        replicas, timeout_ms = self.replica_wait
        if replicas > 0:
            pipe.execute_command("WAIT", replicas, timeout_ms)

    def _waited(self, replies: list) -> None:
        replicas = self.replica_wait[0]
        if replicas > 0 and int(replies[-1]) < replicas and self.wait_counters is not None:
            self.wait_counters["replica_wait_short"] += 1

    def cdrs(self, since_ms: int = 0, count: int = 10_000) -> list[dict]:
        entries = self._call(self.redis.xrange, CDR_STREAM, min=f"{since_ms}-0", count=count)
        return [{"id": eid.decode(), **{k.decode(): v.decode() for k, v in fields.items()}}
                for eid, fields in entries]

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
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(AUTHBLOCK_CHANNEL, AUTHLOCK_CHANNEL)
            while True:
                # Not listen(): its reads end at the socket timeout, which is short, and
                # every resubscription would miss what is published meanwhile.
                message = pubsub.get_message(timeout=BLOCKS_POLL)
                if message is None or message.get("type") != "message":
                    continue
                text = message["data"].decode("utf-8", "replace")
                if message["channel"] in (AUTHLOCK_CHANNEL, AUTHLOCK_CHANNEL.encode()):
                    seconds, _, aor = text.partition(" ")  # a user name may hold spaces
                    yield "user", aor, float(seconds or 0)
                else:
                    ip, _, seconds = text.partition(" ")
                    yield "source", ip, float(seconds or 0)
        except REDIS_ERRORS as exc:
            if not self._unavailable(exc):
                raise
            raise StoreUnavailable(str(exc)) from exc
        finally:
            pubsub.close()

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
        for keys in _batches(self._scan("trust:*"), PIPELINE_BATCH):
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
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            # first: what is issued during the listing is heard
            pubsub.subscribe(BAN_CHANNEL, TRUST_CHANNEL)
            for ban in self.bans():
                yield "ban", ban["ip"], ban["left"], ban["reason"]
            for trust in self.trusted():
                yield "trust", trust["ip"], trust["left"], ""
            while True:
                message = pubsub.get_message(timeout=BLOCKS_POLL)
                if message is None or message.get("type") != "message":
                    continue
                text = message["data"].decode("utf-8", "replace")
                channel = message["channel"]
                if channel in (TRUST_CHANNEL, TRUST_CHANNEL.encode()):
                    seconds, *ips = text.split(" ")
                    for ip in ips:
                        yield "trust", ip, float(seconds or 0), ""
                    continue
                ip, seconds, reason = (text.split(" ") + ["", ""])[:3]
                if reason == "unban":
                    yield "unban", ip, 0.0, ""
                else:
                    yield "ban", ip, float(seconds or 0), reason
        except (redis.RedisError, OSError) as exc:
            if not self._unavailable(exc):
                raise
            raise StoreUnavailable(str(exc)) from exc
        finally:
            pubsub.close()

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

    # ---------------------------------------------------------------- processes
    def heartbeat(self, role: str, host: str, name: str, info: dict, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(proc_key(role, host, name), pack(info), px=int(ttl * 1000))
        index_process(pipe, proc_key(role, host, name), ttl)
        self._call(pipe.execute)

    def announce_host(self, host: str, info: dict, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(host_key(host), pack(info), px=int(ttl * 1000))
        pipe.hset(HOSTS_KEY, host, pack({**info, "seen": time.time()}))
        pipe.expire(HOSTS_KEY, HOSTS_TTL)
        self._call(pipe.execute)

    def streams_reset(self, host: str) -> None:
        self._call(self.redis.delete, streams_key(host))

    def stream_opened(self, host: str, conn: int, info: dict) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(streams_key(host), str(conn), pack(info))
        pipe.expire(streams_key(host), HOSTS_TTL)
        self._call(pipe.execute)

    def stream_closed(self, host: str, conn: int) -> None:
        self._call(self.redis.hdel, streams_key(host), str(conn))

    def stream_open(self, host: str, conn: int) -> bool:
        """Whether connection ``conn`` of ``host``'s dispatcher is still open."""
        return bool(self._call(self.redis.hexists, streams_key(host), str(conn)))

    def hosts(self) -> dict[str, dict]:
        """Every host announced (live or not: callers judge by "seen")."""
        raw = self._call(self.redis.hgetall, HOSTS_KEY)
        return {key.decode(): unpack(value) for key, value in raw.items()}

    def host_info(self, host: str) -> dict | None:
        data = self._call(self.redis.get, host_key(host))
        return None if data is None else unpack(data)

    def processes(self, role: str | None = None) -> list[dict]:
        found = [unpack(data) for data in indexed_processes(self, role) if data is not None]
        return sorted(found, key=lambda p: (p.get("role", ""), p.get("host", ""),
                                            p.get("name", "")))


# --------------------------------------------------------------------------- RTP relays
# Relay ids are "<host id>/relay-<index>".  Session records are text-only msgpack: the
# refresh script below reads their "relay" field with Lua's cmsgpack.

RELAY_NODES_KEY = "relay:nodes"
RELAY_EVENTS_KEY = "relay:events"
RELAY_EVENTS_MAXLEN = 100_000
RELAY_NODES_TTL = 86_400  # seconds; refreshed by every heartbeat
RELAY_OWNED_TTL_MIN = 86_400  # seconds: the owned index outlives the sessions written into it


def relay_session_key(call_id: str) -> str:
    return f"relay:session:{{{call_id}}}"


def relay_owned_key(relay_id: str) -> str:
    return f"relay:owned:{{{relay_id}}}"


# KEYS: session.  ARGV: relay id, packed record, ttl ms, record version.  Rewrites the record
# only while this relay still owns it and the stored one is not newer: 1 written (or newer
# kept), 0 gone (expired or deleted by the control plane), -1 taken over by another relay.
_RELAY_REFRESH_LUA = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local stored = cmsgpack.unpack(current)
if stored.relay ~= ARGV[1] then return -1 end
if (tonumber(stored.version) or 0) > (tonumber(ARGV[4]) or 0) then return 1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def _relay_refresh_script(store: Store):
    script = getattr(store, "_relay_refresh", None)
    if script is None:
        script = store._relay_refresh = store.redis.register_script(_RELAY_REFRESH_LUA)
    return script


def relay_heartbeat(store: Store, relay_id: str, info: dict, ttl: float) -> None:
    """Announce a relay and its load: in relay:nodes for workers, proc:relay:* for operators."""
    pipe = store.redis.pipeline(transaction=False)
    pipe.hset(RELAY_NODES_KEY, relay_id, pack(info))
    pipe.expire(RELAY_NODES_KEY, RELAY_NODES_TTL)
    key = proc_key("relay", info.get("host", ""), info.get("name", relay_id))
    pipe.set(key, pack(info), px=int(ttl * 1000))
    index_process(pipe, key, ttl)
    store._call(pipe.execute)


def relay_nodes(store: Store) -> list[dict]:
    """Every relay ever announced (live or not): callers judge liveness by its "seen"."""
    raw = store._call(store.redis.hgetall, RELAY_NODES_KEY)
    return [unpack(value) for value in raw.values()]


def relay_forget(store: Store, relay_ids: Iterable[str]) -> None:
    ids = list(relay_ids)
    if ids:
        store._call(store.redis.hdel, RELAY_NODES_KEY, *ids)


def relay_save_sessions(store: Store, relay_id: str,
                        sessions: Iterable[tuple[str, dict, float]],
                        drop: Iterable[str] = ()) -> None:
    """Create or overwrite session records (call id, record, ttl s): the relay owns them now.
    ``drop``: call ids whose sessions ended, deleted in the same round trip."""
    pipe = store.redis.pipeline(transaction=False)
    now_ms, longest = int(time.time() * 1000), 0
    for call_id, record, ttl in sessions:
        ttl_ms = int(ttl * 1000)
        pipe.set(relay_session_key(call_id), pack(record), px=ttl_ms)
        pipe.zadd(relay_owned_key(relay_id), {call_id: now_ms + ttl_ms})
        longest = max(longest, ttl_ms)
    if longest:
        # The index lives as long as the longest-lived session written through it lately.
        pipe.pexpire(relay_owned_key(relay_id), max(longest, RELAY_OWNED_TTL_MIN * 1000))
    ended = list(drop)
    for call_id in ended:
        pipe.delete(relay_session_key(call_id))
    if ended:
        pipe.zrem(relay_owned_key(relay_id), *ended)
    if longest or ended:
        store._call(pipe.execute)


def relay_create_sessions(store: Store, relay_id: str,
                          sessions: list[tuple[str, dict, float]]) -> None:
    """Write records of sessions whose first save failed (Redis was down when they were set
    up), unless a record exists by now: then it is newer news (another relay took the call
    over, or the first save landed after all) and the next refresh settles it."""
    if not sessions:
        return
    pipe = store.redis.pipeline(transaction=False)
    now_ms, longest = int(time.time() * 1000), 0
    for call_id, record, ttl in sessions:
        ttl_ms = int(ttl * 1000)
        pipe.set(relay_session_key(call_id), pack(record), px=ttl_ms, nx=True)
        pipe.zadd(relay_owned_key(relay_id), {call_id: now_ms + ttl_ms})
        longest = max(longest, ttl_ms)
    pipe.pexpire(relay_owned_key(relay_id), max(longest, RELAY_OWNED_TTL_MIN * 1000))
    store._call(pipe.execute)


def relay_refresh_sessions(store: Store, relay_id: str,
                           sessions: list[tuple[str, dict, float]]) -> list[int]:
    """Rewrite records this relay still owns; per session 1, 0 (gone) or -1 (taken over)."""
    if not sessions:
        return []
    script = _relay_refresh_script(store)
    pipe = store.redis.pipeline(transaction=False)
    now_ms, longest = int(time.time() * 1000), 0
    for call_id, record, ttl in sessions:
        ttl_ms = int(ttl * 1000)
        script(keys=[relay_session_key(call_id)],
               args=[relay_id, pack(record), ttl_ms, record.get("version", 0)], client=pipe)
        pipe.zadd(relay_owned_key(relay_id), {call_id: now_ms + ttl_ms})
        longest = max(longest, ttl_ms)
    pipe.pexpire(relay_owned_key(relay_id), max(longest, RELAY_OWNED_TTL_MIN * 1000))
    replies = store._call(pipe.execute)
    return [int(reply) for reply in replies[0:2 * len(sessions):2]]


def relay_drop_sessions(store: Store, relay_id: str, call_ids: Iterable[str],
                        delete_records: bool = True) -> None:
    """Forget sessions: their records (unless another relay took them over) and index entries."""
    ids = list(call_ids)
    if not ids:
        return
    pipe = store.redis.pipeline(transaction=False)
    if delete_records:
        for call_id in ids:
            pipe.delete(relay_session_key(call_id))
    pipe.zrem(relay_owned_key(relay_id), *ids)
    store._call(pipe.execute)


def relay_session(store: Store, call_id: str) -> dict | None:
    data = store._call(store.redis.get, relay_session_key(call_id))
    return None if data is None else unpack(data)


def relay_owned_sessions(store: Store, relay_id: str) -> list[dict]:
    """The live session records a relay owns, for its restart; stale index entries go."""
    key = relay_owned_key(relay_id)
    store._call(store.redis.zremrangebyscore, key, "-inf", int(time.time() * 1000))
    call_ids = [m.decode() for m in store._call(store.redis.zrange, key, 0, -1)]
    if not call_ids:
        return []
    pipe = store.redis.pipeline(transaction=False)
    for call_id in call_ids:
        pipe.get(relay_session_key(call_id))
    records, gone = [], []
    for call_id, data in zip(call_ids, store._call(pipe.execute), strict=True):
        record = None if data is None else unpack(data)
        if record is None or record.get("relay") != relay_id:
            gone.append(call_id)
        else:
            records.append(record)
    if gone:
        store._call(store.redis.zrem, key, *gone)
    return records


def relay_report_event(store: Store, event: dict,
                       sessions: Iterable[tuple[str, dict, float]] = (),
                       relay_id: str = "") -> str:
    """XADD a media event (text fields) and, in the same round trip, save the session records
    that say it was reported, so a restarted relay does not report it again."""
    pipe = store.redis.pipeline(transaction=False)
    pipe.xadd(RELAY_EVENTS_KEY, {k: str(v) for k, v in event.items()},
              maxlen=RELAY_EVENTS_MAXLEN, approximate=True)
    script = _relay_refresh_script(store)
    for call_id, record, ttl in sessions:
        script(keys=[relay_session_key(call_id)],
               args=[relay_id, pack(record), int(ttl * 1000), record.get("version", 0)],
               client=pipe)
    replies = store._call(pipe.execute)
    return replies[0].decode()


def media_events_group(store: Store, group: str, start: str = "0") -> None:
    """Create the consumer group (and the stream) unless it exists."""
    def create() -> None:
        try:
            store.redis.xgroup_create(RELAY_EVENTS_KEY, group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":  # (not BUSY: Redis running a long script)
                raise

    store._call(create)


def read_media_events(store: Store, group: str, consumer: str, count: int = 100,
                      block_ms: int | None = None) -> list[tuple[str, dict]]:
    """New events for this consumer (XREADGROUP >).  A blocking read must stay shorter than
    the store's socket timeout."""
    reply = _grouped(store, lambda: media_events_group(store, group), store.redis.xreadgroup,
                     group, consumer, {RELAY_EVENTS_KEY: ">"}, count=count, block=block_ms)
    return _stream_entries(reply)


def claim_stale_media_events(store: Store, group: str, consumer: str, min_idle_ms: int,
                             count: int = 100) -> list[tuple[str, dict]]:
    """Take over events a dead consumer read but never acknowledged (XAUTOCLAIM)."""
    reply = _grouped(store, lambda: media_events_group(store, group), store.redis.xautoclaim,
                     RELAY_EVENTS_KEY, group, consumer, min_idle_ms, start_id="0-0",
                     count=count)
    return [(_text(entry_id), {_text(k): _text(v) for k, v in fields.items()})
            for entry_id, fields in reply[1] if fields is not None]


def ack_media_events(store: Store, group: str, ids: Iterable[str]) -> int:
    ids = list(ids)
    if not ids:
        return 0
    return int(store._call(store.redis.xack, RELAY_EVENTS_KEY, group, *ids))


def _grouped(store: Store, create, fn, *args, **kwargs):
    """A consumer-group command; when the group or its stream is gone (NOGROUP: Redis
    restarted empty, or someone deleted it), make the group anew and run it once more."""
    try:
        return store._call(fn, *args, **kwargs)
    except redis.ResponseError as exc:
        if not is_nogroup(exc):
            raise
    create()
    return store._call(fn, *args, **kwargs)


def _stream_entries(reply) -> list[tuple[str, dict]]:
    entries = []
    for _stream, items in reply or []:
        for entry_id, values in items:
            entries.append((_text(entry_id), {_text(k): _text(v) for k, v in values.items()}))
    return entries


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- operators
# What sipctl and the metrics endpoint use beyond the readers above: hangup requests that
# one live worker carries out (a stream read through a consumer group, so exactly one
# worker acts and a dead worker's unacknowledged requests are claimed by another), and
# cluster-wide readings done with pipelines so a listing costs few round trips.

HANGUP_STREAM = "hangup"
HANGUP_GROUP = "workers"
HANGUP_MAXLEN = 10_000
PIPELINE_BATCH = 500


def post_hangup(store: Store, tag: str, call_id: str, by: str, at: float | None = None) -> str:
    """Ask the workers to end call ``tag`` (BYE on both legs); the request's stream id."""
    fields = {"tag": tag, "call_id": call_id, "by": by,
              "at": f"{time.time() if at is None else at:.3f}"}
    return _text(store._call(store.redis.xadd, HANGUP_STREAM, fields, maxlen=HANGUP_MAXLEN,
                             approximate=True))


def hangup_group(store: Store) -> None:
    """Create the workers' consumer group (and the stream) unless it exists.  It starts at
    the stream's beginning, so requests posted before any worker ran are not lost."""
    def create() -> None:
        try:
            store.redis.xgroup_create(HANGUP_STREAM, HANGUP_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":  # (not BUSY: Redis running a long script)
                raise

    store._call(create)


def read_hangups(store: Store, consumer: str, count: int = 10,
                 block_ms: int | None = None) -> list[tuple[str, dict]]:
    """New hangup requests for this consumer.  A blocking read must stay shorter than the
    store's socket timeout."""
    reply = _grouped(store, lambda: hangup_group(store), store.redis.xreadgroup, HANGUP_GROUP,
                     consumer, {HANGUP_STREAM: ">"}, count=count, block=block_ms)
    return _stream_entries(reply)


def claim_stale_hangups(store: Store, consumer: str, min_idle_ms: int,
                        count: int = 10) -> list[tuple[str, dict]]:
    """Requests a consumer read but never acknowledged (it died): take them over."""
    reply = _grouped(store, lambda: hangup_group(store), store.redis.xautoclaim, HANGUP_STREAM,
                     HANGUP_GROUP, consumer, min_idle_ms, start_id="0-0", count=count)
    return [(_text(entry_id), {_text(k): _text(v) for k, v in fields.items()})
            for entry_id, fields in reply[1] if fields is not None]


def ack_hangups(store: Store, ids: Iterable[str]) -> int:
    ids = list(ids)
    if not ids:
        return 0
    return int(store._call(store.redis.xack, HANGUP_STREAM, HANGUP_GROUP, *ids))


def _batches(keys: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def call_records(store: Store) -> list[tuple[str, dict]]:
    """(tag, record) of every call in Redis: live ones and those ended lately."""
    found = []
    for keys in _batches(store._scan("call:*"), PIPELINE_BATCH):
        pipe = store.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "d")
        for key, data in zip(keys, store._call(pipe.execute), strict=True):
            if data is not None:
                found.append((key[len("call:{"):-1], unpack(data)))
    return found


def trace_heads(store: Store, tags: list[str], count: int) -> dict[str, list[dict]]:
    """The first ``count`` trace entries of each call (the offer and answer are there)."""
    heads: dict[str, list[dict]] = {}
    for batch in _batches(tags, PIPELINE_BATCH):
        pipe = store.redis.pipeline(transaction=False)
        for tag in batch:
            pipe.lrange(trace_key(tag), 0, count - 1)
        for tag, entries in zip(batch, store._call(pipe.execute), strict=True):
            heads[tag] = [unpack(e) for e in entries]
    return heads


def cdrs_after(store: Store, after: str, count: int = 1000) -> list[dict]:
    """CDRs with a stream id above ``after`` ("<ms>-<n>"), oldest first."""
    entries = store._call(store.redis.xrange, CDR_STREAM, min=f"({after}", count=count)
    return [{"id": _text(eid), **{_text(k): _text(v) for k, v in fields.items()}}
            for eid, fields in entries]


# --------------------------------------------------------------------------- counting indexes
# What a scrape or ``sipctl stats`` counts, kept by the scripts that create, refresh and end
# a binding or a call, so no reader walks the keyspace (SCAN over 50,000 registrations cost
# the dispatcher 560 ms of CPU per scrape).  Each is a sorted set scored by the member's
# expiry (epoch ms), so a count is ``ZCOUNT key <now> +inf``: exact at any moment, with no
# process watching TTLs.  Members whose expiry passed are trimmed by the writers
# (ZREMRANGEBYSCORE in the same scripts) and ignored by readers meanwhile.  Measured cost:
# the register script takes ~30 us of redis-server CPU instead of ~20 us (20,000 AORs).
#
# These keys carry no hash tag: the scripts touch them beside the AOR's or call's own keys,
# which works on one server and under Sentinel.  On Redis Cluster a script may touch one slot
# only: the scripts then run without the index keys (they count nothing when given none:
# ``registration_index_keys``/``call_index_keys`` are the one place to leave them out), and
# the counts need another way (per-slot index keys summed by the reader, or a second write).
REG_CONTACTS_INDEX = "stats:reg:contacts"  # member "<aor>|<binding key>", score its expiry
REG_AORS_INDEX = "stats:reg:aors"  # member "<aor>", score its latest binding's expiry
CALLS_INDEX = "stats:calls"  # member call tag, score its creation: the last minute's calls
COUNTED_CALL_STATES = ("trying", "ringing", "early", "answered")  # stats:calls:<state>
PROCS_INDEX = "procs"  # member proc:<role>:<host>:<name>, score its heartbeat's expiry
# The keys that have no TTL by design (the rest expire or are deleted by the path that ends
# them): the directory, the timer shards, the streams (trimmed by length), the counting
# indexes and the host list (their members carry their own expiry as a score or a record).
PERSISTENT_KEYS = re.compile(r"^(user:\{.*\}|timers:\{\d+\}|cdr|hangup|relay:events|"
                             r"stats:.+|procs|hosts)$")


def registration_index_keys(store: Store) -> list[str]:
    """The indexes the registrar's scripts update (none on a Redis Cluster: see Store)."""
    return [REG_CONTACTS_INDEX, REG_AORS_INDEX] if store.indexed else []


def call_index_keys(store: Store) -> list[str]:
    if not store.indexed:
        return []
    return [CALLS_INDEX, *(f"{CALLS_INDEX}:{state}" for state in COUNTED_CALL_STATES)]


def counted_state(record: dict) -> str:
    """The state a call counts under; '' for a relayed MESSAGE, which is no call."""
    if record.get("method", "INVITE") != "INVITE":
        return ""
    return str(record.get("state", ""))


def unindex_registrations(store: Store, aor: str, binding_keys: list[str]) -> None:
    """Take a deleted AOR's bindings out of the indexes (``sipctl users del``)."""
    if not store.indexed:
        return
    pipe = store.redis.pipeline(transaction=False)
    if binding_keys:
        pipe.zrem(REG_CONTACTS_INDEX, *(f"{aor}|{k}" for k in binding_keys))
    pipe.zrem(REG_AORS_INDEX, aor)
    store._call(pipe.execute)


def indexed_aors(store: Store, now: float | None = None) -> list[str]:
    """AORs with a binding that has not expired (from the index: no SCAN)."""
    now_ms = int((time.time() if now is None else now) * 1000)
    return [_text(a) for a in store._call(store.redis.zrangebyscore, REG_AORS_INDEX,
                                          f"({now_ms}", "+inf")]


def live_counts(store: Store, now: float | None = None) -> dict:
    """Registrations and calls by state, from the indexes in one round trip:
    {"aors", "contacts", "calls": {state: n}, "calls_last_minute"}."""
    if not store.indexed:
        return surveyed_counts(store, now)
    now_ms = int((time.time() if now is None else now) * 1000)
    pipe = store.redis.pipeline(transaction=False)
    pipe.zcount(REG_AORS_INDEX, f"({now_ms}", "+inf")
    pipe.zcount(REG_CONTACTS_INDEX, f"({now_ms}", "+inf")
    pipe.zcount(CALLS_INDEX, now_ms - 60_000, "+inf")
    for state in COUNTED_CALL_STATES:
        pipe.zcount(f"{CALLS_INDEX}:{state}", f"({now_ms}", "+inf")
    aors, contacts, created, *states = store._call(pipe.execute)
    return {"aors": int(aors), "contacts": int(contacts), "calls_last_minute": int(created),
            "calls": {s: int(n) for s, n in zip(COUNTED_CALL_STATES, states, strict=True)}}


def surveyed_counts(store: Store, now: float | None = None) -> dict:
    """live_counts by SCAN over every primary (a Redis Cluster, where the scripts keep no
    index): its cost grows with the registrations and calls."""
    now = time.time() if now is None else now
    aors = contacts = 0
    for keys in _batches(store._scan("reg:*"), PIPELINE_BATCH):
        pipe = store.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hvals(key)
        for values in store._call(pipe.execute):
            live = sum(1 for v in values if unpack(v).get("expires_at", 0) > now * 1000)
            aors += bool(live)
            contacts += live
    calls = dict.fromkeys(COUNTED_CALL_STATES, 0)
    last_minute = 0
    for _tag, record in store.live_calls():
        state = counted_state(record)
        if state in calls:
            calls[state] += 1
        last_minute += record.get("created", 0) >= now - 60
    return {"aors": aors, "contacts": contacts, "calls_last_minute": last_minute,
            "calls": calls}


def index_process(pipe, key: str, ttl: float) -> None:
    """Add a heartbeat to the process index (in the heartbeat's own pipeline)."""
    now_ms = int(time.time() * 1000)
    pipe.zadd(PROCS_INDEX, {key: now_ms + int(ttl * 1000)})
    pipe.zremrangebyscore(PROCS_INDEX, "-inf", now_ms)


def indexed_processes(store: Store, role: str | None = None) -> list[bytes | None]:
    """The packed heartbeats of the live processes (of one role): two commands, no SCAN."""
    now_ms = int(time.time() * 1000)
    keys = [_text(k) for k in store._call(store.redis.zrangebyscore, PROCS_INDEX,
                                          f"({now_ms}", "+inf")]
    if role:
        keys = [k for k in keys if k.startswith(f"proc:{role}:")]
    if not keys:
        return []
    if store.indexed:
        return store._call(store.redis.mget, keys)
    pipe = store.redis.pipeline(transaction=False)  # one GET per slot's node, one round trip
    for key in keys:
        pipe.get(key)
    return store._call(pipe.execute)


def provision_bindings(store: Store, bindings: Iterable[tuple[str, Binding]],
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
                    *registration_index_keys(store)]
            _evalsha(pipe, store._register, keys, [now_ms, "", 0, 1000, 1 << 30, pack(ops),
                                                   binding.key, pack(binding.to_record())])

    for chunk in _batches(bindings, batch):
        store._pipelined(lambda pipe, c=chunk: build(pipe, c))
        count += len(chunk)
    return count


def bindings_of(store: Store, aors: list[str], now: float | None = None
                ) -> dict[str, list[Binding]]:
    """The live bindings of many AORs, pipelined (``sipctl regs`` over the whole index)."""
    now = time.time() if now is None else now
    found: dict[str, list[Binding]] = {}
    for batch in _batches(aors, PIPELINE_BATCH):
        pipe = store.redis.pipeline(transaction=False)
        for aor in batch:
            pipe.hvals(reg_key(aor))
        for aor, values in zip(batch, store._call(pipe.execute), strict=True):
            live = (Binding.from_record(unpack(v)) for v in values)
            found[aor] = sorted((b for b in live if b.expires_at > now),
                                key=lambda b: b.registered_at)
    return found


def live_call_records(store: Store, now: float | None = None) -> list[tuple[str, dict]]:
    """(tag, record) of the calls not ended, found through the state indexes (no SCAN):
    what ``sipctl calls`` lists."""
    now_ms = int((time.time() if now is None else now) * 1000)
    pipe = store.redis.pipeline(transaction=False)
    for state in COUNTED_CALL_STATES:
        pipe.zrangebyscore(f"{CALLS_INDEX}:{state}", f"({now_ms}", "+inf")
    tags = sorted({_text(t) for found in store._call(pipe.execute) for t in found})
    records = []
    for batch in _batches(tags, PIPELINE_BATCH):
        pipe = store.redis.pipeline(transaction=False)
        for tag in batch:
            pipe.hget(call_key(tag), "d")
        for tag, data in zip(batch, store._call(pipe.execute), strict=True):
            if data is not None:
                records.append((tag, unpack(data)))
    return records
