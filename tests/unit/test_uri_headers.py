"""URIs (cluster/sip/uri.py) and the typed header values (cluster/sip/headers.py)."""

from __future__ import annotations

import pytest

from cluster.sip.errors import SipError
from cluster.sip.headers import (
    CSeq,
    NameAddr,
    build_params,
    check_date,
    param_value,
    parse_cseq,
    parse_name_addr,
    parse_params,
    parse_uint,
    parse_via,
    quote,
    split_values,
    unquote,
)
from cluster.sip.uri import AbsoluteURI, SipURI, TelURI, parse_uri, unescape


def bad(parser, value: bytes) -> SipError:
    with pytest.raises(SipError) as info:
        parser(value)
    return info.value


# --------------------------------------------------------------------------- SIP and SIPS URIs


def test_a_plain_sip_uri():
    uri = parse_uri(b"sip:alice@atlanta.com")
    assert isinstance(uri, SipURI)
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == (
        "sip", b"alice", None, "atlanta.com", None)
    assert uri.params == () and uri.headers is None
    assert uri.transport == "udp"
    assert bytes(uri) == b"sip:alice@atlanta.com"


def test_password_and_uri_params():
    uri = parse_uri(b"sip:alice:secretword@atlanta.com;transport=TCP")
    assert uri.user == b"alice" and uri.password == b"secretword"
    assert uri.param("transport") == "TCP" and uri.transport == "tcp"


def test_sips_defaults_to_tls_and_keeps_headers_after_the_question_mark():
    uri = parse_uri(b"sips:alice@atlanta.com?subject=project%20x&priority=urgent")
    assert uri.scheme == "sips" and uri.transport == "tls"
    assert uri.headers == b"subject=project%20x&priority=urgent"
    assert bytes(uri) == b"sips:alice@atlanta.com?subject=project%20x&priority=urgent"


def test_telephone_subscriber_user_with_user_phone():
    uri = parse_uri(b"sip:+1-212-555-1212:1234@gateway.com;user=phone")
    # RFC 3261 19.1.3's example: the part after the colon is the password by the grammar
    assert uri.user == b"+1-212-555-1212" and uri.password == b"1234"
    assert uri.param("user") == "phone"
    assert uri.host == "gateway.com"


def test_params_in_the_user_part_stay_in_the_user():
    uri = parse_uri(b"sip:alice;day=tuesday@atlanta.com")
    assert uri.user == b"alice;day=tuesday"
    assert uri.params == ()


def test_uri_params_with_and_without_values_and_headers():
    uri = parse_uri(b"sip:atlanta.com;method=REGISTER;lr;maddr=239.255.255.1;TTL=15"
                    b"?to=alice%40atlanta.com")
    assert uri.user is None
    assert uri.params == (("method", "REGISTER"), ("lr", None), ("maddr", "239.255.255.1"),
                          ("ttl", "15"))
    assert uri.has_param("lr") and uri.param("lr") == ""
    assert uri.param("missing") is None and uri.param("missing", "d") == "d"
    assert not uri.has_param("missing")
    assert uri.headers == b"to=alice%40atlanta.com"


def test_scheme_and_host_are_case_insensitive_user_is_not():
    uri = parse_uri(b"SIP:User@EXAMPLE.COM:5060;LR")
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("sip", b"User", "example.com", 5060)
    assert uri.has_param("lr")
    assert bytes(uri) == b"SIP:User@EXAMPLE.COM:5060;LR"  # sent on as it came


@pytest.mark.parametrize(("raw", "host", "port", "bare"), [
    (b"sip:[2001:db8::1]:5070", "[2001:db8::1]", 5070, "2001:db8::1"),
    (b"sip:user@[2001:DB8::10]", "[2001:db8::10]", None, "2001:db8::10"),
    (b"sips:[::ffff:192.0.2.1];transport=tcp", "[::ffff:192.0.2.1]", None, "::ffff:192.0.2.1"),
    (b"sip:bob@192.0.2.4:65535", "192.0.2.4", 65535, "192.0.2.4"),
    (b"sip:host.example.com.", "host.example.com.", None, "host.example.com."),
])
def test_hosts_and_ports(raw: bytes, host: str, port: int | None, bare: str):
    uri = parse_uri(raw)
    assert (uri.host, uri.port, uri.host_bare) == (host, port, bare)


