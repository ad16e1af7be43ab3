"""The Prometheus endpoint (cluster/metrics.py): heartbeats in, exposition out."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import metrics
from cluster.store import StoreUnavailable
from conftest import ROOT, documented_metrics

NOW = 1_800_000_000.0
PID = os.getpid()  # a process whose /proc entry exists, for the process_* figures
WORKER = {"role": "worker", "host": "h1", "name": "worker-0", "pid": PID, "started": NOW - 60,
          "seen": NOW - 0.5, "inflight": 3, "received": 120, "requests_INVITE": 7,
          "requests_REGISTER": 40, "requests_XYZZY": 2, "sent_BYE": 2, "responses_100": 9,
          "responses_200": 45, "responses_401": 12, "received_200": 6, "auth_forbidden": 2,
          "calls": 5, "calls_ended": 4, "parse_errors": 1,
          "hist_register_latency": [3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2.5]}
DISPATCHER = {"role": "dispatcher", "host": "h1", "name": "dispatcher", "pid": PID,
              "started": NOW - 70, "seen": NOW - 0.25, "workers": ["worker-0", "worker-1"],
              "received": 130, "forwarded": 128, "dropped": 2}
RELAY = {"role": "relay", "host": "h1", "name": "relay-0", "pid": PID, "id": "h1/relay-0",
         "started": NOW - 50, "seen": NOW - 1, "control": ["127.0.0.1", 30000],
         "addresses": {"4": "127.0.0.1"}, "ports": [20002, 24999], "sessions": 2,
         "streams": 4, "pps": 199.5, "free_pairs": 1247, "forwarded": 9000,
         "cmd_offer_ok": 3, "cmd_delete_error": 1, "sessions_expired": 1}
COUNTS = {"calls": {"trying": 1, "answered": 2}, "aors": 3, "contacts": 4,
          "calls_last_minute": 5}


class FakeStore:
    def __init__(self, processes, fail=False, counts=COUNTS):
        self._processes = processes
        self.fail = fail
        self.counts = counts

    def processes(self):
        if self.fail:
            raise StoreUnavailable("gone")
        return self._processes

    def live_counts(self, now):
        return self.counts


def scrape(processes, counts=COUNTS) -> str:
    collector = metrics.ClusterCollector(FakeStore(processes, counts=counts), "h1",
                                         clock=lambda: NOW)
    return metrics.exposition(collector).decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def labels(role: str, process: str, **extra: str) -> tuple:
    return tuple(sorted({"role": role, "process": process, "host": "h1", **extra}.items()))


@pytest.fixture
def text() -> str:
    return scrape([DISPATCHER, WORKER, RELAY])


def test_one_family_per_name_and_one_type_each(text):
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types, f"{name} typed twice"
            types[name] = kind
    # A gauge and a counter never share a base name (the old sipcluster_calls and
    # sipcluster_calls_total did).
    bases = [re.sub(r"_total$", "", n) for n in types]
    assert len(bases) == len(set(bases))


def test_worker_counters_map_to_labelled_families(text):
    found = samples(text)
    w = ("worker", "worker-0")
    assert found[("sipcluster_sip_requests_received_total", labels(*w, method="INVITE"))] == 7
    assert found[("sipcluster_sip_requests_received_total", labels(*w, method="OTHER"))] == 2
    assert found[("sipcluster_sip_requests_sent_total", labels(*w, method="BYE"))] == 2
    assert found[("sipcluster_sip_responses_sent_total", labels(*w, code="401"))] == 12
    assert found[("sipcluster_sip_responses_received_total", labels(*w, code="200"))] == 6
    assert found[("sipcluster_auth_failures_total", labels(*w, outcome="forbidden"))] == 2
    assert found[("sipcluster_auth_failures_total", labels(*w, outcome="locked"))] == 0
    assert found[("sipcluster_calls_started_total", labels(*w))] == 5
    assert found[("sipcluster_sip_parse_errors_total", labels(*w))] == 1
    assert found[("sipcluster_worker_inflight_requests", labels(*w))] == 3
    assert "XYZZY" not in text


def test_sip_datagrams_and_rtp_packets_have_names_of_their_own(text):
    found = samples(text)
    assert found[("sipcluster_sip_datagrams_received_total",
                  labels("dispatcher", "dispatcher"))] == 130
    assert found[("sipcluster_sip_datagrams_received_total", labels("worker", "worker-0"))] \
        == 120
    assert found[("sipcluster_sip_datagrams_forwarded_total",
                  labels("dispatcher", "dispatcher"))] == 128
    assert found[("sipcluster_rtp_packets_forwarded_total", labels("relay", "relay-0"))] \
        == 9000
    assert not [k for k in found if k[0].startswith("sipcluster_sip_datagrams")
                and ("role", "relay") in k[1]]
    assert found[("sipcluster_workers_joined", labels("dispatcher", "dispatcher"))] == 2


def test_relay_figures_have_rtpengine_shapes_and_no_rate_gauge(text):
    found = samples(text)
    r = ("relay", "relay-0")
    assert found[("sipcluster_relay_sessions", labels(*r))] == 2
    assert found[("sipcluster_relay_closed_sessions_total", labels(*r, reason="expired"))] == 1
    assert found[("sipcluster_relay_closed_sessions_total", labels(*r, reason="deleted"))] == 0
    assert found[("sipcluster_relay_commands_total",
                  labels(*r, command="offer", result="ok"))] == 3
    assert found[("sipcluster_relay_commands_total",
                  labels(*r, command="answer", result="error"))] == 0
    assert "pps" not in text and "per_second" not in text


def test_every_family_is_there_at_zero_before_any_event():
    bare = [{k: v for k, v in p.items() if k in metrics.IDENTITY_FIELDS}
            for p in (DISPATCHER, WORKER, RELAY)]
    text = scrape(bare, {"calls": {}, "aors": 0, "contacts": 0})
    found = samples(text)
    for fam in metrics.FAMILIES:
        suffix = "_total" if fam.kind == "counter" else ""
        assert f"# TYPE {metrics.PREFIX}{fam.name}{suffix} {fam.kind}" in text
        if fam.label_names and not fam.zero:
            continue  # status codes: the family is there, its series come with the codes
        for role in fam.roles:
            process = {"dispatcher": "dispatcher", "worker": "worker-0", "relay": "relay-0"}
            zeros = fam.zero or ((),)
            for values in zeros:
                key = (metrics.PREFIX + fam.name + suffix,
                       labels(role, process[role], **dict(zip(fam.label_names, values,
                                                              strict=True))))
                assert key in found, key
    for spec in metrics.HISTOGRAMS:
        key = (f"sipcluster_{spec.name}_seconds_count", labels("worker", "worker-0"))
        assert found[key] == 0


def test_histograms_are_cumulative_with_their_sum(text):
    found = samples(text)
    w = labels("worker", "worker-0")

    def bucket(le):
        return found[("sipcluster_register_latency_seconds_bucket",
                      tuple(sorted((*w, ("le", le)))))]
    assert bucket("0.001") == 3 and bucket("0.0025") == 4 and bucket("1.0") == 4
    assert bucket("+Inf") == 5
    assert found[("sipcluster_register_latency_seconds_count", w)] == 5
    assert found[("sipcluster_register_latency_seconds_sum", w)] == 2.5


def test_a_histogram_puts_a_bound_in_its_own_bucket():
    hist = metrics.Histogram(metrics.HISTOGRAM_SPECS["register_latency"])
    for seconds in (0.001, 0.0011, 5.0):
        hist.observe(seconds)
    assert hist.heartbeat() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 5.0021]


def test_process_figures_are_labelled_per_process(text):
    found = samples(text)
    for role, process in (("dispatcher", "dispatcher"), ("worker", "worker-0"),
                          ("relay", "relay-0")):
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                     "process_open_fds", "process_start_time_seconds"):
            assert found[(name, labels(role, process))] > 0


def test_cluster_gauges(text):
    found = samples(text)
    assert found[("sipcluster_active_calls", (("state", "answered"),))] == 2
    assert found[("sipcluster_active_calls", (("state", "ringing"),))] == 0
    assert found[("sipcluster_registered_aors", ())] == 3
    assert found[("sipcluster_registered_contacts", ())] == 4


def test_label_values_are_escaped():
    odd = dict(WORKER, name='we"ird\\name\nx')
    assert 'process="we\\"ird\\\\name\\nx"' in scrape([odd])


def test_unknown_counters_get_a_family_of_their_own():
    found = samples(scrape([dict(WORKER, **{"odd-name.x": 4})]))
    assert found[("sipcluster_odd_name_x_total", labels("worker", "worker-0"))] == 4


def test_the_endpoint_reports_its_own_host_only():
    other_host = dict(WORKER, host="h2", name="worker-9")
    text = scrape([WORKER, other_host])
    assert 'process="worker-0"' in text and "worker-9" not in text


def test_every_documented_metric_is_exported_from_the_start():
    """deploy/README.md's table names exactly what a scrape holds before any event."""
    text = scrape([{k: v for k, v in p.items() if k in metrics.IDENTITY_FIELDS}
                   for p in (DISPATCHER, WORKER, RELAY)], {"calls": {}, "aors": 0,
                                                           "contacts": 0})
    exported = {f.name + ("_total" if f.type == "counter" else "")
                for f in text_string_to_metric_families(text)}
    assert documented_metrics() == exported


