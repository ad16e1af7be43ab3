"""The Redis store: the one package that knows every key (the schema is in schema.py).

``Store`` is one connection (connection.py: errors, packing, the Lua scripts and the one
way they run) with one mixin per concern over it:

  registrations.py  the user directory, bindings, pings, nonce counts, transaction answers
  calls.py          call records, their timers, SIP traces and CDRs written
  relays.py         RTP relays' announcements, session records and media events
  streams.py        hang-up requests and media events (consumer groups), CDRs read
  limits.py         authentication failures, lockouts, bans, trust, scanner counters
  surveys.py        processes, hosts, counts, call listings for sipctl and metrics

Every operation is a ``Store`` method.  Those that callers use as functions of a store
(``relay_session(store, call_id)``) are exported below as those same methods.
"""

from __future__ import annotations

from .calls import Arrival, Calls, counted_state
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
from .registrations import Binding, RegisterResult, Registrations
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


registration_index_keys = Store.registration_index_keys
call_index_keys = Store.call_index_keys
provision_bindings = Store.provision_bindings
bindings_of = Store.bindings_of
trace_heads = Store.trace_heads
relay_heartbeat = Store.relay_heartbeat
relay_nodes = Store.relay_nodes
relay_forget = Store.relay_forget
relay_save_sessions = Store.relay_save_sessions
relay_create_sessions = Store.relay_create_sessions
relay_refresh_sessions = Store.relay_refresh_sessions
relay_drop_sessions = Store.relay_drop_sessions
relay_session = Store.relay_session
relay_owned_sessions = Store.relay_owned_sessions
relay_report_event = Store.relay_report_event
post_hangup = Store.post_hangup
hangup_group = Store.hangup_group
read_hangups = Store.read_hangups
claim_stale_hangups = Store.claim_stale_hangups
ack_hangups = Store.ack_hangups
media_events_group = Store.media_events_group
read_media_events = Store.read_media_events
claim_stale_media_events = Store.claim_stale_media_events
ack_media_events = Store.ack_media_events
cdrs_after = Store.cdrs_after
indexed_aors = Store.indexed_aors
live_counts = Store.live_counts
call_records = Store.call_records
live_call_records = Store.live_call_records

__all__ = [
    "AUTHBLOCK_CHANNEL", "AUTHLOCK_CHANNEL", "Arrival", "BAN_CHANNEL", "CALLS_INDEX", "CDR_LEGACY",
    "CDR_STREAMS", "COUNTED_CALL_STATES", "HANGUP_GROUP", "HANGUP_STREAM", "HOSTS_KEY",
    "PERSISTENT_KEYS", "PROCS_INDEX", "REDIS_ERRORS", "REG_AORS_INDEX", "REG_CONTACTS_INDEX",
    "RELAY_EVENTS_LEGACY", "RELAY_EVENTS_STREAMS", "RELAY_NODES_KEY", "STREAM_SHARDS",
    "STREAM_SHARD_TAGS", "TIMER_LEASE", "TIMER_SHARDS", "TRUST_CHANNEL", "TX_PREFIX",
    "VERSION_STEP", "Binding", "RegisterResult", "Store", "StoreUnavailable", "ack_hangups",
    "ack_media_events", "aor_of", "authfail_key", "authlock_key", "authuser_key", "ban_key",
    "bindings_of", "call_index_keys", "call_key", "cdr_id", "cdr_key", "cdr_position",
    "call_records", "cdrs_after", "claim_stale_hangups", "claim_stale_media_events",
    "counted_state", "error_code", "hangup_group", "host_key", "indexed_aors", "is_nogroup",
    "is_unavailable", "live_call_records", "live_counts", "media_events_group", "nc_key", "pack",
    "parse_timer_member", "ping_key", "post_hangup", "proc_key", "provision_bindings",
    "read_hangups", "read_media_events", "reg_key", "registration_index_keys",
    "relay_create_sessions", "relay_drop_sessions", "relay_events_key", "relay_forget",
    "relay_heartbeat", "relay_nodes", "relay_owned_key", "relay_owned_sessions",
    "relay_refresh_sessions", "relay_report_event", "relay_session", "relay_session_key",
    "relay_save_sessions", "scanerrors_key", "scanusers_key", "stream_shard", "streams_key",
    "timer_key", "timer_member", "timer_shard", "trace_heads", "trace_key", "trust_key", "tx_key",
    "unpack", "user_key",
]