@pytest.mark.parametrize(("written", "plain"), [
    (b"sip:%61lice@atlanta.com", b"sip:alice@atlanta.com"),
    (b"sip:%75se%72@example.com", b"sip:user@example.com"),
    (b"sip:ALI%43E@atlanta.com", b"sip:ALIC%45@atlanta.com"),
    (b"sip:user%3bpar@example.com", b"sip:user%3Bpar@example.com"),
])
def test_escaped_and_plain_users_compare_equal_unescaped(written: bytes, plain: bytes):
    a, b = parse_uri(written), parse_uri(plain)
    assert a.user_unescaped == b.user_unescaped
    assert a.aor() == b.aor()
    assert a.user != b.user or written == plain  # the user as written is kept for output
    assert bytes(a) == written


def test_unescape():
    assert unescape(b"a%20b%2") == b"a b%2"  # an incomplete escape stays as it is
    assert unescape(b"%00%ff%FF") == b"\x00\xff\xff"
    assert unescape(b"plain") == b"plain"
    assert unescape(b"%ZZ%4") == b"%ZZ%4"


def test_aor_drops_port_params_and_escapes():
    uri = parse_uri(b"sip:%31002@192.168.31.109:5060;transport=UDP")
    assert uri.aor() == "sip:1002@192.168.31.109"
    assert parse_uri(b"sip:example.com").aor() == "sip:example.com"


def test_replace_builds_from_fields():
    uri = parse_uri(b"sip:1009@192.168.31.109:60119;ob")
    moved = uri.replace(host="203.0.113.5", port=None)
    assert bytes(moved) == b"sip:1009@203.0.113.5;ob"
    assert parse_uri(bytes(moved)) == moved
    with_pw = SipURI("sips", b"u", b"p", "[2001:db8::1]", 5061, (("lr", None),), b"a=b")
    assert bytes(with_pw) == b"sips:u:p@[2001:db8::1]:5061;lr?a=b"
    assert parse_uri(bytes(with_pw)) == with_pw


@pytest.mark.parametrize("raw", [
    b"", b"alice@atlanta.com", b"1sip:a@b", b":a@b", b"sip:a b@c", b"sip:<a@b>", b"sip:a\"@b",
    b"sip:alice@", b"sip:@atlanta.com", b"sip:alice@atlanta.com:0",
    b"sip:alice@atlanta.com:65536", b"sip:alice@atlanta.com:123456", b"sip:alice@host:abc",
    b"sip:alice@host:", b"sip:-host", b"sip:host-", b"sip:ho_st", b"sip:host;;lr", b"sip:host;=v",
    b"sip:[2001:db8::1", b"sip:[2001:db8::1]x", b"sip:[2001:zz8::1]", b"sip:host\x00",
    b"sip:ho\tst", b"tel:", b"http:",
])
def test_malformed_uris_are_400(raw: bytes):
    assert bad(parse_uri, raw).status == 400


def test_tel_uris():
    uri = parse_uri(b"tel:+1-201-555-0123;phone-context=example.com;ext=22")
    assert isinstance(uri, TelURI)
    assert uri.number == "+1-201-555-0123" and uri.scheme == "tel"
    assert uri.params == (("phone-context", "example.com"), ("ext", "22"))
    assert bytes(uri) == b"tel:+1-201-555-0123;phone-context=example.com;ext=22"
    assert parse_uri(b"TEL:7042").number == "7042"


def test_other_schemes_are_kept_opaque():
    for raw, scheme in [(b"mailto:x@example.com", "mailto"), (b"isbn:2983792873", "isbn"),
                        (b"soap.beep://192.0.2.103:3002", "soap.beep"),
                        (b"http://www.example.com", "http")]:
        uri = parse_uri(raw)
        assert isinstance(uri, AbsoluteURI) and uri.scheme == scheme and bytes(uri) == raw


# --------------------------------------------------------------------------- name-addr


