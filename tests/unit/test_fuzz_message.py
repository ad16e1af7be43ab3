"""Bad input never escapes as anything but SipError, and what parses serialises back.

A deterministic mutation fuzzer (fixed seeds, a fixed number of mutations) runs over the seed
and RFC 4475 corpus; hypothesis generates valid messages from a small grammar and checks that
parsing, serialising and changing them round-trips.  Bounded-work tests feed the parser large
pathological datagrams and time it.
"""

from __future__ import annotations

import random
import string
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cluster.sip.errors import SipError
from cluster.sip.message import Header, Request, Response, header_key, parse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CORPUS = [path.read_bytes() for path in sorted((FIXTURES / "seed").glob("*.sip"))
          + sorted((FIXTURES / "rfc4475").glob("*.dat"))]
MAX_DATAGRAM = 65_507  # the largest UDP payload over IPv4


def header_pairs(msg) -> list[tuple[str, bytes]]:
    return [(h.key, h.value) for h in msg.headers]


# =========================================================================== mutation fuzzer

SPECIAL = b' \t\r\n:;,=@<>"\\%[]?/0123456789\x00\x7f\x80\xff'
REPEATABLE = [b";", b",", b"<", b">", b'"', b"\\", b"%", b" ", b"a", b";a=b", b"<sip:a@b>,",
              b"\r\nVia: SIP/2.0/UDP h", b"\r\nX: y", b"%2", b"["]


def _bit_flip(rng, data, corpus):
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _insert_byte(rng, data, corpus):
    i = rng.randrange(len(data) + 1)
    byte = rng.choice(SPECIAL) if rng.random() < 0.7 else rng.randrange(256)
    return data[:i] + bytes([byte]) + data[i:]


def _delete_bytes(rng, data, corpus):
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16):]


def _duplicate_slice(rng, data, corpus):
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randint(1, 64))
    k = rng.randrange(len(data) + 1)
    return data[:k] + data[i:j] + data[k:]


def _splice(rng, data, corpus):
    other = rng.choice(corpus)
    return data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]


def _shuffle_header_lines(rng, data, corpus):
    eol = b"\r\n" if b"\r\n" in data else b"\n"
    head, sep, body = data.partition(eol + eol)
    lines = head.split(eol)
    if len(lines) < 3:
        return data
    rest = lines[1:]
    if rng.random() < 0.5:
        rng.shuffle(rest)
    else:  # move or drop one line, or duplicate one
        line = rest.pop(rng.randrange(len(rest)))
        if rng.random() < 0.7:
            rest.insert(rng.randrange(len(rest) + 1), line)
            if rng.random() < 0.5:
                rest.insert(rng.randrange(len(rest) + 1), line)
    return eol.join([lines[0], *rest]) + sep + body


def _swap_line_ends(rng, data, corpus):
    choice = rng.randrange(4)
    if choice == 0:
        return data.replace(b"\r\n", b"\n")
    if choice == 1:
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if choice == 2:  # one line end only
        i = data.find(b"\r\n", rng.randrange(len(data)))
        return data if i < 0 else data[:i] + b"\n" + data[i + 2:]
    i = data.find(b"\n", rng.randrange(len(data)))
    return data if i < 0 else data[:i] + b"\r\n" + data[i + 1:]


def _truncate(rng, data, corpus):
    return data[:rng.randrange(len(data))]


