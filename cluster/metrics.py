"""The Prometheus endpoint: one per host, served by the host's dispatcher.

Every process of the cluster pushes its counters in its heartbeat
(``proc:<role>:<host>:<name>`` in Redis, about once a second).  On each scrape a custom
``prometheus_client`` collector reads the heartbeats of its own host's processes (through
the ``procs`` index, no SCAN) and exports them, one series per process with the labels
``role`` (dispatcher, worker, relay), ``process`` (its name) and ``host``; it adds the
standard ``process_*`` figures of each of those processes (read from /proc, as
prometheus_client's ProcessCollector does) and the cluster-wide gauges (calls by state,
registrations), read from the counting indexes the registrar and the B2BUA keep (a few
ZCOUNTs, whatever the number of registrations), which every host's endpoint reports alike.

Every family in ``FAMILIES`` is exported from the first scrape on, at zero for each process
of its role, so an alert on ``increase()`` works before the first event.  Heartbeat
counters no family claims are exported as ``sipcluster_<name>_total`` with the same labels.
Counters restart from zero when a process restarts; rate() and increase() handle that.
deploy/README.md lists every family; a test checks that list against a scrape.
"""

from __future__ import annotations

import bisect
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .config import Config
from .store import COUNTED_CALL_STATES, Store, StoreUnavailable

log = logging.getLogger("metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "sipcluster_"
LABELS = ("role", "process", "host")

# Heartbeat fields that describe a process rather than count events.
IDENTITY_FIELDS = frozenset({"role", "host", "name", "pid", "started", "seen", "id", "control",
                             "addresses", "ports", "workers", "pps"})
# Methods a label may name; anything else from the wire is counted as "OTHER" (a label
# value per token a scanner invents would grow the series without bound).
METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "MESSAGE", "INFO",
           "UPDATE", "PRACK", "REFER", "NOTIFY", "SUBSCRIBE", "PUBLISH")
RELAY_COMMANDS = ("ping", "offer", "answer", "delete", "query")
BAN_REASONS = ("flood_register", "flood_invite", "flood_other", "flood_dialog", "scan_users",
               "scan_errors")


@dataclass(frozen=True)
class Fam:
    """One exported family: its heartbeat source and the label values present at zero."""

    name: str  # without PREFIX; counters without the _total suffix
    kind: str  # counter, gauge
    help: str
    roles: tuple[str, ...]
    key: str = ""  # heartbeat field (plain families)
    pattern: str = ""  # heartbeat field regex whose groups fill ``label_names``
    label_names: tuple[str, ...] = ()
    zero: tuple[tuple[str, ...], ...] = ()  # label values exported at zero
    template: str = ""  # heartbeat field for zero label values, e.g. "requests_{}"


