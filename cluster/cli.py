"""sipctl: the operator's tool.  It talks to Redis only, so it works from any host.

  sipctl users add USER                   add or change a user (HA1 hashes only are kept):
                                          the password is asked (no echo), or read from
                                          stdin with --password-stdin; --password PW works
                                          too but shows PW to every user of the host (ps)
  sipctl users del USER                   remove a user and its registrations
  sipctl users list [--json]
  sipctl users import FILE                CSV lines "user,password" (header line optional)
  sipctl users demo [--if-empty]          the demo directory: 1000-1019, password 1234
                                          (--if-empty: only when there is no user at all,
                                          as `sipcluster up` does it)
  sipctl regs [AOR] [--json]              registered contacts, with the time left
  sipctl calls [--all] [--json]           live calls: parties, state, age, worker, both legs
  sipctl call ID [--full] [--json]        one call (either leg's Call-ID, or its tag): both
                                          legs' dialogs, media, and the SIP ladder
  sipctl hangup ID [--wait S]             end a call: a live worker sends BYE on both legs
  sipctl cluster [--json]                 live dispatchers, workers and relays
  sipctl stats [--json]                   calls per second, calls, registrations, counters
  sipctl bans [--json]                    banned sources: address, reason, seconds left, who
  sipctl bans --trusted [--json]          trusted sources (a request from them authenticated)
                                          banned it (their datagrams are dropped unanswered)
  sipctl bans unban IP                    let a banned source in again (every host, at once)
  sipctl cdr [--since T] [--format table|csv|json]
                                          call detail records (T: epoch, ISO time, or an age
                                          such as 30s, 15m, 2h, 1d)

Counters are those of the processes alive now, since each one started.
"""

from __future__ import annotations

import argparse
import builtins
import csv
import getpass
import io
import json
import os
import re
import socket
import sys
import time
from datetime import UTC, datetime

from . import envelope, ladder
from .config import (
    OVERRIDES_FILE,
    RUN_DIR,
    Config,
    ConfigError,
    load,
    setting_env_names,
    use_home,
)
from .escape import escape_controls, escape_lines
from .redisclient import redacted
from .sip import digest
from .sip.ids import call_tag
from .sip.rtp import StreamStats
from .store import Store, StoreUnavailable, aor_of

DEMO_USERS = [str(n) for n in range(1000, 1020)]
DEMO_PASSWORD = "1234"


def ha1_hashes(user: str, realm: str, password: str) -> dict[str, str]:
    return {alg: digest.ha1(user, realm, password, alg) for alg in ("MD5", "SHA-256")}


def print(*values, sep: str = " ", end: str = "\n", file=None, flush: bool = False) -> None:
    """Everything sipctl writes goes through here (this module's ``print``): much of it
    came from the wire (user parts, User-Agents, Call-IDs, whole messages), and a raw
    ESC, CR or NUL would act on the operator's terminal or forge output lines.  Every
    control is shown escaped (cluster/escape.py); the line breaks of sipctl's own
    layout stay.  Table cells and CSV fields escape their LFs too (``_cell``), so a value
    never breaks a row.  JSON needs nothing: json.dumps escapes controls (ensure_ascii)."""
    builtins.print(*(escape_lines(v if isinstance(v, str) else str(v)) for v in values),
                   sep=sep, end=end, file=file, flush=flush)


def _cell(value) -> str:
    """One value of a table row or CSV record, on one line whatever it holds."""
    return escape_controls(value)


