"""sipctl's own logic (cluster/cli.py), without Redis: reading call records, codecs from
traces, CDR formats and times, the figures of `sipctl stats`, and the worker that carries
out `sipctl hangup`.  The commands against a running cluster are in
tests/integration/test_operator.py."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import datetime
from types import SimpleNamespace

import pytest
from callkit import START, TAG, Rig, roundtrip

from cluster import cli, ladder
from cluster.sip.rtp import StreamStats
from cluster.store import StoreUnavailable
from conftest import FIXTURES
from workers.sip import operator
from workers.sip.b2bua import call_tag

SEED = FIXTURES / "seed"
NOW = 1_800_000_000.0


def seed(name: str) -> bytes:
    return (SEED / f"{name}.sip").read_bytes()


def entry(name: str, direction: str, leg: str) -> dict:
    return {"t": 0.0, "dir": direction, "leg": leg, "peer": ["192.0.2.1", 5060],
            "first": "", "data": seed(name)}


# --------------------------------------------------------------------------- calls
def forked_call() -> dict:
    rig = Rig(restore=False)
    rig.start(forks=2)
    return roundtrip(rig.call.to_record())


def test_a_ringing_call_lists_every_fork():
    record = forked_call()
    summary = cli.call_summary(TAG, record, START + 12.34)
    assert (summary["call"], summary["caller"], summary["callee"], summary["state"]) == (
        TAG, "1002", "1009", "trying")
    assert summary["age"] == 12.3
    assert summary["host"] == record["a"]["host"] != ""  # the host that took the INVITE
    forks = [f"sc7.{TAG}.0", f"sc7.{TAG}.1"]
    assert summary["a_call_id"] == record["a"]["call_id"].decode()
    assert summary["b_call_id"] == ",".join(forks)
    assert [leg["name"] for leg in summary["legs"]] == ["a", "b0", "b1"]
    assert [leg["call_id"] for leg in summary["legs"][1:]] == forks
    assert summary["legs"][1]["peer"] == "192.168.31.50:60119"
    assert summary["legs"][0]["dialog"] is None  # no dialog before a To tag
    json.dumps(summary)  # every value is JSON


def test_an_answered_call_lists_the_answering_fork_only():
    record = forked_call()
    record.update(state="answered", winner=1, answered=START + 3)
    record["forks"][1]["dialog"] = {"state": "confirmed", "local_tag": "x", "remote_tag": "y",
                                    "local_seq": 1, "remote_seq": None,
                                    "remote_target": b"sip:1009@192.168.31.51:5062"}
    summary = cli.call_summary(TAG, record, START + 5)
    assert summary["b_call_id"] == f"sc7.{TAG}.1"
    assert summary["answered"] == START + 3
    assert summary["legs"][2]["dialog"] == {
        "state": "confirmed", "local_tag": "x", "remote_tag": "y", "local_cseq": 1,
        "remote_cseq": None, "remote_target": "sip:1009@192.168.31.51:5062"}


def test_the_codec_is_the_first_format_of_the_answer_the_caller_got():
    trace = [entry("04-invite", "in", "a"), entry("06-invite", "out", "b0"),
             entry("10-200", "in", "b0"), entry("12-200", "out", "a")]
    assert ladder.codec_of(trace) == "PCMA/8000"


def test_before_the_answer_the_codec_is_the_callers_first_offer():
    # Zoiper's offer: m=audio 62715 RTP/AVP 3 101 ... (3 is GSM, a static payload type)
    assert ladder.codec_of([entry("04-invite", "in", "a")]) == "GSM/8000"
    assert ladder.codec_of([entry("03-ack", "in", "a")]) == ""
    assert ladder.codec_of([]) == ""


def test_a_broken_sdp_gives_no_codec():
    broken = seed("12-200").replace(b"v=0", b"v=9")
    assert ladder.codec_of([{"dir": "out", "leg": "a", "data": broken}]) == ""


def test_stream_figures_come_from_the_relays_raw_counters():
    stats = StreamStats()
    stats.packets, stats.bytes, stats.clock_rate, stats.jitter = 150, 25800, 8000, 16.0
    figures = cli.stream_figures({"stats": stats.to_record()})
    assert (figures["packets"], figures["bytes"], figures["jitter_ms"]) == (150, 25800, 2.0)


class FakeStore:
    def __init__(self, calls: dict[str, dict], traces: dict[str, list] | None = None):
        self.calls = calls
        self.traces = traces or {}

    def load_call(self, tag):
        return (1, self.calls[tag]) if tag in self.calls else None

    def trace(self, tag):
        return self.traces.get(tag, [])


def test_a_call_is_found_by_either_legs_call_id_or_its_tag():
    a_call_id = "cqBcUqknj-sTLjz_cI-GKw.."
    tag = call_tag(a_call_id.encode())
    store = FakeStore({tag: {"state": "answered"}})
    assert cli.resolve_call(store, a_call_id) == (tag, {"state": "answered"})
    assert cli.resolve_call(store, f"sc12.{tag}.0") == (tag, {"state": "answered"})
    assert cli.resolve_call(store, tag) == (tag, {"state": "answered"})


def test_a_call_that_left_only_its_trace_is_found_without_a_record():
    tag = call_tag(b"gone@example")
    assert cli.resolve_call(FakeStore({}, {tag: [{"dir": "in"}]}), "gone@example") == (tag,
                                                                                       None)
    assert cli.resolve_call(FakeStore({}), "nothing@example") == (
        call_tag(b"nothing@example"), None)


# --------------------------------------------------------------------------- CDRs
CDR = {"id": "1795607051659-0", "caller": "1002", "callee": "1009", "a_call_id": "a@x",
       "b_call_id": "sc1.t.0", "start": "1795607048.585", "answer": "1795607048.594",
       "end": "1795607051.658", "duration": "3.064", "hangup_cause": "NORMAL_CLEARING",
       "q850": "16", "hangup_side": "operator", "sip_status": "200"}


def test_cdrs_in_json_have_numbers_and_nulls():
    typed = cli.typed_cdr(dict(CDR, answer=""))
    assert typed["duration"] == 3.064 and typed["q850"] == 16 and typed["sip_status"] == 200
    assert typed["start"] == 1795607048.585 and typed["answer"] is None
    assert typed["caller"] == "1002" and typed["id"] == CDR["id"]


def test_a_cdr_in_json_has_iso_times_beside_the_epochs_and_flat_media_as_numbers():
    typed = cli.typed_cdr(dict(CDR, billsec="3.064", codec="PCMU/8000", media_a_packets="150",
                               media_a_jitter_ms="0.4"))
    assert typed["start_time"] == "2026-11-25T11:44:08.585+00:00"
    assert typed["start"] == 1795607048.585 and typed["billsec"] == 3.064
    assert (typed["media_a_packets"], typed["media_a_jitter_ms"]) == (150, 0.4)
    assert typed["codec"] == "PCMU/8000"


def test_a_csv_cdr_holds_no_json_even_from_an_older_version():
    media = '{"a": {"packets": 150, "bytes": 25800, "lost": 0, "jitter_ms": 0.4}, "b": {}}'
    flat = cli.flat_cdr(dict(CDR, media=media))
    assert "media" not in flat and "start" not in flat
    assert (flat["media_a_packets"], flat["media_a_jitter_ms"]) == (150, 0.4)
    assert not [v for v in flat.values() if "{" in str(v)]


def test_the_relay_figures_of_a_cdr_become_an_object():
    media = '{"a": {"packets": 150, "bytes": 25800, "lost": 0, "jitter_ms": 0.4}}'
    assert cli.typed_cdr(dict(CDR, media=media))["media"] == {
        "a": {"packets": 150, "bytes": 25800, "lost": 0, "jitter_ms": 0.4}}
    assert cli.typed_cdr(dict(CDR, media="not json"))["media"] == "not json"


@pytest.mark.parametrize("text, expected", [
    ("1795600000", 1795600000.0),
    ("1795600000.5", 1795600000.5),
    ("90s", NOW - 90), ("15m", NOW - 900), ("2h", NOW - 7200), ("1d", NOW - 86400),
    ("2026-11-25T10:00:00", datetime(2026, 11, 25, 10, 0).timestamp()),
    ("2026-11-25 10:00", datetime(2026, 11, 25, 10, 0).timestamp()),
])
def test_since(text, expected):
    assert cli.parse_since(text, NOW) == pytest.approx(expected)


def test_a_since_that_means_nothing_is_an_error():
    with pytest.raises(SystemExit, match="--since"):
        cli.parse_since("yesterday", NOW)


@pytest.fixture
def cdr_output(monkeypatch, capsys):
    seen = {}

    def fake_read(store, since):
        seen["since"] = since
        return [CDR]

    monkeypatch.setattr(cli, "read_cdrs", fake_read)

    def run(*argv: str) -> str:
        args = cli.build_parser().parse_args(["cdr", *argv])
        assert cli.cmd_cdr(args, SimpleNamespace(), None) == 0
        return capsys.readouterr().out

    run.seen = seen
    return run


def test_cdr_formats(cdr_output):
    assert json.loads(cdr_output("--format", "json")) == [cli.typed_cdr(CDR)]
    assert json.loads(cdr_output("--json")) == [cli.typed_cdr(CDR)]
    rows = list(csv.DictReader(io.StringIO(cdr_output("--format", "csv"))))
    assert list(rows[0]) == cli.CDR_CSV_FIELDS  # the same columns whatever the CDR holds
    assert rows[0]["start_time"] == "2026-11-25T11:44:08.585+00:00"
    assert rows[0]["answer_time"] == "2026-11-25T11:44:08.594+00:00"
    assert rows[0]["end_time"] == "2026-11-25T11:44:11.658+00:00"
    assert {k: v for k, v in rows[0].items() if v} == {
        **{k: v for k, v in CDR.items() if k not in ("start", "answer", "end")},
        "start_time": rows[0]["start_time"], "answer_time": rows[0]["answer_time"],
        "end_time": rows[0]["end_time"]}
    table = cdr_output().splitlines()
    assert table[0].split()[:3] == ["START", "CALLER", "CALLEE"]
    assert "NORMAL_CLEARING" in table[1] and "operator" in table[1]


def test_cdr_since_is_passed_on(cdr_output):
    cdr_output("--since", "1795600000")
    assert cdr_output.seen["since"] == 1795600000.0


def test_cdrs_are_read_page_after_page():
    pages = {"0-0": [{"id": f"1-{i}"} for i in range(cli.CDR_PAGE)],
             f"1-{cli.CDR_PAGE - 1}": [{"id": "2-0"}]}
    store = SimpleNamespace(cdrs_after=lambda after, count: pages[after])
    records = cli.read_cdrs(store, 0.0)
    assert len(records) == cli.CDR_PAGE + 1 and records[-1] == {"id": "2-0"}


def test_cdrs_since_start_at_the_first_id_of_that_millisecond():
    seen = []
    store = SimpleNamespace(cdrs_after=lambda after, count: seen.append(after) or [])
    assert cli.read_cdrs(store, 1795600000.5) == []
    assert seen == ["1795600000499-18446744073709551615"]


# --------------------------------------------------------------------------- stats
def test_stats_add_up_the_live_processes_and_the_shared_state():
    processes = [
        {"role": "worker", "pid": 1, "seen": NOW, "started": NOW - 9, "requests_INVITE": 3,
         "responses_200": 4, "received_180": 1, "auth_forbidden": 2, "calls": 2,
         "parse_errors": 1, "inflight": 1},
        {"role": "worker", "pid": 2, "seen": NOW, "started": NOW - 9, "requests_INVITE": 1,
         "responses_200": 1, "auth_throttled": 5, "calls_ended": 1,
         "retransmissions_absorbed": 7},
        {"role": "dispatcher", "pid": 3, "received": 10, "forwarded": 9, "dropped": 1,
         "workers": ["w0", "w1"]},
        {"role": "relay", "pid": 4, "sessions": 1, "streams": 2, "pps": 50.0,
         "forwarded": 500, "media_timeouts": 1, "free_pairs": 10},
    ]
    counts = {"aors": 3, "contacts": 4, "calls_last_minute": 2,
              "calls": {"trying": 0, "ringing": 1, "early": 0, "answered": 1}}
    store = SimpleNamespace(processes=lambda: processes, live_counts=lambda now: counts)
    stats = cli.gather_stats(store, NOW)
    assert stats["processes"] == {"dispatcher": 1, "relay": 1, "worker": 2}
    assert stats["calls_created_last_minute"] == 2 and stats["calls_per_second"] == 0.033
    assert stats["active_calls"] == 2
    assert stats["calls_by_state"] == {"trying": 0, "ringing": 1, "early": 0, "answered": 1}
    assert stats["registrations"] == {"aors": 3, "contacts": 4}
    assert stats["requests_received"] == {"INVITE": 4}
    assert stats["responses_sent"] == {"200": 5}
    assert stats["responses_received"] == {"180": 1}
    assert stats["auth_failures"] == {"total": 7, "forbidden": 2, "throttled": 5}
    assert (stats["calls_set_up"], stats["calls_ended"]) == (2, 1)
    assert (stats["parse_errors"], stats["retransmissions_absorbed"]) == (1, 7)
    assert stats["dispatcher"] == {"received": 10, "forwarded": 9, "dropped": 1}
    assert stats["relays"] == {"relays": 1, "sessions": 1, "streams": 2,
                               "packets_per_second": 50.0, "packets_forwarded": 500,
                               "media_timeouts": 1, "port_pairs_free": 10}


# --------------------------------------------------------------------------- commands
@pytest.mark.parametrize("command", [["regs"], ["calls"], ["call", "x"], ["cluster"],
                                     ["stats"], ["cdr"], ["users", "list"]])
def test_every_listing_has_a_json_form(command):
    args = cli.build_parser().parse_args([*command, "--json"])
    assert args.json is True


def test_hangup_waits_five_seconds_unless_told():
    parser = cli.build_parser()
    assert parser.parse_args(["hangup", "abc@x"]).wait == 5.0
    assert parser.parse_args(["hangup", "abc@x", "--wait", "0"]).wait == 0.0


# --------------------------------------------------------------------------- hangup requests
# The other half of `sipctl hangup`: the worker that reads the request (workers/sip/operator).
class FakeB2BUA:
    def __init__(self, outcome):
        self.outcome = outcome
        self.asked: list[tuple[str, str]] = []

    def hangup(self, tag, side="system"):
        self.asked.append((tag, side))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def carried_out(outcome, age: float = 1.0):
    acked = []
    store = SimpleNamespace(ack_hangups=lambda ids: acked.extend(ids))
    worker = SimpleNamespace(b2bua=FakeB2BUA(outcome), counters=Counter(), store=store)
    request = {"tag": TAG, "call_id": "a@x", "by": "sipctl@ops",
               "at": f"{operator.time.time() - age:.3f}"}
    operator.carry_out(worker.b2bua, worker.store, worker.counters, "1-0", request)
    return worker, acked


def test_a_worker_ends_the_call_as_the_operator_and_acknowledges():
    worker, acked = carried_out(True)
    assert worker.b2bua.asked == [(TAG, "operator")]
    assert acked == ["1-0"] and worker.counters["operator_hangups"] == 1


def test_a_request_for_a_call_already_gone_is_acknowledged():
    worker, acked = carried_out(False)
    assert acked == ["1-0"] and worker.counters["operator_hangups"] == 0


def test_a_stale_request_is_dropped():
    worker, acked = carried_out(True, age=operator.MAX_AGE + 5)
    assert worker.b2bua.asked == [] and acked == ["1-0"]


def test_redis_trouble_leaves_the_request_pending_for_another_try():
    worker, acked = carried_out(StoreUnavailable("gone"))
    assert worker.b2bua.asked == [(TAG, "operator")] and acked == []


def test_a_configuration_error_is_one_line_with_a_suggestion(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cluster.toml"
    path.write_text("[registrar]\nmax_expire = 60\n")
    assert cli.main(["--config", str(path), "cluster"]) == 2
    assert capsys.readouterr().err == (f"sipctl: {path}: unknown setting registrar.max_expire "
                                       "(did you mean max_expires?)\n")
    path.write_text("")
    monkeypatch.setenv("SIPCLUSTER_AUTH_RELAM", "example.org")
    assert cli.main(["--config", str(path), "cluster"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean SIPCLUSTER_AUTH_REALM" in err


def test_sipctl_uses_the_realm_the_cluster_was_started_with(tmp_path, monkeypatch, capsys):
    """`SIPCLUSTER_SIP_ADVERTISED_ADDRESS=... make run`, then a plain `sipctl users add`:
    the user goes into the realm the cluster runs with, not the file's default."""
    from cluster import launch
    from cluster.config import load, write_overrides
    run = tmp_path / "run"
    monkeypatch.setattr(cli, "RUN_DIR", run)
    monkeypatch.setattr(cli, "OVERRIDES_FILE", run / "overrides.json")
    path = tmp_path / "cluster.toml"
    path.write_text("")
    overrides = {"SIPCLUSTER_SIP_ADVERTISED_ADDRESS": "192.0.2.7"}
    write_overrides(run / "overrides.json", overrides)
    launch.write_record(load(path, env=overrides, secret_file=None), run / "launch.json")

    assert cli.configuration(str(path), env={}).realm == "192.0.2.7"
    assert capsys.readouterr().err == ""  # nothing differs: nothing said
    config = cli.configuration(str(path), env={"SIPCLUSTER_AUTH_REALM": "other"})
    assert config.realm == "192.0.2.7"
    assert capsys.readouterr().err.count("realm 192.0.2.7 (this environment: other)") == 1
    other = tmp_path / "other.toml"
    other.write_text("")
    assert cli.configuration(str(other), env={}).realm == "127.0.0.1"  # another cluster


