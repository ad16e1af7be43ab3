"""The registrar of a running cluster, seen from the wire and from Redis.

Two clusters serve this module, each with its own Redis database:

* ``cluster`` offers SHA-256 first and MD5 second, as RFC 8760 asks, with short
  nonces (2 s) and at most 3 contacts per AOR.  Registrations are forgotten
  between tests (users are kept).
* ``md5_cluster`` offers MD5 only (SIPp 3.6 answers the first challenge it sees
  and knows no SHA-256) and throttles after 3 failures in a 3 s window.

Every test checks the bindings in Redis through ``cluster.store`` as well as
the SIP answers.
"""

from __future__ import annotations

import email.utils
import os
import re
import time

import pytest
from harness import running_cluster
from sipp import Sipp
from sipua import UA, Reply, challenge_params

from conftest import FIXTURES

AOR = "1002@127.0.0.1"
PASSWORD = "1234"
MIN_EXPIRES, MAX_EXPIRES, MAX_CONTACTS = 60, 3600, 3
NONCE_LIFETIME = 2
MAX_FAILURES, FAILURE_WINDOW = 3, 3
SETTINGS = {
    "registrar": {"min_expires": MIN_EXPIRES, "max_expires": MAX_EXPIRES,
                  "default_expires": MAX_EXPIRES, "max_contacts": MAX_CONTACTS},
    "auth": {"algorithms": ["SHA-256", "MD5"], "nonce_lifetime": NONCE_LIFETIME,
             "max_failures": 1000},
}
MD5_SETTINGS = {
    "auth": {"algorithms": ["MD5"], "max_failures": MAX_FAILURES,
             "failure_window": FAILURE_WINDOW},
}


def db_url(redis_server, db: int) -> str:
    redis_server.client(db=db).flushdb()
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    with running_cluster(tmp_path_factory.mktemp("registrar"), db_url(redis_server, 4),
                         workers=2, settings=SETTINGS) as running:
        running.add_user("1002", PASSWORD)
        running.add_user("1003", "abcd")
        yield running


@pytest.fixture(scope="module")
def md5_cluster(tmp_path_factory, redis_server):
    with running_cluster(tmp_path_factory.mktemp("registrar-md5"), db_url(redis_server, 5),
                         workers=2, settings=MD5_SETTINGS) as running:
        running.add_user("1002", PASSWORD)
        yield running


@pytest.fixture
def ua(cluster):
    cluster.clear_registrations()
    with UA(cluster.address) as agent:
        yield agent


# ------------------------------------------------------------------ helpers


def listed_contacts(reply: Reply) -> dict[str, int]:
    """Contact URI -> expires, as a 200 to REGISTER lists them."""
    found = {}
    for value in reply.all("Contact"):
        for uri, params in re.findall(r"<([^>]*)>([^,]*)", value):
            expires = re.search(r";\s*expires=(\d+)", params)
            found[uri] = int(expires.group(1)) if expires else None
    return found


def contact_uris(bindings) -> list[str]:
    return sorted(b.contact.decode() for b in bindings)


def uri(ua: UA, port_offset: int = 0) -> str:
    return f"sip:1002@127.0.0.1:{ua.port + port_offset}"


def processed_count(cluster, call_id: str, at_least: int, settle: float = 0.5) -> int:
    """How many REGISTERs of ``call_id`` the workers applied (one log line each).

    supervisord copies the workers' output into the log files a little later, so
    this waits (up to 3 s) for ``at_least`` lines, then ``settle`` seconds more for
    any line that should not be there.
    """
    def count() -> int:
        text = cluster.read_log("worker-0") + cluster.read_log("worker-1")
        pattern = rf"call-id={re.escape(call_id)} .*binding\(s\) after REGISTER"
        return len(re.findall(pattern, text))
    deadline = time.monotonic() + 3
    while count() < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle)
    return count()


def header_names(reply: Reply) -> list[str]:
    return [name.lower() for name, _ in reply.headers]


# ------------------------------------------------------------------ SIPp and the seed