def _print_rows(rows: list[dict], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("(none)")
        return
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# --------------------------------------------------------------------------- users


def read_password(args, stdin=None, prompt=None) -> str:
    """The new user's password: ``--password`` (visible to every user of the host in ps and
    /proc/<pid>/cmdline, and kept in shell history), else one line of stdin with
    ``--password-stdin``, else a prompt without echo (typed twice) when stdin is a
    terminal.  ValueError when there is none."""
    stdin = sys.stdin if stdin is None else stdin
    if args.password is not None and args.password_stdin:
        raise ValueError("--password and --password-stdin exclude each other")
    if args.password is not None:
        password = args.password
    elif args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    elif stdin.isatty():
        ask = prompt or getpass.getpass
        password = ask(f"password for {args.user}: ")
        if ask("again: ") != password:
            raise ValueError("the two passwords differ")
    else:
        raise ValueError("no password: give --password-stdin (and the password on stdin), "
                         "or run it on a terminal to be asked")
    if not password:
        raise ValueError("the password is empty")
    return password


def cmd_users(args, config: Config, store: Store) -> int:
    realm = config.realm
    if args.action == "add":
        try:
            password = read_password(args)
        except ValueError as exc:
            print(f"sipctl: {exc}", file=sys.stderr)
            return 1
        store.put_user(args.user, realm, ha1_hashes(args.user, realm, password))
        print(f"user {args.user}@{realm} saved")
    elif args.action == "del":
        if not store.delete_user(args.user, realm):
            print(f"no user {args.user}@{realm}", file=sys.stderr)
            return 1
        print(f"user {args.user}@{realm} deleted")
    elif args.action == "list":
        rows = [{"user": u["user"], "realm": u["realm"], "algorithms": ",".join(sorted(u["ha1"])),
                 "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(u["created"]))}
                for u in store.list_users(realm)]
        _print_rows(rows, ["user", "realm", "algorithms", "created"], args.json)
    elif args.action == "import":
        count = store.put_users(_read_csv(args.file, realm))
        print(f"{count} users imported into realm {realm}")
    elif args.action == "demo":
        if args.if_empty and store.has_users():
            # A user the operator deleted looks like one never created: once the directory
            # holds anybody, nobody is added, and no password is put back.
            print("the directory has users: demo users not provisioned "
                  "(`sipctl users demo` adds them anyway)")
            return 0
        entries = [(u, realm, ha1_hashes(u, realm, DEMO_PASSWORD)) for u in DEMO_USERS]
        store.put_users(entries)
        print(f"demo users {DEMO_USERS[0]}-{DEMO_USERS[-1]} (password {DEMO_PASSWORD}) "
              f"provisioned in realm {realm}")
        print("WARNING: demo passwords are public knowledge: change them "
              "(sipctl users add USER asks for the new password) before real use",
              file=sys.stderr)
    return 0


def _read_csv(path: str, realm: str):
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if not row or row[0].strip().startswith("#"):
                continue
            user, password = row[0].strip(), (row[1].strip() if len(row) > 1 else "")
            if user.lower() in ("user", "username") and password.lower() in ("password", "pass"):
                continue  # a header line
            if not user or not password:
                raise SystemExit(f"{path}: line without user and password: {row!r}")
            yield user, realm, ha1_hashes(user, realm, password)


# --------------------------------------------------------------------------- registrations


def cmd_regs(args, config: Config, store: Store) -> int:
    now = time.time()
    if args.aor:
        user = args.aor.split(":", 1)[-1].split("@", 1)[0]
        aors = [aor_of(user, config.realm)]
    else:
        aors = store.registered_aors()
    rows = []
    for aor, bindings in store.bindings_of(aors, now).items():
        for b in bindings:
            rows.append({"aor": aor, "contact": b.contact.decode("latin-1"),
                         "source": f"{b.source[0]}:{b.source[1]}", "transport": b.transport,
                         "host": b.host, "user_agent": b.user_agent,
                         "expires_in": int(b.expires_at - now),
                         "expires_at": round(b.expires_at, 3), "nat": b.nat,
                         "instance": b.instance or ""})
    # "host": the host whose SIP socket the phone registered through (its NAT lets in
    # only what that host sends).
    _print_rows(rows, ["aor", "contact", "source", "host", "transport", "expires_in",
                       "user_agent"], args.json)
    return 0


# --------------------------------------------------------------------------- calls
CALL_STATES = ("trying", "ringing", "early", "answered")


def cmd_calls(args, config: Config, store: Store) -> int:
    now = time.time()
    found = store.call_records() if args.all else store.live_call_records()  # --all: a SCAN
    records = [(tag, r) for tag, r in found
               if r.get("method", "INVITE") == "INVITE" and (args.all or r["state"] != "ended")]
    records.sort(key=lambda item: item[1].get("created", 0))
    # A call notes its codec once an answer reached the caller; before that (or a call
    # of an older worker) the codec is the offer's, read from the head of its trace.
    unnoted = [tag for tag, record in records if not record.get("codec")]
    heads = store.trace_heads(unnoted, ladder.CODEC_HEAD) if unnoted else {}
    with_relays = bool(store.relay_nodes())
    rows = []
    for tag, record in records:
        row = call_summary(tag, record, now)
        row["codec"] = record.get("codec") or ladder.codec_of(heads.get(tag, []))
        row["relay"] = _relay_of(store, tag, record)[0] if with_relays else ""
        rows.append(row)
    _print_rows(rows, ["caller", "callee", "state", "age", "host", "worker", "relay", "codec",
                       "a_call_id", "b_call_id"], args.json)
    return 0


def call_summary(tag: str, record: dict, now: float) -> dict:
    """A call record as an operator reads it (what ``calls`` lists)."""
    forks = record.get("forks", [])
    winner = record.get("winner", -1)
    b_legs = [forks[winner]] if 0 <= winner < len(forks) else forks
    return {"call": tag, "caller": record.get("caller", ""), "callee": record.get("callee", ""),
            "state": record.get("state", ""),
            "age": round(now - record.get("created", now), 1),
            "worker": record.get("worker", ""),
            # The host whose SIP socket took the caller's INVITE (with several hosts).
            "host": record["a"].get("host", ""),
            "a_call_id": _text(record["a"]["call_id"]),
            "b_call_id": ",".join(_text(leg["call_id"]) for leg in b_legs),
            "legs": [leg_summary(record["a"])] + [leg_summary(leg) for leg in forks],
            "created": record.get("created"), "answered": record.get("answered") or None,
            "ended": record.get("ended") or None, "hangup": record.get("hangup") or None}


def _leg_transport(sock_index: int) -> str:
    if sock_index == envelope.DIAL_TCP:  # a connection still to be opened by the dispatcher
        return "tcp"
    return envelope.stream_transport(sock_index).lower() if envelope.is_stream(sock_index) \
        else "udp"


def leg_summary(leg: dict) -> dict:
    dialog = leg.get("dialog") or {}
    peer = leg.get("peer") or ["", 0]
    sock = int(leg.get("sock_index", 0))
    return {"name": leg["name"], "call_id": _text(leg["call_id"]), "state": leg.get("state", ""),
            "peer": f"{peer[0]}:{peer[1]}", "user": leg.get("user", ""),
            # Whose SIP socket or connection the leg's messages leave by: the host (its
            # dispatcher holds the connections) and, over a stream, the connection's id
            # (a field of streams:<host>).
            "host": leg.get("host", ""), "transport": _leg_transport(sock),
            "conn": sock if envelope.is_stream(sock) else None,
            "target": _text(leg.get("target", b"")), "final": leg.get("final") or None,
            "dialog": {"state": dialog.get("state", ""), "local_tag": dialog.get("local_tag", ""),
                       "remote_tag": dialog.get("remote_tag", ""),
                       "local_cseq": dialog.get("local_seq"),
                       "remote_cseq": dialog.get("remote_seq"),
                       "remote_target": _text(dialog.get("remote_target", b""))}
            if dialog else None}


def _relay_of(store: Store, tag: str, record: dict) -> tuple[str, dict | None]:
    """(relay id, session record) of a call's media, if a relay carries it."""
    for key in (tag, _text(record["a"]["call_id"])):
        session = store.relay_session(key)
        if session is not None:
            return str(session.get("relay", "")), session
    return "", None


def resolve_call(store: Store, ident: str) -> tuple[str, dict | None]:
    """(tag, record or None) of the call ``ident`` names: a call tag, or either leg's
    Call-ID.  The record is None when only a trace is left (or nothing)."""
    candidates = [ident] if re.fullmatch(r"[0-9a-f]{24}", ident) else []
    candidates.append(call_tag(ident.encode("utf-8", "surrogateescape")))
    for tag in candidates:
        loaded = store.load_call(tag)
        if loaded is not None:
            return tag, loaded[1]
    for tag in candidates:
        if store.trace(tag):
            return tag, None
    return candidates[-1], None


def cmd_call(args, config: Config, store: Store) -> int:
    tag, record = resolve_call(store, args.id)
    entries = store.trace(tag)
    if record is None and not entries:
        print(f"sipctl: no call {args.id} (calls are kept 2 minutes after they end, their "
              f"traces calls.trace_ttl = {config.calls.trace_ttl} s)", file=sys.stderr)
        return 1
    now = time.time()
    summary = call_summary(tag, record, now) if record else {"call": tag}
    relay_id, session = _relay_of(store, tag, record) if record else ("", None)
    codec = (record or {}).get("codec") or ladder.codec_of(entries)
    if args.json:
        summary["relay"] = relay_id
        summary["media"] = session
        for side in (s for leg in (session or {}).get("legs", []) for s in leg.get("sides", [])):
            side["figures"] = stream_figures(side)
        summary["codec"] = codec
        summary["ladder"] = [a.to_json() | ({"message": a.data.decode("utf-8", "replace")}
                                            if args.full else {}) for a in ladder.arrows(entries)]
        print(json.dumps(summary, indent=2, default=_json_default))
        return 0
    if record:
        _print_call(summary, codec, relay_id, session)
    else:
        print(f"call {tag}: no call record left (ended, or an attempt that never became a call)")
    print()
    print(ladder.draw(entries, caller=summary.get("caller", ""),
                      callee=summary.get("callee", ""), full=args.full))
    if len(entries) >= config.calls.trace_max:
        print(f"(the trace keeps the last {config.calls.trace_max} messages: calls.trace_max)")
    return 0


def _print_call(summary: dict, codec: str, relay_id: str, session: dict | None) -> None:
    print(f"call {summary['call']}: {_cell(summary['caller'])} -> {_cell(summary['callee'])}, "
          f"{summary['state']}, age {summary['age']} s, last worker {summary['worker']}")
    times = [f"created {_clock(summary['created'])}"]
    if summary["answered"]:
        times.append(f"answered {_clock(summary['answered'])}")
    if summary["ended"]:
        hangup = summary["hangup"] or {}
        times.append(f"ended {_clock(summary['ended'])}: {hangup.get('cause', '?')} "
                     f"({hangup.get('side', '?')} side, SIP {hangup.get('status', '?')})")
    print(", ".join(times))
    if codec or relay_id:
        print(f"media: codec {codec or '?'}, "
              + (f"relay {relay_id}" if relay_id else "no relay session"))
    print()
    rows = []
    for leg in summary["legs"]:
        dialog = leg["dialog"] or {}
        rows.append({"leg": leg["name"], "state": leg["state"], "peer": leg["peer"],
                     "transport": leg["transport"], "host": leg["host"] or "-",
                     "dialog": dialog.get("state", "-"),
                     "cseq": f"{_dash(dialog.get('local_cseq'))}/"
                             f"{_dash(dialog.get('remote_cseq'))}",
                     "local_tag": dialog.get("local_tag", ""),
                     "remote_tag": dialog.get("remote_tag", ""), "call_id": leg["call_id"]})
    _print_rows(rows, ["leg", "state", "peer", "transport", "host", "dialog", "cseq",
                       "local_tag", "remote_tag", "call_id"], False)
    if session:
        print()
        _print_media(session)


def stream_figures(side: dict) -> dict:
    """What the relay measured of the RTP one party sent (packets, lost, jitter...)."""
    return StreamStats.from_record(side.get("stats", {})).figures()


def _print_media(session: dict) -> None:
    rows = []
    for leg in session.get("legs", []):
        for side in leg.get("sides", []):
            figures = stream_figures(side)
            latched = side.get("latched")
            rows.append({"leg": leg.get("name") or "?", "media": side.get("media", ""),
                         "relay_port": side.get("port", ""),
                         "latched": f"{latched[0]}:{latched[1]}" if latched else "-",
                         "packets": figures["packets"], "bytes": figures["bytes"],
                         "lost": figures["lost"], "jitter_ms": round(figures["jitter_ms"], 2),
                         "hold": "yes" if leg.get("hold") else ""})
    _print_rows(rows, ["leg", "media", "relay_port", "latched", "packets", "bytes", "lost",
                       "jitter_ms", "hold"], False)


def cmd_hangup(args, config: Config, store: Store) -> int:
    tag, record = resolve_call(store, args.id)
    if record is None or record.get("state") == "ended":
        print(f"sipctl: no live call {args.id}", file=sys.stderr)
        return 1
    if not store.processes("worker"):
        print("sipctl: no live worker: the request waits until one starts (for a minute)",
              file=sys.stderr)
    store.post_hangup(tag, _text(record["a"]["call_id"]), f"sipctl@{socket.gethostname()}")
    if args.wait <= 0:
        print(f"call {tag}: hangup requested")
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        loaded = store.load_call(tag)
        if loaded is None or loaded[1].get("state") == "ended":
            hangup = (loaded[1].get("hangup") if loaded else None) or {}
            print(f"call {tag}: ended ({hangup.get('cause', 'gone')}, "
                  f"{hangup.get('side', '?')} side)")
            return 0
        time.sleep(0.05)
    print(f"sipctl: call {tag} still up after {args.wait:g} s; the request stays queued for "
          "a live worker", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- processes
LOAD_FIELDS = {"worker": ("inflight",), "relay": ("sessions", "streams", "pps"),
               "dispatcher": ()}
MAIN_COUNTERS = {
    "worker": ("received", "calls", "calls_ended", "parse_errors", "retransmissions_absorbed",
               "shed", "store_unavailable"),
    "dispatcher": ("received", "forwarded", "dropped", "keepalives"),
    "relay": ("forwarded", "sessions_created", "sessions_deleted", "media_timeouts"),
}


def cmd_cluster(args, config: Config, store: Store) -> int:
    now = time.time()
    rows = []
    for proc in store.processes():
        row = dict(proc)
        role = proc.get("role", "")
        row["age"] = round(now - proc.get("seen", now), 1)
        row["uptime"] = int(now - proc.get("started", now))
        if role == "dispatcher":
            row["load"] = f"workers={len(proc.get('workers', []))}"
        else:
            row["load"] = " ".join(f"{k}={proc[k]}" for k in LOAD_FIELDS.get(role, ())
                                   if k in proc)
        row["counters"] = " ".join(f"{k}={proc[k]}" for k in MAIN_COUNTERS.get(role, ())
                                   if proc.get(k))
        rows.append(row)
    _print_rows(rows, ["role", "host", "name", "pid", "age", "uptime", "load", "counters"],
                args.json)
    return 0


# --------------------------------------------------------------------------- stats
def gather_stats(store: Store, now: float | None = None) -> dict:
    """The cluster's figures: shared state (calls, registrations) and the counters of the
    processes alive now (each since it started)."""
    now = time.time() if now is None else now
    processes = store.processes()
    by_role: dict[str, list[dict]] = {}
    for proc in processes:
        by_role.setdefault(proc.get("role", "?"), []).append(proc)
    workers = _sum_counters(by_role.get("worker", []))
    counts = store.live_counts(now)  # the counting indexes: no SCAN of calls or bindings
    states = {state: counts["calls"].get(state, 0) for state in CALL_STATES}
    created = counts["calls_last_minute"]
    aors, contacts = counts["aors"], counts["contacts"]
    auth = _with_prefix(workers, "auth_")
    stats = {
        "processes": {role: len(procs) for role, procs in sorted(by_role.items())},
        "calls_per_second": round(created / 60, 3),
        "calls_created_last_minute": created,
        "active_calls": sum(states[s] for s in CALL_STATES),
        "calls_by_state": states,
        "registrations": {"aors": aors, "contacts": contacts},
        "calls_set_up": workers.get("calls", 0), "calls_ended": workers.get("calls_ended", 0),
        "requests_received": _with_prefix(workers, "requests_"),
        "requests_sent": _with_prefix(workers, "sent_"),
        "responses_sent": _with_prefix(workers, "responses_"),
        "responses_received": _with_prefix(workers, "received_"),
        "auth_failures": {"total": sum(auth.values()), **auth},
        "parse_errors": workers.get("parse_errors", 0),
        "retransmissions_absorbed": workers.get("retransmissions_absorbed", 0),
        "operator_hangups": workers.get("operator_hangups", 0),
        "shed_503": workers.get("shed", 0),
        "store_unavailable": workers.get("store_unavailable", 0),
        "dispatcher": {k: v for k, v in _sum_counters(by_role.get("dispatcher", [])).items()
                       if k in ("received", "forwarded", "dropped", "keepalives", "stun")},
    }
    relays = by_role.get("relay", [])
    if relays:
        sums = _sum_counters(relays)
        stats["relays"] = {
            "relays": len(relays), "sessions": sums.get("sessions", 0),
            "streams": sums.get("streams", 0), "packets_per_second": round(sum(
                float(r.get("pps", 0)) for r in relays), 1),
            "packets_forwarded": sums.get("forwarded", 0),
            "media_timeouts": sums.get("media_timeouts", 0),
            "port_pairs_free": sums.get("free_pairs", 0)}
    return stats


def _sum_counters(processes: list[dict]) -> dict[str, int]:
    sums: dict[str, int] = {}
    for proc in processes:
        for key, value in proc.items():
            if isinstance(value, int) and not isinstance(value, bool) and key not in (
                    "pid", "started", "seen"):
                sums[key] = sums.get(key, 0) + value
    return sums


def _with_prefix(counters: dict[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix):]: v for k, v in sorted(counters.items()) if k.startswith(prefix)}


def cmd_stats(args, config: Config, store: Store) -> int:
    stats = gather_stats(store)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    states = stats["calls_by_state"]
    lines = [
        ("processes", _pairs(stats["processes"])),
        ("calls per second", f"{stats['calls_per_second']} (last minute: "
                             f"{stats['calls_created_last_minute']} calls)"),
        ("active calls", f"{stats['active_calls']} ("
                         + _pairs({s: states[s] for s in CALL_STATES}) + ")"),
        ("registrations", f"{stats['registrations']['aors']} AOR(s), "
                          f"{stats['registrations']['contacts']} contact(s)"),
        ("calls set up / ended", f"{stats['calls_set_up']} / {stats['calls_ended']}"),
        ("requests received", _pairs(stats["requests_received"])),
        ("requests sent", _pairs(stats["requests_sent"])),
        ("responses sent", _pairs(stats["responses_sent"])),
        ("responses received", _pairs(stats["responses_received"])),
        ("auth failures", f"{stats['auth_failures']['total']}"
                          + _bracket({k: v for k, v in stats["auth_failures"].items()
                                      if k != "total"})),
        ("parse errors", str(stats["parse_errors"])),
        ("retransmissions", f"{stats['retransmissions_absorbed']} absorbed"),
        ("shed (503) / Redis trouble", f"{stats['shed_503']} / {stats['store_unavailable']}"),
        ("dispatchers", _pairs(stats["dispatcher"])),
    ]
    if "relays" in stats:
        lines.append(("relays", _pairs(stats["relays"])))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name.ljust(width)}  {value or '-'}")
    print("(counters: the live processes', since each started)")
    return 0


def _pairs(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def _bracket(values: dict) -> str:
    return f" ({_pairs(values)})" if values else ""


# --------------------------------------------------------------------------- CDRs
# CSV columns, always these in this order (a billing import maps columns once): times in
# ISO 8601 with their UTC offset, the relay's figures one column each (``media_<leg>_<x>``),
# then any field a later version adds, sorted.  ``duration`` runs from the INVITE to the
# end, ``billsec`` from the answer to the end (0 unanswered), both in seconds to the ms.
MEDIA_LEGS = ("a", "b")
MEDIA_FIGURES = ("packets", "bytes", "lost", "jitter_ms")
CDR_CSV_FIELDS = ["id", "caller", "callee", "caller_source", "start_time", "answer_time",
                  "end_time", "duration", "billsec", "hangup_cause", "q850", "hangup_side",
                  "sip_status", "codec", "a_call_id", "b_call_id",
                  *(f"media_{leg}_{x}" for leg in MEDIA_LEGS for x in MEDIA_FIGURES)]
CDR_EPOCHS = {"start": "start_time", "answer": "answer_time", "end": "end_time"}
CDR_TYPES = {"start": float, "answer": float, "end": float, "duration": float,
             "billsec": float, "q850": int, "sip_status": int,
             "media": json.loads}  # media: the relay's figures as JSON (CDRs of older versions)
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CDR_PAGE = 1000


def parse_since(text: str, now: float) -> float:
    """Epoch seconds from "1700000000", "2026-11-25T10:00[:00]" (local time) or an age
    such as "90s", "15m", "2h", "1d"."""
    text = text.strip()
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if age:
        return now - float(age.group(1)) * AGE_UNITS[age.group(2)]
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise SystemExit(f"sipctl: --since {text!r}: give epoch seconds, an ISO time or an "
                         "age such as 15m") from None


def read_cdrs(store: Store, since: float = 0.0) -> list[dict]:
    since_ms = int(since * 1000)
    # The last id a CDR of the millisecond before ``since`` could have: the read starts
    # right after it (stream ids are "<ms>-<sequence>", the sequence 64-bit).
    after = f"{since_ms - 1}-{2**64 - 1}" if since_ms > 0 else "0-0"
    records = page = store.cdrs_after(after, CDR_PAGE)
    while len(page) == CDR_PAGE:
        page = store.cdrs_after(page[-1]["id"], CDR_PAGE)
        records += page
    return records


def typed_cdr(record: dict) -> dict:
    """A CDR with numbers as numbers, empty fields as null (the stream keeps text), and the
    times also in ISO 8601 (``start_time``...)."""
    typed: dict = {}
    for key, value in record.items():
        if value == "":
            typed[key] = None
        elif key in CDR_TYPES or key.startswith("media_"):
            try:
                typed[key] = CDR_TYPES.get(key, _number)(value)
            except ValueError:
                typed[key] = value
        else:
            typed[key] = value
    for epoch, iso in CDR_EPOCHS.items():
        if epoch in record:
            typed[iso] = iso_time(record[epoch])
    return typed


def flat_cdr(record: dict) -> dict:
    """A CDR as CSV columns: ISO times instead of epochs, and the relay figures of a CDR
    written by an older version (one JSON ``media`` field) spread into their columns."""
    flat = {k: v for k, v in record.items() if k not in CDR_EPOCHS and k != "media"}
    for epoch, iso in CDR_EPOCHS.items():
        flat[iso] = iso_time(record.get(epoch, ""))
    try:
        media = json.loads(record["media"]) if record.get("media") else {}
    except ValueError:
        media = {}
    for leg, figures in (media.items() if isinstance(media, dict) else ()):
        for name, value in (figures.items() if isinstance(figures, dict) else ()):
            flat.setdefault(f"media_{leg}_{name}", value)
    return flat


def iso_time(epoch) -> str:
    """ISO 8601 in UTC to the millisecond ("" for an empty field)."""
    try:
        seconds = float(epoch)
    except (TypeError, ValueError):
        return ""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def cmd_cdr(args, config: Config, store: Store) -> int:
    since = parse_since(args.since, time.time()) if args.since else 0.0
    records = read_cdrs(store, since)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        print(json.dumps([typed_cdr(r) for r in records], indent=2))
        return 0
    if fmt == "csv":
        records = [flat_cdr(r) for r in records]
        fields = CDR_CSV_FIELDS + sorted({k for r in records for k in r} - set(CDR_CSV_FIELDS))
        # Fields escaped (no CR, LF or other control left), then quoted where the csv
        # module must (a comma or a quote): every record is one line of the output.
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore",
                                quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else _cell(v) for k, v in r.items()}
                        for r in records)
        print(out.getvalue(), end="")
        return 0
    rows = [{**r, "start": _clock(float(r["start"])) if r.get("start") else ""} for r in records]
    _print_rows(rows, ["start", "caller", "callee", "duration", "billsec", "hangup_cause",
                       "hangup_side", "sip_status", "codec", "a_call_id"], False)
    return 0


