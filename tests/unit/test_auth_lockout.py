"""The Authenticator's decisions (workers/sip/auth.py) over a store kept in memory:
per-user lockout across sources, the user's registered address spared, unknown users
counted alike, the digest uri checked first, and the log line of each refusal."""

import logging
import time
from collections import Counter

import pytest
from memstore import MemoryStore

from cluster.sip import digest
from cluster.sip.errors import SipError
from cluster.sip.message import parse
from cluster.store import Binding, aor_of
from workers.sip.auth import Authenticator, Verdict

REALM, SECRET = "example.com", b"s" * 32
USERS = {"1002": "right"}
LIMIT = 3


class CountingStore(MemoryStore):
    """The memory store (held to the Redis store's contract), counting the calls these
    tests watch."""

    def __init__(self):
        super().__init__()
        self.fails: Counter = Counter()
        self.user_fails: Counter = Counter()
        self.binding_reads = 0

    def note_auth_failure(self, ip, window):
        self.fails[ip] += 1
        return super().note_auth_failure(ip, window)

    def note_user_auth_failure(self, aor, window, threshold, lockout):
        self.user_fails[aor] += 1
        return super().note_user_auth_failure(aor, window, threshold, lockout)

    def bindings(self, aor, now=None):
        self.binding_reads += 1
        return super().bindings(aor, now)

    def bind(self, user, ip):
        """A live binding of ``user`` registered from ``ip``."""
        now = time.time()
        contact = f"sip:{user}@{ip}:5062"
        assert self.register(
            aor_of(user, REALM), f"tx:{{{user}}}:{ip}", now=now, nonce=None, nc=None,
            nonce_ttl=300, tx_ttl=32, max_contacts=5, call_id="c0", cseq=1, remove_keys=[],
            star=False, set_bindings=[Binding(key=contact, contact=contact.encode(),
                                              expires_at=now + 3600, call_id="c0", cseq=1,
                                              source=(ip, 5062), host="h1")]).outcome == "ok"


@pytest.fixture
def store():
    store = CountingStore()
    for user, password in USERS.items():
        store.put_user(user, REALM, {"MD5": digest.ha1(user, REALM, password)})
    return store


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
    store.bind("1002", "10.0.0.1")
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


# --------------------------------------------------------------------------- precheck


def test_precheck_passes_good_credentials_of_a_cached_user_and_reads_nothing(auth, store,
                                                                               monkeypatch):
    source = ("192.0.2.7", 5060)
    good = register(auth, "1002", "right")
    assert auth.precheck(good, source, proxy=False) is None  # HA1 not cached: check decides
    assert auth.check(good, source, proxy=False).verdict is Verdict.OK  # caches it
    monkeypatch.setattr(store, "get_user", lambda *a: pytest.fail("precheck read the store"))
    passed = auth.precheck(good, source, proxy=False)
    assert passed.verdict is Verdict.OK and passed.username == "1002"


def test_precheck_leaves_every_refusal_to_check_and_records_none(auth, store, caplog):
    source = ("192.0.2.7", 5060)
    auth.check(register(auth, "1002", "right"), source, proxy=False)  # 1002's HA1 cached
    wrong = register(auth, "1002", "wrong")
    other_uri = register(auth, "1002", "right", uri="sip:other.example.com")
    with caplog.at_level(logging.WARNING):
        assert auth.precheck(wrong, source, proxy=False) is None
        assert auth.precheck(other_uri, source, proxy=False) is None
    assert not caplog.records and not store.fails and not store.user_fails
    assert auth.counters == Counter()
    # A locked-out user is not passed, even with the right password.
    for _ in range(LIMIT):
        auth.check(wrong, ("198.51.100.1", 5060), proxy=False)
    assert auth.precheck(register(auth, "1002", "right"), ("198.51.100.2", 5060),
                         proxy=False) is None
