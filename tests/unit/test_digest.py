"""Digest authentication: parsing, verification, challenges and stateless nonces."""

import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.sip import digest
from cluster.sip.digest import (
    Credentials,
    NonceCounter,
    NonceState,
    build_challenge,
    check_nonce,
    ha1,
    ha1_algorithm,
    make_nonce,
    parse_credentials,
    verify,
)
from cluster.sip.errors import SipError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SEED_REALM = "192.168.31.109"


def header_value(path: Path, name: str) -> bytes:
    """The value of the one ``name`` header line of a wire message (CRLF)."""
    match = re.search(rb"^" + name.encode() + rb":[ \t]*(.*?)\r?$", path.read_bytes(), re.M | re.I)
    assert match, f"{name} not in {path.name}"
    return match.group(1)


REGISTER_AUTH = header_value(FIXTURES / "seed/14-register.sip", "Authorization")
INVITE_AUTH = header_value(FIXTURES / "seed/04-invite.sip", "Proxy-Authorization")
SEED_HA1 = ha1("1002", SEED_REALM, "1234")

# RFC 7616 section 3.9.1
RFC_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC_REALM = "http-auth@example.org"


def rfc7616_credentials(algorithm: str, response: str) -> bytes:
    return (
        f'Digest username="Mufasa", realm="{RFC_REALM}", uri="/dir/index.html", '
        f'algorithm={algorithm}, nonce="{RFC_NONCE}", nc=00000001, cnonce="{RFC_CNONCE}", '
        f'qop=auth, response="{response}", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
    ).encode()


# --- the seed trace ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "method", "nc"),
    [(REGISTER_AUTH, "REGISTER", 2), (INVITE_AUTH, "INVITE", 1)],
    ids=["register", "invite"],
)
def test_seed_credentials_verify_with_the_users_password(value, method, nc):
    creds = parse_credentials(value)
    assert creds.is_digest and creds.username == "1002" and creds.realm == SEED_REALM
    assert creds.algorithm == "MD5" and creds.qop == "auth"
    assert creds.nonce_count == nc and creds.nc == f"{nc:08d}"
    assert verify(creds, method, SEED_HA1)
    assert verify(creds, method, SEED_HA1.upper())  # stored HA1 case does not matter


@pytest.mark.parametrize("value", [REGISTER_AUTH, INVITE_AUTH], ids=["register", "invite"])
def test_seed_credentials_fail_with_another_password(value):
    creds = parse_credentials(value)
    method = "REGISTER" if value is REGISTER_AUTH else "INVITE"
    assert not verify(creds, method, ha1("1002", SEED_REALM, "1235"))
    assert not verify(creds, method, ha1("1002", "other.realm", "1234"))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'uri="sip:192.168.31.109:5060;', b'uri="sip:192.168.31.109:5061;'),
        (b'nonce="fffe2121', b'nonce="fffe2122'),
        (b'cnonce="b3468b9a', b'cnonce="b3468b9b'),
        (b"nc=00000002", b"nc=00000003"),
        (b'response="b4418b2b', b'response="b4418b2c'),
        (b'username="1002"', b'username="1003"'),
        (b'realm="192.168.31.109"', b'realm="192.168.31.110"'),
        (b"qop=auth,", b""),
    ],
    ids=["uri", "nonce", "cnonce", "nc", "response", "username", "realm", "qop-removed"],
)
def test_tampered_register_credentials_fail(old, new):
    assert old in REGISTER_AUTH
    creds = parse_credentials(REGISTER_AUTH.replace(old, new))
    # the server looks the HA1 up by the (possibly tampered) username and realm
    assert not verify(creds, "REGISTER", ha1(creds.username, creds.realm, "1234"))


def test_register_credentials_fail_for_another_method():
    creds = parse_credentials(REGISTER_AUTH)
    assert not verify(creds, "INVITE", SEED_HA1)
    assert not verify(creds, "register", SEED_HA1)  # methods are case-sensitive