def test_sipp_registers_with_md5_digest(md5_cluster, tmp_path):
    md5_cluster.clear_registrations()
    sipp = Sipp("register_md5.xml", md5_cluster.address, tmp_path / "sipp", calls=5, rate=10,
                users=[("1002", PASSWORD)], timeout=20)
    result = sipp.run()
    assert result.returncode == 0, result.summary()
    assert (result.created, result.successful, result.failed) == (5, 5, 0), result.summary()
    [binding] = md5_cluster.store.bindings(AOR)  # 5 refreshes of one Contact: one binding
    assert binding.contact == f"sip:1002@127.0.0.1:{sipp.port}".encode()
    assert binding.source == ("127.0.0.1", sipp.port)
    assert binding.user_agent == "sipp"
    assert binding.host == "test-host"
    assert 3590 < binding.expires_at - time.time() <= 3600


def seed_register(ua: UA, cluster, cseq: int, authorization: str | None) -> bytes:
    """The seed trace's REGISTER (Zoiper), re-addressed to the test cluster and socket."""
    data = (FIXTURES / "seed" / "14-register.sip").read_bytes()
    lines = []
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.startswith(b"Authorization:"):
            if authorization is not None:
                lines.append(b"Authorization: " + authorization.encode())
            continue
        lines.append(line)
    text = b"\r\n".join(lines) + b"\r\n\r\n"
    text = text.replace(b"192.168.31.109:5060", b"127.0.0.1:%d" % cluster.sip_port)
    text = text.replace(b"192.168.31.142:55747", b"127.0.0.1:%d" % ua.port)
    text = text.replace(b"z9hG4bK-524287-1---86aa6dd38424cee1",
                        b"z9hG4bK-" + os.urandom(8).hex().encode())
    return text.replace(b"CSeq: 3 REGISTER", b"CSeq: %d REGISTER" % cseq)


def test_seed_registration_flow(ua, cluster):
    request_uri = f"sip:127.0.0.1:{cluster.sip_port};transport=UDP"
    ua.send(seed_register(ua, cluster, 3, None))
    challenge = ua.receive()
    assert challenge.status == 401
    assert challenge.header("Call-ID") == "gzK0vdfGjqqhSuekwhNwmg.."
    auth = ua.authorization(challenge, "REGISTER", request_uri, PASSWORD, algorithm="MD5")
    ua.send(seed_register(ua, cluster, 4, auth))
    reply = ua.receive()
    assert (reply.status, reply.header("CSeq")) == (200, "4 REGISTER")
    contact = f"sip:1002@127.0.0.1:{ua.port};rinstance=59defe5c8b2788ae;transport=UDP"
    assert listed_contacts(reply) == {contact: 60}
    assert reply.header("Date")
    [binding] = cluster.store.bindings(AOR)
    assert binding.contact == contact.encode()
    assert binding.user_agent == "Zoiper v2.10.20.4_1"
    assert binding.call_id == "gzK0vdfGjqqhSuekwhNwmg.."
    assert 55 < binding.expires_at - time.time() <= 60


# ------------------------------------------------------------------ digest


def test_sha256_is_offered_first_and_md5_second(ua, cluster):
    challenge = ua.register(None)
    assert challenge.status == 401
    offers = [challenge_params(v) for v in challenge.all("WWW-Authenticate")]
    assert [o.get("algorithm") for o in offers] == ["SHA-256", "MD5"]
    assert all(o["realm"] == "127.0.0.1" and o["qop"] == "auth" for o in offers)
    reply = ua.register(PASSWORD, challenge=challenge, algorithm="SHA-256")
    assert "algorithm=SHA-256" in ua.last_authorization
    assert reply.status == 200
    with UA(cluster.address) as md5_ua:  # a client that only knows the second offer
        assert md5_ua.register(PASSWORD, algorithm="MD5").status == 200
    assert contact_uris(cluster.store.bindings(AOR)) == sorted([uri(ua), uri(md5_ua)])


def test_wrong_password_gets_403(ua, cluster):
    reply = ua.register("not-the-password")
    assert (reply.status, reply.reason) == (403, "Forbidden")
    assert reply.header("WWW-Authenticate") is None
    assert cluster.store.bindings(AOR) == []


def test_unknown_user_looks_like_a_wrong_password(ua, cluster):
    wrong = ua.register("not-the-password")
    with UA(cluster.address, user="9999") as stranger:
        unknown = stranger.register("whatever")
    assert (unknown.status, unknown.reason) == (wrong.status, wrong.reason) == (403, "Forbidden")
    assert header_names(unknown) == header_names(wrong)
    assert cluster.store.bindings("9999@127.0.0.1") == []
    assert cluster.store.bindings(AOR) == []


