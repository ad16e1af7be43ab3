"""The key schema: every Redis key the cluster writes is named here, and nowhere else.

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
                                   claims due entries atomically for a lease (their score
                                   moves TIMER_LEASE ahead) and removes them once the call
                                   has seen them; an entry whose claimant died comes due
                                   again.  The call record says whether the timer is still
                                   pending.  No TTL: entries leave once fired.  Each shard
                                   (0-3) is its own hash tag, so on a Redis Cluster the
                                   shards sit in different slots (13907, 9842, 5649, 1584:
                                   spread over the primaries of an evenly split cluster)
                                   instead of all on one node.
  trace:{<call tag>}               list of the call's SIP messages in order (msgpack each:
                                   {"t", "dir": "in"/"out", "leg", "peer", "first", "data"}),
                                   capped at calls.trace_max; TTL calls.trace_ttl, extended
                                   by every write and never shortened.  An attempt that is no
                                   call yet (INVITE, 407, ACK) is kept 64*T1 until the call
                                   exists.  ``sipctl call <Call-ID>`` draws it as a ladder.
  cdr:{<stream shard>}             Redis Streams of call detail records, one per stream shard
                                   (st0, st1, st2: see "stream shards" below); a CDR goes to
                                   the shard of its A-leg Call-ID.  Each capped with MAXLEN ~
                                   1,000,000 / 3.  Read with ``sipctl cdr``, which merges the
                                   shards in time order; a CDR's id is "<entry id>-<shard>".
  cdr                              the single CDR stream of earlier versions: no longer
                                   written, still read (as the first of the shards, its ids
                                   unchanged "<entry id>") until it is trimmed or deleted.
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
                                   so other hosts can send through it (invariant 12); written by
                                   another host, with "by": <its id> and "base" (the index its
                                   sockets have there), while that host serves the dead one's
                                   floating address (cluster/adoption.py).  TTL: idem.
  streams:<host id>                hash of the SIP connections (TCP, TLS, WS, WSS) open at its
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
                                   ...}; a side of a session adopted from a dead host's relay
                                   carries its "address" (workers/relay/relay.py ``adopt``).
                                   TTL: the session's idle limit (its media timeout +
                                   a grace period), refreshed while media flows and by every
                                   command; deleted by the relay's `delete`.
  relay:owned:{<relay id>}         sorted set of the call ids a relay serves, score = expiry
                                   (epoch ms); read when the relay restarts.  TTL: a day (or
                                   the longest idle limit), refreshed with every write.
  relay:events:{<stream shard>}    Redis Streams of media events {"event": "media-timeout",
                                   "call_id", "relay", "idle", "hold", "at"}, one per stream
                                   shard, an event in the shard of its Call-ID; read by the
                                   B2BUA with the consumer group "b2bua" made on every shard
                                   (XREADGROUP, XACK, XAUTOCLAIM; an event's id names its
                                   shard: "<shard>/<entry id>").  Each capped with MAXLEN ~
                                   100,000 / 3.
  relay:events                     the single media-event stream of earlier versions: still
                                   read with the same group (relays of an earlier version write
                                   there during a rolling upgrade), shard "l" in event ids.

The rest of the package reads and writes these keys (cluster/store/__init__.py lists
its modules); every operation there turns Redis trouble into ``StoreUnavailable`` so
callers can answer 503 instead of crashing.

On a Redis Cluster (``redis+cluster://``, cluster/clusterclient.py) every script and every
multi-key command touches the keys of one hash tag (tests/unit/test_cluster_slots.py); a
pipeline may span slots (each primary gets its share, one round trip); the keys without a
tag (``hangup``, ``relay:nodes``, ``proc:``/``host:``) are one slot each.

Stream shards: the CDR and media-event streams are written to 3 keys each, hash tags st0,
st1 and st2 (slots 13206, 9143 and 5076: one in each third of the slot space, so each
primary of an evenly split 3-primary cluster holds one shard of each, 0-5460, 5461-10922,
10923-16383); on one Redis they are 3 keys of one server, read the same way.  Every reader
reads all of them (one pipeline: one round trip per primary) and merges by entry id.
"""
from __future__ import annotations

import re
import zlib

# --------------------------------------------------------------------------- one AOR's keys


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


def authuser_key(aor: str) -> str:
    return f"authuser:{{{aor}}}"


def authlock_key(aor: str) -> str:
    return f"authlock:{{{aor}}}"


# --------------------------------------------------------------------------- one call's keys
TX_PREFIX = "tx"


def tx_key(tag: str, key: str) -> str:
    return f"{TX_PREFIX}:{{{tag}}}:{key}"


def call_key(tag: str) -> str:
    return f"call:{{{tag}}}"


def trace_key(tag: str) -> str:
    return f"trace:{{{tag}}}"


def relay_session_key(call_id: str) -> str:
    return f"relay:session:{{{call_id}}}"


# --------------------------------------------------------------------------- timers
TIMER_SHARDS = 4
# Seconds a claimed timer waits for its claimant before it comes due again: far above
# the few ms a firing takes, so a live claimant is not doubled (a double would be harmless:
# the call fires a timer only at the exact due time it holds).
TIMER_LEASE = 3.0


def timer_key(shard: int) -> str:
    return f"timers:{{{shard}}}"


def timer_shard(tag: str) -> int:
    return zlib.crc32(tag.encode()) % TIMER_SHARDS