def test_quoted_display_name_with_escapes():
    addr = parse_name_addr(b'"Alice \\"Al\\" \\\\ Smith" <sip:alice@atlanta.com>;tag=1928301774')
    assert addr.display == b'Alice "Al" \\ Smith'
    assert addr.tag == "1928301774"
    assert bytes(addr.uri) == b"sip:alice@atlanta.com"
    assert bytes(addr) == b'"Alice \\"Al\\" \\\\ Smith" <sip:alice@atlanta.com>;tag=1928301774'
    rebuilt = addr.build()
    assert rebuilt == b'"Alice \\"Al\\" \\\\ Smith" <sip:alice@atlanta.com>;tag=1928301774'
    assert parse_name_addr(rebuilt) == addr


def test_quoted_display_name_with_a_comma_and_angle_brackets():
    addr = parse_name_addr(b'"Doe, <John>" <sip:john@example.com>')
    assert addr.display == b"Doe, <John>" and addr.params == ()


def test_empty_quoted_display_name_and_no_space_before_the_bracket():
    assert parse_name_addr(b'""<sip:a@example.com>').display == b""
    assert parse_name_addr(b'"1002"<sip:1002@192.168.31.109>;tag=x').display == b"1002"


@pytest.mark.parametrize(("value", "display"), [
    (b"Alice <sip:alice@atlanta.com>", b"Alice"),
    (b"Alice   Smith\t<sip:alice@atlanta.com>", b"Alice Smith"),
    (b"caller<sip:caller@example.com>", b"caller"),
    (b"token1~` token2'+_ token3*%!.- <sip:mundane@example.com>",
     b"token1~` token2'+_ token3*%!.-"),
    (b"<sip:alice@atlanta.com>", None),
])
def test_token_display_names(value: bytes, display: bytes | None):
    assert parse_name_addr(value).display == display


def test_addr_spec_form_params_belong_to_the_header():
    addr = parse_name_addr(b"sip:+19725552222@gw1.example.net;unknownparam;tag=5")
    assert addr.uri.params == ()
    assert addr.params == (("unknownparam", None), ("tag", "5"))
    assert addr.display is None


def test_name_addr_form_params_inside_brackets_belong_to_the_uri():
    addr = parse_name_addr(b"<sip:+19725552222@gw1.example.net;unknownparam>;expires=60")
    assert addr.uri.params == (("unknownparam", None),)
    assert addr.params == (("expires", "60"),)
    assert addr.param("expires") == "60" and addr.param("nope") is None


def test_header_params_with_quoted_values_and_lws():
    addr = parse_name_addr(b'<sip:a@b.example.com> ; tag = 5 ; note="a;b,c=\\"d\\"" ;q=0.7;Flag')
    assert addr.params == (("tag", "5"), ("note", '"a;b,c=\\"d\\""'), ("q", "0.7"),
                           ("flag", None))
    assert addr.tag == "5"
    assert unquote(addr.param("note").encode()) == b'a;b,c="d"'


def test_name_addr_with_uri_headers_needs_brackets():
    addr = parse_name_addr(b"<sip:user@example.com?Route=%3Csip:sip.example.com%3E>")
    assert addr.uri.headers == b"Route=%3Csip:sip.example.com%3E"
    assert bad(parse_name_addr, b"sip:user@example.com?Route=x").status == 400


def test_non_sip_uri_in_name_addr():
    addr = parse_name_addr(b"<tel:+15551234>;tag=9")
    assert isinstance(addr.uri, TelURI)
    with pytest.raises(SipError) as info:
        addr.sip_uri  # noqa: B018
    assert info.value.status == 416
    assert parse_name_addr(b"<sip:a@example.com>").sip_uri.user == b"a"


def test_with_tag_and_with_params():
    addr = parse_name_addr(b'"Bob" <sip:bob@example.com>;tag=old;x=1')
    tagged = addr.with_tag("new")
    assert tagged.tag == "new" and tagged.param("x") == "1"
    assert tagged.build() == b'"Bob" <sip:bob@example.com>;x=1;tag=new'
    assert parse_name_addr(bytes(tagged)) == tagged
    assert addr.with_params(()).build() == b'"Bob" <sip:bob@example.com>'