def _long_repeat(rng, data, corpus):
    if rng.random() < 0.5:
        piece = rng.choice(REPEATABLE)
    else:
        i = rng.randrange(len(data))
        piece = data[i:i + rng.randint(1, 40)]
    count = rng.randint(2, 4096 // len(piece) + 2)
    k = rng.randrange(len(data) + 1)
    return data[:k] + piece * count + data[k:]


MUTATORS = [_bit_flip, _insert_byte, _delete_bytes, _duplicate_slice, _splice,
            _shuffle_header_lines, _swap_line_ends, _truncate, _long_repeat]


@dataclass
class FuzzReport:
    runs: int = 0
    accepted: int = 0
    used: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    slowest: tuple[float, bytes] = (0.0, b"")


def mutate(rng: random.Random, report: FuzzReport) -> bytes:
    data = rng.choice(CORPUS)
    for _ in range(rng.randint(1, 3)):
        mutator = rng.choice(MUTATORS)
        report.used[mutator.__name__] = report.used.get(mutator.__name__, 0) + 1
        data = mutator(rng, data or b"\r\n", CORPUS)[:MAX_DATAGRAM]
    return data


def check_accepted(msg) -> None:
    """What parse+validate accepted must serialise, change and reparse consistently."""
    again = parse(msg.to_bytes())
    again.validate()
    assert again.start_line() == msg.start_line()
    assert header_pairs(again) == header_pairs(msg)
    assert again.body == msg.body
    again.set_header(b"X-Fuzz", b"1")
    changed = parse(again.to_bytes())
    assert header_pairs(changed) == header_pairs(msg) + [("x-fuzz", b"1")]
    assert changed.body == msg.body


def fuzz_one(data: bytes, report: FuzzReport) -> None:
    report.runs += 1
    started = time.perf_counter()
    try:
        msg = parse(data)
        msg.validate()
    except SipError as e:
        assert 100 <= e.status <= 699 and e.reason
        return
    except Exception as e:  # noqa: BLE001 - anything else is the bug being hunted
        report.failures.append(f"{type(e).__name__}: {e} for {data!r}\n"
                               + "".join(traceback.format_tb(e.__traceback__)[-2:]))
        return
    finally:
        elapsed = time.perf_counter() - started
        if elapsed > report.slowest[0]:
            report.slowest = (elapsed, data)
    report.accepted += 1
    try:
        check_accepted(msg)
    except Exception as e:  # noqa: BLE001
        report.failures.append(f"accepted but does not round-trip ({type(e).__name__}: {e}) "
                               f"for {data!r}")


FUZZ_SEEDS = (3261, 4475, 3581, 2543)
MUTATIONS_PER_SEED = 30_000
assert len(FUZZ_SEEDS) * MUTATIONS_PER_SEED >= 100_000


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_mutated_corpus_raises_only_sip_error(seed: int):
    rng = random.Random(seed)
    report = FuzzReport()
    for _ in range(MUTATIONS_PER_SEED):
        fuzz_one(mutate(rng, report), report)
        if len(report.failures) >= 5:
            break
    print(f"seed {seed}: {report.runs} inputs, {report.accepted} accepted, slowest "
          f"{report.slowest[0] * 1e3:.1f} ms ({len(report.slowest[1])} bytes)")
    assert not report.failures, "\n\n".join(report.failures)
    assert report.runs == MUTATIONS_PER_SEED
    assert set(report.used) == {m.__name__ for m in MUTATORS}
    assert report.accepted > MUTATIONS_PER_SEED // 20  # the mutations do not only make junk


def test_unmutated_corpus_through_the_fuzz_checks():
    report = FuzzReport()
    for data in CORPUS:
        fuzz_one(data, report)
    assert not report.failures, "\n\n".join(report.failures)
    assert report.accepted == 21 + 27


def test_random_bytes_raise_only_sip_error():
    rng = random.Random(17)
    report = FuzzReport()
    for _ in range(3_000):
        fuzz_one(rng.randbytes(rng.randint(0, 200)), report)
    assert not report.failures, "\n\n".join(report.failures)


# =========================================================================== bounded work


def _timed_parse(data: bytes) -> float:
    started = time.perf_counter()
    try:
        parse(data).validate()
    except SipError:
        pass
    return time.perf_counter() - started


def _with_header(lines: bytes) -> bytes:
    return (b"OPTIONS sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
            b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c\r\n"
            b"CSeq: 1 OPTIONS\r\n" + lines + b"Content-Length: 0\r\n\r\n")


def _filled(prefix: bytes, piece: bytes, suffix: bytes = b"\r\n") -> bytes:
    room = 60_000 - len(prefix) - len(suffix)
    return _with_header(prefix + piece * (room // len(piece)) + suffix)


PATHOLOGICAL = {
    "via-params": _filled(b"Via: SIP/2.0/UDP h", b";a=b"),
    "via-values": _filled(b"Via: SIP/2.0/UDP h", b", SIP/2.0/UDP h;branch=z9hG4bK1"),
    "via-lines": _filled(b"", b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n", b""),
    "contact-values": _filled(b"Contact: <sip:a@b>", b',"x,y" <sip:a@b;lr>;q=0.5'),
    "route-lines": _filled(b"", b"Route: <sip:p@proxy.example.com;lr>\r\n", b""),
    "unknown-lines": _filled(b"", b"X-A: b\r\n", b""),
    "commas": _filled(b"Contact: ", b","),
    "open-angles": _filled(b"Contact: ", b"<"),
    "quotes": _filled(b"Contact: ", b'"'),
    "backslashes": _filled(b'Contact: "', b"\\"),
    "semicolons": _filled(b"Contact: <sip:a@b>", b";"),
    "long-token": _filled(b"X-Long: ", b"a"),
    "long-host": _filled(b"Contact: <sip:a@", b"a", b"->\r\n"),
    "long-cseq": _with_header(b"CSeq: " + b"1" * 60_000 + b"\r\n"),
    "escapes": _filled(b"Contact: <sip:", b"%2", b"@b>\r\n"),
    "long-call-id": _filled(b"Call-ID: ", b"x"),
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_large_pathological_datagrams_take_bounded_time(name: str):
    data = PATHOLOGICAL[name]
    assert len(data) <= MAX_DATAGRAM
    assert _timed_parse(data) < 0.5


def test_many_continuation_lines_take_linear_time():
    data = _with_header(b"Subject: x" + b"\r\n a" * 6000 + b"\r\n")
    assert _timed_parse(data) < 0.3


# =========================================================================== hypothesis

TOKEN_CHARS = string.ascii_letters + string.digits + "-.!%*_+`'~"
ALNUM = string.ascii_letters + string.digits
METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
           "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"]

tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)
labels = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=8)
hostnames = st.lists(labels, min_size=1, max_size=3).map(".".join)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6_refs = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
hosts = st.one_of(hostnames, ipv4s, ipv6_refs)
ports = st.one_of(st.none(), st.integers(1, 65535))
escapes = st.integers(0, 255).map(lambda b: f"%{b:02X}")
users = st.lists(st.one_of(st.text(alphabet=ALNUM + "-_.!~*'()&=+$", min_size=1, max_size=6),
                           escapes), min_size=1, max_size=4).map("".join)
quoted_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e)
                      | st.sampled_from("éü€"), max_size=16)
words = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
                max_size=10).map(str.encode)
lws = st.sampled_from(["", "", "", " ", "  ", "\t"])


def quote(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


@st.composite
def sip_uris(draw) -> bytes:
    scheme = draw(st.sampled_from(["sip", "sips", "SIP"]))
    user = draw(st.one_of(st.none(), users))
    host = draw(hosts)
    port = draw(ports)
    params = draw(st.lists(st.tuples(tokens, st.one_of(st.none(), tokens)), max_size=3))
    text = f"{scheme}:" + (f"{user}@" if user else "") + host + (f":{port}" if port else "")
    text += "".join(f";{k}" + (f"={v}" if v is not None else "") for k, v in params)
    return text.encode()


@st.composite
def header_params(draw, avoid: frozenset[str] = frozenset()) -> list[tuple[str, str | None]]:
    names = draw(st.lists(tokens.filter(lambda n: n.lower() not in avoid), max_size=3,
                          unique_by=str.lower))
    values = st.one_of(st.none(), tokens, quoted_text.map(lambda t: quote(t).decode()))
    return [(name, draw(values)) for name in names]


def render_params(params, spaced: bool) -> bytes:
    sep = " ; " if spaced else ";"
    eq = " = " if spaced else "="
    return "".join(sep + k + ("" if v is None else eq + v) for k, v in params).encode()


@st.composite
def name_addrs(draw, tag: str | None) -> bytes:
    display = draw(st.one_of(
        st.none(),
        quoted_text.map(quote),
        st.lists(tokens, min_size=1, max_size=3).map(lambda ws: " ".join(ws).encode()),
    ))
    uri = draw(sip_uris())
    params = draw(header_params(avoid=frozenset({"tag"})))
    if tag is not None:
        params.insert(draw(st.integers(0, len(params))), ("tag", tag))
    head = b"" if display is None else display + draw(st.sampled_from([b"", b" ", b"  "]))
    return head + b"<" + uri + b">" + render_params(params, draw(st.booleans()))


@dataclass
class ViaSpec:
    transport: str
    host: str
    port: int | None
    branch: str
    rport: int | None | bool  # False: absent, True: a bare ;rport

    def render(self, spaced: bool) -> bytes:
        slash = " / " if spaced else "/"
        text = f"SIP{slash}2.0{slash}{self.transport} {self.host}"
        if self.port:
            text += f":{self.port}"
        params = [("branch", self.branch)]
        if self.rport is True:
            params.append(("rport", None))
        elif self.rport:
            params.append(("rport", str(self.rport)))
        return text.encode() + render_params(params, spaced)


vias = st.builds(
    ViaSpec,
    transport=st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS"]),
    host=hosts,
    port=ports,
    branch=tokens.map(lambda t: "z9hG4bK" + t),
    rport=st.one_of(st.just(False), st.just(True), st.integers(1, 65535)),
)


@dataclass
class Spec:
    """A generated message, what its bytes are, and what a parser must read from them."""

    data: bytes
    start: bytes
    call_id: bytes
    cseq: tuple[int, str]
    from_tag: str
    to_tag: str | None
    vias: list[ViaSpec]
    max_forwards: int | None
    unknown: list[tuple[str, bytes]]
    body: bytes


def header_name(draw, long: str, compact: str | None) -> bytes:
    name = compact if compact and draw(st.booleans()) else long
    name = "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name) \
        if draw(st.integers(0, 3)) == 0 else name
    return (name + draw(lws) + ":" + draw(lws)).encode()


def folded(draw, value: bytes) -> bytes:
    """Fold some of the single spaces of ``value`` onto continuation lines."""
    parts = value.split(b" ")
    out = parts[0]
    for part in parts[1:]:
        out += draw(st.sampled_from([b" ", b" ", b"\r\n ", b"\r\n\t"])) + part
    return out


@st.composite
def messages(draw) -> Spec:
    is_request = draw(st.booleans())
    method = draw(st.sampled_from(METHODS))
    if is_request:
        start = method.encode() + b" " + draw(sip_uris()) + b" SIP/2.0"
    else:
        reason = b" ".join(draw(st.lists(words, max_size=3)))
        start = b"SIP/2.0 %d %s" % (draw(st.integers(100, 699)), reason)
    call_id = draw(st.text(alphabet=TOKEN_CHARS + "()<>:/[]?{}", min_size=1, max_size=20))
    if draw(st.booleans()):
        call_id += "@" + draw(hostnames)
    cseq = (draw(st.integers(0, 2**32 - 1)), method)
    from_tag = draw(tokens)
    to_tag = draw(st.one_of(st.none(), tokens))
    via_specs = draw(st.lists(vias, min_size=1, max_size=4))
    max_forwards = draw(st.one_of(st.none(), st.integers(0, 255)))
    unknown = [(f"X-{n}", b" ".join(draw(st.lists(words, max_size=4))))
               for n in draw(st.lists(tokens, max_size=4, unique_by=str.lower))]
    body = draw(st.binary(max_size=200))

    lines: list[bytes] = []
    spaced = draw(st.booleans())
    i = 0
    while i < len(via_specs):  # one or more Via values per line
        take = draw(st.integers(1, len(via_specs) - i))
        values = b", ".join(v.render(spaced) for v in via_specs[i:i + take])
        lines.append(header_name(draw, "Via", "v") + values)
        i += take
    others = [
        header_name(draw, "From", "f") + draw(name_addrs(from_tag)),
        header_name(draw, "To", "t") + draw(name_addrs(to_tag)),
        header_name(draw, "Call-ID", "i") + call_id.encode(),
        header_name(draw, "CSeq", None) + b"%d %s" % (cseq[0], method.encode()),
    ]
    if max_forwards is not None:
        others.append(header_name(draw, "Max-Forwards", None) + b"%02d" % max_forwards)
    others += [header_name(draw, name, None) + folded(draw, value) for name, value in unknown]
    if body:
        others.append(header_name(draw, "Content-Type", "c") + b"application/octet-stream")
    if body or draw(st.booleans()):
        others.append(header_name(draw, "Content-Length", "l") + b"%d" % len(body))
    for line in others:  # anywhere, while the Via lines keep their order
        lines.insert(draw(st.integers(0, len(lines))), line)
    data = b"\r\n".join([start, *lines]) + b"\r\n\r\n" + body
    return Spec(data, start, call_id.encode(), cseq, from_tag, to_tag, via_specs,
                max_forwards, unknown, body)


FUZZ_SETTINGS = settings(max_examples=300, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(messages())
def test_generated_messages_parse_to_what_was_written(spec: Spec):
    msg = parse(spec.data)
    msg.validate()
    assert msg.start_line() == spec.start
    assert isinstance(msg, Request) == (not spec.start.startswith(b"SIP/2.0 "))
    assert msg.call_id == spec.call_id
    assert (msg.cseq.number, msg.cseq.method) == spec.cseq
    assert msg.from_.tag == spec.from_tag
    assert msg.to.tag == spec.to_tag
    assert len(msg.vias) == len(spec.vias)
    for got, want in zip(msg.vias, spec.vias, strict=True):
        assert (got.transport, got.host, got.port, got.branch) == (
            want.transport, want.host.lower(), want.port, want.branch)
        assert got.has_rport == (want.rport is not False)
        assert got.rport == (None if isinstance(want.rport, bool) else want.rport)
    assert msg.max_forwards == spec.max_forwards
    for name, value in spec.unknown:
        assert msg.header(name.lower()) == value
    assert msg.body == spec.body
    assert msg.to_bytes() == spec.data


def rebuilt(msg) -> Request | Response:
    """The same message with every line serialised from its parsed value."""
    headers = [Header(h.key, h.name, h.value) for h in msg.headers]
    if isinstance(msg, Request):
        return Request(msg.method, msg.uri_raw, headers, msg.body)
    return Response(msg.status, msg.reason, headers, msg.body)


@FUZZ_SETTINGS
@given(messages(), st.booleans())
def test_parse_serialise_parse_keeps_start_line_headers_and_body(spec: Spec, lf_only: bool):
    data = spec.data
    if lf_only:  # the LF-only form of the same message (see the framing xfail in test_message)
        assume(b"\r\n\r\n" not in spec.body)
        data = data.replace(b"\r\n", b"\n")
        body_start = data.index(b"\n\n") + 2
        data = data[:body_start] + spec.body
    first = parse(data)
    again = parse(rebuilt(first).to_bytes())
    again.validate()
    assert again.start_line() == first.start_line() == spec.start
    assert header_pairs(again) == header_pairs(first)
    assert again.body == first.body == spec.body


# ---------------------------------------------------------------- changes to generated messages

SETTABLE = {
    b"Max-Forwards": st.integers(0, 255).map(lambda n: b"%d" % n),
    b"Subject": st.lists(words, max_size=3).map(b" ".join),
    b"X-Changed": st.lists(words, max_size=3).map(b" ".join),
    b"Call-ID": tokens.map(str.encode),
    b"i": tokens.map(str.encode),
    b"Contact": st.deferred(lambda: name_addrs(None)),
}
ADDABLE = {
    b"X-Added": st.lists(words, min_size=1, max_size=3).map(b" ".join),
    b"Record-Route": sip_uris().map(lambda u: b"<" + u + b";lr>"),
    b"Contact": st.deferred(lambda: name_addrs(None)),
}
REMOVABLE = ["max-forwards", "contact", "subject", "content-type", "x-changed", "record-route"]


@st.composite
def changes(draw) -> list[tuple]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["set", "add", "remove", "body"]))
        if kind == "set":
            name = draw(st.sampled_from(sorted(SETTABLE)))
            out.append(("set", name, draw(SETTABLE[name])))
        elif kind == "add":
            name = draw(st.sampled_from(sorted(ADDABLE)))
            out.append(("add", name, draw(ADDABLE[name]), draw(st.booleans())))
        elif kind == "remove":
            out.append(("remove", draw(st.sampled_from(REMOVABLE))))
        else:
            content_type = draw(st.sampled_from([None, b"application/sdp", b"text/plain"]))
            out.append(("body", draw(st.binary(max_size=100)), content_type))
    return out


