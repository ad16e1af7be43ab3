"""The dispatcher's cheap look-ups (cluster/sip/scan.py) must agree with the full parser
wherever the parser accepts the message, and must never raise on anything."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster.sip import scan
from cluster.sip.errors import SipError
from cluster.sip.message import Response, parse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CORPUS = sorted((FIXTURES / "seed").glob("*.sip")) + sorted((FIXTURES / "rfc4475").glob("*.dat"))


def parser_call_id(data: bytes) -> bytes | None:
    return parse(data).call_id or None


def parser_top_branch(data: bytes) -> bytes | None:
    branch = parse(data).via.branch
    return branch.encode("latin-1") if branch else None


def parses(path: Path) -> bool:
    try:
        parse(path.read_bytes()).via  # noqa: B018
    except SipError:
        return False
    return True


PARSED = [path for path in CORPUS if parses(path)]





def test_the_corpus_is_there():
    assert len(CORPUS) == 21 + 49
    assert len(PARSED) > 50


@pytest.mark.parametrize("path", PARSED, ids=lambda p: p.stem)
def test_call_id_agrees_with_the_parser(path: Path):
    data = path.read_bytes()
    assert scan.call_id(data) == parser_call_id(data)


@pytest.mark.parametrize("path", PARSED, ids=lambda p: p.stem)
def test_top_branch_agrees_with_the_parser(path: Path):
    data = path.read_bytes()
    assert scan.top_branch(data) == parser_top_branch(data)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_is_response_agrees_with_the_start_line(path: Path):
    data = path.read_bytes()
    assert scan.is_response(data) == data.startswith(b"SIP/")
    if path in PARSED:
        assert scan.is_response(data) == isinstance(parse(data), Response)


def test_seed_values():
    data = (FIXTURES / "seed" / "04-invite.sip").read_bytes()
    assert scan.call_id(data) == b"cqBcUqknj-sTLjz_cI-GKw.."
    assert scan.top_branch(data) == b"z9hG4bK-524287-1---974f0e190ebbfd0d"
    assert not scan.is_response(data)
    assert scan.is_response((FIXTURES / "seed" / "05-100.sip").read_bytes())


# --------------------------------------------------------------------------- header spellings


def message(via: bytes, call_id: bytes, extra: bytes = b"", body: bytes = b"") -> bytes:
    return (b"OPTIONS sip:bob@example.com SIP/2.0\r\n" + via + b"\r\nFrom: <sip:a@example.com>"
            b";tag=1\r\nTo: <sip:bob@example.com>\r\n" + call_id + b"\r\nCSeq: 1 OPTIONS\r\n"
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


VIA = b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop"
CALL = b"Call-ID: the-call@192.0.2.1"
INNER_SIP = (b"INVITE sip:q@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKbody"
             b"\r\nCall-ID: inner-call\r\n\r\n")

SPELLINGS = [
    pytest.param(VIA, CALL, b"", b"", id="usual"),
    pytest.param(VIA, b"i: the-call@192.0.2.1", b"", b"", id="compact-i"),
    pytest.param(VIA, b"I:the-call@192.0.2.1", b"", b"", id="compact-upper-i"),
    pytest.param(VIA, b"cAlL-iD: the-call@192.0.2.1", b"", b"", id="odd-case-call-id"),
    pytest.param(VIA, b"Call-ID  :   the-call@192.0.2.1  ", b"", b"", id="call-id-lws"),
    pytest.param(VIA, b"X-Call-ID: decoy\r\nCall-ID: the-call", b"", b"", id="decoy-header"),
    pytest.param(b"v: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop", CALL, b"", b"", id="compact-v"),
    pytest.param(b"VIA: SIP/2.0/UDP 192.0.2.1;BRANCH=z9hG4bKtop", CALL, b"", b"",
                 id="upper-via-and-branch"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1;rport;received=192.0.2.1;ttl=1;branch=z9hG4bKtop",
                 CALL, b"", b"", id="branch-after-other-params"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1;xbranch=no;branch=z9hG4bKtop", CALL, b"", b"",
                 id="param-ending-in-branch"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1 ; branch = z9hG4bKtop ; rport", CALL, b"", b"",
                 id="branch-with-lws"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop, SIP/2.0/UDP 192.0.2.2"
                 b";branch=z9hG4bKsecond", CALL, b"", b"", id="two-vias-one-line"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1, SIP/2.0/UDP 192.0.2.2;branch=z9hG4bKsecond",
                 CALL, b"", b"", id="top-via-without-branch"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop\r\nVia: SIP/2.0/UDP 192.0.2.2"
                 b";branch=z9hG4bKsecond", CALL, b"", b"", id="two-via-lines"),
    pytest.param(b"Via : SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop", CALL, b"", b"",
                 id="via-space-before-colon"),
    pytest.param(b"Via:\r\n SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop", CALL, b"", b"",
                 id="folded-via-value-on-next-line"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1\r\n\t;branch=z9hG4bKtop", CALL, b"", b"",
                 id="folded-via-branch-on-next-line"),
    pytest.param(b"Via: SIP/2.0/UDP 192.0.2.1;x=\"a,b\";branch=z9hG4bKtop", CALL, b"", b"",
                 id="quoted-comma-before-branch"),
    pytest.param(b"v: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop\r\nVia: SIP/2.0/UDP 192.0.2.2"
                 b";branch=z9hG4bKsecond", CALL, b"", b"", id="compact-v-then-long-via"),
    pytest.param(VIA, b"Call-ID:\r\n the-call@192.0.2.1", b"", b"", id="folded-call-id"),
    pytest.param(b"v: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop", b"i: the-call@192.0.2.1",
                 b"Content-Type: message/sip\r\n", INNER_SIP, id="message-sip-body"),
]


@pytest.mark.parametrize(("via", "call_id", "extra", "body"), SPELLINGS)
def test_scan_agrees_with_the_parser_on_header_spellings(via, call_id, extra, body):
    data = message(via, call_id, extra, body)
    msg = parse(data)
    msg.validate()
    assert (scan.call_id(data), scan.top_branch(data)) == (
        parser_call_id(data), parser_top_branch(data))


def test_lf_only_messages():
    data = message(VIA, b"i: lf-call").replace(b"\r\n", b"\n")
    assert scan.call_id(data) == b"lf-call" == parser_call_id(data)
    assert scan.top_branch(data) == b"z9hG4bKtop" == parser_top_branch(data)


def test_no_call_id_and_no_via():
    data = b"OPTIONS sip:bob@example.com SIP/2.0\r\nCSeq: 1 OPTIONS\r\n\r\n"
    assert scan.call_id(data) is None and scan.top_branch(data) is None


def test_an_empty_call_id_is_refused_by_the_parser_as_scan_ignores_it():
    data = message(VIA, b"Call-ID: ")
    assert scan.call_id(data) is None
    with pytest.raises(SipError):
        parse(data)


# --------------------------------------------------------------------------- garbage


GARBAGE = [
    b"", b"\n", b"\r\n", b"\r\n\r\n", b"SIP/", b"SIP", b"Call-ID:", b"\nCall-ID:",
    b"\nCall-ID:\r\n", b"\ni:", b"\nVia:", b"\nv:", b"\nVia: ;branch=", b"\nVia: x;branch=\r",
    b"\xff" * 300, b"\x00" * 300, b"\n" * 5000, b"\ni" * 5000, b"\nVia:" + b";" * 5000,
    b"\nv:" + b" ;branch" * 2000, b"\nCall-iD" * 2000, b"\n i : " * 2000,
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_returns_none_or_bytes_and_never_raises(data: bytes):
    check_scan_result(data)


def check_scan_result(data: bytes) -> None:
    call_id = scan.call_id(data)
    branch = scan.top_branch(data)
    assert call_id is None or (isinstance(call_id, bytes) and call_id
                               and b"\n" not in call_id and call_id == call_id.strip())
    assert branch is None or (isinstance(branch, bytes) and branch
                              and not set(branch) & set(b";, \t\r\n"))
    assert isinstance(scan.is_response(data), bool)


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not out:
            out = bytearray(rng.randbytes(rng.randint(1, 40)))
        i = rng.randrange(len(out))
        kind = rng.randrange(5)
        if kind == 0:
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out.insert(i, rng.choice(b" \t\r\n:;,=\"<>iIvV"))
        elif kind == 2:
            del out[i:i + rng.randint(1, 8)]
        elif kind == 3:
            del out[i:]
        else:
            out[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(out)


def test_scan_never_raises_on_mutated_messages():
    rng = random.Random(4475)
    corpus = [path.read_bytes() for path in CORPUS]
    for _ in range(20_000):
        check_scan_result(mutate(rng, rng.choice(corpus)))


def test_scan_never_raises_on_random_bytes():
    rng = random.Random(3261)
    for _ in range(5_000):
        data = rng.randbytes(rng.randint(0, 300))
        if rng.random() < 0.5:
            data = b"\n".join((data, b"Via:", b"i:", b"Call-ID:", b";branch="))
        check_scan_result(data)
