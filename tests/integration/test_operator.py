"""The operator's view of a running cluster: sipctl (as a subprocess, reading Redis) and the
host's Prometheus endpoint, during and after a SIPp call that stays up until the operator
hangs it up.

The call: SIPp registers the callee (1009) from the port its SIPp callee then answers on;
a SIPp caller (1002) calls it through the cluster (INVITE, 407, ACK, INVITE with digest,
100, 180, 200, ACK), its media anchored on the cluster's one RTP relay, and both sides wait
for a BYE.  The test follows it with ``sipctl calls``/``call``, ends it with ``sipctl
hangup``, and checks the CDR, the registration listing and the metrics counters against
what the test itself caused.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import time
import urllib.request
from datetime import UTC, datetime

import pytest
from calls_helpers import (
    PASSWORD,
    SipMessage,
    callee,
    caller,
    start_listening,
    wait_for,
)
from harness import running_cluster
from sipp import SIPP, Sipp
from sipua import UA

from conftest import documented_metrics

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed")

DB = 11  # this module's Redis database on the session's redis-server
CALLER, CALLEE = "1002", "1009"
HOLD = 2.0  # seconds the call stays answered before the operator hangs it up
RELAY = "test-host/relay-0"
SETTINGS = {"media": {"mode": "relay", "relays": 1, "rtp_port_min": 37000,
                      "rtp_port_max": 37199}}
LADDER_ROW = re.compile(r"^\+\d+\.\d+\s*\|(.*)\|(.*)\|(.*)$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    redis_server.client(db=DB).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    with running_cluster(tmp_path_factory.mktemp("operator"), url, workers=2,
                         settings=SETTINGS) as running:
        for user in (CALLER, CALLEE):
            running.add_user(user, PASSWORD)
        yield running


# ------------------------------------------------------------------ metrics
def settled_scrape(cluster) -> dict[tuple[str, frozenset], float]:
    """A scrape once the counters stopped moving: workers publish theirs with their
    heartbeat (every second), so what the start-up's OPTIONS probes did may show up a
    second late and be counted as this test's."""
    def counters(samples):
        return {key: value for key, value in samples.items() if key[0].endswith("_total")
                and key[0].startswith("sipcluster_")}  # process_cpu_seconds_total always moves

    previous = scrape(cluster)
    for _ in range(10):
        time.sleep(1.2)  # longer than a heartbeat
        current = scrape(cluster)
        if counters(current) == counters(previous):
            return current
        previous = current
    raise AssertionError("the counters kept moving with no traffic")