def test_bans_lists_source_reason_and_seconds_left(capsys):
    import json as json_module
    import time as time_module
    from types import SimpleNamespace

    from cluster import cli

    class Bans:
        def bans(self):
            return [{"ip": "192.0.2.7", "reason": "flood-invite", "at": time_module.time() - 40,
                     "seconds": 300, "by": "dispatcher@host-a", "left": 259.6}]

    assert cli.cmd_bans(SimpleNamespace(action=None, json=False, trusted=False), None, Bans()) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["SOURCE", "REASON", "LEFT", "SINCE", "BY"]
    assert table[1].split()[:3] == ["192.0.2.7", "flood-invite", "260s"]
    cli.cmd_bans(SimpleNamespace(action=None, json=True, trusted=False), None, Bans())
    row = json_module.loads(capsys.readouterr().out)[0]
    assert (row["source"], row["reason"], row["left"], row["by"]) == (
        "192.0.2.7", "flood-invite", 260, "dispatcher@host-a")
    assert cli.build_parser().parse_args(["bans", "unban", "192.0.2.7"]).ip == "192.0.2.7"
# --------------------------------------------------------------------------- passwords
class _Input(io.StringIO):
    def __init__(self, text: str, tty: bool):
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _add_args(*argv: str):
    return cli.build_parser().parse_args(["users", "add", "1002", *argv])


