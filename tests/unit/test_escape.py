"""The one escaping rule (cluster/escape.py) and where it is applied: the log formatter
(cluster/logsetup.py), sipctl's output (cluster/cli.py), the ladder (cluster/ladder.py),
and the user part of a URI read as a name (cluster/sip/uri.py)."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster import cli, ladder
from cluster.escape import escape_controls, escape_lines
from cluster.logsetup import BatchedStream, EscapingFormatter, call_log, setup_logging
from cluster.sip.errors import SipError
from cluster.sip.uri import parse_uri

C0 = [chr(c) for c in range(0x20)]
C1 = [chr(c) for c in range(0x80, 0xA0)]
# What may never be left in escaped text: C0, DEL, C1, line/paragraph separators,
# bidirectional overrides and lone surrogates.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


# --------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("char", [*C0, "\x7f", *C1, "\u2028", "\u2029", "\u202e", "\u2066"])
def test_every_control_is_shown_as_a_visible_escape(char):
    shown = escape_controls(f"a{char}b")
    assert shown.startswith("a\\") and shown.endswith("b")
    assert not UNSAFE.search(shown)


def test_the_usual_controls_read_as_their_escapes():
    assert escape_controls("99\r\n2026 CRITICAL") == "99\\r\\n2026 CRITICAL"
    assert escape_controls("x\x1b[2Jy\x00\x08\t") == "x\\x1b[2Jy\\x00\\x08\\t"
    assert escape_controls("\x7f\x85\x9b") == "\\x7f\\x85\\x9b"
    assert escape_controls("\u2028") == "\\u2028"


def test_bytes_are_read_as_utf8_and_invalid_bytes_show_as_hex():
    assert escape_controls(b"J\xc3\xb6rg") == "Jörg"
    assert escape_controls(b"a\xff\xfe\x1b[2J\xc2\x85") == "a\\xff\\xfe\\x1b[2J\\x85"
    assert escape_controls("a\udcff".encode("utf-8", "surrogateescape")) == "a\\xff"
    assert escape_controls("a\udcff") == "a\\xff"  # a byte surrogateescape kept
    assert escape_controls("a\ud800") == "a\\ud800"  # any other lone surrogate


def test_plain_text_is_returned_as_it_is():
    plain = "call-id=abc@10.0.0.1 call sc1: 1002 -> 1009, 1 contact(s)"
    assert escape_controls(plain) is plain  # the fast path: no copy
    letters = "Jörg → 東京 ☎ \u200d"
    assert escape_controls(letters) is letters
    assert escape_controls(None) == "None" and escape_controls(5) == "5"


def test_escape_lines_keeps_the_line_breaks_only():
    assert escape_lines("a\x1b\nb\r\n") == "a\\x1b\nb\\r\n"


@given(st.binary(max_size=200))
def test_any_bytes_give_one_safe_line(data):
    shown = escape_controls(data)
    assert not UNSAFE.search(shown)
    shown.encode("utf-8")  # writable: no lone surrogate left


@given(st.text(max_size=200))
def test_any_text_gives_one_safe_line(text):
    shown = escape_controls(text)
    assert not UNSAFE.search(shown)
    shown.encode("utf-8")
    if not UNSAFE.search(text):
        assert shown == text


# --------------------------------------------------------------------------- logs
def log_to(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s w[1] %(name)s: %(message)s"))
    logger = logging.getLogger("test-escape")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


FORGED = "2026-01-01 00:00:00,000 CRITICAL worker-0[1] b2bua: FORGED-LOG-LINE"


def test_a_record_with_cr_lf_in_an_argument_and_in_the_call_id_is_one_line():
    out = io.StringIO()
    clog = call_log(log_to(out), b"cid\r\n" + FORGED.encode() + b"\x1b[2J\x00")
    clog.info("call from %s to %s: %d", "1002", "99\r\n" + FORGED, 404)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert not UNSAFE.search(text[:-1])
    assert text.startswith("INFO w[1] test-escape: call-id=cid\\r\\n2026-01-01")
    assert "\\x1b[2J\\x00 call from 1002 to 99\\r\\n2026-01-01" in text


def test_a_percent_in_the_call_id_is_not_a_conversion():
    out = io.StringIO()
    logger = log_to(out)
    call_log(logger, "a%s%d@x").info("call %s: %d contact(s)", "sc1", 2)
    call_log(logger, "b%s@x").info("no arguments: 100%")
    assert out.getvalue().splitlines() == [
        "INFO w[1] test-escape: call-id=a%s%d@x call sc1: 2 contact(s)",
        "INFO w[1] test-escape: call-id=b%s@x no arguments: 100%"]


def test_a_traceback_keeps_its_lines_none_of_which_passes_for_a_record():
    out = io.StringIO()
    try:
        raise ValueError("bad\r\n" + FORGED + "\x1b[2J")
    except ValueError:
        log_to(out).exception("internal error")
    lines = out.getvalue().splitlines()
    assert lines[0] == "ERROR w[1] test-escape: internal error"
    assert len(lines) > 2 and all(line.startswith("  | ") for line in lines[1:])
    assert not UNSAFE.search(out.getvalue().replace("\n", ""))
    # The exception's own LF is a line break of the traceback, indented like the rest.
    assert "  | ValueError: bad\\r" in lines and "  | " + FORGED + "\\x1b[2J" in lines


def test_setup_logging_installs_the_escaping_formatter():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(SimpleNamespace(log=SimpleNamespace(level="info")), "worker-0")
        (handler,) = root.handlers
        assert isinstance(handler.formatter, EscapingFormatter)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


# --------------------------------------------------------------------------- sipctl
HOSTILE_CDR = {"id": "1-0", "caller": "1002", "callee": "99\r\n" + FORGED + ',"x"',
               "a_call_id": "esc\x1b[2J\x00\x08id@x", "start": "1795607000.5",
               "duration": "1.0", "hangup_cause": "NORMAL_CLEARING", "hangup_side": "caller",
               "sip_status": "200"}


def cdr_out(monkeypatch, capsys, *argv: str) -> str:
    monkeypatch.setattr(cli, "read_cdrs", lambda store, since: [HOSTILE_CDR])
    args = cli.build_parser().parse_args(["cdr", *argv])
    assert cli.cmd_cdr(args, SimpleNamespace(), None) == 0
    return capsys.readouterr().out


def test_cdr_csv_has_one_quoted_line_per_record_and_no_control(monkeypatch, capsys):
    text = cdr_out(monkeypatch, capsys, "--format", "csv")
    assert not UNSAFE.search(text.replace("\n", "")) and "\r" not in text
    assert len(text.splitlines()) == 2
    (row,) = csv.DictReader(io.StringIO(text))
    assert row["callee"] == "99\\r\\n" + FORGED + ',"x"'  # the comma and quotes quoted
    assert row["a_call_id"] == "esc\\x1b[2J\\x00\\x08id@x"
    assert row["q850"] == ""  # a missing field stays empty


def test_cdr_table_and_json_carry_no_control(monkeypatch, capsys):
    table = cdr_out(monkeypatch, capsys)
    assert len(table.splitlines()) == 2 and not UNSAFE.search(table.replace("\n", ""))
    assert "esc\\x1b[2J\\x00\\x08id@x" in table
    as_json = cdr_out(monkeypatch, capsys, "--json")
    assert not UNSAFE.search(as_json.replace("\n", ""))
    assert json.loads(as_json)[0]["a_call_id"] == HOSTILE_CDR["a_call_id"]  # raw, in JSON


def test_every_listing_escapes_its_cells(capsys):
    rows = [{"aor": "sip:1004@x", "user_agent": "x\x1b[2Jy", "contact": b"<sip:a\r\nb>"}]
    cli._print_rows(rows, ["aor", "contact", "user_agent"], False)
    text = capsys.readouterr().out
    assert len(text.splitlines()) == 2 and not UNSAFE.search(text.replace("\n", ""))
    assert "x\\x1b[2Jy" in text and "<sip:a\\r\\nb>" in text
    header, row = text.splitlines()
    assert header.index("USER_AGENT") == row.index("x\\x1b")  # columns still line up


def test_whatever_sipctl_prints_carries_no_control_but_its_own_line_breaks(capsys):
    cli.print("call \x1b]0;pwned\x07:", "a\x00b\nnext", file=None)
    assert capsys.readouterr().out == "call \\x1b]0;pwned\\x07: a\\x00b\nnext\n"


def test_the_ladder_shows_hostile_text_escaped():
    entries = [{"t": 1.0, "dir": "in", "leg": "a", "peer": ["127.0.0.1", 5060],
                "first": "INVITE\x1b[2J sip:1003@x SIP/2.0",
                "data": b"INVITE sip:1003@x SIP/2.0\r\nUser-Agent: x\x1b[2Jy\x00\r\n\r\n"}]
    text = ladder.draw(entries, caller="1002\x1b[2J", callee="99\r\nX", full=True)
    assert not UNSAFE.search(text.replace("\n", ""))
    assert "User-Agent: x\\x1b[2Jy\\x00" in text and "callee 99\\r\\nX" in text


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("user", [b"99%0d%0aX", b"null-%00-null", b"a%1b%5b2J", b"%7f",
                                  b"%c2%85", b"%C2%9B2J"])
def test_a_user_part_that_decodes_to_a_control_is_no_name(user):
    uri = parse_uri(b"sip:" + user + b"@example.com")
    assert b"%" in uri.user and uri.user_unescaped != uri.user  # still parsed and kept
    with pytest.raises(SipError) as caught:
        _ = uri.user_name
    assert caught.value.status == 400


@pytest.mark.parametrize(("user", "name"), [(b"1002", "1002"), (b"J%C3%B6rg", "Jörg"),
                                            (b"I%20have%20spaces", "I have spaces"),
                                            (b"a%ffb", "a\ufffdb")])
def test_a_user_part_is_read_as_a_name(user, name):
    assert parse_uri(b"sip:" + user + b"@example.com").user_name == name


def test_a_uri_without_a_user_has_no_name():
    assert parse_uri(b"sip:example.com").user_name is None


# --------------------------------------------------------------------------- held lines
class Timers:
    """``schedule(delay, fn)`` that runs nothing until told."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, object]] = []

    def __call__(self, delay, fn) -> None:
        self.armed.append((delay, fn))

    def fire(self) -> None:
        armed, self.armed = self.armed, []
        for _delay, fn in armed:
            fn()


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def batched_logger(limit: int = 256) -> tuple[logging.Logger, CountingStream, Timers]:
    stream, timers = CountingStream(), Timers()
    handler = BatchedStream(stream, timers, delay=0.2, limit=limit)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"batched-{id(stream)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger, stream, timers