def scrape(cluster) -> dict[tuple[str, frozenset], float]:
    url = f"http://127.0.0.1:{cluster.config.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def total(samples, name: str, **labels: str) -> float:
    """The sum of a family's samples over every process, restricted to ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


# What the test's own traffic must add to the counters (nothing else talks to this
# cluster).  Workers: requests received are the SIPp registration (2), a REGISTER with a
# wrong password (2), the caller's INVITE twice and ACK twice; sent, the B-leg INVITE and
# ACK and a BYE each way; responses sent, 401 twice, 407 and 403, 100 and 180 to the caller,
# 200 to the registration and to the caller; received, the callee's 180 and 200 and both
# 200s to the BYEs.  The relay: one session, offered, answered and deleted.
EXPECTED_DELTAS = {
    ("worker", "sipcluster_sip_requests_received_total", ("method", "REGISTER")): 4,
    ("worker", "sipcluster_sip_requests_received_total", ("method", "INVITE")): 2,
    ("worker", "sipcluster_sip_requests_received_total", ("method", "ACK")): 2,
    ("worker", "sipcluster_sip_requests_received_total", ("method", "BYE")): 0,
    ("worker", "sipcluster_sip_requests_sent_total", ("method", "INVITE")): 1,
    ("worker", "sipcluster_sip_requests_sent_total", ("method", "ACK")): 1,
    ("worker", "sipcluster_sip_requests_sent_total", ("method", "BYE")): 2,
    ("worker", "sipcluster_sip_responses_sent_total", ("code", "100")): 1,
    ("worker", "sipcluster_sip_responses_sent_total", ("code", "180")): 1,
    ("worker", "sipcluster_sip_responses_sent_total", ("code", "200")): 2,
    ("worker", "sipcluster_sip_responses_sent_total", ("code", "401")): 2,
    ("worker", "sipcluster_sip_responses_sent_total", ("code", "403")): 1,
    ("worker", "sipcluster_sip_responses_sent_total", ("code", "407")): 1,
    ("worker", "sipcluster_sip_responses_received_total", ("code", "180")): 1,
    ("worker", "sipcluster_sip_responses_received_total", ("code", "200")): 3,
    ("worker", "sipcluster_auth_failures_total", ("outcome", "forbidden")): 1,
    ("worker", "sipcluster_calls_started_total", ()): 1,
    ("worker", "sipcluster_calls_ended_total", ()): 1,
    ("worker", "sipcluster_operator_hangups_total", ()): 1,
    ("worker", "sipcluster_sip_parse_errors_total", ()): 1,
    ("worker", "sipcluster_post_dial_delay_seconds_count", ()): 1,
    ("worker", "sipcluster_register_latency_seconds_count", ()): 4,
    ("worker", "sipcluster_invite_first_response_seconds_count", ()): 1,
    ("relay", "sipcluster_relay_commands_total", ("command", "offer", "result", "ok")): 1,
    ("relay", "sipcluster_relay_commands_total", ("command", "answer", "result", "ok")): 1,
    ("relay", "sipcluster_relay_commands_total", ("command", "delete", "result", "ok")): 1,
    ("relay", "sipcluster_relay_sessions_created_total", ()): 1,
    ("relay", "sipcluster_relay_closed_sessions_total", ("reason", "deleted")): 1,
}


def deltas(before, after) -> dict[tuple, float]:
    found = {}
    for key in EXPECTED_DELTAS:
        role, name, pairs = key
        labels = dict(zip(pairs[::2], pairs[1::2], strict=True), role=role)
        found[key] = total(after, name, **labels) - total(before, name, **labels)
    return found


# ------------------------------------------------------------------ ladders
def ladder_arrows(text: str) -> dict[str, list[tuple[str, str]]]:
    """Per side ("caller", "callee"): (direction seen from the cluster, first word of the
    label), in order, retransmissions left out."""
    sides: dict[str, list[tuple[str, str]]] = {"caller": [], "callee": []}
    for line in text.splitlines():
        row = LADDER_ROW.match(line)
        if row is None or "retransmission" in row.group(3):
            continue
        left, right = row.group(1), row.group(2)
        lane, side = (left, "caller") if left.strip() else (right, "callee")
        rightwards = lane.endswith(">")
        assert rightwards != lane.startswith("<"), f"an arrow has one head: {line!r}"
        to_cluster = rightwards if side == "caller" else not rightwards
        sides[side].append(("in" if to_cluster else "out", lane.strip("<>- ").split()[0]))
    return sides


def sipp_arrows(messages: list[SipMessage]) -> list[tuple[str, str]]:
    """What the cluster saw of one SIPp instance: its sent messages arrived ("in")."""
    seen, arrows = set(), []
    for msg in messages:
        if (msg.direction, msg.text) in seen:
            continue  # SIPp's own retransmission
        seen.add((msg.direction, msg.text))
        word = str(msg.status) if msg.is_response else msg.method
        arrows.append(("in" if msg.direction == "sent" else "out", word))
    return arrows


def call_id_of(messages: list[SipMessage], direction: str, method: str) -> str:
    return next(m.header("Call-ID") for m in messages
                if m.direction == direction and not m.is_response and m.method == method)


# ------------------------------------------------------------------ the tests
def test_unknown_calls_are_refused_with_an_error(cluster):
    for command in ("call", "hangup"):
        done = cluster.sipctl(command, "no-such-call@nowhere", check=False)
        assert done.returncode == 1
        assert "no" in done.stderr and "call" in done.stderr


def test_an_operator_follows_a_call_ends_it_and_reads_its_cdr(cluster, tmp_path):
    started = time.time()
    before = settled_scrape(cluster)

    # The callee registers with SIPp, from the port its SIPp callee answers on.
    uas = callee(cluster, tmp_path / "uas", scenario="call_uas.xml", timeout=30)
    registration = Sipp("register_md5.xml", cluster.address, tmp_path / "register", calls=1,
                        users=[(CALLEE, PASSWORD)], timeout=10, port=uas.sipp.port).run()
    assert registration.returncode == 0, registration.summary()
    regs = cluster.sipctl_json("regs", CALLEE)
    assert [r["contact"] for r in regs] == [f"sip:{CALLEE}@127.0.0.1:{uas.port}"]
    assert 3590 <= regs[0]["expires_in"] <= 3600
    assert regs[0]["source"] == f"127.0.0.1:{uas.port}" and regs[0]["user_agent"] == "sipp"

    # A wrong password and a broken datagram, for the failure counters.
    with UA(cluster.address, user=CALLER) as ua:
        assert ua.register("wrong-password").status == 403
        ua.send(b"SIP/2.0 200 OK\r\nCall-ID: broken@operator\r\n\r\n")

    start_listening(uas)
    uac = caller(cluster, tmp_path / "uac", CALLER, CALLEE, scenario="call_uac_wait_bye.xml",
                 timeout=30)
    uac.sipp.start()
    try:
        # During the call: listed with both legs, answered.  The codec comes from the
        # trace, which reaches Redis up to one flush tick (workers/sip/tracebuf.py) after
        # the record says answered.
        def answered():
            listed = [c for c in cluster.sipctl_json("calls") if c["caller"] == CALLER]
            return listed if (listed and listed[0]["state"] == "answered"
                              and listed[0]["codec"]) else None
        listed = wait_for(answered, timeout=10, step=0.2)
        assert listed, cluster.sipctl("calls").stdout + cluster.log_tail()
        call = listed[0]
        a_call_id = call_id_of(uac.messages, "sent", "INVITE")
        b_call_id = call_id_of(uas.messages, "received", "INVITE")
        assert call["callee"] == CALLEE and call["a_call_id"] == a_call_id
        assert call["b_call_id"] == b_call_id and call["worker"].startswith("worker-")
        assert [(leg["name"], leg["call_id"], leg["state"]) for leg in call["legs"]] == [
            ("a", a_call_id, "answered"), ("b0", b_call_id, "answered")]
        assert [leg["dialog"]["state"] for leg in call["legs"]] == ["confirmed", "confirmed"]
        assert (call["codec"], call["relay"]) == ("PCMU/8000", RELAY)
        media = cluster.sipctl_json("call", a_call_id)["media"]
        assert media["relay"] == RELAY
        assert sorted(leg["name"] for leg in media["legs"]) == ["a", "b"]
        sides = [side for leg in media["legs"] for side in leg["sides"]]
        assert all(side["port"] in range(37000, 37200) for side in sides)
        assert [side["figures"]["packets"] for side in sides] == [0, 0]  # SIPp sends no RTP
        shown = cluster.sipctl("call", a_call_id).stdout
        assert f"relay {RELAY}" in shown and "PACKETS" in shown

        # The ladder so far matches both SIPp logs, whichever leg names the call.
        assert wait_for(lambda: any(m.method == "ACK" for m in uas.messages), timeout=5)
        during = wait_for(lambda: _matching_ladder(cluster, b_call_id, uac, uas), timeout=5)
        assert during, _ladder_report(cluster, b_call_id, uac, uas)

        # The operator hangs up after HOLD seconds: both SIPp sides get a BYE and answer it.
        time.sleep(max(0.0, call["answered"] + HOLD - time.time()))
        hung_up_at = time.time()
        done = cluster.sipctl("hangup", a_call_id)
        assert "ended" in done.stdout
        uac.result = uac.sipp.wait()
        uas.result = uas.sipp.wait()
    finally:
        uac.sipp.stop()
        uas.sipp.stop()
    assert uac.ok and uas.ok, uac.report() + "\n" + uas.report()
    for party in (uac, uas):
        byes = [m for m in party.messages if m.direction == "received" and m.method == "BYE"]
        assert len(byes) == 1 and "NORMAL_CLEARING" in byes[0].header("Reason")
    # X-Call-ID (calls.xcid_header): every request the callee got names the caller's Call-ID,
    # so sngrep and Homer group both legs; nothing the caller got carries it.
    to_callee = [m for m in uas.messages if m.direction == "received" and not m.is_response]
    assert {m.method for m in to_callee} >= {"INVITE", "ACK", "BYE"}
    assert [m.header("X-Call-ID") for m in to_callee] == [a_call_id] * len(to_callee)
    assert not [m for m in uac.messages if m.direction == "received" and m.header("X-Call-ID")]

    # After the call: the whole ladder matches, the call is no longer listed as live.
    after_call = wait_for(lambda: _matching_ladder(cluster, a_call_id, uac, uas), timeout=5)
    assert after_call, _ladder_report(cluster, a_call_id, uac, uas)
    assert ("out", "BYE") in after_call["caller"] and ("in", "200") in after_call["callee"]
    assert not [c for c in cluster.sipctl_json("calls") if c["caller"] == CALLER]

    # The CDR: answered when the callee's 200 came, ended by the operator HOLD s later.
    cdrs = [c for c in json.loads(cluster.sipctl("cdr", "--since", f"{started:.3f}",
                                         "--format", "json").stdout)
            if c["a_call_id"] == a_call_id]
    assert len(cdrs) == 1, cdrs
    cdr = cdrs[0]
    assert (cdr["caller"], cdr["callee"], cdr["b_call_id"]) == (CALLER, CALLEE, b_call_id)
    assert (cdr["hangup_side"], cdr["hangup_cause"], cdr["sip_status"]) == (
        "operator", "NORMAL_CLEARING", 200)
    assert cdr["answer"] == pytest.approx(call["answered"], abs=0.002)
    assert cdr["start"] == pytest.approx(call["created"], abs=0.002)
    assert cdr["billsec"] == pytest.approx(cdr["end"] - cdr["answer"], abs=0.002)
    assert cdr["duration"] == pytest.approx(cdr["end"] - cdr["start"], abs=0.002)
    assert HOLD <= cdr["billsec"] < cdr["duration"] <= hung_up_at - call["created"] + 1.0
    uac_port = next(m for m in uac.messages if m.direction == "sent").header("Via")
    assert cdr["caller_source"] == "127.0.0.1:" + re.search(r":(\d+)", uac_port).group(1)
    assert cdr["codec"] == "PCMU/8000"
    assert (cdr["media_a_packets"], cdr["media_b_packets"]) == (0, 0)  # SIPp sends no RTP
    assert cdr["start_time"] == datetime.fromtimestamp(cdr["start"], UTC).isoformat(
        timespec="milliseconds")
    # The CSV a billing system takes: fixed columns, ISO 8601 times, no JSON in a cell.
    csv_text = cluster.sipctl("cdr", "--since", f"{started:.3f}", "--format", "csv").stdout
    rows = [r for r in csv.DictReader(io.StringIO(csv_text)) if r["a_call_id"] == a_call_id]
    assert len(rows) == 1
    row = rows[0]
    assert list(row)[:9] == ["id", "caller", "callee", "caller_source", "start_time",
                             "answer_time", "end_time", "duration", "billsec"]
    assert datetime.fromisoformat(row["answer_time"]).timestamp() == pytest.approx(
        cdr["answer"], abs=0.001)
    assert float(row["billsec"]) == cdr["billsec"] and row["codec"] == "PCMU/8000"
    assert row["media_a_packets"] == "0" and row["caller_source"] == cdr["caller_source"]
    assert not [v for v in row.values() if "{" in v or "[" in v]

    # The metrics endpoint: the workers' counters moved by exactly what this test did.
    moved = wait_for(lambda: (found := deltas(before, scrape(cluster))) == EXPECTED_DELTAS
                     and found, timeout=5, step=0.2)
    found = deltas(before, scrape(cluster))
    assert moved == EXPECTED_DELTAS, {k: (v, EXPECTED_DELTAS[k]) for k, v in found.items()
                                      if v != EXPECTED_DELTAS[k]}
    after = scrape(cluster)
    assert total(after, "sipcluster_up", role="worker") == 2
    assert total(after, "sipcluster_up", role="dispatcher") == 1
    assert total(after, "sipcluster_up", role="relay") == 1
    assert wait_for(lambda: total(scrape(cluster), "sipcluster_registered_contacts") == 1,
                    timeout=8, step=0.5)

    # sipctl stats and cluster agree with the endpoint.
    stats = cluster.sipctl_json("stats")
    assert stats["registrations"] == {"aors": 1, "contacts": 1}
    assert stats["active_calls"] == 0 and stats["calls_ended"] == 1
    assert stats["auth_failures"]["forbidden"] >= 1 and stats["parse_errors"] >= 1
    processes = cluster.sipctl_json("cluster")
    assert sorted(p["role"] for p in processes) == ["dispatcher", "relay", "worker", "worker"]
    assert all(p["age"] < 3 for p in processes)


def _matching_ladder(cluster, call_id: str, uac, uas):
    """The ladder's arrows per side when they equal the SIPp logs' messages, else None."""
    arrows = ladder_arrows(cluster.sipctl("call", call_id).stdout)
    wanted = {"caller": sipp_arrows(uac.messages), "callee": sipp_arrows(uas.messages)}
    return arrows if arrows == wanted else None


def _ladder_report(cluster, call_id: str, uac, uas) -> str:
    return (cluster.sipctl("call", call_id, check=False).stdout
            + f"\nUAC: {sipp_arrows(uac.messages)}\nUAS: {sipp_arrows(uas.messages)}\n"
            + cluster.log_tail())


# ------------------------------------------------------------------ the real scrape
PROMTOOL = shutil.which("promtool")


def test_a_real_scrape_has_every_documented_metric_and_passes_promtool(cluster):
    """The scrape has a family for every metric deploy/README.md names (each is typed from
    the first scrape on, samples or not), and after the call above (histograms filled,
    response codes seen) promtool (the `prometheus` package; .ci/run installs it) finds
    nothing to lint in it."""
    url = f"http://127.0.0.1:{cluster.config.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    typed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert sorted(documented_metrics() - typed) == []
    sampled = {re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0].split()[0])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert sorted(documented_metrics() - sampled) == []  # every one has a series by now
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt package prometheus)")
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