# --------------------------------------------------------------------------- helpers
def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _clock(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _json_default(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# --------------------------------------------------------------------------- bans
def cmd_bans(args, config: Config, store: Store) -> int:
    if args.action == "unban":
        if store.unban(args.ip):
            print(f"{args.ip} unbanned")
            return 0
        print(f"sipctl: {args.ip} is not banned (its counters are reset anyway)",
              file=sys.stderr)
        return 1
    if args.trusted:
        rows = [{"source": t["ip"], "left": int(round(t["left"])), "since": _clock(t.get("at")),
                 "by": t.get("by", "")} for t in store.trusted()]
        if not args.json:
            for row in rows:
                row["left"] = f"{row['left']}s"
        _print_rows(rows, ["source", "left", "since", "by"], args.json)
        return 0
    now = time.time()
    rows = [{"source": ban["ip"], "reason": ban["reason"], "left": int(round(ban["left"])),
             "since": _clock(ban.get("at")), "seconds": ban.get("seconds"),
             "by": ban.get("by", ""), "age": round(now - float(ban.get("at", now)), 1)}
            for ban in store.bans()]
    if not args.json:
        for row in rows:
            row["left"] = f"{row['left']}s"
    _print_rows(rows, ["source", "reason", "left", "since", "by"], args.json)
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config (default: SIPCLUSTER_CONFIG or deploy/)")
    parser.add_argument("--home", help="folder of the cluster's run/ (default: $SIPCLUSTER_HOME, "
                                       "the checkout, or $XDG_STATE_HOME/sipcluster)")
    sub = parser.add_subparsers(dest="command", required=True)

    users = sub.add_parser("users", help="the directory of users")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add")
    add.add_argument("user")
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--password", help="the password on the command line: visible to "
                        "every user of this host in ps; prefer the prompt or --password-stdin")
    secret.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin")
    delete = users_sub.add_parser("del")
    delete.add_argument("user")
    listing = users_sub.add_parser("list")
    listing.add_argument("--json", action="store_true")
    imp = users_sub.add_parser("import")
    imp.add_argument("file")
    demo = users_sub.add_parser("demo")
    demo.add_argument("--if-empty", action="store_true",
                      help="only when the directory has no user at all")

    regs = sub.add_parser("regs", help="registered contacts")
    regs.add_argument("aor", nargs="?")
    regs.add_argument("--json", action="store_true")

    calls = sub.add_parser("calls", help="live calls")
    calls.add_argument("--all", action="store_true", help="also calls ended lately")
    calls.add_argument("--json", action="store_true")

    call = sub.add_parser("call", help="one call: legs, media and the SIP ladder")
    call.add_argument("id", help="either leg's Call-ID, or the call's tag")
    call.add_argument("--full", action="store_true", help="print every message")
    call.add_argument("--json", action="store_true")

    hangup = sub.add_parser("hangup", help="end a call (BYE on both legs)")
    hangup.add_argument("id", help="either leg's Call-ID, or the call's tag")
    hangup.add_argument("--wait", type=float, default=5.0,
                        help="seconds to wait for the call to end (0: do not wait)")

    cluster = sub.add_parser("cluster", help="live processes")
    cluster.add_argument("--json", action="store_true")

    stats = sub.add_parser("stats", help="the cluster's figures")
    stats.add_argument("--json", action="store_true")

    bans = sub.add_parser("bans", help="banned sources")
    bans.add_argument("--json", action="store_true")
    bans.add_argument("--trusted", action="store_true",
                      help="the trusted sources instead (limits.trust_seconds)")
    bans_sub = bans.add_subparsers(dest="action")
    unban = bans_sub.add_parser("unban", help="let a banned source in again")
    unban.add_argument("ip")

    cdr = sub.add_parser("cdr", help="call detail records")
    cdr.add_argument("--since", help="epoch seconds, ISO time, or an age (30s, 15m, 2h, 1d)")
    cdr.add_argument("--format", choices=("table", "csv", "json"), default="table")
    cdr.add_argument("--json", action="store_true", help="the same as --format json")
    return parser


COMMANDS = {"users": cmd_users, "regs": cmd_regs, "calls": cmd_calls, "call": cmd_call,
            "hangup": cmd_hangup, "cluster": cmd_cluster, "stats": cmd_stats, "cdr": cmd_cdr,
            "bans": cmd_bans}


def configuration(path: str | None, env=os.environ) -> Config:
    """The configuration to act on.  On the host that runs the cluster, with the same file,
    the realm and Redis URL are those the cluster runs with (the file plus the overrides
    `sipcluster up` was given, kept in run/): a user added under a realm the cluster no
    longer uses could never log in.  Where this environment's settings would differ, the
    cluster's win, and sipctl says so on stderr."""
    own = load(path, env=env)
    record_path = RUN_DIR / "launch.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return own
    if not isinstance(record, dict) or record.get("config") != own.source:
        return own  # another file: another cluster (a test's, another host's)
    kept = {name: value for name, value in env.items()
            if name not in setting_env_names(env)}
    running = load(path, env=kept, overrides_file=OVERRIDES_FILE)
    own = load(path, env=env, overrides_file=OVERRIDES_FILE)  # this environment over them
    differences = [f"{what} {theirs} (this environment: {mine})"
                   for what, theirs, mine in (
                       ("realm", running.realm, own.realm),
                       ("Redis", redacted(running.redis.url), redacted(own.redis.url)))
                   if theirs != mine]
    if differences:
        print(f"sipctl: using the running cluster's {' and '.join(differences)}, as kept in "
              f"{OVERRIDES_FILE}", file=sys.stderr)
    return running


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_home(args.home, "cluster.cli", argv)
    try:
        config = configuration(args.config)
    except ConfigError as exc:
        print(f"sipctl: {exc}", file=sys.stderr)
        return 2
    store = Store(config.redis.url, timeout=2.0, max_connections=4)
    try:
        return COMMANDS[args.command](args, config, store)
    except StoreUnavailable as exc:
        print(f"sipctl: Redis at {redacted(config.redis.url)} is not answering: {exc}",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sipctl cdr | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