@pytest.mark.parametrize("value", [
    b"", b"   ", b'"unterminated <sip:a@b.example.com>', b'"x" sip:a@b.example.com',
    b"<sip:a@b.example.com", b"Al@ce <sip:a@b.example.com>", b"<sip:a@b.example.com>;",
    b"<sip:a@b.example.com>junk", b"< sip:a@b.example.com >", b"sip:a@b.example.com, sip:c@d",
    b"*", b"<>",
])
def test_malformed_name_addr_is_400(value: bytes):
    assert bad(parse_name_addr, value).status == 400


# --------------------------------------------------------------------------- params helpers


def test_parse_and_build_params():
    params = parse_params(b";A=1 ; b ;c = \"q v\";maddr=[2001:db8::1]")
    assert params == (("a", "1"), ("b", None), ("c", '"q v"'), ("maddr", "[2001:db8::1]"))
    assert build_params(params) == b';a=1;b;c="q v";maddr=[2001:db8::1]'
    assert param_value(params, "b") == "" and param_value(params, "z") is None
    assert parse_params(b"xx;a=1", 2) == (("a", "1"),)
    for text in (b";", b";=v", b";a=", b"a=1", b';a="unterminated', b";a=b c"):
        assert bad(parse_params, text).status == 400


def test_quote_and_unquote_round_trip():
    for text in (b"", b"plain", b'with "quotes"', b"back\\slash", b"\\\""):
        assert unquote(quote(text)) == text


def test_split_values_respects_quotes_and_brackets():
    assert split_values(b'"a, b" <sip:x>, <sip:y;p=1,2>, sip:z') == [
        b'"a, b" <sip:x>', b"<sip:y;p=1,2>", b"sip:z"]
    assert split_values(b'"a\\", b" <sip:q>, <sip:r>') == [b'"a\\", b" <sip:q>', b"<sip:r>"]
    assert split_values(b"a,b , c") == [b"a", b"b", b"c"]
    assert split_values(b"") == [b""]
    for text in (b'"a, b <sip:x>', b"<sip:x", b'"\\"'):
        assert bad(split_values, text).status == 400


# --------------------------------------------------------------------------- Via


def test_via_with_rport_without_a_value():
    via = parse_via(b"SIP/2.0/UDP 192.168.31.142:55747;branch=z9hG4bK-1;rport")
    assert (via.protocol, via.transport, via.host, via.port) == (
        "SIP/2.0", "UDP", "192.168.31.142", 55747)
    assert via.branch == "z9hG4bK-1"
    assert via.has_rport and via.rport is None and via.received is None
    assert via.sent_by == ("192.168.31.142", 55747)
    assert bytes(via) == b"SIP/2.0/UDP 192.168.31.142:55747;branch=z9hG4bK-1;rport"


def test_via_with_rport_received_maddr_and_ttl():
    via = parse_via(b"SIP/2.0/UDP 192.0.2.1;rport=5061;received=198.51.100.2;maddr=224.2.0.1"
                    b";ttl=16;branch=z9hG4bKx")
    assert via.rport == 5061 and via.received == "198.51.100.2"
    assert via.maddr == "224.2.0.1" and via.port is None
    assert via.sent_by == ("192.0.2.1", 5060)
    assert via.branch == "z9hG4bKx"


def test_via_with_ipv6_sent_by_and_received():
    via = parse_via(b"SIP/2.0/TCP [2001:DB8::9]:5070;branch=z9hG4bKv6;received=[2001:db8::a]")
    assert (via.transport, via.host, via.port) == ("TCP", "[2001:db8::9]", 5070)
    assert via.received == "[2001:db8::a]"
    assert parse_via(b"SIP/2.0/UDP [::1];branch=z9hG4bK1").host == "[::1]"


def test_via_with_lws_around_slashes_semicolons_and_equals():
    via = parse_via(b"SIP  /   2.0 / UDP    192.0.2.2 : 5062 ;  branch =  z9hG4bK9ikj8 ; rport")
    assert (via.protocol, via.transport, via.host, via.port) == (
        "SIP/2.0", "UDP", "192.0.2.2", 5062)
    assert via.branch == "z9hG4bK9ikj8" and via.has_rport