def apply(msg, change: tuple) -> None:
    kind = change[0]
    if kind == "set":
        msg.set_header(change[1], change[2])
    elif kind == "add":
        msg.add_header(change[1], change[2], first=change[3])
    elif kind == "remove":
        msg.remove_header(change[1])
    else:
        msg.set_body(change[1], change[2])


def model(pairs: list[tuple[str, bytes]], body: bytes, change: tuple):
    """What a change should do to the (key, value) list and the body, without the parser."""
    pairs = list(pairs)

    def set_one(key: str, value: bytes) -> None:
        for i, (k, _) in enumerate(pairs):
            if k == key:
                pairs[i] = (key, value)
                pairs[i + 1:] = [p for p in pairs[i + 1:] if p[0] != key]
                return
        pairs.append((key, value))

    kind = change[0]
    if kind == "set":
        set_one(header_key(change[1]), change[2])
    elif kind == "add":
        pair = (header_key(change[1]), change[2])
        if change[3]:
            pairs.insert(0, pair)
        else:
            pairs.append(pair)
    elif kind == "remove":
        pairs = [p for p in pairs if p[0] != change[1]]
    else:
        body, content_type = change[1], change[2]
        if content_type is not None:
            set_one("content-type", content_type)
        elif not body:
            pairs = [p for p in pairs if p[0] != "content-type"]
        set_one("content-length", b"%d" % len(body))
    return pairs, body


@FUZZ_SETTINGS
@given(messages(), changes())
def test_changed_messages_reparse_to_what_was_set(spec: Spec, steps: list[tuple]):
    msg = parse(spec.data)
    pairs, body = header_pairs(msg), msg.body
    for step in steps:
        apply(msg, step)
        pairs, body = model(pairs, body, step)
    assert header_pairs(msg) == pairs
    out = msg.to_bytes()
    again = parse(out)
    again.validate()
    assert again.start_line() == spec.start
    assert header_pairs(again) == pairs
    assert again.body == body
