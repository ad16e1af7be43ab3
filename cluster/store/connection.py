"""The connection to Redis: what its errors mean, how values are packed, and the Lua
scripts with the one way they run (EVALSHA, loaded again after a Redis restart).

Every concern of the store (cluster/store/__init__.py) is a mixin over ``Connection``: its
operations reach Redis only through ``_call``, ``_scan``, ``_pipelined`` and ``_script``,
which turn Redis trouble into ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import msgpack
import redis

from .. import redisclient

PIPELINE_BATCH = 500  # keys per pipeline of the readers that walk many


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


def as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def batches(keys: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- scripts
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
# KEYS: timer shards (all of them in one run on one server; one per run on a Redis
# Cluster, where they live in different slots: four runs cost a worker's claim ~3 times
# the packing and parsing of one).  Returns the members claimed (up to ARGV[2] per shard)
# and the earliest score left in them (false when they are empty): the claimant sleeps
# until then.
_POP_TIMERS_LUA = """
local again = tonumber(ARGV[1]) + tonumber(ARGV[3])
local claimed, first = {}, false
for _, key in ipairs(KEYS) do
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  for _, member in ipairs(due) do
    redis.call('ZADD', key, 'XX', again, member)
    claimed[#claimed + 1] = member
  end
  local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
  if head and (not first or tonumber(head) < tonumber(first)) then first = head end
end
return {claimed, first}
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




class Connection:
    # (replicas, milliseconds): WAIT after every call write and CDR when replicas > 0
    # (redis.wait_replicas); set by the SIP workers, the only writers of either.  Writes
    # that WAIT saw on fewer replicas are counted in ``wait_counters["replica_wait_short"]``.
    replica_wait: tuple[int, int] = (0, 0)
    wait_counters: dict | None = None

    def __init__(self, url: str, timeout: float = 0.25, max_connections: int = 64,
                 wrap_lane=None):
        self.url = url
        # The counting indexes are single keys the registrar's and the call's scripts update
        # beside the AOR's or call's own keys: on a Redis Cluster they sit in another slot,
        # which a script may not touch, so there the counts and listings are surveyed
        # (SCAN over every primary) instead.
        self.on_cluster = redisclient.is_cluster_url(url)  # keys spread over several nodes
        self.indexed = not self.on_cluster
        # (or via Sentinel; ``wrap_lane``: see redisclient.connect)
        self.redis = redisclient.connect(url, timeout, max_connections, wrap_lane)
        self._register = self.redis.register_script(_REGISTER_LUA)
        self._nc = self.redis.register_script(_NC_LUA)
        self._call_cas = self.redis.register_script(_CALL_CAS_LUA)
        self._drop_binding = self.redis.register_script(_DROP_BINDING_LUA)
        self._pop_timers = self.redis.register_script(_POP_TIMERS_LUA)
        self._relay_refresh = self.redis.register_script(_RELAY_REFRESH_LUA)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except REDIS_ERRORS as exc:
            self._raise_unavailable(exc)

    def _raise_unavailable(self, exc: BaseException):
        """Raise ``exc`` as StoreUnavailable when it is Redis trouble that passes, else as it
        is (a bug: wrong type, bad arguments...: not Redis's state)."""
        if not self._unavailable(exc):
            raise exc
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
            lane = getattr(self.redis, "lane", None)  # the connections it keeps
            if lane is not None:
                lane.drop_idle()
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

    def _scan(self, pattern: str) -> Iterator[str]:
        try:
            # On a Redis Cluster, scan_iter walks every primary in turn.
            for key in self.redis.scan_iter(match=pattern, count=1000):
                yield key.decode()
        except REDIS_ERRORS as exc:
            self._raise_unavailable(exc)

    # ---------------------------------------------------------------- scripts
    # Every script runs as a plain EVALSHA of the sha loaded at start: redis-py would ask
    # SCRIPT EXISTS before every pipeline holding a Script, an extra round trip each time.
    # After a Redis restart (NOSCRIPT) ``_unavailable`` loads them all again and the command
    # (or the whole pipeline) runs once more.

    @staticmethod
    def _evalsha(pipe, script, keys: list, args: list) -> None:
        """Queue one script run in the pipeline ``_pipelined`` gives to its builder."""
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    def _script(self, script, keys: list, args: list):
        """Run one script now; its reply."""
        return self._again_after_noscript(
            lambda: self.redis.evalsha(script.sha, len(keys), *keys, *args))

    def _pipelined(self, build) -> list:
        """Run the pipeline ``build`` fills (scripts go in through ``_evalsha``).  After a
        Redis restart or SCRIPT FLUSH only the script runs that got NOSCRIPT are sent again,
        once the scripts are loaded: the pipeline's other commands (an XADD, an RPUSH) ran
        already and must not run twice."""
        def run() -> list:
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            stack = list(pipe.command_stack)
            replies = pipe.execute(raise_on_error=False)
            missing = [i for i, reply in enumerate(replies)
                       if isinstance(reply, redis.exceptions.NoScriptError)]
            if missing:
                self._reload_scripts()
                again = self.redis.pipeline(transaction=False)
                for i in missing:  # in their order: a timer armed before its record
                    args, options = stack[i]
                    again.execute_command(*args, **options)
                for i, reply in zip(missing, again.execute(raise_on_error=False), strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        return self._call(run)

    def _again_after_noscript(self, run):
        for attempt in (1, 2):
            try:
                return self._call(run)
            except StoreUnavailable as exc:  # _call has loaded the scripts again: retry
                if attempt == 2 or not isinstance(exc.__cause__,
                                                  redis.exceptions.NoScriptError):
                    raise
        return None

    # ---------------------------------------------------------------- replication
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