# --- RFC 7616 examples ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "response"),
    [
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ],
)
def test_rfc7616_examples_verify(algorithm, response):
    creds = parse_credentials(rfc7616_credentials(algorithm, response))
    stored = ha1("Mufasa", RFC_REALM, "Circle of Life", algorithm)
    assert ha1_algorithm(algorithm) == algorithm
    assert verify(creds, "GET", stored)
    assert not verify(creds, "GET", ha1("Mufasa", RFC_REALM, "Circle of life", algorithm))
    assert not verify(creds, "POST", stored)


def test_sha256_ha1_is_sha256_of_user_realm_password():
    expected = hashlib.sha256(b"Mufasa:http-auth@example.org:Circle of Life").hexdigest()
    assert ha1("Mufasa", RFC_REALM, "Circle of Life", "sha-256") == expected
    assert ha1("1002", SEED_REALM, "1234") == hashlib.md5(b"1002:192.168.31.109:1234").hexdigest()


# --- other qop modes and algorithms, computed the way a client does -----------------------


def client_response(algorithm, ha1_hex, nonce, method, uri, *, qop=None, nc="00000001",
                    cnonce="0a4f113b", body=b""):
    """An independent, spelled-out client computation (RFC 2617 / 7616 section 3.4)."""
    h = hashlib.sha256 if algorithm.upper().startswith("SHA-256") else hashlib.md5
    if algorithm.lower().endswith("-sess"):
        ha1_hex = h(f"{ha1_hex}:{nonce}:{cnonce}".encode()).hexdigest()
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + h(body).hexdigest()
    ha2 = h(a2.encode()).hexdigest()
    if qop is None:
        return h(f"{ha1_hex}:{nonce}:{ha2}".encode()).hexdigest()
    return h(f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode()).hexdigest()


def credentials_value(algorithm, response, *, qop=None, uri="sip:bob@example.com"):
    value = f'Digest username="alice", realm="example.com", nonce="abc", uri="{uri}", ' \
            f'response="{response}", algorithm={algorithm}'
    if qop:
        value += f', qop={qop}, nc=00000001, cnonce="0a4f113b"'
    return value.encode()


@pytest.mark.parametrize("algorithm", ["MD5", "MD5-sess", "SHA-256", "SHA-256-sess"])
@pytest.mark.parametrize("qop", [None, "auth", "auth-int"])
def test_every_algorithm_and_qop_verifies(algorithm, qop):
    stored = ha1("alice", "example.com", "secret", algorithm)
    body = b"v=0\r\n"
    uri = "sip:bob@example.com"
    response = client_response(algorithm, stored, "abc", "INVITE", uri, qop=qop, body=body)
    creds = parse_credentials(credentials_value(algorithm, response, qop=qop))
    if qop is None and algorithm.endswith("-sess"):  # -sess needs a cnonce, which comes with qop
        assert not verify(creds, "INVITE", stored, body=body)
        return
    assert verify(creds, "INVITE", stored, body=body)
    assert not verify(creds, "INVITE", ha1("alice", "example.com", "secreT", algorithm), body=body)
    if qop == "auth-int":
        assert not verify(creds, "INVITE", stored, body=b"v=1\r\n")


def test_unsupported_algorithm_or_qop_or_scheme_never_verifies():
    stored = ha1("alice", "example.com", "secret")
    response = client_response("MD5", stored, "abc", "INVITE", "sip:bob@example.com", qop="auth")
    good = parse_credentials(credentials_value("MD5", response, qop="auth"))
    assert verify(good, "INVITE", stored)
    for algorithm, qop in [("SHA-512-256", "auth"), ("MD5", "auth-conf")]:
        creds = parse_credentials(credentials_value(algorithm, response, qop=qop))
        assert not verify(creds, "INVITE", stored)
    assert ha1_algorithm("SHA-512-256") is None
    with pytest.raises(ValueError):
        ha1("alice", "example.com", "secret", "SHA-1")


def test_non_ascii_response_is_a_mismatch_not_a_crash():
    creds = parse_credentials(REGISTER_AUTH.replace(b'response="b4418b2b', "response=\"é".encode()))
    assert not verify(creds, "REGISTER", SEED_HA1)


# --- parsing ------------------------------------------------------------------------------


