"""The Redis store: the one package that knows every key (the schema is in schema.py).

``Store`` is one connection (connection.py: errors, packing, the Lua scripts and the one
way they run) with one mixin per concern over it:

  registrations.py  the user directory, bindings, pings, nonce counts, transaction answers
  calls.py          call records, their timers, SIP traces and CDRs written
  relays.py         RTP relays' announcements, session records and media events
  streams.py        hang-up requests and media events (consumer groups), CDRs read
  limits.py         authentication failures, lockouts, bans, trust, scanner counters
  surveys.py        processes, hosts, counts, call listings for sipctl and metrics

Every operation is a ``Store`` method, called on the store (``store.relay_session(tag)``);
this package exports the class, its errors, the record types and the schema's keys.
"""

from __future__ import annotations

from .calls import Arrival, Calls, TimerClaim, counted_state
from .connection import (
    REDIS_ERRORS,
    VERSION_STEP,
    Connection,
    StoreUnavailable,
    error_code,
    is_nogroup,
    is_unavailable,
    pack,
    unpack,
)
from .limits import Limits
from .registrations import Binding, NonceAsk, RegisterResult, Registrations
from .relays import Relays
from .schema import (
    AUTHBLOCK_CHANNEL,
    AUTHLOCK_CHANNEL,
    BAN_CHANNEL,
    CALLS_INDEX,
    CDR_LEGACY,
    CDR_STREAMS,
    COUNTED_CALL_STATES,
    HANGUP_GROUP,
    HANGUP_STREAM,
    HOSTS_KEY,
    PERSISTENT_KEYS,
    PROCS_INDEX,
    REG_AORS_INDEX,
    REG_CONTACTS_INDEX,
    RELAY_EVENTS_LEGACY,
    RELAY_EVENTS_STREAMS,
    RELAY_NODES_KEY,
    STREAM_SHARD_TAGS,
    STREAM_SHARDS,
    TIMER_LEASE,
    TIMER_SHARDS,
    TRUST_CHANNEL,
    TX_PREFIX,
    aor_of,
    authfail_key,
    authlock_key,
    authuser_key,
    ban_key,
    call_key,
    cdr_key,
    host_key,
    nc_key,
    parse_timer_member,
    ping_key,
    proc_key,
    reg_key,
    relay_events_key,
    relay_owned_key,
    relay_session_key,
    scanerrors_key,
    scanusers_key,
    stream_shard,
    streams_key,
    timer_key,
    timer_member,
    timer_shard,
    trace_key,
    trust_key,
    tx_key,
    user_key,
)
from .streams import Streams, cdr_id, cdr_position
from .surveys import Surveys


class Store(Registrations, Calls, Relays, Streams, Limits, Surveys, Connection):
    """The cluster's shared state in Redis; every Redis trouble comes out as
    ``StoreUnavailable``."""


__all__ = [
    "AUTHBLOCK_CHANNEL", "AUTHLOCK_CHANNEL", "Arrival", "BAN_CHANNEL", "CALLS_INDEX", "CDR_LEGACY",
    "CDR_STREAMS", "COUNTED_CALL_STATES", "HANGUP_GROUP", "HANGUP_STREAM", "HOSTS_KEY",
    "PERSISTENT_KEYS", "PROCS_INDEX", "REDIS_ERRORS", "REG_AORS_INDEX", "REG_CONTACTS_INDEX",
    "RELAY_EVENTS_LEGACY", "RELAY_EVENTS_STREAMS", "RELAY_NODES_KEY", "STREAM_SHARDS",
    "STREAM_SHARD_TAGS", "TIMER_LEASE", "TIMER_SHARDS", "TRUST_CHANNEL", "TX_PREFIX",
    "VERSION_STEP", "Binding", "NonceAsk", "RegisterResult", "Store", "StoreUnavailable",
    "TimerClaim", "aor_of",
    "authfail_key", "authlock_key", "authuser_key", "ban_key", "call_key", "cdr_id", "cdr_key",
    "cdr_position", "counted_state", "error_code", "host_key", "is_nogroup", "is_unavailable",
    "nc_key", "pack", "parse_timer_member", "ping_key", "proc_key", "reg_key", "relay_events_key",
    "relay_owned_key", "relay_session_key", "scanerrors_key", "scanusers_key", "stream_shard",
    "streams_key", "timer_key", "timer_member", "timer_shard", "trace_key", "trust_key", "tx_key",
    "unpack", "user_key",
]