def timer_member(tag: str, name: str, due: float) -> str:
    """A timer's entry: the due time written exactly (repr), as the call compares it."""
    return f"{tag}|{name}|{due!r}"


def parse_timer_member(member: bytes | str) -> tuple[str, str, float]:
    text = member.decode() if isinstance(member, bytes) else member
    tag, _, rest = text.partition("|")
    name, _, due = rest.rpartition("|")
    return tag, name, float(due)


# --------------------------------------------------------------------------- one source's keys


def authfail_key(ip: str) -> str:
    return f"authfail:{{{ip}}}"


def ban_key(ip: str) -> str:
    return f"ban:{{{ip}}}"


def trust_key(ip: str) -> str:
    return f"trust:{{{ip}}}"


def scanusers_key(ip: str) -> str:
    return f"scanusers:{{{ip}}}"


def scanerrors_key(ip: str) -> str:
    return f"scanerrors:{{{ip}}}"


AUTHBLOCK_CHANNEL = "authblock"
AUTHLOCK_CHANNEL = "authlock"
BAN_CHANNEL = "ban"
TRUST_CHANNEL = "trust"
TRUST_ANNOUNCE_MAX = 500  # addresses per trust message
# Seconds one wait for a published message (bans, trust, auth blocks) lasts before it
# starts again.  A message wakes the wait at once whatever this is; the wait only bounds
# how often an idle subscriber wakes for nothing (at 1 s: 2 of an idle worker's ~25
# wake-ups a second, one of the dispatcher's).  A poll that ends in silence sends a PING
# on the subscription; one more without an answer gives the connection up (limits.py).
BLOCKS_POLL = 30.0

# --------------------------------------------------------------------------- processes, hosts


def proc_key(role: str, host: str, name: str) -> str:
    return f"proc:{role}:{host}:{name}"


def host_key(host: str) -> str:
    return f"host:{host}"


def streams_key(host: str) -> str:
    return f"streams:{host}"


HOSTS_KEY = "hosts"
HOSTS_TTL = 86_400  # seconds; refreshed by every announcement

# --------------------------------------------------------------------------- RTP relays
# Relay ids are "<host id>/relay-<index>".

RELAY_NODES_KEY = "relay:nodes"
RELAY_EVENTS_LEGACY = "relay:events"  # the one stream of earlier versions: read, not written
RELAY_EVENTS_MAXLEN = 100_000  # in all: each shard is capped at its share
RELAY_NODES_TTL = 86_400  # seconds; refreshed by every heartbeat
RELAY_OWNED_TTL_MIN = 86_400  # seconds: the owned index outlives the sessions written into it


def relay_owned_key(relay_id: str) -> str:
    return f"relay:owned:{{{relay_id}}}"


# --------------------------------------------------------------------------- streams
# The hash tags of the stream shards (see "Stream shards" above): chosen so that their slots
# (13206, 9143, 5076) fall in different thirds of the slot space (tests/unit/test_cluster_slots.py).
STREAM_SHARD_TAGS = ("st0", "st1", "st2")
STREAM_SHARDS = len(STREAM_SHARD_TAGS)


def stream_shard(ident: str) -> int:
    """The shard a CDR or media event goes to: from its Call-ID, so one call's entries share
    a shard and the shards fill evenly."""
    return zlib.crc32(ident.encode("utf-8", "surrogateescape")) % STREAM_SHARDS


def cdr_key(shard: int) -> str:
    return f"cdr:{{{STREAM_SHARD_TAGS[shard]}}}"


def relay_events_key(shard: int) -> str:
    return f"relay:events:{{{STREAM_SHARD_TAGS[shard]}}}"


CDR_STREAMS = tuple(cdr_key(shard) for shard in range(STREAM_SHARDS))
RELAY_EVENTS_STREAMS = tuple(relay_events_key(shard) for shard in range(STREAM_SHARDS))
CDR_LEGACY = "cdr"  # the one stream of earlier versions: read, not written
CDR_MAXLEN = 1_000_000  # in all: each shard is capped at its share
HANGUP_STREAM = "hangup"
HANGUP_GROUP = "workers"
HANGUP_MAXLEN = 10_000

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
# the counts and the live-call listing are surveyed by SCAN over every primary instead
# (surveys.py: ``surveyed_counts``, ``live_call_records``; registrations.py:
# ``registered_aors``): the same answers, at a cost that grows with the keyspace.
REG_CONTACTS_INDEX = "stats:reg:contacts"  # member "<aor>|<binding key>", score its expiry
REG_AORS_INDEX = "stats:reg:aors"  # member "<aor>", score its latest binding's expiry
CALLS_INDEX = "stats:calls"  # member call tag, score its creation: the last minute's calls
COUNTED_CALL_STATES = ("trying", "ringing", "early", "answered")  # stats:calls:<state>
PROCS_INDEX = "procs"  # member proc:<role>:<host>:<name>, score its heartbeat's expiry
# The keys that have no TTL by design (the rest expire or are deleted by the path that ends
# them): the directory, the timer shards, the streams (trimmed by length), the counting
# indexes and the host list (their members carry their own expiry as a score or a record).
PERSISTENT_KEYS = re.compile(r"^(user:\{.*\}|timers:\{\d+\}|cdr(:\{st\d+\})?|hangup|"
                             r"relay:events(:\{st\d+\})?|stats:.+|procs|hosts)$")
