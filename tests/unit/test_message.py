"""SIP messages: parsing the seed trace, typed views, header handling, framing, changes,
and building requests and responses (cluster/sip/message.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.sip.errors import SipError
from cluster.sip.headers import Via, parse_via
from cluster.sip.message import (
    REASONS,
    Request,
    Response,
    build_request,
    build_response,
    header_key,
    parse,
    parse_shared,
)

SEED_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "seed"
SEED_FILES = sorted(SEED_DIR.glob("*.sip"))


def seed(name: str) -> bytes:
    return (SEED_DIR / f"{name}.sip").read_bytes()


def body_of(data: bytes) -> bytes:
    """What follows the first empty line of a CRLF wire message."""
    return data.split(b"\r\n\r\n", 1)[1]


# A minimal valid request; tests add, replace or drop lines of it.
BASE_HEADERS = (
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776asdhds",
    b"Max-Forwards: 70",
    b"From: Alice <sip:alice@example.com>;tag=1928301774",
    b"To: <sip:bob@example.com>",
    b"Call-ID: a84b4c76e66710@pc33.example.com",
    b"CSeq: 314159 OPTIONS",
)


def wire(*headers: bytes, start: bytes = b"OPTIONS sip:bob@example.com SIP/2.0",
         body: bytes = b"", eol: bytes = b"\r\n") -> bytes:
    return eol.join((start, *headers)) + eol + eol + body


def refused(data: bytes) -> SipError:
    with pytest.raises(SipError) as info:
        parse(data).validate()
    return info.value


def header_pairs(msg) -> list[tuple[str, bytes]]:
    return [(h.key, h.value) for h in msg.headers]


# --------------------------------------------------------------------------- the seed trace

CALL_A = b"cqBcUqknj-sTLjz_cI-GKw.."  # A-leg, Zoiper <-> FreeSWITCH
CALL_B = b"81a36a1e-f284-123d-5799-f111227aced7"  # B-leg, FreeSWITCH <-> MicroSIP
CALL_REG = b"gzK0vdfGjqqhSuekwhNwmg.."
ZOIPER_CONTACT = b"sip:1002@192.168.31.142:55747;transport=UDP"
MICROSIP_CONTACT = b"sip:1009@192.168.31.109:60119;ob"
SOFIA_CONTACT = b"sip:mod_sofia@192.168.31.109:5060"
FS_CONTACT = b"sip:1009@192.168.31.109:5060;transport=udp"
FLAG = "flag"  # a Via ";rport" without a value


@dataclass(frozen=True)
class SeedView:
    """What the seed message says, read off the wire bytes by hand."""

    first: str | int  # method or status
    call_id: bytes
    cseq: tuple[int, str]
    from_tag: str
    to_tag: str | None
    branch: str
    rport: int | str  # FLAG or the port the response carries
    sent_by: tuple[str, int]
    contact: bytes | None
    max_forwards: int | None
    content_length: int


ZOIPER = ("192.168.31.142", 55747)
FS = ("192.168.31.109", 5060)
MICROSIP = ("192.168.31.109", 60119)
BR_INV1 = "z9hG4bK-524287-1---78626c9dcaefb665"
BR_INV2 = "z9hG4bK-524287-1---974f0e190ebbfd0d"
BR_B = "z9hG4bKmSymF8rmr1cvm"
BR_BYE = "z9hG4bKpBH6jytUjKS1B"
TAG_A, TAG_FS_A = "0e837329", "4Z6N2Z34t5KXF"
TAG_FS_B, TAG_MS = "58Ze4tm8QeagB", "d4e3674ca23d4b22bebd2e39245254d5"

SEED_VIEWS = {
    "01-invite": SeedView("INVITE", CALL_A, (1, "INVITE"), TAG_A, None, BR_INV1, FLAG, ZOIPER,
                          ZOIPER_CONTACT, 70, 264),
    "02-407": SeedView(407, CALL_A, (1, "INVITE"), TAG_A, "3pDX04j1XvXam", BR_INV1, 55747,
                       ZOIPER, None, None, 0),
    "03-ack": SeedView("ACK", CALL_A, (1, "ACK"), TAG_A, "3pDX04j1XvXam", BR_INV1, FLAG, ZOIPER,
                       None, 70, 0),
    "04-invite": SeedView("INVITE", CALL_A, (2, "INVITE"), TAG_A, None, BR_INV2, FLAG, ZOIPER,
                          ZOIPER_CONTACT, 70, 264),
    "05-100": SeedView(100, CALL_A, (2, "INVITE"), TAG_A, None, BR_INV2, 55747, ZOIPER, None,
                       None, 0),
    "06-invite": SeedView("INVITE", CALL_B, (88896036, "INVITE"), TAG_FS_B, None, BR_B, FLAG, FS,
                          SOFIA_CONTACT, 69, 248),
    "07-100": SeedView(100, CALL_B, (88896036, "INVITE"), TAG_FS_B, None, BR_B, 5060, FS, None,
                       None, 0),
    "08-180": SeedView(180, CALL_B, (88896036, "INVITE"), TAG_FS_B, TAG_MS, BR_B, 5060, FS,
                       MICROSIP_CONTACT, None, 0),
    "09-183": SeedView(183, CALL_A, (2, "INVITE"), TAG_A, TAG_FS_A, BR_INV2, 55747, ZOIPER,
                       FS_CONTACT, None, 272),
    "10-200": SeedView(200, CALL_B, (88896036, "INVITE"), TAG_FS_B, TAG_MS, BR_B, 5060, FS,
                       MICROSIP_CONTACT, None, 321),
    "11-ack": SeedView("ACK", CALL_B, (88896036, "ACK"), TAG_FS_B, TAG_MS, "z9hG4bKN2QDH39QNa3eg",
                       FLAG, FS, SOFIA_CONTACT, 70, 0),
    "12-200": SeedView(200, CALL_A, (2, "INVITE"), TAG_A, TAG_FS_A, BR_INV2, 55747, ZOIPER,
                       FS_CONTACT, None, 272),
    "13-ack": SeedView("ACK", CALL_A, (2, "ACK"), TAG_A, TAG_FS_A,
                       "z9hG4bK-524287-1---b84e335815c6f6a9", FLAG, ZOIPER, ZOIPER_CONTACT, 70, 0),
    "14-register": SeedView("REGISTER", CALL_REG, (3, "REGISTER"), "88741f1c", None,
                            "z9hG4bK-524287-1---86aa6dd38424cee1", FLAG, ZOIPER,
                            b"sip:1002@192.168.31.142:55747;rinstance=59defe5c8b2788ae;transport=UDP",
                            70, 0),
    "15-200": SeedView(200, CALL_REG, (3, "REGISTER"), "88741f1c", "6HS75N5BNQ02p",
                       "z9hG4bK-524287-1---86aa6dd38424cee1", 55747, ZOIPER,
                       b"sip:1002@192.168.31.142:55747;rinstance=59defe5c8b2788ae;transport=UDP",
                       None, 0),
    "16-bye": SeedView("BYE", CALL_B, (30422, "BYE"), TAG_MS, TAG_FS_B,
                       "z9hG4bKPjf3b1d22a5602462d8ca11d6db5fad320", FLAG, MICROSIP, None, 70, 0),
    "17-200": SeedView(200, CALL_B, (30422, "BYE"), TAG_MS, TAG_FS_B,
                       "z9hG4bKPjf3b1d22a5602462d8ca11d6db5fad320", 60119, MICROSIP, None, None, 0),
    "18-bye": SeedView("BYE", CALL_A, (88896041, "BYE"), TAG_FS_A, TAG_A, BR_BYE, FLAG, FS, None,
                       70, 0),
    "19-bye": SeedView("BYE", CALL_A, (88896041, "BYE"), TAG_FS_A, TAG_A, BR_BYE, FLAG, FS, None,
                       70, 0),
    "20-200": SeedView(200, CALL_A, (88896041, "BYE"), TAG_FS_A, TAG_A, BR_BYE, 5060, FS,
                       ZOIPER_CONTACT, None, 0),
    "21-200": SeedView(200, CALL_A, (88896041, "BYE"), TAG_FS_A, TAG_A, BR_BYE, 5060, FS,
                       ZOIPER_CONTACT, None, 0),
}


def test_the_seed_table_covers_every_seed_file():
    assert len(SEED_FILES) == 21
    assert sorted(SEED_VIEWS) == [path.stem for path in SEED_FILES]


@pytest.mark.parametrize("path", SEED_FILES, ids=lambda p: p.stem)
def test_seed_parses_validates_and_serialises_byte_identical(path: Path):
    data = path.read_bytes()
    msg = parse(data)
    msg.validate()
    assert msg.to_bytes() == data
    assert bytes(msg) == data
    assert msg.start_line() == data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("name", sorted(SEED_VIEWS))
def test_seed_typed_views(name: str):
    want = SEED_VIEWS[name]
    msg = parse(seed(name))
    if isinstance(want.first, int):
        assert isinstance(msg, Response) and msg.status == want.first
    else:
        assert isinstance(msg, Request) and msg.method == want.first
    assert msg.call_id == want.call_id
    assert (msg.cseq.number, msg.cseq.method) == want.cseq
    assert msg.from_.tag == want.from_tag
    assert msg.to.tag == want.to_tag
    assert msg.via.branch == want.branch
    assert msg.via.transport == "UDP"
    assert msg.via.sent_by == want.sent_by
    assert msg.via.has_rport
    if want.rport == FLAG:
        assert msg.via.rport is None
    else:
        assert msg.via.rport == want.rport
    contacts = [bytes(c.uri) for c in msg.contacts]
    assert contacts == ([] if want.contact is None else [want.contact])
    assert msg.max_forwards == want.max_forwards
    assert msg.header("content-length").strip() == str(want.content_length).encode()
    assert len(msg.body) == want.content_length


@pytest.mark.parametrize("name", [n for n, v in SEED_VIEWS.items() if v.content_length])
def test_seed_body_is_the_sdp(name: str):
    data = seed(name)
    msg = parse(data)
    assert msg.body == body_of(data)
    assert msg.body.startswith(b"v=0\r\no=")
    assert msg.body.endswith(b"\r\n")
    assert msg.content_type == b"application/sdp"


def test_seed_request_uris_and_addresses():
    invite = parse(seed("04-invite"))
    assert invite.uri.user == b"1009" and invite.uri.host == "192.168.31.109"
    assert invite.uri.port == 5060 and invite.uri.transport == "udp"
    assert invite.from_.display == b"1002"
    assert invite.from_.uri.param("transport") == "UDP"
    b_leg = parse(seed("06-invite"))
    assert b_leg.from_.display == b"Extension 1002"
    assert b_leg.uri.has_param("ob") and b_leg.uri.port == 60119
    assert b_leg.header("x-fs-support") == b"update_display,send_info"
    register = parse(seed("14-register"))
    assert register.expires == 60
    assert register.contacts[0].uri.param("rinstance") == "59defe5c8b2788ae"
    ok = parse(seed("15-200"))
    assert ok.contacts[0].param("expires") == "60"
    assert ok.header("date") == b"Sat, 21 Sep 2024 06:21:03 GMT"
    bye = parse(seed("18-bye"))
    assert bye.header("reason") == b'Q.850;cause=16;text="NORMAL_CLEARING"'


def test_the_two_retransmitted_byes_are_the_same_request():
    first, second = parse(seed("18-bye")), parse(seed("19-bye"))
    assert first.to_bytes() == second.to_bytes()
    assert (first.via.branch, first.cseq) == (second.via.branch, second.cseq)


def test_received_on_the_seed_b_leg_responses():
    msg = parse(seed("07-100"))
    assert msg.via.received == "192.168.31.109"
    assert msg.via.rport == 5060
    assert msg.header("content-length") == b"0"  # written "Content-Length:  0"


# --------------------------------------------------------------------------- header names


@pytest.mark.parametrize(("name", "key"), [
    (b"Call-ID", "call-id"), (b"cAlL-iD", "call-id"), (b"CALL-ID", "call-id"),
    (b"i", "call-id"), (b"I", "call-id"), (b"f", "from"), (b"t", "to"), (b"v", "via"),
    (b"m", "contact"), (b"l", "content-length"), (b"c", "content-type"), (b"k", "supported"),
    (b"s", "subject"), (b"e", "content-encoding"), (b"o", "event"), (b"r", "refer-to"),
    (b"u", "allow-events"), (b"x", "session-expires"), (b"CSEQ", "cseq"),
    (b"X-Custom-Thing", "x-custom-thing"),
])
def test_header_key_is_case_insensitive_and_expands_compact_forms(name: bytes, key: str):
    assert header_key(name) == key


@pytest.mark.parametrize("name", [b"", b"Bad Name", b"X@Y", b"Na(me", b"\xff"])
def test_header_key_refuses_non_tokens(name: bytes):
    with pytest.raises(SipError) as info:
        header_key(name)
    assert info.value.status == 400


def test_compact_forms_in_a_message():
    data = wire(
        b"v: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKcompact",
        b"f: <sip:alice@example.com>;tag=77",
        b"t: <sip:bob@example.com>",
        b"i: compact-call@example.com",
        b"CSeq: 5 INVITE",
        b"m: <sip:alice@192.0.2.1:5080>",
        b"k: 100rel, timer",
        b"s: a subject",
        b"e: gzip",
        b"c: application/SDP; charset=x",
        b"l: 4",
        start=b"INVITE sip:bob@example.com SIP/2.0",
        body=b"abcd",
    )
    msg = parse(data)
    msg.validate()
    assert msg.via.branch == "z9hG4bKcompact"
    assert msg.from_.tag == "77" and msg.to.tag is None
    assert msg.call_id == b"compact-call@example.com"
    assert bytes(msg.contacts[0].uri) == b"sip:alice@192.0.2.1:5080"
    assert msg.header_values("supported") == [b"100rel", b"timer"]
    assert msg.header("subject") == b"a subject"
    assert msg.header("content-encoding") == b"gzip"
    assert msg.content_type == b"application/sdp"
    assert msg.body == b"abcd"
    assert msg.to_bytes() == data
    # the name as written is kept for output
    assert [h.name for h in msg.headers][:3] == [b"v", b"f", b"t"]


def test_header_names_in_odd_case_and_with_space_before_the_colon():
    data = wire(
        b"VIA: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKodd",
        b"fRoM : <sip:alice@example.com>;tag=1",
        b"TO\t: <sip:bob@example.com>",
        b"cAlL-iD   :odd-case",
        b"cseq: 1 OPTIONS",
    )
    msg = parse(data)
    msg.validate()
    assert msg.call_id == b"odd-case"
    assert msg.via.branch == "z9hG4bKodd"
    assert msg.from_.tag == "1"
    assert msg.to_bytes() == data


# --------------------------------------------------------------------------- repeated headers


def test_repeated_header_lines_and_comma_separated_values():
    data = wire(
        b"Via: SIP/2.0/UDP first.example.com;branch=z9hG4bK1, SIP/2.0/TCP second.example.com"
        b";branch=z9hG4bK2",
        *BASE_HEADERS[1:],
        b"Via: SIP/2.0/UDP third.example.com:5070;branch=z9hG4bK3",
        b'Contact: "Doe, John" <sip:john@a.example.com>;note="x, y", <sip:j2@b.example.com>',
        b"Contact: <sip:j3@c.example.com;lr>",
        b"Route: <sip:p1@proxy.example.com;lr>,<sip:p2@proxy.example.com;lr>",
        b"Route: <sip:p3@proxy.example.com;lr>",
        b"Record-Route: <sip:rr@proxy.example.com;lr>",
        b"X-List: a, b,c",
    )
    msg = parse(data)
    msg.validate()
    assert len(msg.header_lines("via")) == 2
    assert [v.host for v in msg.vias] == [
        "first.example.com", "second.example.com", "third.example.com"]
    assert [v.transport for v in msg.vias] == ["UDP", "TCP", "UDP"]
    assert msg.via.branch == "z9hG4bK1"
    assert msg.vias[2].port == 5070
    contacts = msg.contacts
    assert [c.display for c in contacts] == [b"Doe, John", None, None]
    assert contacts[0].param("note") == '"x, y"'
    assert [c.uri.user for c in contacts] == [b"john", b"j2", b"j3"]
    assert [r.uri.user for r in msg.routes] == [b"p1", b"p2", b"p3"]
    assert msg.record_routes[0].uri.has_param("lr")
    assert msg.header_values("x-list") == [b"a", b"b", b"c"]
    assert msg.header("x-list") == b"a, b,c"
    assert msg.to_bytes() == data


def test_contact_star():
    msg = parse(wire(*BASE_HEADERS[:-1], b"CSeq: 2 REGISTER", b"Contact: *", b"Expires: 0",
                     start=b"REGISTER sip:example.com SIP/2.0"))
    msg.validate()
    assert msg.contact_star and msg.contacts == []
    assert msg.expires == 0


@pytest.mark.parametrize("key", ["call-id", "from", "to", "cseq", "max-forwards"])
def test_a_single_valued_header_given_twice_is_refused(key: str):
    line = next(h for h in BASE_HEADERS if header_key(h.split(b":")[0]) == key)
    assert refused(wire(*BASE_HEADERS, line)).status == 400


@pytest.mark.parametrize("key", ["via", "from", "to", "call-id", "cseq"])
def test_a_missing_required_header_is_refused(key: str):
    kept = [h for h in BASE_HEADERS if header_key(h.split(b":")[0]) != key]
    assert refused(wire(*kept)).status == 400


def test_missing_max_forwards_is_accepted():
    msg = parse(wire(*[h for h in BASE_HEADERS if not h.startswith(b"Max-Forwards")]))
    msg.validate()
    assert msg.max_forwards is None


# --------------------------------------------------------------------------- line folding


def test_line_folding_is_unfolded_in_values_and_kept_on_the_wire():
    data = wire(
        b"Via: SIP/2.0/UDP 192.0.2.1",
        b"\t;branch=z9hG4bKfolded",
        *BASE_HEADERS[1:-1],
        b"CSeq: 314159",
        b"   OPTIONS",
        b"Subject: first part",
        b" second part",
        b"\tthird part",
        b"X-Empty-Then-Value:",
        b"  value",
    )
    msg = parse(data)
    msg.validate()
    assert msg.via.branch == "z9hG4bKfolded"
    assert (msg.cseq.number, msg.cseq.method) == (314159, "OPTIONS")
    assert msg.header("subject") == b"first part second part third part"
    assert msg.header("x-empty-then-value") == b"value"
    assert msg.to_bytes() == data


def test_a_continuation_line_before_any_header_is_refused():
    data = b"OPTIONS sip:bob@example.com SIP/2.0\r\n folded: nonsense\r\n" + b"\r\n".join(
        BASE_HEADERS) + b"\r\n\r\n"
    assert refused(data).status == 400


def test_a_header_line_without_a_colon_is_refused():
    assert refused(wire(*BASE_HEADERS, b"NoColonHere")).status == 400


# --------------------------------------------------------------------------- changes


CHANGE_BASE = seed("06-invite").replace(
    b"Content-Length: 248\r\n",
    b"Content-Length: 248\r\nX-Odd  :   spaced ,, value;;\r\nx-lower:\r\n"
    b"X-Folded: one\r\n two\r\nP-Asserted-Identity: <sip:1002@192.168.31.109>\r\n",
)
NEW_SDP = b"v=0\r\no=- 1 2 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"


def _set_mf(msg):
    msg.set_header(b"Max-Forwards", b"68")


def _set_via(msg):
    msg.set_header(b"Via", b"SIP/2.0/UDP 203.0.113.9;branch=z9hG4bKnew")


def _add(msg):
    msg.add_header(b"X-Added", b"yes")


def _add_first(msg):
    msg.add_header(b"Record-Route", b"<sip:203.0.113.9;lr>", first=True)


def _remove(msg):
    msg.remove_header("user-agent")


def _set_body(msg):
    msg.set_body(NEW_SDP, b"application/sdp")


def _clear_body(msg):
    msg.set_body(b"")


def _new_uri(msg):
    msg.set_uri(b"sip:1009@203.0.113.7:5062")


def _new_via(msg):
    msg.replace_top_via(msg.via.with_received("192.168.31.109", 5060))


def expected_after(change, pairs: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The (key, value) list a change should leave, worked out without the parser."""
    out = list(pairs)

    def replace(key, value):
        i = next(i for i, (k, _) in enumerate(out) if k == key)
        out[i] = (key, value)
        out[i + 1:] = [p for p in out[i + 1:] if p[0] != key]

    if change is _set_mf:
        replace("max-forwards", b"68")
    elif change is _set_via:
        replace("via", b"SIP/2.0/UDP 203.0.113.9;branch=z9hG4bKnew")
    elif change is _add:
        out.append(("x-added", b"yes"))
    elif change is _add_first:
        out.insert(0, ("record-route", b"<sip:203.0.113.9;lr>"))
    elif change is _remove:
        out = [p for p in out if p[0] != "user-agent"]
    elif change is _set_body:
        replace("content-type", b"application/sdp")
        replace("content-length", str(len(NEW_SDP)).encode())
    elif change is _clear_body:
        out = [p for p in out if p[0] != "content-type"]
        replace("content-length", b"0")
    elif change is _new_via:
        replace("via", b"SIP/2.0/UDP 192.168.31.109;rport=5060;branch=z9hG4bKmSymF8rmr1cvm"
                       b";received=192.168.31.109")
    return out