# The names the alert rules and the dashboard use must be metrics the endpoint exports (the
# documented list, which the test above ties to the exposition).
METRIC_NAME = re.compile(r"\b((?:sipcluster|process)_[a-z_]+?)(?:_bucket|_sum|_count)?\b")
PROMTOOL = shutil.which("promtool")


def _used(text: str) -> set[str]:
    return {m.group(1) for m in METRIC_NAME.finditer(text)}


def test_the_alert_rules_and_the_dashboard_use_exported_metrics_only():
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "sipcluster.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    documented = documented_metrics()
    assert _used(rules) and _used(exprs)
    assert sorted(_used(rules) - documented) == []
    assert sorted(_used(exprs) - documented) == []


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt package prometheus)")
def test_promtool_accepts_the_rules_and_the_scrape_configuration():
    for args in (["check", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
                 ["check", "config", str(ROOT / "deploy" / "prometheus.yml")]):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr


def serve(collector) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), metrics._handler(collector))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_the_http_endpoint():
    server, base = serve(metrics.ClusterCollector(FakeStore([WORKER]), "h1"))
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"] == metrics.CONTENT_TYPE
            assert b"sipcluster_calls_started_total" in reply.read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + "/nothing", timeout=5)
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_redis_trouble_is_a_503():
    server, base = serve(metrics.ClusterCollector(FakeStore([], fail=True), "h1"))
    try:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(base + "/metrics", timeout=5)
        assert failed.value.code == 503
    finally:
        server.shutdown()
        server.server_close()