STREAM_TRANSPORTS = (("tcp",), ("tls",), ("ws",), ("wss",))
W, D, R = ("worker",), ("dispatcher",), ("relay",)
FAMILIES: tuple[Fam, ...] = (
    # SIP datagrams (the dispatcher's from the network, a worker's handed on to it)
    Fam("sip_datagrams_received", "counter", "SIP datagrams received: by the dispatcher "
        "from the network, by a worker from the dispatcher.", D + W, key="received"),
    Fam("sip_datagrams_forwarded", "counter", "SIP datagrams the dispatcher passed to a "
        "worker.", D, key="forwarded"),
    Fam("sip_datagrams_dropped", "counter", "SIP datagrams the dispatcher dropped (no live "
        "worker for their slot, or a socket error).", D, key="dropped"),
    Fam("sip_keepalives_received", "counter", "CRLF keep-alives received (answered by "
        "nothing, dropped).", D, key="keepalives"),
    Fam("stun_requests_received", "counter", "STUN binding requests received and answered.",
        D, key="stun"),
    Fam("sip_handoff_datagrams_sent", "counter", "SIP datagrams sent from this host's port "
        "on behalf of a worker of another host (NAT hand-off).", D, key="egress"),
    Fam("workers_joined", "gauge", "Workers the dispatcher routes to.", D, key="workers"),
    # SIP over TCP, TLS, WS and WSS (cluster/streams.py), by transport
    Fam("sip_connections", "gauge", "SIP connections open at the dispatcher, by transport.",
        D, pattern=r"streams_open_(tcp|tls|ws|wss)$", label_names=("transport",),
        zero=STREAM_TRANSPORTS, template="streams_open_{}"),
    Fam("sip_connections_opened", "counter", "SIP connections accepted, by transport.", D,
        pattern=r"streams_opened_(tcp|tls|ws|wss)$", label_names=("transport",),
        zero=STREAM_TRANSPORTS, template="streams_opened_{}"),
    Fam("sip_connections_closed", "counter", "SIP connections closed (by either end, a "
        "timeout or a broken limit), by transport.", D,
        pattern=r"streams_closed_(tcp|tls|ws|wss)$", label_names=("transport",),
        zero=STREAM_TRANSPORTS, template="streams_closed_{}"),
    Fam("sip_stream_messages_received", "counter", "SIP messages read from connections, by "
        "transport.", D, pattern=r"streams_messages_(tcp|tls|ws|wss)$",
        label_names=("transport",), zero=STREAM_TRANSPORTS, template="streams_messages_{}"),
    Fam("sip_stream_bytes_received", "counter", "Bytes read from SIP connections (TLS: "
        "decrypted; WebSocket: with the upgrade and the frames), by transport.", D,
        pattern=r"streams_bytes_in_(tcp|tls|ws|wss)$", label_names=("transport",),
        zero=STREAM_TRANSPORTS, template="streams_bytes_in_{}"),
    Fam("sip_stream_bytes_sent", "counter", "Bytes written to SIP connections, by transport.",
        D, pattern=r"streams_bytes_out_(tcp|tls|ws|wss)$", label_names=("transport",),
        zero=STREAM_TRANSPORTS, template="streams_bytes_out_{}"),
    Fam("sip_websocket_violations", "counter", "WebSocket connections closed for breaking "
        "RFC 6455 or a limit (a refused upgrade, an unmasked or oversized frame, a frame "
        "flood).", D, key="streams_closed_websocket"),
    Fam("sip_connections_dialed", "counter", "TCP connections the cluster opens itself "
        "(cluster/dialer.py), by outcome: opening, connected, reused (a request sent over one "
        "already open), failed; and per message of a failed one, fallback_udp (sent over UDP "
        "instead) or transport_errors (reported to the worker).", D,
        pattern=r"streams_dial_(opening|connected|reused|failed|fallback_udp|transport_errors)$",
        label_names=("outcome",),
        zero=tuple((o,) for o in ("opening", "connected", "reused", "failed", "fallback_udp",
                                  "transport_errors")), template="streams_dial_{}"),
    Fam("sip_banned_dropped", "counter", "SIP datagrams from banned sources, dropped unread "
        "by the dispatcher.", D, key="banned_dropped"),
    Fam("bans_issued", "counter", "Sources banned (dropped unanswered for limits.ban_seconds), "
        "by reason: flood_<class> by a dispatcher, scan_users / scan_errors by a worker.",
        D + W, pattern=r"bans_([a-z_]+)$", label_names=("reason",),
        zero=tuple((r,) for r in BAN_REASONS), template="bans_{}"),
    Fam("trusted_sources", "gauge", "Source addresses a dispatcher gives the trusted rates (a "
        "request from them authenticated within limits.trust_seconds).", D,
        key="trusted_sources"),
    Fam("handoff_foreign", "counter", "Hand-off datagrams from an address that is no host of "
        "the cluster (dropped).", D, key="handoff_foreign"),
    Fam("handoff_unauthenticated", "counter", "Hand-off datagrams not sealed with the "
        "cluster's hand-off key, or outside its time window (dropped).", D,
        key="handoff_unauthenticated"),
    Fam("handoff_replayed", "counter", "Second copies of a sealed hand-off (dropped).", D,
        key="handoff_replayed"),
    # SIP signalling (workers)
    Fam("sip_requests_received", "counter", "SIP requests received, by method (OTHER: an "
        "unknown method).", W, pattern=r"requests_(.+)$", label_names=("method",),
        zero=tuple((m,) for m in METHODS), template="requests_{}"),
    Fam("sip_requests_sent", "counter", "SIP requests sent, by method (retransmissions "
        "included).", W, pattern=r"sent_(.+)$", label_names=("method",),
        zero=tuple((m,) for m in METHODS), template="sent_{}"),
    Fam("sip_transport_errors", "counter", "Messages a worker could not send over a stream "
        "(the connection closed, or could not be opened): a request's transaction takes it "
        "as a 503 (RFC 3261 8.1.3.1).", W, key="transport_errors"),
    Fam("sip_responses_sent", "counter", "SIP responses sent, by status code.", W,
        pattern=r"responses_(\d{3})$", label_names=("code",)),
    Fam("sip_responses_received", "counter", "SIP responses received, by status code.", W,
        pattern=r"received_(\d{3})$", label_names=("code",)),
    Fam("auth_failures", "counter", "Digest authentications refused, by outcome: forbidden "
        "(wrong credentials), throttled (the source), locked (the user).", W,
        pattern=r"auth_([a-z]+)$", label_names=("outcome",),
        zero=(("forbidden",), ("throttled",), ("locked",)), template="auth_{}"),
    Fam("calls_started", "counter", "Calls set up (INVITEs accepted for routing).", W,
        key="calls"),
    Fam("calls_ended", "counter", "Calls ended (a CDR written).", W, key="calls_ended"),
    Fam("sip_parse_errors", "counter", "Messages that did not parse.", W, key="parse_errors"),
    Fam("sip_bad_requests", "counter", "Requests refused with a 4xx before any work (RFC 3261 "
        "8.2 checks, bad headers).", W, key="bad_requests"),
    Fam("sip_bad_extension", "counter", "Requests refused with 420 Bad Extension.", W,
        key="bad_extension"),
    Fam("internal_errors", "counter", "Messages that met a bug (answered 500).", W,
        key="internal_errors"),
    Fam("retransmissions_absorbed", "counter", "Retransmitted requests absorbed while the "
        "first copy was being handled.", W, key="retransmissions_absorbed"),
    Fam("retransmissions_answered", "counter", "Retransmitted requests answered again from "
        "the worker's memory of the answer.", W, key="retransmissions_answered"),
    Fam("sip_shed", "counter", "Requests refused with 503 because the worker was full.", W,
        key="shed"),
    Fam("store_unavailable", "counter", "Events that found Redis slow or gone.", W,
        key="store_unavailable"),
    Fam("held_for_retransmission", "counter", "Requests left unanswered for their "
        "retransmission because Redis was unavailable (workers.outage_hold).", W,
        key="held_for_retransmission"),
    Fam("hangups_deferred", "counter", "BYEs and CANCELs left unanswered while Redis was "
        "unavailable (a retransmission is carried out once it is back).", W,
        key="hangups_deferred"),
    Fam("hangups_retried", "counter", "Deferred hang-ups carried out once Redis was back.", W,
        key="hangups_retried"),
    Fam("sip_stray_responses", "counter", "Responses that matched no call.", W,
        key="stray_responses"),
    Fam("call_write_conflicts", "counter", "Call writes that lost a compare-and-set to "
        "another writer and were decided again.", W, key="cas_conflicts"),
    Fam("trace_lost", "counter", "Call trace entries that could not be written.", W,
        key="trace_lost"),
    Fam("operator_hangups", "counter", "Calls ended by `sipctl hangup`.", W,
        key="operator_hangups"),
    Fam("receive_errors", "counter", "Envelopes from the dispatcher that could not be read.",
        W, key="receive_errors"),
    Fam("replica_wait_short", "counter", "Call writes and CDRs not on redis.wait_replicas "
        "replicas within redis.wait_timeout (WAIT).", W, key="replica_wait_short"),
    Fam("hep_packets_sent", "counter", "SIP messages copied to the HEP collector (hep.address).",
        W, key="hep_sent"),
    Fam("hep_send_errors", "counter", "HEP copies that could not be sent (dropped).", W,
        key="hep_errors"),
    Fam("trust_written", "counter", "Trusted sources a worker wrote and announced (new or "
        "refreshed).", W, key="trust_written"),
    Fam("sip_banned_unanswered", "counter", "Answers a worker did not send: their "
        "destination is banned.", W, key="banned_unanswered"),
    Fam("envelopes_refused", "counter", "Envelopes a worker dropped: not from its "
        "dispatcher's forwarding socket.", W, key="envelopes_refused"),
    Fam("sip_response_errors", "counter", "Responses that could not be handled (logged with "
        "their Call-ID).", W, key="response_errors"),
    Fam("call_unhandled_actions", "counter", "Actions of the call machine the worker had no "
        "way to perform (a bug; logged).", W, key="unhandled_actions"),
    Fam("worker_inflight_requests", "gauge", "Requests a worker is handling now.", W,
        key="inflight"),
    # RTP relays (rtpengine-like shapes)
    Fam("rtp_packets_forwarded", "counter", "RTP/RTCP packets a relay passed between the "
        "legs.", R, key="forwarded"),
    Fam("relay_sessions", "gauge", "Media sessions a relay holds now.", R, key="sessions"),
    Fam("relay_streams", "gauge", "Media streams a relay forwards now.", R, key="streams"),
    Fam("relay_free_port_pairs", "gauge", "RTP port pairs a relay has left.", R,
        key="free_pairs"),
    Fam("relay_sessions_created", "counter", "Media sessions created.", R,
        key="sessions_created"),
    Fam("relay_closed_sessions", "counter", "Media sessions closed, by reason: deleted "
        "(signalling ended the call), expired (idle past its hard limit), orphaned (its "
        "record vanished from Redis).", R, pattern=r"sessions_(deleted|expired|orphaned)$",
        label_names=("reason",), zero=(("deleted",), ("expired",), ("orphaned",)),
        template="sessions_{}"),
    Fam("relay_media_timeouts", "counter", "Calls reported for lack of RTP.", R,
        key="media_timeouts"),
    Fam("relay_commands", "counter", "Relay control commands, by command and result.", R,
        pattern=r"cmd_([a-z]+)_([a-z]+)$", label_names=("command", "result"),
        zero=tuple((c, r) for c in RELAY_COMMANDS for r in ("ok", "error")),
        template="cmd_{}_{}"),
    Fam("relay_latched", "counter", "Streams latched to the source actually seen.", R,
        key="latched"),
    Fam("relay_ports_exhausted", "counter", "Offers refused because no port pair was free.",
        R, key="ports_exhausted"),
    Fam("relay_sessions_restored", "counter", "Sessions re-bound from Redis at a restart.", R,
        key="restored"),
    Fam("relay_control_malformed", "counter", "Control messages that did not parse.", R,
        key="control_malformed"),
    Fam("relay_control_retransmitted", "counter", "Control retransmissions answered again.",
        R, key="control_retransmitted"),
    Fam("relay_control_unauthenticated", "counter", "Control commands not sealed with the "
        "cluster's relay key, or outside its time window (ignored).", R,
        key="control_unauthenticated"),
    Fam("relay_control_replayed", "counter", "Second copies of a sealed control command "
        "(ignored).", R, key="control_replayed"),
    Fam("relay_loop_errors", "counter", "Errors caught in the relay's packet loop.", R,
        key="loop_errors"),
    Fam("relay_redis_errors", "counter", "Redis errors met by a relay.", R,
        key="redis_errors"),
)