def test_parse_fills_every_field_and_params():
    creds = parse_credentials(INVITE_AUTH)
    assert creds == Credentials(
        scheme="Digest", username="1002", realm=SEED_REALM,
        nonce="5f046960-2eb0-484f-bf16-758576387c3f",
        uri="sip:1009@192.168.31.109:5060;transport=UDP",
        response="8bece954ef65ba0456abe71cf1243c6c", algorithm="MD5",
        cnonce="5362af04830c3186db2b7bda9bb5585d", nc="00000001", qop="auth", opaque=None,
        params=creds.params,
    )
    assert set(creds.params) == {
        "username", "realm", "nonce", "uri", "response", "cnonce", "nc", "qop", "algorithm"
    }


def test_parse_tolerates_case_whitespace_folding_escapes_and_quoted_commas():
    value = (b'dIGEST  USERNAME = "a\\"l\\\\ice" ,\r\n Realm="ex, ample" ,\tNonce=tok.en-1 ,'
             b' uri="sip:a,b@c" , Response="00", QOP="auth", nc = 0000000A, cnonce="x", Opaque="",'
             b" x-ext=\"\"")
    creds = parse_credentials(value)
    assert creds.scheme == "dIGEST" and creds.is_digest
    assert creds.username == 'a"l\\ice'
    assert creds.realm == "ex, ample" and creds.nonce == "tok.en-1" and creds.uri == "sip:a,b@c"
    assert creds.qop == "auth" and creds.nonce_count == 10 and creds.opaque == ""
    assert creds.params["x-ext"] == "" and creds.algorithm == "MD5"


def test_parse_decodes_utf8_usernames():
    value = 'Digest username="jürgen", realm="r", nonce="n", uri="u", response="0"'
    creds = parse_credentials(value.encode())
    assert creds.username == "jürgen" and creds.nonce_count == 0 and creds.qop is None


def test_unknown_scheme_from_rfc4475_regaut01_is_not_digest():
    creds = parse_credentials(header_value(FIXTURES / "rfc4475/regaut01.dat", "Authorization"))
    assert creds.scheme == "NoOneKnowsThisScheme" and not creds.is_digest
    assert creds.params == {"opaque-data": "here"}
    assert not verify(creds, "REGISTER", SEED_HA1)


def test_unknown_scheme_with_token68_is_not_an_error():
    creds = parse_credentials(b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
    assert creds.scheme == "Basic" and not creds.is_digest and creds.params == {}


BASE = b'username="a", realm="r", nonce="n", uri="u", response="0"'
BASE_DIGEST = b"Digest " + BASE
UNTERMINATED = "unterminated or badly escaped quoted string in 'opaque'"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "do not start with an auth scheme"),
        (b"  ,Digest", "do not start with an auth scheme"),
        (b"Digest", "have no parameters"),
        (b"Digest   ", "have no parameters"),
        (b"Digest," + BASE, "no whitespace after the Digest scheme"),
        (b"Digest " + BASE + b",", "empty parameter at offset"),
        (b"Digest " + BASE + b",,x=1", "empty parameter at offset"),
        (b"Digest =a, " + BASE, "expected a name at offset 7"),
        (b"Digest " + BASE + b", stale", "parameter 'stale' has no '='"),
        (b"Digest " + BASE + b", stale=", "parameter 'stale' has no value"),
        (b"Digest " + BASE + b', opaque="abc', UNTERMINATED),
        (b"Digest " + BASE + b', opaque="a\\', UNTERMINATED),
        (b"Digest " + BASE + b', opaque="a\nb"', UNTERMINATED),
        (b"Digest " + BASE + b", nc=0000 0001", "unexpected character after 'nc' at offset"),
        (b'Digest ' + BASE + b', opaque="x"y', "unexpected character after 'opaque'"),
        (b'Digest ' + BASE + b', Realm="s"', "duplicate parameter 'realm'"),
        (b'Digest realm="r", nonce="n", uri="u"', "lack username, response"),
        (b"Digest " + BASE + b", qop=auth, nc=00000001", "with qop lack nc or cnonce"),
        (b"Digest " + BASE + b', qop=auth, cnonce="c"', "with qop lack nc or cnonce"),
        (b"Digest " + BASE + b', qop=auth, cnonce="c", nc=1', "'nc' is not 8 hex digits"),
        (b"Digest " + BASE + b', nc="0000000g"', "'nc' is not 8 hex digits"),
        (BASE_DIGEST.replace(b'"a"', b'"\xff"'), "'username' is not valid UTF-8"),
        (b"Digest " + BASE + b', opaque="\xc3("', "'opaque' is not valid UTF-8"),
    ],
)
def test_malformed_digest_credentials_raise_400_with_the_reason(value, reason):
    with pytest.raises(SipError) as caught:
        parse_credentials(value)
    assert caught.value.status == 400
    assert reason in caught.value.reason


