"""The security log line of a refused authentication, and the fail2ban filter that
reads it (deploy/fail2ban/): run with Python's re, <HOST> translated as fail2ban does
for addresses, over lines made by the workers' own formatter."""

import configparser
import logging
import re
from pathlib import Path

import pytest

from workers.sip.auth import auth_failed_line

FILTER = (Path(__file__).resolve().parents[2] / "deploy" / "fail2ban" / "filter.d"
          / "sipcluster.conf")
# The format cluster/logsetup.py gives every process.
FORMAT = "%(asctime)s %(levelname)s worker-0[4242] %(name)s: %(message)s"


def fail2ban_regex() -> re.Pattern:
    parser = configparser.RawConfigParser()
    parser.read(FILTER)
    failregex = parser.get("Definition", "failregex")
    return re.compile(failregex.replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))


def written(user, source, reason, call_id, realm="127.0.0.1") -> str:
    """The line as a worker writes it."""
    record = logging.LogRecord("auth", logging.WARNING, __file__, 1, "%s",
                               (auth_failed_line(user, realm, source, reason, call_id),), None)
    return logging.Formatter(FORMAT).format(record)


def test_the_documented_format():
    line = written("1002", ("1.2.3.4", 5060), "wrong-password", b"abc@host")
    assert line.endswith('WARNING worker-0[4242] auth: auth failed: user="1002" '
                         'realm="127.0.0.1" source=1.2.3.4:5060 reason=wrong-password '
                         'call-id="abc@host"')


@pytest.mark.parametrize("reason", ["wrong-password", "unknown-user", "throttled-source",
                                    "locked-user", "uri-mismatch", "replayed-nonce-count",
                                    "user-mismatch"])
def test_the_filter_finds_the_source_of_every_reason(reason):
    m = fail2ban_regex().search(written("1002", ("192.0.2.7", 5077), reason, b"x"))
    assert m is not None and m["host"] == "192.0.2.7"


def test_ipv6_sources_are_bracketed_and_found():
    line = written("1002", ("2001:db8::7", 5060), "wrong-password", b"x")
    assert "source=[2001:db8::7]:5060 " in line
    assert fail2ban_regex().search(line)["host"] == "2001:db8::7"


FORGERIES = [
    # a user name that tries to supply its own source field, or to end the line
    ('x" realm="r" source=6.6.6.6:1 reason=wrong-password call-id="y', b"c"),
    ("x\r\n2026-01-01 00:00:00,000 WARNING worker-0[1] auth: auth failed: user=\"v\" "
     "realm=\"r\" source=6.6.6.6:1 reason=wrong-password call-id=\"z\"", b"c"),
    ("1002", b'c" source=6.6.6.6:1 reason=x call-id="'),
    ("1002\\", b'\\" source=6.6.6.6:1'),
    ("\x1b[2J\x00\x08\u2028", b"\x1b[2J\x00\r\n\xff"),
]


@pytest.mark.parametrize(("user", "call_id"), FORGERIES)
def test_wire_values_cannot_forge_fields_or_lines(user, call_id):
    line = written(user, ("192.0.2.7", 5060), "wrong-password", call_id)
    assert "\n" not in line and "\r" not in line
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or c == "\u2028" for c in line)
    matches = list(fail2ban_regex().finditer(line))
    assert [m["host"] for m in matches] == ["192.0.2.7"]


def test_escapes_are_readable_and_long_values_cut():
    line = written("a\"b\\c\x1bd", ("192.0.2.7", 5060), "wrong-password", b"q" * 5000)
    assert 'user="a\\"b\\\\c\\x1bd"' in line
    assert 'call-id="' + "q" * 200 + '..."' in line
    assert len(line) < 600


# ---------------------------------------------------------------- the ban line
BAN_FILTER = FILTER.with_name("sipcluster-ban.conf")


def ban_regex() -> re.Pattern:
    parser = configparser.RawConfigParser()
    parser.read(BAN_FILTER)
    failregex = parser.get("Definition", "failregex")
    return re.compile(failregex.replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))


def written_ban(source, reason, seconds=300, process="dispatcher[4242]") -> str:
    from cluster.limits import ban_line
    record = logging.LogRecord("ban", logging.WARNING, __file__, 1, "%s",
                               (ban_line(source, reason, seconds),), None)
    return logging.Formatter(FORMAT.replace("worker-0[4242]", process)).format(record)


def test_the_ban_line_format():
    line = written_ban(("1.2.3.4", 5060), "flood-invite")
    assert line.endswith("WARNING dispatcher[4242] ban: source banned: source=1.2.3.4:5060 "
                         "reason=flood-invite seconds=300")


@pytest.mark.parametrize("reason", ["flood-register", "flood-invite", "flood-other",
                                    "flood-dialog", "scan-users", "scan-errors"])
@pytest.mark.parametrize("source", [("192.0.2.7", 5077), ("2001:db8::7", 5060)])
def test_the_ban_filter_finds_the_source_of_every_reason(reason, source):
    for process in ("dispatcher[1]", "worker-1[2]"):
        m = ban_regex().search(written_ban(source, reason, process=process))
        assert m is not None and m["host"] == source[0]


def test_the_auth_filter_does_not_take_ban_lines_and_back():
    assert fail2ban_regex().search(written_ban(("192.0.2.7", 1), "scan-users")) is None
    assert ban_regex().search(written("1002", ("192.0.2.7", 1), "wrong-password", b"x")) is None