# Each change and the header keys it may touch; every other line must stay as it came.
CHANGES = {
    _set_mf: {"max-forwards"}, _set_via: {"via"}, _add: set(), _add_first: set(),
    _remove: {"user-agent"}, _set_body: {"content-type", "content-length"},
    _clear_body: {"content-type", "content-length"}, _new_uri: set(), _new_via: {"via"},
}


@pytest.mark.parametrize("change", list(CHANGES), ids=lambda f: f.__name__.strip("_"))
def test_changes_keep_untouched_headers_byte_exact_and_in_order(change):
    original = parse(CHANGE_BASE)
    msg = parse(CHANGE_BASE)
    change(msg)
    out = msg.to_bytes()
    again = parse(out)
    again.validate()
    assert header_pairs(again) == expected_after(change, header_pairs(original))
    kept = [h.raw for h in original.headers if h.key not in CHANGES[change]]
    positions = [out.index(raw + b"\r\n") for raw in kept]
    assert positions == sorted(positions)
    assert b"\r\nX-Odd  :   spaced ,, value;;\r\nx-lower:\r\nX-Folded: one\r\n two\r\n" in out
    if change is _set_body:
        assert again.body == NEW_SDP
    elif change is _clear_body:
        assert again.body == b"" and again.content_type is None
    else:
        assert again.body == original.body
    if change is _new_uri:
        assert again.start_line() == b"INVITE sip:1009@203.0.113.7:5062 SIP/2.0"
        assert again.uri.port == 5062
    else:
        assert again.start_line() == original.start_line()


