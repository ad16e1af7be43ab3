"""Hostile text from the wire reaches no log line, CDR listing or terminal unescaped.

Three inputs, each sent by a real UA to a running cluster: an authenticated INVITE whose
dialled number percent-decodes to CR LF and a forged log record (refused with 400 before
it is named anywhere), an INVITE whose Call-ID carries ESC, NUL and backspace (carried
through to its CDR raw, shown escaped), and a REGISTER whose User-Agent clears a terminal
(``ESC[2J``).  The test reads every log file of the cluster, ``sipctl cdr`` in its three
formats and ``sipctl regs``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from calls_helpers import PASSWORD, answers_to, provision
from harness import running_cluster, wait_for
from sipua import UA

DB = 2  # this module's Redis database on the session's redis-server
ROOT = Path(__file__).resolve().parents[2]
FORGED = "2026-01-01 00:00:00,000 CRITICAL worker-0[1] b2bua: FORGED-LOG-LINE"
CALL_ID = "esc\x1b[2J\x00\x08id@test"
CALL_ID_SHOWN = "esc\\x1b[2J\\x00\\x08id@test"
USER_AGENT = "x\x1b[2Jy"
CONTROLS = {chr(c) for c in range(0x20)} - {"\n"} | {"\x7f"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    redis_server.client(db=DB).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    with running_cluster(tmp_path_factory.mktemp("escaping"), url, workers=2) as running:
        provision(running, ["1002", "1003", "1004"])
        yield running


def raw_controls(text: str) -> set[str]:
    return {c for c in text if c in CONTROLS}


def all_logs(cluster) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="surrogateescape")
                     for path in sorted(cluster.log_dir.glob("*.log")))


def invite(ua: UA, user_part: str, call_id: str, cseq: int, auth: str | None = None) -> bytes:
    uri = f"sip:{user_part}@127.0.0.1"
    headers = [f"Contact: <sip:{ua.user}@127.0.0.1:{ua.port}>"]
    if auth:
        headers.append(f"Proxy-Authorization: {auth}")
    data = ua.request("INVITE", uri, headers, cseq=cseq)
    return (data.replace(f"To: <sip:{ua.user}@127.0.0.1>".encode(), f"To: <{uri}>".encode())
            .replace(f"Call-ID: {ua.call_id}".encode(), f"Call-ID: {call_id}".encode()))


def authenticated_call(cluster, user_part: str, call_id: str):
    """INVITE, 407, INVITE with credentials for the same Request-URI: its final answer."""
    with UA(cluster.address, user="1002") as ua:
        ua.send(invite(ua, user_part, call_id, 1))
        challenge = answers_to(ua, 1, 10.0)
        assert challenge is not None and challenge.status == 407
        as_www = dataclasses.replace(challenge, headers=[
            ("WWW-Authenticate", v) for v in challenge.all("Proxy-Authenticate")])
        auth = ua.authorization(as_www, "INVITE", f"sip:{user_part}@127.0.0.1", PASSWORD)
        ua.send(invite(ua, user_part, call_id, 2, auth))
        return answers_to(ua, 2, 10.0)


def test_a_dialled_number_that_decodes_to_cr_lf_is_refused_and_forges_nothing(cluster):
    user_part = "99%0d%0a" + quote(FORGED, safe="")
    reply = authenticated_call(cluster, user_part, "forged-" + str(time.time()) + "@test")
    assert reply is not None and reply.status == 400, reply
    assert "control" in reply.reason.lower()
    logs = all_logs(cluster)
    assert not [line for line in logs.splitlines() if line.startswith(FORGED[:23])]
    assert not raw_controls(logs)
    assert not [c for c in cluster.store.cdrs_after() if "FORGED" in json.dumps(c)]


def test_a_call_id_with_esc_nul_and_backspace_is_shown_escaped(cluster):
    reply = authenticated_call(cluster, "1003", CALL_ID)  # known, not registered
    assert reply is not None and reply.status == 480, reply
    cdrs = wait_for(lambda: [c for c in cluster.store.cdrs_after()
                             if c.get("a_call_id") == CALL_ID], 5.0)
    assert cdrs, "the stream keeps the raw Call-ID"
    # The worker logged the attempt with its Call-ID, escaped, on one line.
    line = wait_for(lambda: next((x for x in all_logs(cluster).splitlines()
                                  if f"call-id={CALL_ID_SHOWN} " in x), None), 5.0)
    assert line and "1003" in line
    assert not raw_controls(all_logs(cluster))

    text = cluster.sipctl("cdr", "--format", "csv").stdout
    assert not raw_controls(text) and "\r" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["callee"] for r in rows if r["a_call_id"] == CALL_ID_SHOWN] == ["1003"]
    assert len(text.splitlines()) == len(rows) + 1  # one line per record

    table = cluster.sipctl("cdr").stdout
    assert CALL_ID_SHOWN in table and not raw_controls(table)

    as_json = cluster.sipctl("cdr", "--format", "json").stdout
    assert not raw_controls(as_json) and "\\u001b" in as_json
    assert CALL_ID in [c["a_call_id"] for c in json.loads(as_json)]


def test_a_user_agent_that_clears_the_terminal_is_listed_escaped(cluster):
    with UA(cluster.address, user="1004") as ua:
        reply = ua.register(PASSWORD, extra=[f"User-Agent: {USER_AGENT}"])
    assert reply is not None and reply.status == 200
    listing = cluster.sipctl("regs").stdout
    assert "x\\x1b[2Jy" in listing and not raw_controls(listing)
    as_json = cluster.sipctl("regs", "--json").stdout
    assert not raw_controls(as_json)
    assert [r["user_agent"] for r in json.loads(as_json) if "1004" in r["aor"]] == [USER_AGENT]


def test_a_register_whose_user_decodes_to_a_control_is_refused(cluster):
    with UA(cluster.address, user="10%1b04") as ua:
        reply = ua.register(PASSWORD)
    assert reply is not None and reply.status == 400
    assert not raw_controls(all_logs(cluster))
