"""The registrar shell (workers/sip/registrar.py) end to end on parsed REGISTERs, with
its real Authenticator over the memory store (tests/memstore.py, held to the Redis
store's contract by tests/integration/test_store_contract.py): challenges, digest
answers, stale nonces, replayed nonce-counts, retransmissions, Expires 0, Contact: *,
queries and the refusals.  The user is the seed trace's 1002 / 1234."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from itertools import count

import pytest
from memstore import MemoryStore

from cluster.sip import digest
from cluster.sip.errors import SipError
from cluster.sip.message import Response, parse
from cluster.sip.transaction import server_key
from cluster.store import AUTHBLOCK_CHANNEL, Binding, aor_of, tx_key
from workers.sip.answers import Answers
from workers.sip.auth import Authenticator
from workers.sip.registrar import Registrar, RegistrarSettings, Source

REALM, SECRET = "example.com", b"k" * 32
AOR = aor_of("1002", REALM)
PHONE = ("192.0.2.10", 5062)
SOURCE = Source(addr=PHONE, host="h1")


@pytest.fixture
def store():
    store = MemoryStore()  # the real clock: the registrar and the nonces read time.time()
    store.put_user("1002", REALM, {"MD5": digest.ha1("1002", REALM, "1234")})
    store.put_user("1001", REALM, {"MD5": digest.ha1("1001", REALM, "abcd")})
    return store


@pytest.fixture
def registrar(store):
    auth = Authenticator(store, realm=REALM, secret=SECRET, algorithms=("MD5",),
                         nonce_lifetime=300, max_failures=2, failure_window=60)
    tags = count()
    answers = Answers(None, store, new_tag=lambda: f"totag{next(tags)}", server=b"sipcluster",
                      tx_ttl=32, counters=Counter())
    return Registrar(store, auth, RegistrarSettings(
        realm=REALM, min_expires=60, max_expires=7200, default_expires=3600, max_contacts=2,
        nonce_lifetime=300, tx_ttl=32), answers)


_branches = count()


def register(*, user="1002", cseq=1, call_id="reg-1", contacts=(f"<sip:1002@{PHONE[0]}:5062>",),
             expires: int | None = 3600, authorization: bytes | None = None,
             via_host=f"{PHONE[0]}:{PHONE[1]}", branch=None):
    branch = branch or f"z9hG4bK-{next(_branches)}"
    lines = [f"REGISTER sip:{REALM} SIP/2.0",
             f"Via: SIP/2.0/UDP {via_host};rport;branch={branch}",
             f"From: <sip:{user}@{REALM}>;tag=ft1", f"To: <sip:{user}@{REALM}>",
             f"Call-ID: {call_id}", f"CSeq: {cseq} REGISTER", "Max-Forwards: 70",
             "User-Agent: seedphone/1.0"]
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    data = ("\r\n".join(lines) + "\r\n").encode()
    if authorization is not None:
        data += b"Authorization: " + authorization + b"\r\n"
    return parse(data + b"Content-Length: 0\r\n\r\n")


def handle(registrar, req, pending=None, source=SOURCE):
    registrar.answers.pending = {} if pending is None else pending
    return registrar.handle(req, source, server_key(req))


def challenge_of(registrar) -> bytes:
    answer, _, _ = handle(registrar, register())
    assert answer.status == 401
    return answer.header("www-authenticate")


def credentials(challenge: bytes, *, user="1002", password="1234", nc=1) -> bytes:
    return digest.authorization(challenge, method="REGISTER", uri=f"sip:{REALM}",
                                username=user, password=password, cnonce="a1b2c3d4", nc=nc)


def authorized(registrar, *, password="1234", nc=1, challenge=None, **fields):
    challenge = challenge or challenge_of(registrar)
    return register(authorization=credentials(challenge, password=password, nc=nc), **fields)


def contacts_of(answer: Response) -> list[bytes]:
    return answer.header_values("contact")


def test_a_register_without_credentials_is_challenged(registrar, store):
    answer, tx, fresh = handle(registrar, register())
    assert (answer.status, tx, fresh) == (401, None, False)
    [value] = answer.header_lines("www-authenticate")
    assert value.startswith(b'Digest realm="example.com", nonce="')
    assert b'qop="auth"' in value and b"stale" not in value
    nonce = re.search(rb'nonce="([^"]+)"', value)[1].decode()
    assert digest.check_nonce(SECRET, nonce, time.time(), 300) is digest.NonceState.VALID
    assert answer.to.tag == "totag0" and answer.header("server") == b"sipcluster"
    assert store.raw_bindings(AOR) == {}


def test_the_right_digest_registers_and_answers_the_bindings(registrar, store):
    req = authorized(registrar)
    answer, tx, fresh = handle(registrar, req)
    assert answer.status == 200
    assert (tx, fresh) == (tx_key(AOR, server_key(req)), True)
    assert contacts_of(answer) == [f"<sip:1002@{PHONE[0]}:5062>;expires=3600".encode()]
    assert answer.header("date").endswith(b" GMT")
    [binding] = store.bindings(AOR)
    assert (binding.source, binding.host, binding.nat, binding.user_agent) == (
        PHONE, "h1", False, "seedphone/1.0")
    assert abs(binding.expires_at - time.time() - 3600) < 5
    assert store.registered_aors() == [AOR]


def test_the_expiry_is_capped_at_the_maximum_and_a_low_one_refused(registrar, store):
    answer, _, _ = handle(registrar, authorized(registrar, expires=10**6))
    assert contacts_of(answer)[0].endswith(b";expires=7200")
    answer, tx, _ = handle(registrar, authorized(registrar, expires=30, cseq=2))
    assert (answer.status, answer.header("min-expires"), tx) == (423, b"60", None)


def test_a_wrong_password_is_forbidden_and_counted(registrar, store):
    answer, tx, fresh = handle(registrar, authorized(registrar, password="4321"))
    assert (answer.status, tx, fresh) == (403, None, False)
    assert store.auth_failures(PHONE[0]) == 1 and store.raw_bindings(AOR) == {}
    # The second failure reaches max_failures: the source is throttled and announced.
    handle(registrar, authorized(registrar, password="4321"))
    assert store.published == [(AUTHBLOCK_CHANNEL, f"{PHONE[0]} 60")]
    answer, _, _ = handle(registrar, authorized(registrar))  # the right one, unchecked
    assert answer.status == 403 and store.auth_failures(PHONE[0]) == 2


def test_an_unknown_user_gets_the_same_answer(registrar, store):
    challenge = challenge_of(registrar)
    req = register(user="9999", authorization=credentials(challenge, user="9999"))
    answer, tx, _ = handle(registrar, req)
    assert (answer.status, tx) == (403, None)


def test_credentials_of_another_user_are_refused(registrar, store):
    challenge = challenge_of(registrar)
    req = register(user="1002", authorization=credentials(challenge, user="1001",
                                                          password="abcd"))
    answer, _, _ = handle(registrar, req)
    assert (answer.status, answer.reason) == (403, b"Username does not match the To user")


def test_a_stale_nonce_is_challenged_with_stale_true_only_for_the_right_digest(registrar):
    old = digest.make_nonce(SECRET, time.time() - 301, os.urandom(12))
    challenge = digest.build_challenge(REALM, old)
    answer, tx, _ = handle(registrar, authorized(registrar, challenge=challenge))
    assert (answer.status, tx) == (401, None)
    assert b"stale=true" in answer.header("www-authenticate")
    assert b"nonce=\"" + old.encode() not in answer.header("www-authenticate")  # a new one
    answer, _, _ = handle(registrar, authorized(registrar, challenge=challenge, password="x"))
    assert answer.status == 403


def test_a_replayed_nonce_count_is_challenged_again(registrar, store):
    challenge = challenge_of(registrar)
    first, _, _ = handle(registrar, authorized(registrar, challenge=challenge))
    assert first.status == 200
    replay, tx, _ = handle(registrar, authorized(registrar, challenge=challenge, cseq=2))
    assert (replay.status, tx) == (401, None)
    assert b"stale" not in replay.header("www-authenticate")
    assert store.bindings(AOR)[0].cseq == 1
    later, _, _ = handle(registrar, authorized(registrar, challenge=challenge, nc=2, cseq=3))
    assert later.status == 200 and store.bindings(AOR)[0].cseq == 3


def test_a_retransmission_gets_the_first_answer(registrar, store):
    req = authorized(registrar, branch="z9hG4bK-retx")
    answer, tx, _ = handle(registrar, req)
    first = answer.to_bytes()
    # Not yet written to Redis: this worker's pending answers have it.
    again, tx2, fresh = handle(registrar, req, pending={tx: first})
    assert (again, tx2, fresh) == (first, tx, False)
    # Written: the store has it.
    store.store_answers([(tx, first, 32)])
    assert handle(registrar, req)[:3] == (first, tx, False)


def test_a_retransmission_whose_answer_was_lost_is_answered_from_the_bindings(registrar, store):
    req = authorized(registrar, branch="z9hG4bK-lost")
    handle(registrar, req)  # its worker died before the answer was kept
    answer, tx, fresh = handle(registrar, req)
    assert answer.status == 200 and fresh is True
    assert contacts_of(answer) == [f"<sip:1002@{PHONE[0]}:5062>;expires=3600".encode()]


def test_expires_zero_removes_the_binding(registrar, store):
    handle(registrar, authorized(registrar))
    answer, _, _ = handle(registrar, authorized(registrar, expires=0, cseq=2))
    assert answer.status == 200 and contacts_of(answer) == []
    assert store.bindings(AOR) == [] and store.registered_aors() == []


def test_a_query_lists_the_bindings_and_changes_none(registrar, store):
    other = f"<sip:1002@{PHONE[0]}:5070>;expires=1800"
    handle(registrar, authorized(registrar, contacts=(f"<sip:1002@{PHONE[0]}:5062>", other)))
    before = store.raw_bindings(AOR)
    answer, _, fresh = handle(registrar, authorized(registrar, contacts=(), cseq=2))
    assert answer.status == 200 and fresh is True
    assert sorted(contacts_of(answer)) == [f"<sip:1002@{PHONE[0]}:5062>;expires=3600".encode(),
                                           f"<sip:1002@{PHONE[0]}:5070>;expires=1800".encode()]
    assert store.raw_bindings(AOR) == before


def test_star_removes_every_binding_and_needs_expires_zero(registrar, store):
    handle(registrar, authorized(registrar))
    with pytest.raises(SipError) as refused:
        handle(registrar, authorized(registrar, contacts=("*",), expires=3600, cseq=2))
    assert refused.value.status == 400
    answer, _, _ = handle(registrar, authorized(registrar, contacts=("*",), expires=0, cseq=3))
    assert answer.status == 200 and contacts_of(answer) == [] and store.bindings(AOR) == []


def test_an_out_of_order_cseq_is_refused(registrar, store):
    handle(registrar, authorized(registrar, cseq=5))
    answer, tx, _ = handle(registrar, authorized(registrar, cseq=4, expires=0))
    assert (answer.status, tx) == (400, None)
    assert answer.reason == b"Out of order REGISTER (CSeq not above the last)"
    assert len(store.bindings(AOR)) == 1


def test_too_many_contacts_are_refused(registrar, store):
    two = tuple(f"<sip:1002@{PHONE[0]}:{port}>" for port in (5062, 5064))
    assert handle(registrar, authorized(registrar, contacts=two))[0].status == 200
    answer, tx, _ = handle(registrar, authorized(registrar, cseq=2, call_id="reg-2",
                                                 contacts=(f"<sip:1002@{PHONE[0]}:5066>",)))
    assert (answer.status, answer.reason, tx) == (403, b"Too many registered contacts", None)
    assert len(store.bindings(AOR)) == 2


def port_contacts(*ports, expires=None) -> tuple[str, ...]:
    suffix = "" if expires is None else f";expires={expires}"
    return tuple(f"<sip:1002@{PHONE[0]}:{port}>{suffix}" for port in ports)


@pytest.mark.parametrize(("contacts", "status"), [
    # Removing 5062 and adding two: one too many (max 2), refused after the removal.
    ((*port_contacts(5062, expires=0), *port_contacts(5066, 5068)), 403),
    # Removing 5062, then an expiry below the minimum on the next contact.
    ((*port_contacts(5062, expires=0), *port_contacts(5066, expires=30)), 423),
    # Removing 5062, then a malformed expiry.
    ((*port_contacts(5062, expires=0), *port_contacts(5066, expires="soon")), 400),
])
def test_a_refused_register_leaves_the_bindings_as_they_were(registrar, store, contacts,
                                                             status):
    assert handle(registrar, authorized(registrar, contacts=port_contacts(5062, 5064)))[
        0].status == 200
    before, aors = store.raw_bindings(AOR), store.registered_aors()
    req = authorized(registrar, cseq=2, call_id="reg-2", contacts=contacts)
    try:
        answer, tx, _ = handle(registrar, req)
    except SipError as refused:
        answer, tx = refused, None
    assert (answer.status, tx) == (status, None)
    assert store.raw_bindings(AOR) == before and store.registered_aors() == aors


def test_a_register_from_behind_a_nat_is_reached_at_its_source(registrar, store):
    handle(registrar, authorized(registrar, via_host="10.0.0.5:5060"))
    [binding] = store.bindings(AOR)
    assert binding.nat is True and binding.destination == PHONE


def test_a_register_over_a_connection_records_it_and_its_transport(registrar, store):
    conn = (5 << 32) | (3 << 1) | 1  # a TLS connection (cluster/envelope.py)
    req = parse(authorized(registrar).to_bytes().replace(b"SIP/2.0/UDP ", b"SIP/2.0/TLS "))
    answer, _, _ = handle(registrar, req, source=Source(addr=PHONE, host="h1", sock_index=conn))
    assert answer.status == 200
    [binding] = store.bindings(AOR)
    assert (binding.transport, binding.conn, binding.host) == ("tls", conn, "h1")


def test_a_udp_binding_has_no_connection_and_its_record_no_field_for_one(registrar, store):
    answer, _, _ = handle(registrar, authorized(registrar))
    assert answer.status == 200
    [binding] = store.bindings(AOR)
    assert binding.conn == 0 and "conn" not in binding.to_record()
    # A record from a newer version, with a field this one does not know, still reads.
    record = {**binding.to_record(), "conn": 7, "later_field": 1}
    assert Binding.from_record(record).conn == 7


# ------------------------------------------------------------------ RFC 5626 outbound
INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-00a0c91e6bf6>"'


def flow(reg_id: int, port: int = 5062) -> str:
    return f"<sip:1002@{PHONE[0]}:{port};ob>;+sip.instance={INSTANCE};reg-id={reg_id}"


def with_headers(req, *lines: str):
    """``req`` with ``lines`` added after its Via."""
    data = req.to_bytes()
    at = data.index(b"\r\n", data.index(b"Via:")) + 2
    return parse(data[:at] + "".join(f"{line}\r\n" for line in lines).encode() + data[at:])


def test_an_outbound_register_gets_require_outbound_and_each_reg_id_its_binding(registrar,
                                                                                  store):
    first = with_headers(authorized(registrar, contacts=(flow(1),)), "Supported: outbound")
    answer, _, _ = handle(registrar, first)
    assert answer.status == 200 and answer.header("require") == b"outbound"
    second = with_headers(authorized(registrar, contacts=(flow(2),), call_id="reg-2"),
                          "Supported: path, outbound")
    answer, _, _ = handle(registrar, second, source=Source(addr=("192.0.2.10", 5099),
                                                           host="h2"))
    assert answer.status == 200 and answer.header("require") == b"outbound"
    flows = sorted(store.bindings(AOR), key=lambda b: b.reg_id)
    assert [(b.reg_id, b.host) for b in flows] == [(1, "h1"), (2, "h2")]
    assert all(b.instance == INSTANCE for b in flows)
    # A flow is reached where its REGISTER came from, whatever its Contact says.
    assert flows[1].destination == ("192.0.2.10", 5099)


def test_a_register_over_the_same_flow_again_replaces_its_binding(registrar, store):
    handle(registrar, authorized(registrar, contacts=(flow(1),)))
    handle(registrar, authorized(registrar, contacts=(flow(1, port=6000),), cseq=2))
    [binding] = store.bindings(AOR)
    assert binding.contact == f"sip:1002@{PHONE[0]}:6000;ob".encode()


def test_without_supported_outbound_or_reg_id_there_is_no_require(registrar, store):
    answer, _, _ = handle(registrar, authorized(registrar, contacts=(flow(1),)))
    assert answer.status == 200 and answer.header("require") is None
    plain = with_headers(authorized(registrar, call_id="reg-2"), "Supported: outbound")
    answer, _, _ = handle(registrar, plain)
    assert answer.status == 200 and answer.header("require") is None


def test_a_flow_asked_for_through_a_proxy_gets_439(registrar, store):
    req = with_headers(authorized(registrar, contacts=(flow(1),)),
                       "Via: SIP/2.0/UDP 192.0.2.99;branch=z9hG4bK-proxy", "Supported: outbound")
    answer, tx, _ = handle(registrar, req)
    assert (answer.status, tx) == (439, None)
    assert store.bindings(AOR) == []