def test_an_unchanged_message_keeps_its_bytes_even_after_typed_views_were_read():
    msg = parse(CHANGE_BASE)
    msg.validate()
    msg.contacts, msg.vias, msg.cseq, msg.header_values("allow")  # noqa: B018
    assert msg.to_bytes() == CHANGE_BASE


def test_typed_views_follow_changes():
    msg = parse(seed("04-invite"))
    assert msg.max_forwards == 70 and msg.call_id == CALL_A
    msg.set_header(b"Max-Forwards", b"69")
    msg.set_header(b"i", b"renamed-call")  # compact name replaces the long-form line
    assert msg.max_forwards == 69
    assert msg.call_id == b"renamed-call"
    assert msg.header_lines("call-id") == [b"renamed-call"]
    msg.remove_header("contact")
    assert msg.contacts == []
    again = parse(msg.to_bytes())
    assert again.call_id == b"renamed-call" and again.max_forwards == 69
    assert b"\r\ni: renamed-call\r\n" in msg.to_bytes()


def test_set_header_adds_a_header_that_was_absent():
    msg = parse(seed("03-ack"))
    msg.set_header(b"Subject", b"new")
    assert msg.headers[-1].key == "subject"
    assert parse(msg.to_bytes()).header("subject") == b"new"


def test_changes_to_an_lf_only_message_keep_lf_line_ends():
    data = seed("03-ack").replace(b"\r\n", b"\n")
    msg = parse(data)
    assert msg.to_bytes() == data
    msg.set_header(b"Max-Forwards", b"10")
    out = msg.to_bytes()
    assert b"\r" not in out
    assert parse(out).max_forwards == 10