def test_replayed_nonce_count_is_rejected(ua, cluster):
    assert ua.register(PASSWORD).status == 200
    before = cluster.store.bindings(AOR)
    replay = ua.request("REGISTER", f"sip:{ua.domain}", [
        f"Contact: <{uri(ua, 1)}>", "Expires: 3600", f"Authorization: {ua.last_authorization}"])
    ua.send(replay)  # same credentials, new branch and CSeq, another Contact
    ua.cseq += 1
    reply = ua.receive()
    assert reply.status == 401
    assert cluster.store.bindings(AOR) == before
    # the same nonce with the next nonce-count is fine (phones do that, see the seed)
    reply = ua.register(PASSWORD, contacts=[f"<{uri(ua, 1)}>"], challenge=ua.last_challenge, nc=2)
    assert reply.status == 200
    assert contact_uris(cluster.store.bindings(AOR)) == sorted([uri(ua), uri(ua, 1)])


def test_replayed_credentials_without_qop_are_rejected(ua, cluster):
    challenge = ua.register(None)
    auth = ua.authorization(challenge, "REGISTER", f"sip:{ua.domain}", PASSWORD,
                            algorithm="MD5", qop=False)
    answers = []
    for contact in (uri(ua), "sip:1002@192.0.2.66:5060"):  # the owner, then an intruder
        before = cluster.store.bindings(AOR)
        ua.send(ua.request("REGISTER", f"sip:{ua.domain}", [
            f"Contact: <{contact}>", "Expires: 3600", f"Authorization: {auth}"]))
        ua.cseq += 1
        answers.append(ua.receive())
    assert answers[0].status in (200, 401)  # whether qop-less answers are taken at all
    assert answers[1].status == 401, answers[1].raw.decode()
    assert cluster.store.bindings(AOR) == before
    assert "192.0.2.66" not in str(contact_uris(cluster.store.bindings(AOR)))


def test_stale_nonce_gets_401_with_stale_true(ua, cluster):
    challenge = ua.register(None)
    time.sleep(NONCE_LIFETIME + 0.6)
    reply = ua.register(PASSWORD, challenge=challenge)
    assert reply.status == 401
    offers = [challenge_params(v) for v in reply.all("WWW-Authenticate")]
    assert offers and all(o.get("stale", "").lower() == "true" for o in offers), offers
    assert cluster.store.bindings(AOR) == []
    assert ua.register(PASSWORD, challenge=reply).status == 200  # the fresh nonce works
    assert contact_uris(cluster.store.bindings(AOR)) == [uri(ua)]


# ------------------------------------------------------------------ bindings


def test_unregister_with_expires_header_zero(ua, cluster):
    assert ua.register(PASSWORD).status == 200
    assert len(cluster.store.bindings(AOR)) == 1
    reply = ua.register(PASSWORD, expires=0)
    assert reply.status == 200
    assert listed_contacts(reply) == {}
    assert cluster.store.bindings(AOR) == []


def test_unregister_with_contact_expires_param_zero(ua, cluster):
    both = [f"<{uri(ua)}>", f"<{uri(ua, 1)}>"]
    assert ua.register(PASSWORD, contacts=both).status == 200
    reply = ua.register(PASSWORD, contacts=[f"<{uri(ua)}>;expires=0"], expires=None)
    assert reply.status == 200
    assert list(listed_contacts(reply)) == [uri(ua, 1)]
    assert contact_uris(cluster.store.bindings(AOR)) == [uri(ua, 1)]


def test_contact_star_with_expires_zero_removes_all(ua, cluster):
    assert ua.register(PASSWORD, contacts=[f"<{uri(ua)}>", f"<{uri(ua, 1)}>"]).status == 200
    assert len(cluster.store.bindings(AOR)) == 2
    reply = ua.register(PASSWORD, contacts=["*"], expires=0)
    assert reply.status == 200
    assert listed_contacts(reply) == {}
    assert cluster.store.bindings(AOR) == []


