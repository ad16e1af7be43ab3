"""The Prometheus text endpoint (cluster/metrics.py): heartbeats in, exposition text out."""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest

from cluster import metrics
from cluster.store import StoreUnavailable

NOW = 1_800_000_000.0
WORKER = {"role": "worker", "host": "h1", "name": "worker-0", "pid": 11, "started": NOW - 60,
          "seen": NOW - 0.5, "inflight": 3, "received": 120, "requests_INVITE": 7,
          "requests_REGISTER": 40, "sent_BYE": 2, "responses_1xx": 9, "responses_2xx": 45,
          "responses_4xx": 12, "received_2xx": 6, "auth_forbidden": 2, "calls": 5,
          "calls_ended": 4, "parse_errors": 1}
DISPATCHER = {"role": "dispatcher", "host": "h1", "name": "dispatcher", "pid": 10,
              "started": NOW - 70, "seen": NOW - 0.25, "workers": ["worker-0", "worker-1"],
              "received": 130, "forwarded": 128, "dropped": 2}
RELAY = {"role": "relay", "host": "h1", "name": "relay-0", "pid": 12, "id": "h1/relay-0",
         "started": NOW - 50, "seen": NOW - 1, "control": ["127.0.0.1", 30000],
         "addresses": {"4": "127.0.0.1"}, "ports": [20002, 24999], "sessions": 2,
         "streams": 4, "pps": 199.5, "free_pairs": 1247, "forwarded": 9000,
         "cmd_offer_ok": 3, "cmd_delete_error": 1}
CLUSTER = {"calls": {"answered": 2, "ended": 1}, "aors": 3, "contacts": 4,
           "calls_created_last_minute": 5}
SAMPLE = re.compile(r'^([a-z_]+)(\{([a-z_]+="[^"\\]*(\\.[^"\\]*)*",?)*\})? -?[0-9.e+]+$')