# --------------------------------------------------------------------------- framing


def test_a_longer_datagram_is_cut_at_content_length():
    data = seed("04-invite")
    msg = parse(data + b"trailing junk that is not part of the message")
    assert msg.body == body_of(data)
    assert msg.to_bytes() == data


def test_a_body_shorter_than_content_length_is_refused():
    data = seed("04-invite")[:-10]
    error = refused(data)
    assert error.status == 400
    assert "Content-Length" in error.reason


def test_without_content_length_the_body_runs_to_the_end_of_the_datagram():
    data = seed("04-invite").replace(b"Content-Length: 264\r\n", b"")
    msg = parse(data + b"extra")
    msg.validate()
    assert msg.body == body_of(data) + b"extra"
    assert msg.header("content-length") is None


def test_content_length_zero_drops_what_follows():
    data = seed("03-ack")
    msg = parse(data + b"INVITE sip:x@y SIP/2.0\r\n\r\n")
    assert msg.body == b""
    assert msg.to_bytes() == data


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1 2", b"0x10", b""])
def test_malformed_content_length_is_refused(value: bytes):
    assert refused(wire(*BASE_HEADERS, b"Content-Length: " + value)).status == 400


def test_conflicting_content_lengths_are_refused_and_equal_ones_accepted():
    assert refused(wire(*BASE_HEADERS, b"Content-Length: 3", b"l: 2", body=b"abc")).status == 400
    msg = parse(wire(*BASE_HEADERS, b"Content-Length: 3", b"l: 3", body=b"abcdef"))
    assert msg.body == b"abc"