@pytest.mark.parametrize("expires", [None, 3600])
def test_contact_star_without_expires_zero_is_400(ua, cluster, expires):
    assert ua.register(PASSWORD).status == 200
    before = cluster.store.bindings(AOR)
    reply = ua.register(PASSWORD, contacts=["*"], expires=expires)
    assert reply.status == 400
    assert reply.reason
    assert cluster.store.bindings(AOR) == before


def test_several_contacts_are_listed_with_their_expires(ua, cluster):
    contacts = [f"<{uri(ua)}>;expires=600", f"<{uri(ua, 1)}>;expires=1200", f"<{uri(ua, 2)}>"]
    reply = ua.register(PASSWORD, contacts=contacts, expires=1800)
    assert reply.status == 200
    listed = listed_contacts(reply)
    assert sorted(listed) == sorted([uri(ua), uri(ua, 1), uri(ua, 2)])
    for contact, wanted in ((uri(ua), 600), (uri(ua, 1), 1200), (uri(ua, 2), 1800)):
        assert wanted - 1 <= listed[contact] <= wanted
    stored = {b.contact.decode(): b.expires_at - time.time() for b in cluster.store.bindings(AOR)}
    assert sorted(stored) == sorted(listed)
    for contact, remaining in stored.items():
        assert listed[contact] - 5 < remaining <= listed[contact] + 1


def test_more_than_max_contacts_is_403(ua, cluster):
    three = [f"<{uri(ua, i)}>" for i in range(MAX_CONTACTS)]
    assert ua.register(PASSWORD, contacts=three).status == 200
    before = cluster.store.bindings(AOR)
    reply = ua.register(PASSWORD, contacts=[f"<{uri(ua, MAX_CONTACTS)}>"])
    assert reply.status == 403
    assert cluster.store.bindings(AOR) == before
    # refreshing one that exists adds nothing, so it is fine
    assert ua.register(PASSWORD, contacts=three[:1]).status == 200
    assert contact_uris(cluster.store.bindings(AOR)) == contact_uris(before)


def test_same_contact_uri_replaces_its_binding(ua, cluster):
    assert ua.register(PASSWORD, expires=600).status == 200
    reply = ua.register(PASSWORD, expires=1200)
    assert reply.status == 200
    assert list(listed_contacts(reply)) == [uri(ua)]
    [binding] = cluster.store.bindings(AOR)
    assert 1195 < binding.expires_at - time.time() <= 1200


def test_same_instance_and_reg_id_with_another_uri_replaces(ua, cluster):
    instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000a95a0e128>"'
    assert ua.register(PASSWORD, contacts=[f"<{uri(ua)}>;{instance};reg-id=1"]).status == 200
    # the phone's address changed (new NAT mapping): same instance and flow, new URI
    reply = ua.register(PASSWORD, contacts=[f"<{uri(ua, 1)}>;{instance};reg-id=1"])
    assert reply.status == 200
    assert list(listed_contacts(reply)) == [uri(ua, 1)]
    assert contact_uris(cluster.store.bindings(AOR)) == [uri(ua, 1)]
    # another flow (reg-id) of the same instance is a binding of its own
    assert ua.register(PASSWORD, contacts=[f"<{uri(ua, 2)}>;{instance};reg-id=2"]).status == 200
    assert contact_uris(cluster.store.bindings(AOR)) == sorted([uri(ua, 1), uri(ua, 2)])