# --- challenges ---------------------------------------------------------------------------


def test_challenge_has_the_usual_form():
    assert build_challenge(SEED_REALM, "abc-123") == \
        b'Digest realm="192.168.31.109", nonce="abc-123", algorithm=MD5, qop="auth"'


def test_challenge_options():
    value = build_challenge('we "r" \\ here', "n", algorithm="sha-256-SESS", qop="auth,auth-int",
                            opaque="op", stale=True)
    assert value == (b'Digest realm="we \\"r\\" \\\\ here", nonce="n", algorithm=SHA-256-sess, '
                     b'qop="auth,auth-int", opaque="op", stale=true')
    assert build_challenge("r", "n", qop=None) == b'Digest realm="r", nonce="n", algorithm=MD5'


@pytest.mark.parametrize(
    "kwargs", [{"algorithm": "SHA-1"}, {"qop": "auth-conf"}, {"opaque": "a\r\nVia: x"}]
)
def test_challenge_rejects_what_it_cannot_honour(kwargs):
    with pytest.raises(ValueError):
        build_challenge("r", "n", **kwargs)


def test_challenge_and_answer_round_trip_through_the_parser():
    """A client answering our challenge verbatim is accepted (quoted realm included)."""
    realm, nonce = 'odd "realm"', make_nonce(b"k" * 32, 1000.0, b"s" * 12)
    challenge = build_challenge(realm, nonce, algorithm="SHA-256")
    stored = ha1("u", realm, "pw", "SHA-256")
    response = client_response("SHA-256", stored, nonce, "REGISTER",
                               "sip:x", qop="auth", cnonce="c")
    answer = f', username="u", uri="sip:x", response="{response}", nc=00000001, cnonce="c"'
    creds = parse_credentials(challenge + answer.encode())
    assert creds.realm == realm and creds.nonce == nonce and creds.qop == "auth"
    assert verify(creds, "REGISTER", stored)


# --- stateless nonces ---------------------------------------------------------------------

SECRET = b"cluster-wide secret of 32 bytes!"
SALT = bytes(range(12))


def test_nonce_is_url_safe_and_unique_per_salt():
    nonce = make_nonce(SECRET, 1_700_000_000.25, SALT)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", nonce)
    assert nonce != make_nonce(SECRET, 1_700_000_000.25, bytes(reversed(SALT)))
    with pytest.raises(ValueError):
        make_nonce(SECRET, 0.0, b"short")


def test_nonce_round_trip_valid_then_stale():
    nonce = make_nonce(SECRET, 1000.0, SALT)
    assert check_nonce(SECRET, nonce, 1000.0, 30) is NonceState.VALID
    assert check_nonce(SECRET, nonce, 1030.0, 30) is NonceState.VALID
    assert check_nonce(SECRET, nonce, 1030.01, 30) is NonceState.STALE


def test_forged_or_garbled_nonces_are_invalid():
    nonce = make_nonce(SECRET, 1000.0, SALT)
    assert check_nonce(b"another secret", nonce, 1000.0, 30) is NonceState.INVALID
    flipped = nonce[:-1] + ("A" if nonce[-1] != "A" else "B")
    assert check_nonce(SECRET, flipped, 1000.0, 30) is NonceState.INVALID
    # re-dated nonce: later timestamp, same salt and MAC
    later = make_nonce(SECRET, 5000.0, SALT)
    assert check_nonce(SECRET, later[:10] + nonce[10:], 5000.0, 30) is NonceState.INVALID
    for garbage in ["", "abc", "fffe2121-d01f-4c89-ab62-12a030a1c10d", nonce + "=", nonce + "A",
                    nonce[:-1], "é" * 50, nonce.replace("-", "+").replace("_", "/")]:
        if garbage != nonce:
            assert check_nonce(SECRET, garbage, 1000.0, 30) is NonceState.INVALID, garbage