def test_compact_content_length_frames_the_body():
    msg = parse(wire(*BASE_HEADERS, b"l:2", body=b"hello"))
    assert msg.body == b"he"


def test_lf_only_messages_are_framed_like_crlf_ones():
    data = seed("04-invite").replace(b"\r\n", b"\n")
    body = body_of(seed("04-invite")).replace(b"\r\n", b"\n")
    data = data.replace(b"Content-Length: 264", b"Content-Length: %d" % len(body))
    msg = parse(data + b"junk")
    msg.validate()
    assert msg.body == body
    assert msg.call_id == CALL_A


def test_headers_that_end_with_the_datagram_have_an_empty_body():
    msg = parse(b"\r\n".join((b"OPTIONS sip:bob@example.com SIP/2.0", *BASE_HEADERS,
                              b"Content-Length: 0")) + b"\r\n")
    msg.validate()
    assert msg.body == b""
    refused_error = refused(b"\r\n".join((b"OPTIONS sip:bob@example.com SIP/2.0",
                                          *BASE_HEADERS, b"Content-Length: 4")))
    assert refused_error.status == 400


@pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\n\r\n", b"\n\n", b"   "])
def test_empty_datagrams_are_refused(data: bytes):
    assert refused(data).status == 400


@pytest.mark.parametrize(("start", "status"), [
    (b"OPTIONS sip:bob@example.com SIP/3.0", 505),
    (b"OPTIONS sip:bob@example.com SIP/2.0 extra", 400),
    (b"OPTIONS  sip:bob@example.com SIP/2.0", 400),
    (b"OPTIONS sip:bob@example.com", 400),
    (b"OPT:IONS sip:bob@example.com SIP/2.0", 400),
    (b"OPTIONS sip:bob@example.com HTTP/1.1", 400),
    (b"SIP/2.0 2000 OK", 400),
    (b"SIP/2.0 099 Low", 400),
    (b"SIP/2.0 700 High", 400),
    (b"SIP/2.0 abc OK", 400),
    (b"SIP/3.0 200 OK", 505),
])
def test_bad_start_lines(start: bytes, status: int):
    assert refused(wire(*BASE_HEADERS, start=start)).status == status