def parse(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line else (line.split()[0], "", "")
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', rest)))
        samples[(name.split()[0], labels)] = float(line.rsplit(" ", 1)[1])
    return samples


def labels(role: str, process: str, **extra: str) -> tuple:
    return tuple(sorted({"role": role, "process": process, "host": "h1", **extra}.items()))


@pytest.fixture
def text() -> str:
    return metrics.render([DISPATCHER, WORKER, RELAY], CLUSTER, NOW)


def test_every_line_is_a_sample_or_a_help_or_type_line(text):
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert SAMPLE.match(line), line


def test_each_family_has_one_help_and_type_and_its_samples_together(text):
    lines = text.splitlines()
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    current = None
    for line in lines:
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif not line.startswith("#"):
            assert line.split("{")[0].split()[0] == current, f"{line} outside {current}"


def test_worker_counters_map_to_labelled_families(text):
    samples = parse(text)
    worker = labels("worker", "worker-0")
    assert samples[("sipcluster_sip_requests_received_total",
                    labels("worker", "worker-0", method="INVITE"))] == 7
    assert samples[("sipcluster_sip_requests_sent_total",
                    labels("worker", "worker-0", method="BYE"))] == 2
    assert samples[("sipcluster_sip_responses_sent_total",
                    labels("worker", "worker-0", **{"class": "4xx"}))] == 12
    assert samples[("sipcluster_sip_responses_received_total",
                    labels("worker", "worker-0", **{"class": "2xx"}))] == 6
    assert samples[("sipcluster_auth_failures_total",
                    labels("worker", "worker-0", outcome="forbidden"))] == 2
    assert samples[("sipcluster_calls_total", worker)] == 5
    assert samples[("sipcluster_calls_ended_total", worker)] == 4
    assert samples[("sipcluster_parse_errors_total", worker)] == 1
    assert samples[("sipcluster_inflight", worker)] == 3
    assert "# TYPE sipcluster_inflight gauge" in text
    assert "# TYPE sipcluster_calls_total counter" in text


def test_the_same_counter_name_in_two_roles_is_one_family(text):
    samples = parse(text)
    assert samples[("sipcluster_received_total", labels("worker", "worker-0"))] == 120
    assert samples[("sipcluster_received_total", labels("dispatcher", "dispatcher"))] == 130
    assert text.count("# TYPE sipcluster_received_total counter") == 1


def test_process_gauges(text):
    samples = parse(text)
    for role, name in (("worker", "worker-0"), ("dispatcher", "dispatcher"),
                       ("relay", "relay-0")):
        assert samples[("sipcluster_up", labels(role, name))] == 1
    assert samples[("sipcluster_heartbeat_age_seconds", labels("worker", "worker-0"))] == 0.5
    assert samples[("sipcluster_process_start_time_seconds",
                    labels("dispatcher", "dispatcher"))] == NOW - 70
    assert samples[("sipcluster_workers_joined", labels("dispatcher", "dispatcher"))] == 2


def test_relay_figures(text):
    samples = parse(text)
    relay = labels("relay", "relay-0")
    assert samples[("sipcluster_sessions", relay)] == 2
    assert samples[("sipcluster_streams", relay)] == 4
    assert samples[("sipcluster_pps", relay)] == 199.5
    assert samples[("sipcluster_forwarded_total", relay)] == 9000
    assert samples[("sipcluster_relay_commands_total",
                    labels("relay", "relay-0", command="offer", result="ok"))] == 3
    assert samples[("sipcluster_relay_commands_total",
                    labels("relay", "relay-0", command="delete", result="error"))] == 1


def test_identity_fields_are_not_exported(text):
    for field in ("pid", "control", "addresses", "ports", "seen", "started_total", "id"):
        assert f"sipcluster_{field} " not in text and f"sipcluster_{field}{{" not in text


def test_cluster_gauges(text):
    samples = parse(text)
    assert samples[("sipcluster_calls", (("state", "answered"),))] == 2
    assert samples[("sipcluster_calls", (("state", "ended"),))] == 1
    assert samples[("sipcluster_registered_aors", ())] == 3
    assert samples[("sipcluster_registered_contacts", ())] == 4
    assert samples[("sipcluster_calls_created_last_minute", ())] == 5


def test_label_values_are_escaped():
    odd = dict(WORKER, name='we"ird\\name\nx')
    text = metrics.render([odd], None, NOW)
    assert 'process="we\\"ird\\\\name\\nx"' in text


def test_unknown_counters_get_a_family_of_their_own():
    name, help_text, extra = metrics.counter_family("store_unavailable")
    assert name == "sipcluster_store_unavailable_total" and extra == {}
    assert help_text
    assert metrics.counter_family("odd-name.x")[0] == "sipcluster_odd_name_x_total"


class FakeStore:
    def __init__(self, processes, fail=False):
        self._processes = processes
        self.fail = fail

    def processes(self):
        if self.fail:
            raise StoreUnavailable("gone")
        return self._processes


def test_a_source_reports_its_own_host_only_and_caches_the_cluster_figures(monkeypatch):
    reads = []
    monkeypatch.setattr(metrics, "cluster_figures", lambda store, now: reads.append(now) or {
        "calls": {}, "aors": len(reads), "contacts": 0})
    clock = iter([NOW, NOW + 1, NOW + 10]).__next__
    other_host = dict(WORKER, host="h2", name="worker-9")
    source = metrics.MetricsSource(FakeStore([WORKER, other_host]), "h1", clock=clock)
    first, second, third = source.text(), source.text(), source.text()
    assert 'process="worker-0"' in first and "worker-9" not in first
    assert "sipcluster_registered_aors 1" in second  # within CLUSTER_FIGURES_TTL: cached
    assert "sipcluster_registered_aors 2" in third
    assert reads == [NOW, NOW + 10]


def serve(source) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), metrics._handler(source))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_the_http_endpoint(monkeypatch):
    monkeypatch.setattr(metrics, "cluster_figures", lambda store, now: CLUSTER)
    server, base = serve(metrics.MetricsSource(FakeStore([WORKER]), "h1"))
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"] == metrics.CONTENT_TYPE
            assert b"sipcluster_calls_total" in reply.read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + "/nothing", timeout=5)
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_redis_trouble_is_a_503():
    server, base = serve(metrics.MetricsSource(FakeStore([], fail=True), "h1"))
    try:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(base + "/metrics", timeout=5)
        assert failed.value.code == 503
    finally:
        server.shutdown()
        server.server_close()
