"""SDP: byte-exact round trips, typed views, relay rewriting, and bad input."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.sip import sdp
from cluster.sip.errors import SipError
from conftest import FIXTURES

SEED = FIXTURES / "seed"
RFC4475 = FIXTURES / "rfc4475"


def sdp_body(path) -> bytes | None:
    """The body of a fixture message whose Content-Type is application/sdp."""
    data = path.read_bytes()
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-type", b"c"):
            return body if body and value.strip().lower() == b"application/sdp" else None
    return None


def bodies(folder, pattern) -> dict[str, bytes]:
    found = {path.name: sdp_body(path) for path in sorted(folder.glob(pattern))}
    return {name: body for name, body in found.items() if body is not None}


SEED_BODIES = bodies(SEED, "*.sip")
RFC4475_BODIES = bodies(RFC4475, "*.dat")


def seed(name: str) -> sdp.SessionDescription:
    return sdp.parse(SEED_BODIES[name])


def lines_of(sd: sdp.SessionDescription) -> list[bytes]:
    return sdp.serialise(sd).splitlines(keepends=True)


def exercise_views(sd: sdp.SessionDescription) -> None:
    """Every view, so that fuzzing proves none of them can fail after parse."""
    seen = [sd.origin, sd.connection, sd.direction, sd.codecs()]
    for index, media in enumerate(sd.media):
        seen += [media.media, media.port, media.port_count, media.proto, media.formats]
        seen += [media.payload_types, media.connection, media.direction, media.rtcp_mux]
        seen += [media.rtcp, sd.effective_connection(index), sd.effective_direction(index)]
        seen += [sd.is_hold(index)]
    assert len(seen) == 4 + 13 * len(sd.media)


# Round trips


def test_fixture_sets_are_not_empty():
    assert set(SEED_BODIES) == {
        "01-invite.sip", "04-invite.sip", "06-invite.sip", "09-183.sip", "10-200.sip",
        "12-200.sip",
    }
    assert len(RFC4475_BODIES) == 19


@pytest.mark.parametrize("name", sorted(SEED_BODIES))
def test_seed_bodies_round_trip_byte_for_byte(name):
    body = SEED_BODIES[name]
    sd = sdp.parse(body)
    assert sdp.serialise(sd) == body
    exercise_views(sd)


@pytest.mark.parametrize("name", sorted(RFC4475_BODIES))
def test_rfc4475_bodies_round_trip_byte_for_byte(name):
    body = RFC4475_BODIES[name]
    assert sdp.serialise(sdp.parse(body)) == body


def test_lf_body_and_missing_final_line_ending_round_trip():
    body = b"v=0\no=- 1 2 IN IP4 10.0.0.1\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\nm=audio 4000 RTP/AVP 0"
    sd = sdp.parse(body)
    assert sdp.serialise(sd) == body
    assert sd.media[0].port == 4000


# Views on the seed trace


def test_zoiper_invite_views():
    sd = seed("01-invite.sip")
    assert sd.origin == sdp.Origin("Z", "0", 119481653, "IN", "IP4", "192.168.31.142")
    assert sd.connection == sdp.Connection("IN", "IP4", "192.168.31.142")
    (audio,) = sd.media
    assert (audio.media, audio.port, audio.port_count) == ("audio", 62715, 1)
    assert audio.proto == "RTP/AVP"
    assert audio.payload_types == [3, 101, 110, 97, 8, 0]
    assert audio.formats == ["3", "101", "110", "97", "8", "0"]
    assert audio.rtcp_mux is True
    assert audio.rtcp is None
    assert audio.connection is None
    assert sd.effective_connection(0) == sd.connection
    assert sd.effective_direction(0) == "sendrecv"
    assert sd.is_hold(0) is False


def test_zoiper_invite_codecs_include_static_types_and_telephone_event():
    assert sd_codecs("01-invite.sip") == [
        sdp.Codec(3, "GSM", 8000, None, None),
        sdp.Codec(101, "telephone-event", 8000, None, b"0-16"),
        sdp.Codec(110, "speex", 8000, None, None),
        sdp.Codec(97, "iLBC", 8000, None, b"mode=20"),
        sdp.Codec(8, "PCMA", 8000, None, None),
        sdp.Codec(0, "PCMU", 8000, None, None),
    ]


def sd_codecs(name: str) -> list[sdp.Codec]:
    ((media_type, codecs),) = seed(name).codecs()
    assert media_type == "audio"
    return codecs


def test_pjmedia_answer_has_media_level_connection_and_rtcp():
    sd = seed("10-200.sip")
    assert sd.connection is None
    assert sd.media[0].connection == sdp.Connection("IN", "IP4", "192.168.31.109")
    assert sd.effective_connection(0) == sd.media[0].connection
    assert sd.media[0].rtcp == sdp.Rtcp(4009, sdp.Connection("IN", "IP4", "192.168.31.109"))
    assert sd.media[0].direction == "sendrecv"
    assert sd.media[0].rtcp_mux is False
    assert [c.name for c in sd_codecs("10-200.sip")] == ["PCMA", "telephone-event"]


def test_freeswitch_183_has_rtcp_on_the_rtp_port_and_mux():
    media = seed("09-183.sip").media[0]
    assert media.port == 17734
    assert media.rtcp == sdp.Rtcp(17734, sdp.Connection("IN", "IP4", "192.168.31.109"))
    assert media.rtcp_mux is True
    assert media.direction is None


def test_ipv6_connection():
    sd = sdp.parse(make_body(session_c=b"c=IN IP6 ::1"))
    assert sd.connection == sdp.Connection("IN", "IP6", "::1")
    assert sd.is_hold(0) is False


def test_codec_details():
    body = make_body(
        m=b"m=audio 4000 RTP/AVP 111 10 96",
        attrs=[b"a=rtpmap:111 opus/48000/2", b"a=fmtp:111 minptime=10;useinbandfec=1"],
    )
    assert sdp.parse(body).media[0].codecs() == [
        sdp.Codec(111, "opus", 48000, 2, b"minptime=10;useinbandfec=1"),
        sdp.Codec(10, "L16", 44100, 2, None),
        sdp.Codec(96, "", 0, None, None),
    ]


def test_non_rtp_stream_has_formats_but_no_payload_types():
    media = sdp.parse(make_body(m=b"m=application 9 UDP/DTLS/SCTP webrtc-datachannel")).media[0]
    assert media.formats == ["webrtc-datachannel"]
    assert media.payload_types == [] and media.codecs() == []


def test_port_count():
    media = sdp.parse(make_body(m=b"m=video 49170/2 RTP/AVP 31")).media[0]
    assert (media.port, media.port_count) == (49170, 2)


# Hold (RFC 3264 section 8.4)


@pytest.mark.parametrize(
    ("session_attrs", "attrs", "session_c", "hold"),
    [
        ([], [b"a=sendonly"], b"c=IN IP4 10.0.0.1", True),
        ([], [b"a=inactive"], b"c=IN IP4 10.0.0.1", True),
        ([], [b"a=recvonly"], b"c=IN IP4 10.0.0.1", False),
        ([], [], b"c=IN IP4 0.0.0.0", True),
        ([], [], b"c=IN IP6 ::", True),
        ([b"a=sendonly"], [], b"c=IN IP4 10.0.0.1", True),
        ([b"a=sendonly"], [b"a=sendrecv"], b"c=IN IP4 10.0.0.1", False),
    ],
)
def test_hold(session_attrs, attrs, session_c, hold):
    sd = sdp.parse(make_body(session_c=session_c, session_attrs=session_attrs, attrs=attrs))
    assert sd.is_hold(0) is hold


def test_media_direction_overrides_session_direction():
    sd = sdp.parse(make_body(session_attrs=[b"a=sendonly"], attrs=[b"a=recvonly"]))
    assert (sd.direction, sd.media[0].direction, sd.effective_direction(0)) == (
        "sendonly", "recvonly", "recvonly",
    )


# Rewriting for the relay


def changed_lines(before: sdp.SessionDescription, after: sdp.SessionDescription):
    old, new = lines_of(before), lines_of(after)
    assert len(old) == len(new)
    return {(a, b) for a, b in zip(old, new, strict=True) if a != b}


def test_rewrite_zoiper_invite_changes_only_c_m_and_o():
    original = seed("01-invite.sip")
    rewritten = sdp.rewrite(original, address="203.0.113.7", ports=[30000])
    assert changed_lines(original, rewritten) == {
        (b"o=Z 0 119481653 IN IP4 192.168.31.142\r\n",
         b"o=Z 0 119481654 IN IP4 192.168.31.142\r\n"),
        (b"c=IN IP4 192.168.31.142\r\n", b"c=IN IP4 203.0.113.7\r\n"),
        (b"m=audio 62715 RTP/AVP 3 101 110 97 8 0\r\n",
         b"m=audio 30000 RTP/AVP 3 101 110 97 8 0\r\n"),
    }
    assert rewritten.media[0].rtcp_mux is True
    assert sdp.serialise(original) == SEED_BODIES["01-invite.sip"]  # the input is not modified


def test_rewrite_media_level_connection_and_rtcp():
    original = seed("10-200.sip")
    rewritten = sdp.rewrite(original, address="203.0.113.7", ports=[30000])
    assert changed_lines(original, rewritten) == {
        (b"o=- 3935917257 3935917258 IN IP4 192.168.31.109\r\n",
         b"o=- 3935917257 3935917259 IN IP4 192.168.31.109\r\n"),
        (b"m=audio 4008 RTP/AVP 8 101\r\n", b"m=audio 30000 RTP/AVP 8 101\r\n"),
        (b"c=IN IP4 192.168.31.109\r\n", b"c=IN IP4 203.0.113.7\r\n"),
        (b"a=rtcp:4009 IN IP4 192.168.31.109\r\n", b"a=rtcp:30001 IN IP4 203.0.113.7\r\n"),
    }
    assert b"a=ssrc:824332886 cname:5e9025ae5704649f\r\n" in rewritten.media[0].lines


def test_rewrite_keeps_rtcp_mux_and_takes_given_rtcp_port():
    original = seed("09-183.sip")
    rewritten = sdp.rewrite(original, address="203.0.113.7", ports=[30000], rtcp_ports=[30000])
    media = rewritten.media[0]
    assert media.rtcp == sdp.Rtcp(30000, sdp.Connection("IN", "IP4", "203.0.113.7"))
    assert media.rtcp_mux is True
    assert sdp.rewrite(original, address="203.0.113.7", ports=[30000]).media[0].rtcp.port == 30001


def test_rewrite_rtcp_without_address_stays_without_address():
    sd = sdp.parse(make_body(attrs=[b"a=rtcp:4001"]))
    rewritten = sdp.rewrite(sd, address="203.0.113.7", ports=[30000])
    assert b"a=rtcp:30001\r\n" in rewritten.media[0].lines


def test_rewrite_to_an_ipv6_relay():
    rewritten = sdp.rewrite(seed("10-200.sip"), address="2001:db8::7", ports=[30000])
    assert rewritten.media[0].connection == sdp.Connection("IN", "IP6", "2001:db8::7")
    assert rewritten.media[0].rtcp == sdp.Rtcp(30001, sdp.Connection("IN", "IP6", "2001:db8::7"))


def test_rewrite_two_streams_with_their_own_ports():
    original = sdp.parse(RFC4475_BODIES["sdp01.dat"])
    rewritten = sdp.rewrite(original, address="203.0.113.7", ports=[30000, 30002])
    assert [(m.media, m.port) for m in rewritten.media] == [("audio", 30000), ("video", 30002)]
    assert rewritten.connection.address == "203.0.113.7"
    assert rewritten.origin.sess_version == original.origin.sess_version + 1
    assert rewritten.media[1].lines[1:] == original.media[1].lines[1:]


@pytest.mark.parametrize("video_port", [None, 30002])
def test_rewrite_keeps_a_rejected_stream_at_port_zero(video_port):
    body = make_body(m=b"m=audio 4000 RTP/AVP 0", more_media=[b"m=video 0 RTP/AVP 31"])
    rewritten = sdp.rewrite(sdp.parse(body), address="203.0.113.7", ports=[30000, video_port])
    assert [m.port for m in rewritten.media] == [30000, 0]


def test_rewrite_keeps_port_when_none_and_keeps_port_count():
    sd = sdp.parse(make_body(m=b"m=video 49170/2 RTP/AVP 31"))
    assert sdp.rewrite(sd, address="203.0.113.7", ports=[None]).media[0].port == 49170
    moved = sdp.rewrite(sd, address="203.0.113.7", ports=[30000]).media[0]
    assert moved.lines[0] == b"m=video 30000/2 RTP/AVP 31\r\n"


@pytest.mark.parametrize("session_c", [b"c=IN IP4 0.0.0.0", b"c=IN IP6 ::"])
def test_rewrite_keeps_an_old_style_hold_a_hold(session_c):
    sd = sdp.parse(make_body(session_c=session_c, attrs=[b"a=sendonly"]))
    rewritten = sdp.rewrite(sd, address="203.0.113.7", ports=[30000])
    assert rewritten.connection == sd.connection
    assert rewritten.media[0].port == 30000
    assert rewritten.is_hold(0) and rewritten.effective_direction(0) == "sendonly"


def test_rewrite_keeps_direction_hold():
    sd = sdp.parse(make_body(attrs=[b"a=inactive"]))
    assert sdp.rewrite(sd, address="203.0.113.7", ports=[30000]).is_hold(0)


def test_rewrite_keeps_line_endings():
    body = make_body(eol=b"\n", attrs=[b"a=rtcp:4001 IN IP4 10.0.0.1"])
    rewritten = sdp.serialise(sdp.rewrite(sdp.parse(body), address="203.0.113.7", ports=[30000]))
    assert b"\r" not in rewritten
    assert b"a=rtcp:30001 IN IP4 203.0.113.7\n" in rewritten


def test_rewrite_bumps_version_only_when_something_changed():
    sd = sdp.parse(make_body(session_c=b"c=IN IP4 203.0.113.7"))
    same = sdp.rewrite(sd, address="203.0.113.7", ports=[None])
    assert same == sd and same.origin.sess_version == 2
    unbumped = sdp.rewrite(sd, address="203.0.113.7", ports=[30000], bump_version=False)
    assert unbumped.origin.sess_version == 2 and unbumped.media[0].port == 30000


def test_rewrite_refuses_media_the_relay_cannot_carry():
    sd = sdp.parse(make_body(session_c=b"c=ATM NSAP 47.0005.80.ffe100"))
    with pytest.raises(SipError) as refused:
        sdp.rewrite(sd, address="203.0.113.7", ports=[30000])
    assert refused.value.status == 488


@pytest.mark.parametrize(
    ("address", "ports"), [("", [30000]), ("10.0.0.1 x", [30000]), ("10.0.0.1", []),
                           ("10.0.0.1", [70000])],
)
def test_rewrite_rejects_bad_arguments(address, ports):
    with pytest.raises(ValueError):
        sdp.rewrite(seed("01-invite.sip"), address=address, ports=ports)


# Small helpers


def test_set_direction_replaces_the_existing_attribute_in_place():
    original = seed("01-invite.sip")
    held = sdp.set_direction(original, 0, "sendonly")
    assert changed_lines(original, held) == {(b"a=sendrecv\r\n", b"a=sendonly\r\n")}
    assert held.is_hold(0)


def test_set_direction_adds_the_attribute_after_the_last_line():
    held = sdp.set_direction(seed("06-invite.sip"), 0, "inactive")
    assert held.media[0].lines[-2:] == [b"a=ptime:20\r\n", b"a=inactive\r\n"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"v=0\no=- 1 2 IN IP4 h\nc=IN IP4 h\nm=audio 4 RTP/AVP 0",
         b"m=audio 4 RTP/AVP 0\na=recvonly"),
        (b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 4 RTP/AVP 0\r\n\r\n",
         b"m=audio 4 RTP/AVP 0\r\na=recvonly\r\n\r\n"),
    ],
)
def test_set_direction_respects_a_missing_final_ending_and_trailing_blank_lines(body, expected):
    assert sdp.serialise(sdp.set_direction(sdp.parse(body), 0, "recvonly")).endswith(expected)


def test_set_direction_rejects_unknown_directions():
    with pytest.raises(ValueError):
        sdp.set_direction(seed("01-invite.sip"), 0, "hold")


def test_set_origin_version():
    sd = sdp.set_origin_version(seed("06-invite.sip"), 7)
    assert sd.lines[1] == b"o=FreeSWITCH 1726882621 7 IN IP4 192.168.31.109\r\n"


# Malformed input


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"o=- 1 2 IN IP4 h\r\n",
        b"v=1\r\no=- 1 2 IN IP4 h\r\n",
        b"v=0 \r\no=- 1 2 IN IP4 h\r\n",
        b"v=0\r\ns=-\r\n",  # no o=
        b"v=0\r\no=- 1 2 IN IP4 h\r\no=- 1 2 IN IP4 h\r\n",
        b"v=0\r\no=- 1 2 IN IP4\r\n",
        b"v=0\r\no=- 1 two IN IP4 h\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 4000 RTP/AVP\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 70000 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio -1 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 4000/x RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 4000 RTP/AVP 128\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 4000 RTP/AVP pcmu\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nm=audio 4000 RTP/AVP 0\r\n",  # no c= anywhere
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 4 RTP/AVP 0\r\na=rtcp:x\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nc=IN IP4 h\r\nm=audio 4 RTP/AVP 0\r\na=rtcp:5 IN IP4\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nA=sendrecv\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\nsendrecv\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\n \r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\n\r\ns=-\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\rs=-\r\n",
        b"v=0\r\no=- 1 2 IN IP4 h\r\ns=\x00\r\n",
        b"v=0\r\no=- 1 " + b"9" * 65 + b" IN IP4 h\r\n",
    ],
)
def test_malformed_sdp_is_a_400(body):
    with pytest.raises(SipError) as refused:
        sdp.parse(body)
    assert refused.value.status == 400
    assert refused.value.reason.startswith("Malformed SDP: ")


def test_a_rejected_stream_needs_no_connection_and_odd_rtpmaps_pass():
    body = b"v=0\r\no=- 1 2 IN IP4 h\r\nm=audio 0 RTP/AVP 96\r\na=rtpmap:96 x/y/z\r\n"
    sd = sdp.parse(body)
    assert sd.media[0].codecs() == [sdp.Codec(96, "x", 0, None, None)]


# Generated bodies and fuzzing

TOKEN = st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=8)
FREE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=20
)
ADDRESS = st.sampled_from(["10.0.0.1", "192.0.2.33", "2001:db8::1", "::1", "host.example.net"])


def make_body(
    *,
    eol: bytes = b"\r\n",
    session_c: bytes | None = b"c=IN IP4 10.0.0.1",
    session_attrs: list[bytes] = (),
    m: bytes = b"m=audio 4000 RTP/AVP 0 8",
    attrs: list[bytes] = (),
    more_media: list[bytes] = (),
) -> bytes:
    lines = [b"v=0", b"o=- 1 2 IN IP4 10.0.0.1", b"s=-"]
    lines += [session_c] if session_c else []
    lines += [b"t=0 0", *session_attrs, m, *attrs, *more_media]
    return eol.join(lines) + eol


@st.composite
def sdp_bodies(draw) -> bytes:
    endings = draw(st.sampled_from([[b"\r\n"], [b"\n"], [b"\r\n", b"\n"]]))
    has_session_c = draw(st.booleans())
    version = draw(st.integers(0, 2**63))
    lines = [b"v=0", f"o={draw(TOKEN)} {draw(st.integers(0, 2**63))} {version} IN IP4 "
             f"{draw(ADDRESS)}".encode(), b"s=" + draw(FREE_TEXT).encode()]
    if has_session_c:
        lines.append(f"c=IN {draw(st.sampled_from(['IP4', 'IP6']))} {draw(ADDRESS)}".encode())
    lines.append(b"t=0 0")
    for _ in range(draw(st.integers(0, 3))):
        pts = draw(st.lists(st.integers(0, 127), min_size=1, max_size=5))
        port = draw(st.integers(0, 65535))
        kind = draw(st.sampled_from(["audio", "video"]))
        lines.append(f"m={kind} {port} RTP/AVP {' '.join(map(str, pts))}".encode())
        if not has_session_c or draw(st.booleans()):
            lines.append(f"c=IN IP4 {draw(ADDRESS)}".encode())
        lines += draw(st.lists(media_attribute(pts), max_size=6))
    body = b"".join(line + draw(st.sampled_from(endings)) for line in lines)
    if draw(st.booleans()):
        body = body.rstrip(b"\r\n")
    return body


def media_attribute(pts: list[int]):
    pt = st.sampled_from(pts)
    return st.one_of(
        st.sampled_from([b"a=sendrecv", b"a=sendonly", b"a=recvonly", b"a=inactive",
                         b"a=rtcp-mux", b"a=ptime:20"]),
        st.builds(lambda p, n: f"a=rtpmap:{p} {n}/8000".encode(), pt, TOKEN),
        st.builds(lambda p, t: f"a=fmtp:{p} {t}".encode(), pt, FREE_TEXT),
        st.builds(lambda p: f"a=rtcp:{p}".encode(), st.integers(0, 65535)),
        st.builds(lambda p, a: f"a=rtcp:{p} IN IP4 {a}".encode(), st.integers(0, 65535), ADDRESS),
        st.builds(lambda t: f"a=x-{t}".encode(), FREE_TEXT),
    )


@settings(max_examples=300)
@given(sdp_bodies())
def test_generated_bodies_round_trip_and_rewrite_cleanly(body):
    sd = sdp.parse(body)
    assert sdp.serialise(sd) == body
    exercise_views(sd)
    ports = [30000 + 2 * index for index in range(len(sd.media))]
    rewritten = sdp.rewrite(sd, address="203.0.113.7", ports=ports)
    reparsed = sdp.parse(sdp.serialise(rewritten))
    assert reparsed == rewritten
    for index, media in enumerate(reparsed.media):
        assert media.port in (0, ports[index])
        assert media.lines[1:] == [
            line if line.startswith((b"c=", b"a=rtcp:")) else original
            for line, original in zip(media.lines[1:], sd.media[index].lines[1:], strict=True)
        ]
        assert sd.is_hold(index) == reparsed.is_hold(index)


def must_fail_cleanly(body: bytes) -> None:
    try:
        sd = sdp.parse(body)
    except SipError as error:
        assert error.status == 400
        return
    assert sdp.serialise(sd) == body
    exercise_views(sd)
    try:
        sdp.rewrite(sd, address="203.0.113.7", ports=[30000] * len(sd.media))
    except SipError as error:
        assert error.status == 488
    if sd.media:
        sdp.set_direction(sd, 0, "inactive")


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_sip_error(body):
    must_fail_cleanly(body)
    must_fail_cleanly(b"v=0\r\no=- 1 2 IN IP4 h\r\n" + body)


@settings(max_examples=500)
@given(
    st.sampled_from(sorted(SEED_BODIES.values()) + sorted(RFC4475_BODIES.values())),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 3), st.binary(max_size=4)),
             min_size=1, max_size=4),
)
def test_mutated_bodies_raise_only_sip_error(body, edits):
    for position, removed, inserted in edits:
        position %= len(body) + 1
        body = body[:position] + inserted + body[position + removed:]
    must_fail_cleanly(body)


def test_media_the_relay_cannot_carry_is_named():
    body = (b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
            b"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fingerprint:sha-256 AB\r\n"
            b"m=video 0 TCP/RTP/AVP 96\r\n"  # rejected (port 0): not in the way
            b"m=audio 5000 RTP/AVP 0\r\nm=audio 5002 RTP/SAVP 0\r\nm=image 5004 udptl t38\r\n"
            b"m=video 9 UDP/TLS/RTP/SAVPF 96\r\n")
    assert sdp.unrelayable_protos(sdp.parse(body)) == ["UDP/TLS/RTP/SAVPF"]
    plain = b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\nc=IN IP4 10.0.0.1\r\nm=audio 5 RTP/AVPF 0\r\n"
    assert sdp.unrelayable_protos(sdp.parse(plain)) == []
