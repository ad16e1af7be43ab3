"""The Authenticator's decisions (workers/sip/auth.py) over a store kept in memory:
per-user lockout across sources, the user's registered address spared, unknown users
counted alike, the digest uri checked first, and the log line of each refusal."""

import logging
from types import SimpleNamespace

import pytest

from cluster.sip import digest
from cluster.sip.errors import SipError
from cluster.sip.message import parse
from workers.sip.auth import Authenticator, Verdict

REALM, SECRET = "example.com", b"s" * 32
USERS = {"1002": "right"}
LIMIT = 3


class MemoryStore:
    """The few store calls the Authenticator makes, with Redis's counting semantics."""

    def __init__(self):
        self.fails: dict[str, int] = {}
        self.user_fails: dict[str, int] = {}
        self.locked: set[str] = set()
        self.registered: dict[str, list[str]] = {}
        self.binding_reads = 0

    def get_user(self, user, realm):
        if user not in USERS:
            return None
        return {"ha1": {"MD5": digest.ha1(user, realm, USERS[user])}}

    def note_auth_failure(self, ip, window):
        self.fails[ip] = self.fails.get(ip, 0) + 1
        return self.fails[ip]

    def announce_block(self, ip, seconds):
        pass

    def note_user_auth_failure(self, aor, window, threshold, lockout):
        self.user_fails[aor] = self.user_fails.get(aor, 0) + 1
        if self.user_fails[aor] >= threshold:
            self.locked.add(aor)
            return float(lockout)
        return 0.0

    def bindings(self, aor):
        self.binding_reads += 1
        return [SimpleNamespace(source=(ip, 5060)) for ip in self.registered.get(aor, [])]


@pytest.fixture
def store():
    return MemoryStore()


@pytest.fixture
def auth(store):
    return Authenticator(store, realm=REALM, secret=SECRET, algorithms=("MD5",),
                         nonce_lifetime=300, max_failures=100, failure_window=60,
                         user_max_failures=LIMIT, user_failure_window=600, user_lockout=600)


def register(auth, user, password, *, uri="sip:example.com", ruri="sip:example.com"):
    challenge = auth.challenge_headers(proxy=False)[0][1]
    creds = digest.authorization(challenge, method="REGISTER", uri=uri, username=user,
                                 password=password, cnonce="0a4f113b")
    return parse((f"REGISTER {ruri} SIP/2.0\r\n"
                  "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\r\n"
                  f"From: <sip:{user}@example.com>;tag=1\r\nTo: <sip:{user}@example.com>\r\n"
                  "Call-ID: c1\r\nCSeq: 1 REGISTER\r\nMax-Forwards: 70\r\n"
                  "Authorization: ").encode() + creds + b"\r\nContent-Length: 0\r\n\r\n")


def reasons(caplog):
    return [r.getMessage().split("reason=")[1].split()[0] for r in caplog.records
            if r.name == "auth" and r.levelno == logging.WARNING]


def test_many_sources_lock_the_user_but_not_its_registered_address(auth, store, caplog):
    caplog.set_level(logging.WARNING, "auth")
    store.registered["1002@example.com"] = ["10.0.0.1"]
    for n in range(LIMIT):
        result = auth.check(register(auth, "1002", f"guess{n}"), (f"192.0.2.{n}", 5060),
                            proxy=False)
        assert result.verdict is Verdict.FORBIDDEN
    # Locked: the right password from yet another address is refused unchecked...
    assert auth.check(register(auth, "1002", "right"), ("192.0.2.99", 5060),
                      proxy=False).verdict is Verdict.LOCKED
    # ...while the phone at its registered address goes on (checked as usual).
    assert auth.check(register(auth, "1002", "right"), ("10.0.0.1", 5062),
                      proxy=False).verdict is Verdict.OK
    assert auth.check(register(auth, "1002", "wrong"), ("10.0.0.1", 5062),
                      proxy=False).verdict is Verdict.FORBIDDEN
    assert reasons(caplog) == ["wrong-password"] * LIMIT + ["locked-user", "wrong-password"]
    assert auth.counters["auth_locked"] == 1
    assert store.binding_reads == 1  # cached between the locked user's requests
    assert not any("response=" in r.getMessage() or "right" in r.getMessage()
                   for r in caplog.records)


def test_unknown_users_are_counted_and_locked_alike(auth, store, caplog):
    caplog.set_level(logging.WARNING, "auth")
    for n in range(LIMIT):
        assert auth.check(register(auth, "nobody", "x"), (f"192.0.2.{n}", 5060),
                          proxy=False).verdict is Verdict.FORBIDDEN
    assert store.user_fails == {"nobody@example.com": LIMIT}
    assert auth.check(register(auth, "nobody", "x"), ("192.0.2.50", 5060),
                      proxy=False).verdict is Verdict.LOCKED
    assert reasons(caplog) == ["unknown-user"] * LIMIT + ["locked-user"]


def test_other_users_are_not_locked(auth, store):
    for n in range(LIMIT):
        auth.check(register(auth, "nobody", "x"), (f"192.0.2.{n}", 5060), proxy=False)
    assert auth.check(register(auth, "1002", "right"), ("192.0.2.50", 5060),
                      proxy=False).verdict is Verdict.OK


def test_no_per_user_limit_when_it_is_zero(store):
    auth = Authenticator(store, realm=REALM, secret=SECRET, algorithms=("MD5",),
                         nonce_lifetime=300, max_failures=100, failure_window=60,
                         user_max_failures=0)
    for n in range(10):
        auth.check(register(auth, "1002", "x"), (f"192.0.2.{n}", 5060), proxy=False)
    assert store.user_fails == {}
    assert auth.check(register(auth, "1002", "right"), ("192.0.2.50", 5060),
                      proxy=False).verdict is Verdict.OK


def test_a_digest_for_another_uri_is_a_bad_request_and_no_guess(auth, store, caplog):
    caplog.set_level(logging.WARNING, "auth")
    req = register(auth, "1002", "right", uri="sip:1003@example.com", ruri="sip:example.com")
    with pytest.raises(SipError) as err:
        auth.check(req, ("192.0.2.1", 5060), proxy=False)
    assert err.value.status == 400
    assert reasons(caplog) == ["uri-mismatch"]
    assert store.fails == {} and store.user_fails == {}
