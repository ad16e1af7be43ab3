"""RFC 4475 torture messages: each file's verdict from tests/fixtures/rfc4475/MANIFEST.md, and
the details the manifest states where the parser is concerned."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cluster.sip.errors import SipError
from cluster.sip.message import Request, Response, parse
from cluster.sip.uri import AbsoluteURI, SipURI

TORTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "rfc4475"
TORTURE_FILES = sorted(TORTURE_DIR.glob("*.dat"))
VALID = "valid"

# The manifest's Parser column: VALID, or the status an INVALID message must raise.  The two
# INVALID responses (scalarlg, bigcode) raise 400 as well; a receiver drops them.
VERDICTS: dict[str, str | int] = {
    # 3.1.1 valid messages
    "wsinv": VALID, "intmeth": VALID, "esc01": VALID, "escnull": VALID, "esc02": VALID,
    "lwsdisp": VALID, "longreq": VALID, "dblreq": VALID, "semiuri": VALID,
    "transports": VALID, "mpart01": VALID, "unreason": VALID, "noreason": VALID,
    # 3.1.2 invalid messages
    "badinv01": 400, "clerr": 400, "ncl": 400, "scalar02": 400, "scalarlg": 400,
    "quotbal": 400, "ltgtruri": 400, "lwsruri": 400, "lwsstart": 400, "trws": 400,
    "escruri": 400, "baddate": 400, "regbadct": 400, "badaspec": 400, "baddn": 400,
    "badvers": 505, "mismatch01": 400, "mismatch02": 501, "bigcode": 400,
    # 3.2 transaction layer
    "badbranch": VALID,
    # 3.3 application layer (the parser's part of it)
    "insuf": 400, "unkscm": VALID, "novelsc": VALID, "unksm2": VALID, "bext01": VALID,
    "invut": VALID, "regaut01": VALID, "multi01": 400, "mcl01": 400, "bcast": VALID,
    "zeromf": VALID, "cparam01": VALID, "cparam02": VALID, "regescrt": VALID, "sdp01": VALID,
    # 3.4 backward compatibility
    "inv2543": VALID,
}
RESPONSES = {"unreason", "noreason", "scalarlg", "bigcode", "bcast"}


def torture(name: str) -> bytes:
    return (TORTURE_DIR / f"{name}.dat").read_bytes()


def parsed(name: str) -> Request | Response:
    msg = parse(torture(name))
    msg.validate()
    return msg


def test_the_verdict_table_covers_every_file_and_matches_the_manifest_counts():
    assert sorted(VERDICTS) == [path.stem for path in TORTURE_FILES]
    assert len(VERDICTS) == 49
    assert sum(v == VALID for v in VERDICTS.values()) == 27
    assert sum(v != VALID for v in VERDICTS.values()) == 22


def test_the_fixture_bytes_match_their_checksums():
    """A checkout that rewrote line ends would make every other test here meaningless."""
    sums = {}
    for line in (TORTURE_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    assert sorted(sums) == [path.name for path in TORTURE_FILES]
    for path in TORTURE_FILES:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[path.name], path.name


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_verdict(name: str):
    data = torture(name)
    expected = VERDICTS[name]
    if expected == VALID:
        msg = parse(data)
        msg.validate()
        assert isinstance(msg, Response) == (name in RESPONSES)
        # what a parser accepted, it can send on and read back the same
        again = parse(msg.to_bytes())
        again.validate()
        assert [(h.key, h.value) for h in again.headers] == [(h.key, h.value) for h in msg.headers]
        assert again.body == msg.body
        return
    with pytest.raises(SipError) as info:  # anything but SipError fails the test
        parse(data).validate()
    assert info.value.status == expected, info.value.reason
    assert info.value.reason


@pytest.mark.parametrize("name", [n for n, v in VERDICTS.items() if v == VALID and n != "dblreq"])
def test_valid_messages_serialise_byte_identical(name: str):
    data = torture(name)
    assert parse(data).to_bytes() == data


# --------------------------------------------------------------------------- 3.1.1 details


def test_wsinv():
    msg = parsed("wsinv")
    assert msg.method == "INVITE"
    assert msg.uri.has_param("unknownparam")
    assert msg.max_forwards == 68
    assert (msg.cseq.number, msg.cseq.method) == (9, "INVITE")
    assert msg.call_id == b"wsinv.ndaksdj@192.0.2.1"
    assert msg.to.tag == "1918181833n"
    assert msg.from_.display == b'J Rosenberg \\"' and msg.from_.tag == "98asjd8"
    vias = msg.vias
    assert [(v.transport, v.host, v.branch) for v in vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert msg.header("unknownheaderwithunusualvalue") == b";;,,;;,;"
    assert b"\r\nUnknownHeaderWithUnusualValue: ;;,,;;,;\r\n" in msg.to_bytes()
    assert msg.header("newfangledheader") == b"newfangled value continued newfangled value"
    assert msg.header("subject") == b""
    contact = msg.contacts[0]
    assert contact.display == b'Quoted string ""'
    assert contact.params == (("newparam", "newvalue"), ("secondparam", None), ("q", "0.33"))
    assert msg.routes[0].uri.params == (("lr", None), ("unknownwith", "value"),
                                        ("unknown-no-value", None))
    assert len(msg.body) == 150 and msg.content_type == b"application/sdp"


def test_intmeth():
    msg = parsed("intmeth")
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.cseq.method == msg.method
    assert msg.to.display == b"BEL:\x07 NUL:\x00 DEL:\x7f"
    assert msg.call_id == b'intmeth.word%ZK-!.*_+\'@word`~)(><:\\/"][?}{'
    assert msg.from_.display == b"token1~` token2'+_ token3*%!.-"
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.max_forwards == 255


def test_esc01_request_uri_user_unescapes():
    msg = parsed("esc01")
    assert isinstance(msg.uri, SipURI) and msg.uri.scheme == "sip"
    assert msg.uri.user == b"sips%3Auser%40example.com"
    assert msg.uri.user_unescaped == b"sips:user@example.com"
    assert msg.uri.host == "example.net"
    assert msg.to.uri.user_unescaped == b"user"
    assert msg.from_.uri.user_unescaped == b"I have spaces"
    contact = msg.contacts[0].uri
    assert contact.user_unescaped == b"caller"
    assert msg.call_id == b"esc01.239409asdfakjkn23onasd0-3234"  # compact i:
    assert msg.content_type == b"application/sdp"  # compact c:


def test_escnull_users_hold_escaped_nuls():
    msg = parsed("escnull")
    assert msg.to.uri.user_unescaped == b"null-\x00-null"
    assert [c.uri.user_unescaped for c in msg.contacts] == [b"\x00", b"\x00\x00"]


def test_esc02_percent_that_is_not_an_escape():
    msg = parsed("esc02")
    assert msg.method == "RE%47IST%45R" and msg.method != "REGISTER"
    assert msg.cseq.method == "RE%47IST%45R"
    assert msg.to.display == b"%Z%45"
    assert msg.via.branch == "z9hG4bK209%fzsnel234"
    # two Contact values, not three: C%6Fntact is another header
    assert [bytes(c.uri) for c in msg.contacts] == [
        b"sip:alias1@host1.example.com", b"sip:alias3@host3.example.com"]
    assert msg.header("c%6fntact") == b"<sip:alias2@host2.example.com>"


def test_lwsdisp():
    assert parsed("lwsdisp").from_.display == b"caller"


def test_longreq():
    msg = parsed("longreq")
    assert len(msg.vias) == 34
    assert msg.via.host == "sip33.example.com" and msg.via.branch is None
    assert msg.vias[-1].branch.startswith("verylong") and msg.vias[-1].received == "192.0.2.5"
    assert msg.call_id.startswith(b"longreq.onereally") and msg.call_id.endswith(b"longcallid")
    assert len(msg.to.display) > 90


def test_dblreq_drops_the_second_request():
    data = torture("dblreq")
    msg = parsed("dblreq")
    assert msg.method == "REGISTER" and msg.body == b""
    assert msg.call_id == b"dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    out = msg.to_bytes()
    assert b"INVITE" not in out
    assert out == data[:data.index(b"\r\n\r\n") + 4]


def test_semiuri_user_holds_the_semicolon():
    uri = parsed("semiuri").uri
    assert uri.user == b"user;par=u%40example.net"
    assert uri.user_unescaped == b"user;par=u@example.net"
    assert uri.host == "example.com" and uri.params == ()


def test_semiuri_folded_accept_values():
    assert parsed("semiuri").header_values("accept") == [
        b"application/sdp", b"application/pkcs7-mime", b"multipart/mixed", b"multipart/signed",
        b"message/sip", b"message/sipfrag"]


def test_transports():
    vias = parsed("transports").vias
    assert [v.transport for v in vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert [v.host for v in vias] == [f"t{i}.example.com" for i in range(1, 6)]


def test_mpart01_binary_body_framed_by_content_length():
    data = torture("mpart01")
    msg = parsed("mpart01")
    assert len(msg.body) == 553 == int(msg.header("content-length"))
    assert msg.body == data[data.index(b"\r\n\r\n") + 4:]
    assert any(byte >= 0x80 for byte in msg.body)  # binary pkcs7
    assert msg.body.replace(b"\r\n", b"").count(b"\n") > 0  # bare LF bytes inside
    assert msg.content_type == b"multipart/mixed"


def test_unreason_utf8_reason_phrase():
    msg = parsed("unreason")
    assert msg.status == 200
    assert msg.reason.decode("utf-8") == "= 2**3 * 5**2 но сто девяносто девять - простое"


def test_noreason_empty_reason_phrase():
    msg = parsed("noreason")
    assert (msg.status, msg.reason) == (100, b"")
    assert msg.to_bytes().startswith(b"SIP/2.0 100 \r\n")


# --------------------------------------------------------------------------- 3.1.2 details


def test_scalar02_overlarge_expires_is_capped_but_cseq_is_refused():
    data = torture("scalar02").replace(b"36893488147419103232 REGISTER", b"1 REGISTER")
    msg = parse(data)
    msg.validate()
    assert msg.expires == 2**32 - 1
    assert msg.max_forwards == 300


def test_badvers_is_505():
    with pytest.raises(SipError) as info:
        parse(torture("badvers"))
    assert info.value.status == 505


# --------------------------------------------------------------------------- 3.2 - 3.4


def test_badbranch_branch_is_just_the_magic_cookie():
    assert parsed("badbranch").via.branch == "z9hG4bK"


def test_unknown_request_uri_schemes_are_kept_opaque():
    unkscm = parsed("unkscm").uri
    assert isinstance(unkscm, AbsoluteURI)
    assert unkscm.scheme == "nobodyknowsthisscheme"
    assert bytes(unkscm) == b"nobodyKnowsThisScheme:totallyopaquecontent"
    novelsc = parsed("novelsc").uri
    assert isinstance(novelsc, AbsoluteURI) and novelsc.scheme == "soap.beep"


def test_unksm2_non_sip_addresses():
    msg = parsed("unksm2")
    assert msg.to.uri.scheme == "isbn" and msg.from_.uri.scheme == "http"
    with pytest.raises(SipError) as info:
        msg.to.sip_uri  # noqa: B018 - a registrar needs a SIP AOR
    assert info.value.status == 416
    assert msg.contacts[0].uri.scheme == "name"


def test_bext01_require_values():
    msg = parsed("bext01")
    assert msg.header_values("require") == [b"nothingSupportsThis", b"nothingSupportsThisEither"]
    assert msg.header_values("proxy-require") == [
        b"noProxiesSupportThis", b"norDoAnyProxiesSupportThis"]


def test_invut_unknown_content_type():
    msg = parsed("invut")
    assert msg.content_type == b"application/unknownformat" and len(msg.body) == 40


def test_regaut01_unknown_authorization_scheme_is_kept():
    msg = parsed("regaut01")
    assert msg.header("authorization") == b"NoOneKnowsThisScheme opaque-data=here"


def test_bcast_second_via_is_broadcast():
    msg = parsed("bcast")
    assert [v.host for v in msg.vias] == ["192.0.2.198", "255.255.255.255"]


def test_zeromf():
    assert parsed("zeromf").max_forwards == 0


def test_cparam01_unknownparam_is_a_contact_param():
    contact = parsed("cparam01").contacts[0]
    assert contact.params == (("unknownparam", None),)
    assert contact.uri.params == ()
    assert bytes(contact.uri) == b"sip:+19725552222@gw1.example.net"


def test_cparam02_unknownparam_is_a_uri_param():
    contact = parsed("cparam02").contacts[0]
    assert contact.uri.params == (("unknownparam", None),)
    assert contact.params == ()
    assert bytes(contact.uri) == b"sip:+19725552222@gw1.example.net;unknownparam"


def test_regescrt_contact_keeps_the_escaped_route_header():
    contact = parsed("regescrt").contacts[0]
    assert contact.uri.headers == b"Route=%3Csip:sip.example.com%3E"
    assert bytes(contact.uri) == b"sip:user@example.com?Route=%3Csip:sip.example.com%3E"


def test_sdp01_accept():
    assert parsed("sdp01").header("accept") == b"text/nobodyKnowsThis"


def test_inv2543_rfc2543_syntax():
    data = torture("inv2543")
    msg = parsed("inv2543")
    assert msg.via.branch is None and msg.via.params == ()
    assert msg.from_.tag is None
    assert msg.max_forwards is None
    assert not msg.has("content-length")
    assert msg.body == data[data.index(b"\r\n\r\n") + 4:]
    assert msg.body.endswith(b"m=audio 49217 RTP/AVP 0\r\n")
    assert msg.record_routes[0].uri.param("maddr") == "ss1.example.com"
    assert msg.from_.uri.param("user") == "phone"  # inside <>: a URI parameter
    assert msg.to.param("user") == "phone" and msg.to.uri.params == ()  # addr-spec: a header one