def test_via_transport_and_protocol_are_case_insensitive():
    via = parse_via(b"sip/2.0/udp Host.Example.COM;branch=z9hG4bK1")
    assert (via.protocol, via.transport, via.host) == ("SIP/2.0", "UDP", "host.example.com")
    assert parse_via(b"SIP/2.0/SCTP h;branch=z9hG4bK1").transport == "SCTP"
    assert parse_via(b"SIP/2.0/UNKNOWN h;branch=z9hG4bK1").transport == "UNKNOWN"


def test_via_keeps_unknown_params_and_quoted_values():
    via = parse_via(b'SIP/2.0/UDP h;branch=z9hG4bK1;x-flag;x-q="a b;c"')
    assert via.params == (("branch", "z9hG4bK1"), ("x-flag", None), ("x-q", '"a b;c"'))


@pytest.mark.parametrize("value", [
    b"", b"SIP/2.0/UDP", b"SIP/2.0 host", b"SIP/2.0/UDP host:0", b"SIP/2.0/UDP host:70000",
    b"SIP/2.0/UDP host:5060x", b"SIP/2.0/UDP host junk", b"SIP/2.0/UDP host;",
    b"SIP/2.0/UDP host;;branch=z9hG4bK1", b"HTTP/1.1/TCP host", b"SIP/2.0/UDP host;branch=a b",
    b"SIP/2.0/UDPhost",
])
def test_malformed_via_is_400(value: bytes):
    assert bad(parse_via, value).status == 400


# --------------------------------------------------------------------------- scalars


@pytest.mark.parametrize(("value", "number", "method"), [
    (b"1 INVITE", 1, "INVITE"),
    (b"  0009 \t INVITE ", 9, "INVITE"),
    (b"4294967295 BYE", 2**32 - 1, "BYE"),
    (b"88896036 RE%47IST%45R", 88896036, "RE%47IST%45R"),
])
def test_cseq(value: bytes, number: int, method: str):
    cseq = parse_cseq(value)
    assert (cseq.number, cseq.method) == (number, method)
    assert parse_cseq(bytes(cseq)) == cseq == CSeq(number, method)


@pytest.mark.parametrize("value", [
    b"", b"INVITE", b"1", b"-1 INVITE", b"1 IN VITE", b"1 INV@TE", b"4294967296 INVITE",
    b"36893488147419103232 REGISTER", b"1.5 INVITE", b"1INVITE",
])
def test_malformed_cseq_is_400(value: bytes):
    assert bad(parse_cseq, value).status == 400


def test_parse_uint():
    assert parse_uint(b" 0068 ", "Max-Forwards") == 68
    error = bad(lambda v: parse_uint(v, "Max-Forwards"), b"-1")
    assert error.status == 400 and "Max-Forwards" in error.reason
    for value in (b"", b"1 2", b"+1", b"0x1"):
        assert bad(lambda v: parse_uint(v, "Expires"), value).status == 400


def test_check_date():
    check_date(b"Sat, 21 Sep 2024 06:21:03 GMT")
    check_date(b"  Thu, 21 Feb 2002 13:02:03 GMT ")
    for value in (b"Fri, 01 Jan 2010 16:00:00 EST", b"21 Sep 2024 06:21:03 GMT",
                  b"Sat, 21 Sep 2024 6:21:03 GMT", b"yesterday"):
        assert bad(check_date, value).status == 400


# --------------------------------------------------------------------------- gaps found


def test_a_tag_without_a_value_is_refused():
    assert bad(parse_name_addr, b"<sip:a@example.com>;tag").status == 400


def test_a_branch_without_a_value_is_refused():
    assert bad(parse_via, b"SIP/2.0/UDP host;branch").status == 400


def test_name_addr_equality_ignores_raw_bytes():
    a = parse_name_addr(b"<sip:a@example.com> ;tag=1")
    b = NameAddr(parse_uri(b"sip:a@example.com"), None, (("tag", "1"),))
    assert a == b and bytes(a) != bytes(b)
