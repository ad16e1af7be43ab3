"""The Prometheus text endpoint: one per host, served by the host's dispatcher.

Every process of the cluster pushes its counters in its heartbeat
(``proc:<role>:<host>:<name>`` in Redis, about once a second).  On each scrape
this endpoint reads the heartbeats of its own host's processes and prints them
in the Prometheus text format (version 0.0.4), one series per process with the
labels ``role`` (dispatcher, worker, relay), ``process`` (its name) and ``host``,
plus cluster-wide gauges read from the shared state (calls by state,
registrations), which every host's endpoint reports alike.

Counter names in heartbeats map to metric families:

  requests_<METHOD>      sipcluster_sip_requests_received_total{method}
  sent_<METHOD>          sipcluster_sip_requests_sent_total{method}
  responses_<N>xx        sipcluster_sip_responses_sent_total{class}
  received_<N>xx         sipcluster_sip_responses_received_total{class}
  auth_<outcome>         sipcluster_auth_failures_total{outcome}     (forbidden, throttled, locked)
  cmd_<command>_<result> sipcluster_relay_commands_total{command, result}
  bans_<reason>          sipcluster_bans_issued_total{reason}        (flood_invite, scan_users...)
  anything else          sipcluster_<name>_total

Counters restart from zero when a process restarts; Prometheus' rate() and
increase() take care of that.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .config import Config
from .store import Store, StoreUnavailable, call_records, registration_counts

log = logging.getLogger("metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "sipcluster_"
CLUSTER_FIGURES_TTL = 5.0  # seconds a scrape reuses the cluster-wide figures (SCANs)

# Heartbeat fields that describe a process rather than count events.
IDENTITY_FIELDS = frozenset({"role", "host", "name", "pid", "started", "seen", "id", "control",
                             "addresses", "ports", "workers"})
# Heartbeat fields that are levels, not running totals.
GAUGES = {
    "inflight": "Requests a worker is handling now.",
    "sessions": "Media sessions a relay holds now.",
    "streams": "Media streams a relay forwards now.",
    "pps": "Packets per second a relay forwarded over its last heartbeat period.",
    "free_pairs": "RTP port pairs a relay has left.",
    "trusted_sources": "Source addresses a dispatcher gives the trusted rates "
                       "(a request from them authenticated within limits.trust_seconds).",
}
# Counter name patterns -> (family, help, label names); the groups fill the labels.
FAMILIES: list[tuple[re.Pattern, str, str, tuple[str, ...]]] = [
    (re.compile(r"requests_([A-Za-z]+)$"), "sip_requests_received_total",
     "SIP requests received, by method.", ("method",)),
    (re.compile(r"sent_([A-Za-z]+)$"), "sip_requests_sent_total",
     "SIP requests sent, by method (retransmissions included).", ("method",)),
    (re.compile(r"responses_([1-6]xx)$"), "sip_responses_sent_total",
     "SIP responses sent, by class.", ("class",)),
    (re.compile(r"received_([1-6]xx)$"), "sip_responses_received_total",
     "SIP responses received, by class.", ("class",)),
    (re.compile(r"auth_([a-z]+)$"), "auth_failures_total",
     "Digest authentications refused: wrong credentials or a throttled source.",
     ("outcome",)),
    (re.compile(r"bans_([a-z_]+)$"), "bans_issued_total",
     "Sources banned (dropped unanswered for limits.ban_seconds), by reason.", ("reason",)),
    (re.compile(r"cmd_([a-z]+)_([a-z]+)$"), "relay_commands_total",
     "Relay control commands, by command and result.", ("command", "result")),
]
COUNTER_HELP = {
    "received": "Datagrams received.",
    "forwarded": "Datagrams or packets passed on.",
    "dropped": "Datagrams dropped.",
    "banned_dropped": "Datagrams from banned sources dropped unread by the dispatcher.",
    "banned_unanswered": "Answers a worker did not send: their destination is banned.",
    "calls": "Calls set up (INVITEs accepted for routing).",
    "calls_ended": "Calls ended (a CDR written).",
    "parse_errors": "Messages that did not parse.",
    "retransmissions_absorbed": "Retransmitted requests absorbed while the first copy was "
                                "being handled.",
    "shed": "Requests refused with 503 because the worker was full.",
    "store_unavailable": "Events that found Redis slow or gone.",
    "held_for_retransmission": "Requests left unanswered for their retransmission because "
                               "Redis was unavailable (workers.outage_hold).",
    "hangups_deferred": "BYEs and CANCELs left unanswered while Redis was unavailable "
                        "(a retransmission is carried out once it is back).",
    "media_timeouts": "Calls reported for lack of RTP.",
    "trust_written": "Trusted sources a worker wrote and announced (new, or refreshed).",
    "replica_wait_short": "Call writes and CDRs not on redis.wait_replicas replicas within "
                          "redis.wait_timeout (WAIT).",
}


# --------------------------------------------------------------------------- the text
@dataclass
class Family:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


class Exposition:
    """Metric families in first-seen order; each family's samples printed together."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict[str, str],
            value: float) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = Family(name, kind, help_text)
        family.samples.append((labels, value))

    def text(self) -> str:
        lines = []
        for family in self.families.values():
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for labels, value in family.samples:
                lines.append(f"{family.name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def render(processes: list[dict], cluster: dict | None, now: float) -> str:
    """The exposition for these heartbeats and cluster-wide figures (pure)."""
    out = Exposition()
    for proc in processes:
        add_process(out, proc, now)
    if cluster:
        add_cluster(out, cluster)
    return out.text()


def add_process(out: Exposition, proc: dict, now: float) -> None:
    labels = {"role": str(proc.get("role", "")), "process": str(proc.get("name", "")),
              "host": str(proc.get("host", ""))}
    out.add(PREFIX + "up", "gauge", "A process whose heartbeat is in Redis.", labels, 1)
    out.add(PREFIX + "heartbeat_age_seconds", "gauge", "Seconds since the last heartbeat.",
            labels, round(max(0.0, now - float(proc.get("seen", now))), 3))
    if "started" in proc:
        out.add(PREFIX + "process_start_time_seconds", "gauge",
                "When the process started (epoch seconds).", labels, float(proc["started"]))
    if proc.get("role") == "dispatcher" and isinstance(proc.get("workers"), list):
        out.add(PREFIX + "workers_joined", "gauge", "Workers the dispatcher routes to.",
                labels, len(proc["workers"]))
    for key in sorted(proc):
        value = proc[key]
        if key in IDENTITY_FIELDS or isinstance(value, bool) or \
                not isinstance(value, (int, float)):
            continue
        if key in GAUGES:
            out.add(PREFIX + _name(key), "gauge", GAUGES[key], labels, value)
            continue
        name, help_text, extra = counter_family(key)
        out.add(name, "counter", help_text, {**labels, **extra}, value)


def counter_family(key: str) -> tuple[str, str, dict[str, str]]:
    """(metric name, help, extra labels) of a heartbeat counter."""
    for pattern, family, help_text, label_names in FAMILIES:
        match = pattern.match(key)
        if match:
            return PREFIX + family, help_text, dict(zip(label_names, match.groups(), strict=True))
    name = _name(key)
    return PREFIX + name + "_total", COUNTER_HELP.get(key, f"Heartbeat counter {key}."), {}


def add_cluster(out: Exposition, cluster: dict) -> None:
    for state, count in sorted(cluster.get("calls", {}).items()):
        out.add(PREFIX + "calls", "gauge", "Calls in Redis by state (ended ones are kept "
                "2 minutes).", {"state": state}, count)
    if "calls_created_last_minute" in cluster:
        out.add(PREFIX + "calls_created_last_minute", "gauge",
                "Calls created over the last 60 seconds.", {},
                cluster["calls_created_last_minute"])
    if "aors" in cluster:
        out.add(PREFIX + "registered_aors", "gauge", "Addresses of record with a binding.", {},
                cluster["aors"])
        out.add(PREFIX + "registered_contacts", "gauge", "Registered contacts (not expired).",
                {}, cluster["contacts"])


def cluster_figures(store: Store, now: float | None = None) -> dict:
    """Cluster-wide figures from the shared state (SCANs: cache them)."""
    now = time.time() if now is None else now
    calls = [record for _tag, record in call_records(store)
             if record.get("method", "INVITE") == "INVITE"]  # a relayed MESSAGE is no call
    states: dict[str, int] = {s: 0 for s in ("trying", "ringing", "early", "answered", "ended")}
    for call in calls:
        states[call["state"]] = states.get(call["state"], 0) + 1
    aors, contacts = registration_counts(store, now)
    return {"calls": states, "aors": aors, "contacts": contacts,
            "calls_created_last_minute": sum(1 for c in calls if c["created"] >= now - 60)}


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).lower()


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


# --------------------------------------------------------------------------- the server
class MetricsSource:
    """What one scrape reads: this host's heartbeats, and the cluster figures (cached)."""

    def __init__(self, store: Store, host: str, clock: Callable[[], float] = time.time):
        self.store = store
        self.host = host
        self.clock = clock
        self._cluster: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def text(self) -> str:
        now = self.clock()
        processes = [p for p in self.store.processes() if p.get("host") == self.host]
        return render(processes, self._cluster_figures(now), now)

    def _cluster_figures(self, now: float) -> dict | None:
        with self._lock:
            if self._cluster is None or now - self._cluster[0] > CLUSTER_FIGURES_TTL:
                self._cluster = (now, cluster_figures(self.store, now))
            return self._cluster[1]


def _handler(source: MetricsSource):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "try /metrics")
                return
            try:
                body = source.text().encode()
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
        server = server_class(address, _handler(MetricsSource(store, host)))
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%d: %s", *address, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", *address)
    return server