def test_non_canonical_spelling_of_a_nonce_is_invalid():
    """The last base64 character has spare bits; other spellings must not pass as the nonce."""
    nonce = make_nonce(SECRET, 1000.0, SALT)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    variants = [nonce[:-1] + c for c in alphabet if c != nonce[-1]]
    assert all(check_nonce(SECRET, v, 1000.0, 30) is NonceState.INVALID for v in variants)


@given(
    now=st.floats(0, 4e9),
    salt=st.binary(min_size=8, max_size=32),
    secret=st.binary(min_size=1, max_size=64),
)
def test_any_fresh_nonce_checks_valid(now, salt, secret):
    assert check_nonce(secret, make_nonce(secret, now, salt), now, 60) is NonceState.VALID


@given(st.text(max_size=120))
def test_check_nonce_never_raises(text):
    assert check_nonce(SECRET, text, 1000.0, 30) is NonceState.INVALID


def test_nonce_counter_protocol_is_satisfied_by_a_simple_implementation():
    class MemoryCounter:
        def __init__(self):
            self.last: dict[str, int] = {}

        def accept_nc(self, nonce: str, nc: int) -> bool:
            if nc <= self.last.get(nonce, -1):
                return False
            self.last[nonce] = nc
            return True

    counter: NonceCounter = MemoryCounter()
    assert counter.accept_nc("n", 1) and not counter.accept_nc("n", 1) and counter.accept_nc("n", 2)


# --- fuzzing ------------------------------------------------------------------------------

SEEDS = [REGISTER_AUTH, INVITE_AUTH, rfc7616_credentials("SHA-256", "00"),
         header_value(FIXTURES / "rfc4475/regaut01.dat", "Authorization")]
INTERESTING = st.sampled_from(
    [b'"', b",", b"\\", b"=", b" ", b"\t", b"\r\n ", b"\n", b"\x00", b"\xff", b"\xc3"]
    + [b"Digest ", b"nc=", b"qop=auth", b"qop=auth-int", b"algorithm=MD5-sess"]
)
# (position, bytes deleted there, bytes inserted there)
EDITS = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 4), INTERESTING | st.binary(max_size=3)),
    max_size=6,
)


def assert_only_sip_errors(value: bytes) -> None:
    try:
        creds = parse_credentials(value)
    except SipError as error:
        assert error.status == 400 and error.reason
        return
    assert isinstance(verify(creds, "REGISTER", SEED_HA1), bool)
    assert isinstance(verify(creds, "INVITE", SEED_HA1, body=value), bool)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_raise_only_sip_error(value):
    assert_only_sip_errors(value)
    assert_only_sip_errors(b"Digest " + value)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), edits=EDITS)
def test_fuzz_mutated_seed_headers_raise_only_sip_error(seed, edits):
    value = bytearray(seed)
    for position, deleted, inserted in edits:
        at = position % (len(value) + 1)
        value[at:at + deleted] = inserted
    assert_only_sip_errors(bytes(value))


def test_client_authorization_reproduces_the_seed_invite_credentials():
    """What a B2BUA leg sends a gateway: the seed's Proxy-Authorization, byte for byte values."""
    challenge = (b'Digest realm="192.168.31.109", nonce="5f046960-2eb0-484f-bf16-758576387c3f", '
                 b'algorithm=MD5, qop="auth"')
    value = digest.authorization(
        challenge, method="INVITE", uri="sip:1009@192.168.31.109:5060;transport=UDP",
        username="1002", password="1234", cnonce="5362af04830c3186db2b7bda9bb5585d")
    creds = digest.parse_credentials(value)
    assert creds.response == "8bece954ef65ba0456abe71cf1243c6c"
    assert creds.nc == "00000001" and creds.qop == "auth"
    assert digest.verify(creds, "INVITE", digest.ha1("1002", "192.168.31.109", "1234"))