def test_the_password_is_asked_twice_without_echo_on_a_terminal():
    asked = []

    def prompt(text):
        asked.append(text)
        return "s3cret"
    assert cli.read_password(_add_args(), _Input("", tty=True), prompt) == "s3cret"
    assert asked == ["password for 1002: ", "again: "]
    answers = iter(["one", "two"])
    with pytest.raises(ValueError, match="differ"):
        cli.read_password(_add_args(), _Input("", tty=True), lambda _: next(answers))


def test_the_password_comes_from_stdin_with_password_stdin():
    args = _add_args("--password-stdin")
    assert cli.read_password(args, _Input("pa ss word\n", tty=False)) == "pa ss word"
    with pytest.raises(ValueError, match="empty"):
        cli.read_password(args, _Input("\n", tty=False))


def test_without_a_terminal_or_password_stdin_there_is_no_password():
    with pytest.raises(ValueError, match="--password-stdin"):
        cli.read_password(_add_args(), _Input("guess\n", tty=False))


def test_password_on_the_command_line_still_works_but_not_with_stdin():
    assert cli.read_password(_add_args("--password", "x1"), _Input("", tty=False)) == "x1"
    with pytest.raises(SystemExit):
        _add_args("--password", "x1", "--password-stdin")


    assert cli.build_parser().parse_args(["bans", "--trusted"]).trusted