@pytest.mark.parametrize("how", ["header", "param"])
def test_expires_below_minimum_gets_423_with_min_expires(ua, cluster, how):
    if how == "header":
        reply = ua.register(PASSWORD, expires=MIN_EXPIRES // 2)
    else:
        reply = ua.register(PASSWORD, contacts=[f"<{uri(ua)}>;expires={MIN_EXPIRES - 1}"])
    assert reply.status == 423
    assert reply.header("Min-Expires") == str(MIN_EXPIRES)
    assert cluster.store.bindings(AOR) == []


def test_expires_above_maximum_is_capped(ua, cluster):
    reply = ua.register(PASSWORD, expires=MAX_EXPIRES * 2)
    assert reply.status == 200
    assert listed_contacts(reply) == {uri(ua): MAX_EXPIRES}
    [binding] = cluster.store.bindings(AOR)
    assert MAX_EXPIRES - 5 < binding.expires_at - time.time() <= MAX_EXPIRES


def test_register_without_contact_fetches_the_bindings(ua, cluster):
    contacts = [f"<{uri(ua)}>;expires=600", f"<{uri(ua, 1)}>"]
    assert ua.register(PASSWORD, contacts=contacts, expires=900).status == 200
    before = cluster.store.bindings(AOR)
    reply = ua.register(PASSWORD, contacts=[], expires=None)
    assert reply.status == 200
    listed = listed_contacts(reply)
    assert sorted(listed) == sorted([uri(ua), uri(ua, 1)])
    assert 595 <= listed[uri(ua)] <= 600 and 895 <= listed[uri(ua, 1)] <= 900
    assert cluster.store.bindings(AOR) == before  # fetching changes nothing


def test_200_carries_a_date_header(ua, cluster):
    reply = ua.register(PASSWORD)
    assert reply.status == 200
    date = reply.header("Date")
    assert date.endswith("GMT")
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 5
    assert len(cluster.store.bindings(AOR)) == 1


def test_to_user_must_be_the_authenticated_user(cluster):
    cluster.clear_registrations()
    with UA(cluster.address, user="1003", auth_user="1002") as ua:
        reply = ua.register(PASSWORD)  # 1002's valid credentials, To: 1003
    assert reply.status == 403
    assert cluster.store.bindings("1003@127.0.0.1") == []
    assert cluster.store.bindings(AOR) == []


def test_retransmitted_register_gets_the_stored_200_and_is_not_processed_again(ua, cluster):
    first = ua.register(PASSWORD)
    assert first.status == 200
    before = cluster.store.bindings(AOR)
    assert processed_count(cluster, ua.call_id, at_least=1, settle=0) == 1
    ua.send(ua.last_sent)  # the very same bytes: same branch, same CSeq
    again = ua.receive()
    assert again is not None and again.raw == first.raw  # same To-tag, same Date
    assert cluster.store.bindings(AOR) == before
    assert processed_count(cluster, ua.call_id, at_least=1) == 1


def test_retransmitted_register_gets_the_same_401(ua):
    first = ua.register(None)
    assert first.status == 401
    ua.send(ua.last_sent)  # T1 passed without the 401 arriving: the phone sends it again
    again = ua.receive()
    assert again is not None and again.raw == first.raw, again.raw.decode()


def test_retransmitted_wrong_password_counts_as_one_failure(ua, cluster):
    assert cluster.store.auth_failures("127.0.0.1") == 0
    first = ua.register("not-the-password")
    assert first.status == 403
    for _ in range(3):
        ua.send(ua.last_sent)  # the very same bytes
        assert ua.receive() is not None
    assert cluster.store.auth_failures("127.0.0.1") == 1
    assert cluster.store.bindings(AOR) == []


def test_binding_records_source_address_and_host(ua, cluster):
    behind_nat = "sip:1002@10.0.0.99:5060"  # what the phone believes its address is
    reply = ua.register(PASSWORD, contacts=[f"<{behind_nat}>"])
    assert reply.status == 200
    [binding] = cluster.store.bindings(AOR)
    assert binding.contact == behind_nat.encode()
    assert binding.source == ("127.0.0.1", ua.port)
    assert binding.host == "test-host"
    assert binding.transport == "udp"
    assert binding.call_id == ua.call_id


# ------------------------------------------------------------------ throttling (last: md5_cluster)


def test_repeated_failures_are_throttled_until_the_window_passes(md5_cluster):
    md5_cluster.clear_registrations()
    for _ in range(MAX_FAILURES):
        with UA(md5_cluster.address) as prober:  # a new Call-ID each time, from 127.0.0.1
            assert prober.register("wrong").status == 403
    throttled_at = time.monotonic()
    statuses = []
    for _ in range(16):  # 16 Call-IDs: both workers are asked (all on one: p = 2**-15)
        with UA(md5_cluster.address) as owner:
            statuses.append(owner.register(PASSWORD).status)
    assert statuses == [403] * 16
    assert md5_cluster.store.bindings(AOR) == []
    time.sleep(max(0.0, throttled_at + FAILURE_WINDOW + 0.5 - time.monotonic()))
    with UA(md5_cluster.address) as owner:
        assert owner.register(PASSWORD).status == 200
    assert len(md5_cluster.store.bindings(AOR)) == 1