# --------------------------------------------------------------------------- histograms
@dataclass(frozen=True)
class HistogramSpec:
    name: str
    help: str
    buckets: tuple[float, ...]  # upper bounds; +Inf is implied


# The buckets: REGISTER is one Lua round trip (~0.2 ms measured on 2 cores) plus queueing,
# and a phone retransmits at T1 = 500 ms, so 1 ms..1 s at ~2.5x steps shows both the normal
# case and the approach of T1.  The callee's first answer (often its 100 Trying) is network
# plus the phone: tens of ms normally, T1 and its doublings when the INVITE was lost, up to
# Timer B (32 s).  Post-dial delay is human scale (ITU-T E.721 means of 3-8 s for the PSTN):
# 100 ms..30 s.
HISTOGRAMS: tuple[HistogramSpec, ...] = (
    HistogramSpec("register_latency", "REGISTER: its arrival at a worker to the worker's "
                  "final answer sent.",
                  (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)),
    HistogramSpec("invite_first_response", "A call's INVITE arriving to the callee's first "
                  "response (100 Trying included) arriving.",
                  (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)),
    HistogramSpec("post_dial_delay", "A call's INVITE arriving to the first 180 or 183 from "
                  "the callee (post-dial delay).",
                  (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0)),
)
HISTOGRAM_SPECS = {spec.name: spec for spec in HISTOGRAMS}


