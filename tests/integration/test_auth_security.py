"""Refused authentications, seen from the wire, from Redis and from the workers' logs:
the digest ``uri`` checked against the Request-URI, the per-user lockout against
password guessing from many addresses, and the security log line fail2ban reads.

Other source addresses are other 127.0.0.0/8 addresses on lo (all of them answer on
Linux).  Pub/sub channels are shared by every database of the session's redis-server:
this module locks only its own user and throttles only addresses no other module uses.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import running_cluster, wait_for
from sipua import UA

DB = 2  # this module's Redis database on the session's redis-server
PASSWORD = "1234"
MAX_FAILURES, USER_MAX_FAILURES = 5, 20
SETTINGS = {"auth": {"algorithms": ["MD5"], "max_failures": MAX_FAILURES,
                     "failure_window": 60, "user_max_failures": USER_MAX_FAILURES,
                     "user_failure_window": 600, "user_lockout": 600}}
WORKERS = ("worker-0", "worker-1")
FILTER = (Path(__file__).resolve().parents[2] / "deploy" / "fail2ban" / "filter.d"
          / "sipcluster.conf")
LINE = re.compile(
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING worker-\d\[\d+\] auth: auth failed: '
    r'user="(?P<user>[^"\\]*)" realm="127\.0\.0\.1" source=(?P<ip>[\d.]+):(?P<port>\d+) '
    r'reason=(?P<reason>[a-z-]+) call-id="(?P<call_id>[^"\\]*)"$')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    redis_server.client(db=DB).flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    with running_cluster(tmp_path_factory.mktemp("auth"), url, workers=2,
                         settings=SETTINGS) as running:
        for user in ("1002", "1010", "1011", "1040"):
            running.add_user(user, PASSWORD)
        yield running


def refusals(cluster, **fields) -> list[re.Match]:
    """The security log lines of the workers whose fields have the values given."""
    found = []
    for name in WORKERS:
        for line in cluster.read_log(name).splitlines():
            if " auth failed: " not in line:
                continue
            m = LINE.match(line)
            assert m is not None, f"not in the documented format: {line!r}"
            if all(m[k] == v for k, v in fields.items()):
                found.append(m)
    return found


def fail2ban_hosts(lines: list[str]) -> list[str]:
    parser = configparser.RawConfigParser()
    parser.read(FILTER)
    regex = re.compile(parser.get("Definition", "failregex")
                       .replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))
    return [m["host"] for line in lines if (m := regex.search(line))]


FAIL2BAN_REGEX = shutil.which("fail2ban-regex")


def fail2ban_matched(lines: list[str], tmp_path: Path) -> int:
    """How many of these log lines fail2ban itself (fail2ban-regex, its date detection
    included) matches with the shipped filter."""
    log = tmp_path / "worker.log"
    log.write_text("".join(line + "\n" for line in lines))
    out = subprocess.run([FAIL2BAN_REGEX, str(log), str(FILTER)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    m = re.search(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed", out,
                  re.M)
    assert m is not None, out
    assert int(m[1]) == len(lines), out
    return int(m[3])


def answer(ua: UA, cseq: int, timeout: float = 3.0):
    """The final answer to our request ``cseq`` (others are skipped), or None."""
    while (reply := ua.receive(timeout=timeout)) is not None:
        if reply.header("CSeq").split()[0] == str(cseq):
            return reply
    return None


# ---------------------------------------------------------------- digest uri
def test_register_with_a_digest_for_another_uri_is_a_bad_request(cluster):
    with UA(cluster.address, user="1002") as ua:
        challenge = ua.register(None)
        assert challenge.status == 401
        creds = ua.authorization(challenge, "REGISTER", "sip:127.0.0.2", PASSWORD)
        contact = [f"Contact: <sip:1002@127.0.0.1:{ua.port}>", "Expires: 60"]
        ua.send(ua.request("REGISTER", "sip:127.0.0.1", contact + [f"Authorization: {creds}"]))
        reply = answer(ua, ua.cseq)
        assert reply is not None and reply.status == 400, reply
        assert cluster.store.bindings("1002@127.0.0.1") == []
        # The same credentials for the right uri register: only the uri was wrong.
        ua.cseq += 1
        assert ua.register(PASSWORD, expires=60).status == 200
        assert wait_for(lambda: refusals(cluster, user="1002", reason="uri-mismatch",
                                         call_id=ua.call_id), 5.0)


def test_invite_with_a_digest_for_another_callee_is_a_bad_request(cluster):
    """Credentials an INVITE to 1010 carried, replayed in an INVITE to 1011, ring nobody."""
    with UA(cluster.address, user="1011") as callee, UA(cluster.address, user="1002") as ua:
        assert callee.register(PASSWORD, expires=60).status == 200
        body = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n" \
               b"m=audio 4000 RTP/AVP 0\r\n"
        headers = [f"Contact: <sip:1002@127.0.0.1:{ua.port}>", "Content-Type: application/sdp"]
        ua.send(ua.request("INVITE", "sip:1011@127.0.0.1", headers, body=body, cseq=1))
        challenge = answer(ua, 1)
        assert challenge is not None and challenge.status == 407
        as_www = dataclasses.replace(challenge, headers=[
            ("WWW-Authenticate", v) for v in challenge.all("Proxy-Authenticate")])
        creds = ua.authorization(as_www, "INVITE", "sip:1010@127.0.0.1", PASSWORD)
        ua.send(ua.request("INVITE", "sip:1011@127.0.0.1",
                           [f"Proxy-Authorization: {creds}", *headers], body=body, cseq=2))
        reply = answer(ua, 2)
        assert reply is not None and reply.status == 400, reply
        callee.skip_provisional = False
        assert callee.receive(timeout=1.0) is None  # 1011 was never rung
        assert wait_for(lambda: refusals(cluster, user="1002", reason="uri-mismatch",
                                         call_id=ua.call_id), 5.0)


# ---------------------------------------------------------------- distributed guessing
def test_guessing_from_40_addresses_is_stopped_while_the_own_phone_registers(cluster, tmp_path):
    """40 addresses x 5 wrong passwords for 1040 (each address stays under its own limit of
    5): the per-user limit stops the checking after 20, while 1040's registered phone (at
    127.0.0.1) keeps registering; even the right password from a new address is refused."""
    victim = "1040@127.0.0.1"
    with UA(cluster.address, user="1040") as phone:
        assert phone.register(PASSWORD, expires=300).status == 200
        for round_ in range(5):
            for n in range(2, 42):
                with UA(cluster.address, user="1040", bind=f"127.0.0.{n}") as guesser:
                    reply = guesser.register(f"guess-{round_}-{n}", expires=60)
                    assert reply is not None and reply.status == 403, (n, reply)
            reply = phone.register(PASSWORD, expires=300)
            assert reply is not None and reply.status == 200, (round_, reply)
        with UA(cluster.address, user="1040", bind="127.0.0.50") as thief:
            reply = thief.register(PASSWORD, expires=60)
            assert reply is not None and reply.status == 403
        assert [b.source[0] for b in cluster.store.bindings(victim)] == ["127.0.0.1"]

    def counted():
        lines = refusals(cluster, user="1040")
        return lines if len(lines) == 201 else None  # 200 guesses and the thief
    lines = wait_for(counted, 10.0)
    assert lines, len(refusals(cluster, user="1040"))
    checked = [m for m in lines if m["reason"] == "wrong-password"]
    locked = [m for m in lines if m["reason"] == "locked-user"]
    # The lockout reaches the other worker through pub/sub: a guess or two in flight
    # meanwhile may still be checked, never many.
    assert USER_MAX_FAILURES <= len(checked) <= USER_MAX_FAILURES + 4, len(checked)
    assert len(checked) + len(locked) == 201
    assert {m["ip"] for m in locked} >= {"127.0.0.41", "127.0.0.50"}
    assert "127.0.0.1" not in {m["ip"] for m in lines}
    assert int(cluster.store.redis.get("authuser:{1040@127.0.0.1}")) == len(checked)
    assert 590 <= cluster.store.redis.ttl("authlock:{1040@127.0.0.1}") <= 600
    # fail2ban's filter finds the real source address in every line a worker wrote.
    raw = [m.string for m in lines]
    assert fail2ban_hosts(raw) == [m["ip"] for m in lines]
    if FAIL2BAN_REGEX:  # and fail2ban's own reading of them, when it is installed
        assert fail2ban_matched(raw, tmp_path) == len(raw)


def test_unknown_users_are_counted_and_locked_like_known_ones(cluster):
    """A made-up name is locked after as many failures as a real one, so the lockout
    does not tell which names exist; its log lines say unknown-user."""
    for n in range(USER_MAX_FAILURES + 2):
        with UA(cluster.address, user="9999", bind=f"127.0.1.{n + 2}") as guesser:
            reply = guesser.register("nope", expires=60)
            assert reply is not None and reply.status == 403
    lines = wait_for(lambda: (found := refusals(cluster, user="9999"))
                     and len(found) == USER_MAX_FAILURES + 2 and found, 10.0)
    assert lines
    reasons = [m["reason"] for m in lines]
    assert USER_MAX_FAILURES <= reasons.count("unknown-user") <= USER_MAX_FAILURES + 1
    assert reasons.count("locked-user") >= 1
    assert cluster.store.redis.ttl("authlock:{9999@127.0.0.1}") > 0