def test_cseq_method_must_match_the_request_method():
    assert refused(wire(*BASE_HEADERS, start=b"INVITE sip:bob@example.com SIP/2.0")).status == 400
    unknown = wire(*BASE_HEADERS, start=b"FROBNICATE sip:bob@example.com SIP/2.0")
    assert refused(unknown).status == 501


def test_a_response_reason_phrase_may_hold_spaces_and_may_be_empty():
    headers = [h for h in BASE_HEADERS if not h.startswith(b"Max-Forwards")]
    msg = parse(wire(*headers, start=b"SIP/2.0 486 Busy   Here  now"))
    assert (msg.status, msg.reason) == (486, b"Busy   Here  now")
    msg = parse(wire(*headers, start=b"SIP/2.0 180 "))
    assert (msg.status, msg.reason) == (180, b"")


def test_header_values_with_unicode_are_kept_as_bytes():
    value = "Ülrich Größe <sip:u@example.com>;tag=9".encode()
    msg = parse(wire(*BASE_HEADERS, b"X-Name: " + value))
    assert msg.header("x-name") == value


# --------------------------------------------------------------------------- build_response


def test_build_response_copies_the_transaction_headers():
    request = parse(seed("04-invite"))
    response = build_response(request, 180, to_tag="as7d")
    assert isinstance(response, Response)
    assert (response.status, response.reason) == (180, b"Ringing")
    assert [h.key for h in response.headers] == [
        "via", "to", "from", "call-id", "cseq", "content-length"]
    assert response.header("via") == request.header("via")
    assert response.header("from") == request.header("from")
    assert response.header("call-id") == CALL_A
    assert response.header("cseq") == b"2 INVITE"
    assert response.header("to") == b"<sip:1009@192.168.31.109:5060>;tag=as7d"
    assert response.header("content-length") == b"0"
    out = response.to_bytes()
    assert out.startswith(b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 192.168.31.142:55747;")
    assert out.endswith(b"\r\nContent-Length: 0\r\n\r\n")
    again = parse(out)
    again.validate()
    assert again.to.tag == "as7d" and again.from_.tag == TAG_A
    assert again.via.branch == BR_INV2
    for absent in ("max-forwards", "contact", "user-agent", "proxy-authorization", "allow"):
        assert not again.has(absent)


def test_build_response_puts_no_tag_on_a_100():
    response = build_response(parse(seed("04-invite")), 100, to_tag="as7d")
    assert response.header("to") == b"<sip:1009@192.168.31.109:5060>"
    assert parse(response.to_bytes()).to.tag is None
    assert response.reason == b"Trying"


def test_build_response_keeps_a_to_tag_the_request_had():
    response = build_response(parse(seed("18-bye")), 200, to_tag="other")
    assert parse(response.to_bytes()).to.tag == TAG_A
    assert response.header("to").count(b"tag=") == 1


def test_build_response_without_a_tag_leaves_to_alone():
    response = build_response(parse(seed("04-invite")), 407)
    assert response.header("to") == b"<sip:1009@192.168.31.109:5060>"
    assert response.reason == REASONS[407].encode()


def test_build_response_copies_every_via_in_order():
    request = parse(wire(
        b"Via: SIP/2.0/UDP a.example.com;branch=z9hG4bKa, SIP/2.0/UDP b.example.com"
        b";branch=z9hG4bKb", *BASE_HEADERS[1:], b"v: SIP/2.0/TCP c.example.com;branch=z9hG4bKc"))
    response = parse(build_response(request, 200, to_tag="t").to_bytes())
    assert [v.branch for v in response.vias] == ["z9hG4bKa", "z9hG4bKb", "z9hG4bKc"]
    assert response.header_lines("via") == request.header_lines("via")


def test_build_response_with_body_extra_headers_and_reason():
    request = parse(seed("04-invite"))
    body = NEW_SDP
    response = build_response(request, 200, "Fine Thanks", to_tag="x1",
                              headers=[(b"Contact", b"<sip:b2bua@203.0.113.1>"),
                                       (b"Server", b"sipcluster")],
                              body=body, content_type=b"application/sdp")
    again = parse(response.to_bytes())
    again.validate()
    assert (again.status, again.reason) == (200, b"Fine Thanks")
    assert again.body == body
    assert again.header("content-length") == str(len(body)).encode()
    assert again.content_type == b"application/sdp"
    assert bytes(again.contacts[0].uri) == b"sip:b2bua@203.0.113.1"
    assert again.header("server") == b"sipcluster"


def test_build_response_for_an_unlisted_status_still_has_a_reason():
    response = build_response(parse(seed("04-invite")), 299)
    assert response.reason == b"Unknown"
    assert parse(response.to_bytes()).status == 299


def test_build_response_matches_what_freeswitch_sent():
    request = parse(seed("01-invite"))
    request.replace_top_via(request.via.with_received("192.168.31.142", 55747))
    response = parse(build_response(request, 407, to_tag="3pDX04j1XvXam").to_bytes())
    sent = parse(seed("02-407"))
    for key in ("from", "to", "call-id", "cseq"):
        assert response.header(key) == sent.header(key)
    assert response.via.rport == sent.via.rport == 55747
    assert response.via.branch == sent.via.branch


# --------------------------------------------------------------------------- build_request


REQUEST_HEADERS = [
    (b"Via", b"SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKbuilt;rport"),
    (b"Max-Forwards", b"70"),
    (b"From", b'"B2BUA" <sip:1002@203.0.113.1>;tag=abc'),
    (b"To", b"<sip:1009@192.168.31.109>"),
    (b"Call-ID", b"built-call-id"),
    (b"CSeq", b"1 INVITE"),
    (b"Contact", b"<sip:b2bua@203.0.113.1:5060>"),
]


def test_build_request_without_body():
    request = build_request("INVITE", b"sip:1009@192.168.31.109:60119;ob", REQUEST_HEADERS)
    out = request.to_bytes()
    assert out.startswith(b"INVITE sip:1009@192.168.31.109:60119;ob SIP/2.0\r\n"
                          b"Via: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKbuilt;rport\r\n")
    assert out.endswith(b"Content-Length: 0\r\n\r\n")
    again = parse(out)
    again.validate()
    assert [h.key for h in again.headers] == [
        "via", "max-forwards", "from", "to", "call-id", "cseq", "contact", "content-length"]
    assert again.from_.display == b"B2BUA" and again.from_.tag == "abc"
    assert again.cseq.number == 1 and again.uri.has_param("ob")
    assert again.content_type is None and again.body == b""


def test_build_request_with_body():
    request = build_request("INVITE", b"sip:1009@192.168.31.109", REQUEST_HEADERS, NEW_SDP,
                            b"application/sdp")
    again = parse(request.to_bytes())
    again.validate()
    assert again.body == NEW_SDP
    assert again.header("content-type") == b"application/sdp"
    assert again.header("content-length") == str(len(NEW_SDP)).encode()
    assert [h.key for h in again.headers][-2:] == ["content-type", "content-length"]


def test_build_request_with_body_but_no_content_type():
    again = parse(build_request("MESSAGE", b"sip:x@example.com",
                                [(n, v.replace(b"INVITE", b"MESSAGE")) for n, v in REQUEST_HEADERS],
                                b"hello").to_bytes())
    assert again.body == b"hello" and not again.has("content-type")


def test_build_request_refuses_a_bad_header_name():
    with pytest.raises(SipError):
        build_request("OPTIONS", b"sip:x@example.com", [(b"Bad Name", b"v")])


# --------------------------------------------------------------------------- Via.with_received


def test_with_received_fills_rport_and_adds_received_rfc3581():
    via = parse(seed("04-invite")).via
    marked = via.with_received("198.51.100.7", 40001)
    assert marked.rport == 40001 and marked.received == "198.51.100.7"
    assert marked.branch == BR_INV2
    assert bytes(marked) == (b"SIP/2.0/UDP 192.168.31.142:55747;branch=" + BR_INV2.encode()
                             + b";rport=40001;received=198.51.100.7")
    assert parse_via(bytes(marked)) == marked


def test_with_received_adds_received_even_when_the_address_matches_if_rport_was_asked():
    via = parse(seed("04-invite")).via
    marked = via.with_received("192.168.31.142", 55747)
    assert marked.received == "192.168.31.142" and marked.rport == 55747


def test_with_received_without_rport():
    via = parse_via(b"SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx")
    assert via.with_received("192.0.2.1", 5060).params == via.params  # nothing to note
    moved = via.with_received("203.0.113.9", 6000)
    assert moved.received == "203.0.113.9"
    assert not moved.has_rport  # no rport unless the client asked for it
    named = parse_via(b"SIP/2.0/UDP pc33.example.com;branch=z9hG4bKx")
    assert named.with_received("192.0.2.1", 5060).received == "192.0.2.1"


def test_with_received_replaces_an_old_received_and_handles_ipv6():
    via = parse_via(b"SIP/2.0/UDP 192.0.2.1;received=10.0.0.1;branch=z9hG4bKx;rport=1")
    marked = via.with_received("203.0.113.9", 7000)
    assert [k for k, _ in marked.params] == ["branch", "rport", "received"]
    assert marked.received == "203.0.113.9" and marked.rport == 7000
    v6 = parse_via(b"SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx")
    assert v6.with_received("2001:db8::1", 5060).received is None
    assert v6.with_received("2001:db8::2", 5060).received == "2001:db8::2"


def test_replace_top_via_keeps_the_other_values_of_its_line():
    msg = parse(wire(
        b"Via: SIP/2.0/UDP a.example.com;branch=z9hG4bKa;rport, SIP/2.0/UDP b.example.com"
        b";branch=z9hG4bKb", *BASE_HEADERS[1:], b"Via: SIP/2.0/UDP c.example.com;branch=z9hG4bKc"))
    msg.replace_top_via(msg.via.with_received("198.51.100.1", 1234))
    again = parse(msg.to_bytes())
    assert [v.host for v in again.vias] == ["a.example.com", "b.example.com", "c.example.com"]
    assert again.via.rport == 1234 and again.via.received == "198.51.100.1"
    assert again.header_lines("via")[1] == b"SIP/2.0/UDP c.example.com;branch=z9hG4bKc"


def test_a_built_via_round_trips():
    via = Via("TCP", "proxy.example.com", 5061, (("branch", "z9hG4bK1"), ("rport", None)))
    assert bytes(via) == b"SIP/2.0/TCP proxy.example.com:5061;branch=z9hG4bK1;rport"
    assert parse_via(bytes(via)) == via


# --------------------------------------------------------------------------- gaps found


def test_an_empty_call_id_is_refused():
    headers = [h if not h.startswith(b"Call-ID") else b"Call-ID: " for h in BASE_HEADERS]
    assert refused(wire(*headers)).status == 400


def test_a_bare_lf_inside_a_header_line_is_refused():
    data = wire(*BASE_HEADERS, b"User-Agent: phone\nX-Injected: 1")
    assert refused(data).status == 400


def test_a_bare_cr_inside_a_header_line_is_refused():
    data = wire(*BASE_HEADERS, b"User-Agent: phone\rX-Injected: 1")
    assert refused(data).status == 400


def test_an_lf_only_message_is_framed_at_its_own_empty_line():
    body = b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--\r\n"
    data = wire(*BASE_HEADERS, b"Content-Type: multipart/mixed;boundary=b",
                b"Content-Length: %d" % len(body), body=body, eol=b"\n")
    msg = parse(data)
    assert msg.body == body


# --------------------------------------------------------------------------- parse_shared


def test_parse_shared_gives_one_read_only_parse_per_bytes():
    data = wire(*BASE_HEADERS)
    shared = parse_shared(data)
    assert parse_shared(bytes(bytearray(data))) is shared  # equal bytes, another object
    assert shared.via.branch == "z9hG4bK776asdhds" and shared.to_bytes() == data
    for change in (lambda m: m.add_header(b"X-A", b"1"), lambda m: m.set_header(b"To", b"<x>"),
                   lambda m: m.remove_header("to"), lambda m: m.set_body(b"x"),
                   lambda m: m.replace_top_via(m.via), lambda m: m.set_uri(b"sip:x@y")):
        with pytest.raises(TypeError):
            change(shared)
    assert shared.to_bytes() == data and shared.header("x-a") is None
    own = parse(data)  # a copy of one's own stays changeable
    own.set_header(b"To", b"<sip:carol@example.com>")
    assert own is not shared and shared.header("to") == b"<sip:bob@example.com>"