class Histogram:
    """What a worker keeps of one histogram: counts per bucket (not cumulative, +Inf last)
    and the sum, sent in its heartbeat as ``hist_<name>: [counts..., sum]``."""

    def __init__(self, spec: HistogramSpec):
        self.spec = spec
        self.counts = [0] * (len(spec.buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.spec.buckets, seconds)] += 1
        self.sum += seconds

    def heartbeat(self) -> list:
        return [*self.counts, round(self.sum, 6)]


def histograms() -> dict[str, Histogram]:
    return {spec.name: Histogram(spec) for spec in HISTOGRAMS}


def histogram_fields(hists: dict[str, Histogram]) -> dict[str, list]:
    return {f"hist_{name}": h.heartbeat() for name, h in hists.items()}


# --------------------------------------------------------------------------- the collector
def _labels(proc: dict) -> list[str]:
    return [str(proc.get("role", "")), str(proc.get("name", "")), str(proc.get("host", ""))]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _family(fam: Fam) -> Metric:
    cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
    return cls(PREFIX + fam.name, fam.help, labels=[*LABELS, *fam.label_names])


PATTERNS = [(re.compile(f.pattern), f) for f in FAMILIES if f.pattern]
KEYED = {(role, f.key): f for f in FAMILIES if f.key for role in f.roles}