def test_info_lines_are_held_and_written_in_one_write_by_the_flush_they_armed():
    logger, stream, timers = batched_logger()
    logger.info("one")
    logger.info("two\r\nWARNING forged")
    assert stream.getvalue() == "" and [d for d, _ in timers.armed] == [0.2]  # one flush armed
    timers.fire()
    assert stream.getvalue() == "INFO one\nINFO two\\r\\nWARNING forged\n"
    assert stream.writes == 1
    logger.info("three")  # held again: a new flush is armed
    assert len(timers.armed) == 1


def test_a_warning_is_written_at_once_after_the_lines_held_before_it():
    logger, stream, timers = batched_logger()
    logger.info("before")
    logger.warning("trouble")
    assert stream.getvalue() == "INFO before\nWARNING trouble\n"
    timers.fire()  # the armed flush finds nothing held
    assert stream.getvalue() == "INFO before\nWARNING trouble\n"


def test_held_lines_are_written_when_the_limit_is_reached_and_at_shutdown():
    logger, stream, timers = batched_logger(limit=3)
    for n in range(4):
        logger.info("line %d", n)
    assert stream.getvalue() == "INFO line 0\nINFO line 1\nINFO line 2\n"
    logger.handlers[0].flush()  # what logging.shutdown does at exit
    assert stream.getvalue().endswith("INFO line 3\n")


def test_setup_logging_with_a_timer_holds_lines():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(SimpleNamespace(log=SimpleNamespace(level="info")), "worker-0",
                      schedule=Timers())
        (handler,) = root.handlers
        assert isinstance(handler, BatchedStream)
        assert isinstance(handler.formatter, EscapingFormatter)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