def test_client_authorization_answers_sha256_and_refuses_other_schemes():
    nonce = digest.make_nonce(b"secret", 1000.0, b"saltsalt")
    challenge = digest.build_challenge("example.org", nonce, algorithm="SHA-256", opaque="xyz")
    value = digest.authorization(challenge, method="INVITE", uri="sip:a@b", username="u",
                                 password="p", cnonce="c1", nc=3)
    creds = digest.parse_credentials(value)
    assert creds.algorithm == "SHA-256" and creds.opaque == "xyz" and creds.nc == "00000003"
    assert digest.verify(creds, "INVITE", digest.ha1("u", "example.org", "p", "SHA-256"))
    assert digest.authorization(b'Basic realm="x"', method="INVITE", uri="sip:a@b",
                                username="u", password="p", cnonce="c") is None


# ---------------------------------------------------------------- digest uri vs Request-URI
@pytest.mark.parametrize(("digest_uri", "request_uri"), [
    ("sip:1011@127.0.0.1", b"sip:1011@127.0.0.1"),
    ("sip:127.0.0.1", b"sip:127.0.0.1"),  # REGISTER
    ("sip:1011@Example.COM", b"sip:1011@example.com"),  # host case
    ("sip:%31011@example.com", b"sip:1011@example.com"),  # escaped user (RFC 3261 19.1.4)
    ("SIP:1011@example.com", b"sip:1011@example.com"),  # scheme case
    ("sip:1011@example.com", b"sip:1011@example.com;transport=udp"),  # params on one side
    ("sip:1011@example.com;user=phone;ob", b"sip:1011@example.com"),
    ("sip:1011@example.com;transport=UDP", b"sip:1011@example.com;transport=udp"),
    ("sip:1011@example.com", b"sip:1011@example.com:5060"),  # port on one side only
    ("sips:1011@example.com:5061", b"sips:1011@example.com"),
    ("sip:127.0.0.1:47123", b"sip:127.0.0.1"),  # SIPp's REGISTER
    ("sip:127.0.0.1:47123", b"sip:1001@127.0.0.1:47123"),  # SIPp's INVITE: names the server
    ("sip:1011@[2001:db8::1]:5070", b"sip:1011@[2001:db8::1]:5070"),
    ("tel:+15551234", b"tel:+15551234"),
])
def test_uri_matches_the_request_uri(digest_uri, request_uri):
    assert digest.uri_matches(digest_uri, request_uri)


@pytest.mark.parametrize(("digest_uri", "request_uri"), [
    ("sip:1010@127.0.0.1", b"sip:1011@127.0.0.1"),  # another callee
    ("sip:1011@127.0.0.2", b"sip:1011@127.0.0.1"),  # another host
    ("sip:1011@example.com:5061", b"sip:1011@example.com:5060"),  # another port
    ("sips:1011@example.com", b"sip:1011@example.com"),  # sips is not sip
    ("sip:1011@example.com", b"sips:1011@example.com"),
    ("sip:1011@example.com", b"sip:example.com"),  # a user the Request-URI lacks
    ("sip:example.org", b"sip:1011@example.com"),  # another server
    ("sip:%31011@example.com", b"sip:2011@example.com"),
    ("sip:1011@example.com;transport=tcp", b"sip:1011@example.com;transport=udp"),
    ("sip:1011@example.com;maddr=192.0.2.1", b"sip:1011@example.com;maddr=192.0.2.2"),
    ("sip:1011:pw@example.com", b"sip:1011@example.com"),
    ("tel:+15551234", b"sip:+15551234@example.com"),
    ("*", b"sip:example.com"),  # not a URI
    ("", b"sip:example.com"),
    ("sip:1011@exa mple.com", b"sip:1011@example.com"),
])
def test_uri_mismatch(digest_uri, request_uri):
    assert not digest.uri_matches(digest_uri, request_uri)