def process_metrics(processes: list[dict], now: float) -> list[Metric]:
    """The families of these heartbeats (pure): every family of ``FAMILIES`` whatever the
    heartbeats hold, each process's counters, its histograms."""
    families = {fam.name: _family(fam) for fam in FAMILIES}  # all of them, samples or not
    up = GaugeMetricFamily(PREFIX + "up", "A process whose heartbeat is in Redis.",
                           labels=LABELS)
    age = GaugeMetricFamily(PREFIX + "heartbeat_age_seconds", "Seconds since the last "
                            "heartbeat.", labels=LABELS)
    hist = {spec.name: HistogramMetricFamily(PREFIX + spec.name + "_seconds", spec.help,
                                             labels=LABELS) for spec in HISTOGRAMS}
    extra: dict[str, CounterMetricFamily] = {}
    for proc in processes:
        role, labels = str(proc.get("role", "")), _labels(proc)
        up.add_metric(labels, 1)
        age.add_metric(labels, round(max(0.0, now - float(proc.get("seen", now))), 3))
        values: dict[tuple[str, tuple[str, ...]], float] = {}
        for key, value in proc.items():
            if key in IDENTITY_FIELDS and key != "workers":
                continue
            if key == "workers" and role == "dispatcher" and isinstance(value, list):
                value = len(value)
            if key.startswith("hist_") and key[5:] in HISTOGRAM_SPECS \
                    and isinstance(value, list):
                _add_histogram(hist[key[5:]], HISTOGRAM_SPECS[key[5:]], labels, value)
                continue
            if not _is_number(value):
                continue
            fam, extra_labels = _family_of(role, key)
            if fam is None:
                name = _name(key)
                metric = extra.get(name)
                if metric is None:
                    metric = extra[name] = CounterMetricFamily(
                        PREFIX + name, f"Heartbeat counter {key}.", labels=LABELS)
                metric.add_metric(labels, value)
                continue
            slot = (fam.name, extra_labels)
            values[slot] = values.get(slot, 0) + value
        for fam in FAMILIES:
            if role not in fam.roles:
                continue
            if fam.label_names:
                for zero in fam.zero:
                    values.setdefault((fam.name, zero), 0)
            else:
                values.setdefault((fam.name, ()), 0)
        for (name, extra_labels), value in values.items():
            families[name].add_metric([*labels, *extra_labels], value)
        for spec in HISTOGRAMS:
            if role == "worker" and not isinstance(proc.get("hist_" + spec.name), list):
                _add_histogram(hist[spec.name], spec, labels, [])
    extras = [extra[name] for name in sorted(extra) if name not in families]
    return [up, age, *families.values(), *hist.values(), *extras]


def _family_of(role: str, key: str) -> tuple[Fam | None, tuple[str, ...]]:
    fam = KEYED.get((role, key))
    if fam is not None:
        return fam, ()
    for pattern, fam in PATTERNS:
        if role in fam.roles:
            match = pattern.match(key)
            if match:
                groups = match.groups()
                if fam.label_names == ("method",) and groups[0] not in METHODS:
                    groups = ("OTHER",)
                return fam, groups
    return None, ()


def _add_histogram(metric: HistogramMetricFamily, spec: HistogramSpec, labels: list[str],
                   fields: list) -> None:
    counts = list(fields[:-1]) if len(fields) == len(spec.buckets) + 2 else \
        [0] * (len(spec.buckets) + 1)
    total = float(fields[-1]) if len(fields) == len(spec.buckets) + 2 else 0.0
    buckets, running = [], 0
    for bound, count in zip([*map(_bound, spec.buckets), "+Inf"], counts, strict=True):
        running += count
        buckets.append((bound, running))
    metric.add_metric(labels, buckets, total)


def _bound(value: float) -> str:
    return repr(float(value))


def cluster_metrics(counts: dict) -> list[Metric]:
    """The cluster-wide gauges from ``store.live_counts`` (pure)."""
    calls = GaugeMetricFamily(PREFIX + "active_calls", "Calls in progress, by state "
                              "(cluster-wide).", labels=["state"])
    for state in COUNTED_CALL_STATES:
        calls.add_metric([state], counts["calls"].get(state, 0))
    aors = GaugeMetricFamily(PREFIX + "registered_aors", "Addresses of record with a live "
                             "binding (cluster-wide).")
    aors.add_metric([], counts["aors"])
    contacts = GaugeMetricFamily(PREFIX + "registered_contacts", "Registered contacts not "
                                 "expired (cluster-wide).")
    contacts.add_metric([], counts["contacts"])
    return [calls, aors, contacts]


def os_process_metrics(processes: list[dict], proc_root: str = "/proc") -> list[Metric]:
    """process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
    process_start_time_seconds... of each local process, labelled like its counters."""
    merged: dict[str, Metric] = {}
    for proc in processes:
        pid = proc.get("pid")
        if not isinstance(pid, int):
            continue
        collector = ProcessCollector(namespace="", pid=lambda p=pid: p, proc=proc_root,
                                     registry=None)
        labels = dict(zip(LABELS, _labels(proc), strict=True))
        for metric in collector.collect():
            target = merged.get(metric.name)
            if target is None:
                target = merged[metric.name] = Metric(metric.name, metric.documentation,
                                                      metric.type)
            for sample in metric.samples:
                target.add_sample(sample.name, {**labels, **sample.labels}, sample.value)
    return list(merged.values())


class ClusterCollector:
    """The prometheus_client collector of one host's endpoint."""

    def __init__(self, store: Store, host: str, clock: Callable[[], float] = time.time,
                 proc_root: str = "/proc"):
        self.store = store
        self.host = host
        self.clock = clock
        self.proc_root = proc_root

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        processes = [p for p in self.store.processes() if p.get("host") == self.host]
        yield from process_metrics(processes, now)
        yield from os_process_metrics(processes, self.proc_root)
        yield from cluster_metrics(self.store.live_counts(now))


def exposition(collector: ClusterCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).lower()


# --------------------------------------------------------------------------- the server
def _handler(collector: ClusterCollector):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "try /metrics")
                return
            try:
                body = exposition(collector)
                status = 200
            except StoreUnavailable as exc:
                body, status = f"redis unavailable: {exc}\n".encode(), 503
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002 (the http.server name)
            pass  # a scrape every few seconds is not news

    return Handler


SERVE_POLL = 60.0


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def start(config: Config, host: str | None = None) -> ThreadingHTTPServer | None:
    """Serve /metrics on metrics.bind:metrics.port in a daemon thread; None when the port
    cannot be bound (the process carries on without it)."""
    host = host or config.sip.effective_host_id
    store = Store(config.redis.url, timeout=2.0, max_connections=4)
    address = (config.metrics.bind, config.metrics.port)
    server_class = _IPv6Server if ":" in config.metrics.bind else ThreadingHTTPServer
    try:
        server = server_class(address, _handler(ClusterCollector(store, host)))
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%d: %s", *address, exc)
        return None
    server.daemon_threads = True
    # serve_forever wakes every poll_interval (0.5 s by default) only to look for a
    # shutdown(), which this process never asks: it ends with the process.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL},
                     name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", *address)
    return server
