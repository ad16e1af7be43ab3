"""Typed views of the structured SIP header values (RFC 3261 section 20 / 25).

Each parser takes the header value as bytes (already unfolded) and returns a
small frozen record; anything malformed raises SipError(400, reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import SipError
from .uri import URI, SipURI, parse_uri

Params = tuple[tuple[str, str | None], ...]

_TOKEN_CHARS = rb"A-Za-z0-9\-.!%*_+`'~"
_TOKEN = re.compile(rb"[" + _TOKEN_CHARS + rb"]+\Z")
_QUOTED = rb'"(?:[^"\\]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*"'
# One ";name[=value]" with LWS allowed around ';' and '='.  A value is a token,
# a host (IPv4, bracketed or bare IPv6) or a quoted string.
_PARAM = re.compile(
    rb"[ \t]*;[ \t]*([" + _TOKEN_CHARS + rb"]+)(?:[ \t]*=[ \t]*("
    + _QUOTED + rb"|[" + _TOKEN_CHARS + rb":\[\]]+))?[ \t]*"
)
_QUOTED_AT = re.compile(_QUOTED)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.S)
_VIA = re.compile(
    rb"[ \t]*([" + _TOKEN_CHARS + rb"]+)[ \t]*/[ \t]*([" + _TOKEN_CHARS + rb"]+)[ \t]*/[ \t]*(["
    + _TOKEN_CHARS + rb"]+)[ \t]+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?"
)
_CSEQ = re.compile(rb"[ \t]*([0-9]+)[ \t]+([" + _TOKEN_CHARS + rb"]+)[ \t]*\Z")
_DIGITS = re.compile(rb"[ \t]*([0-9]+)[ \t]*\Z")
_DATE = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT\Z"
)
MAX_CSEQ = 2**32 - 1


# RFC 3261 25.1: "tag" EQUAL token in From/To, "branch" EQUAL token in Via.
_NAME_ADDR_VALUED = ("tag",)
_VIA_VALUED = ("branch",)


def parse_params(text: bytes, start: int = 0, valued: tuple[str, ...] = ()) -> Params:
    """Parse ``;name=value`` pairs from ``text[start:]`` to its end.

    Names are lower-cased (parameter names are case-insensitive); values keep
    their case and, when quoted, their quotes, since some (tags, branches) must
    be compared and re-sent exactly.
    """
    params = []
    pos, end = start, len(text)
    while pos < end:
        m = _PARAM.match(text, pos)
        if m is None:
            raise SipError(400, "Malformed header parameter")
        value = m.group(2)
        name = m.group(1).decode("latin-1").lower()
        if value is None and name in valued:
            raise SipError(400, f"Parameter {name} without a value")
        params.append((name, None if value is None else value.decode("latin-1")))
        pos = m.end()
    return tuple(params)


def build_params(params: Params) -> bytes:
    return b"".join(b";" + k.encode() + (b"" if v is None else b"=" + v.encode("latin-1"))
                    for k, v in params)


def param_value(params: Params, name: str) -> str | None:
    for key, value in params:
        if key == name:
            return value if value is not None else ""
    return None


def unquote(value: bytes) -> bytes:
    """The content of a quoted-string, with quoted-pairs resolved."""
    return _QUOTED_PAIR.sub(rb"\1", value[1:-1])


def quote(text: bytes) -> bytes:
    return b'"' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def split_values(value: bytes) -> list[bytes]:
    """Split a header value at commas that are not inside quotes or <>."""
    if b'"' not in value and b"<" not in value:
        return [v.strip() for v in value.split(b",")]
    parts, start, depth, quoted, escaped = [], 0, 0, False, False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:
                quoted = False
        elif ch == 0x22:
            quoted = True
        elif ch == 0x3C:
            depth += 1
        elif ch == 0x3E:
            depth -= 1
        elif ch == 0x2C and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
    if quoted or depth:
        raise SipError(400, "Unbalanced quotes or angle brackets")
    parts.append(value[start:].strip())
    return parts


# --------------------------------------------------------------------------- name-addr


@dataclass(frozen=True, slots=True)
class NameAddr:
    """From, To, Contact, Route, Record-Route and friends."""

    uri: URI
    display: bytes | None = None  # unquoted display name
    params: Params = ()
    raw: bytes = field(default=b"", compare=False)

    @property
    def tag(self) -> str | None:
        return param_value(self.params, "tag")

    def param(self, name: str) -> str | None:
        return param_value(self.params, name)

    @property
    def sip_uri(self) -> SipURI:
        if not isinstance(self.uri, SipURI):
            raise SipError(416, "Unsupported URI Scheme")
        return self.uri

    def __bytes__(self) -> bytes:
        return self.raw or self.build()

    def build(self) -> bytes:
        head = quote(self.display) + b" " if self.display else b""
        return head + b"<" + bytes(self.uri) + b">" + build_params(self.params)

    def with_params(self, params: Params) -> NameAddr:
        return NameAddr(self.uri, self.display, params)

    def with_tag(self, tag: str) -> NameAddr:
        kept = tuple(p for p in self.params if p[0] != "tag")
        return NameAddr(self.uri, self.display, kept + (("tag", tag),))


def parse_name_addr(value: bytes) -> NameAddr:
    text = value.strip(b" \t")
    if not text:
        raise SipError(400, "Empty address")
    display = None
    if text[:1] == b'"':
        m = _QUOTED_AT.match(text)
        if m is None:
            raise SipError(400, "Unterminated quoted display name")
        display = unquote(m.group())
        rest = text[m.end():].lstrip(b" \t")
        if rest[:1] != b"<":
            raise SipError(400, "Display name without <URI>")
        return _parse_bracketed(rest, display, value)
    lt = text.find(b"<")
    if lt >= 0:
        words = text[:lt].split()
        if not all(_TOKEN.match(w) for w in words):
            raise SipError(400, "Display name must be tokens or a quoted string")
        display = b" ".join(words) or None
        return _parse_bracketed(text[lt:], display, value)
    # addr-spec form: the URI ends at the first ';' and cannot carry headers.
    semi = text.find(b";")
    uri_raw = text if semi < 0 else text[:semi].rstrip(b" \t")
    if b"?" in uri_raw or b"," in uri_raw:
        raise SipError(400, "A URI with headers or commas must be enclosed in <>")
    uri = parse_uri(uri_raw)
    params = parse_params(text, semi, _NAME_ADDR_VALUED) if semi >= 0 else ()
    return NameAddr(uri, None, params, value)


def _parse_bracketed(text: bytes, display: bytes | None, raw: bytes) -> NameAddr:
    gt = text.find(b">")
    if gt < 0:
        raise SipError(400, "Missing >")
    uri = parse_uri(text[1:gt])
    params = parse_params(text, gt + 1, _NAME_ADDR_VALUED)
    return NameAddr(uri, display, params, raw)


# --------------------------------------------------------------------------- Via


@dataclass(frozen=True, slots=True)
class Via:
    transport: str  # upper case: UDP, TCP, TLS, ...
    host: str
    port: int | None = None
    params: Params = ()
    protocol: str = "SIP/2.0"
    raw: bytes = field(default=b"", compare=False)

    @property
    def branch(self) -> str | None:
        return param_value(self.params, "branch")

    @property
    def received(self) -> str | None:
        return param_value(self.params, "received")

    @property
    def maddr(self) -> str | None:
        return param_value(self.params, "maddr")

    @property
    def has_rport(self) -> bool:
        return any(k == "rport" for k, _ in self.params)

    @property
    def rport(self) -> int | None:
        value = param_value(self.params, "rport")
        return int(value) if value and value.isdigit() else None

    @property
    def sent_by(self) -> tuple[str, int]:
        return self.host, self.port or 5060

    def __bytes__(self) -> bytes:
        return self.raw or self.build()

    def build(self) -> bytes:
        port = b":%d" % self.port if self.port else b""
        return (f"{self.protocol}/{self.transport} {self.host}".encode() + port
                + build_params(self.params))

    def with_received(self, ip: str, port: int) -> Via:
        """RFC 3261 18.2.1 and RFC 3581: note where the request really came from."""
        params = []
        for key, value in self.params:
            if key == "rport":
                params.append(("rport", str(port)))
            elif key != "received":
                params.append((key, value))
        host = self.host[1:-1] if self.host.startswith("[") else self.host
        if host != ip or self.has_rport:
            params.append(("received", ip))
        return Via(self.transport, self.host, self.port, tuple(params), self.protocol)


def parse_via(value: bytes) -> Via:
    m = _VIA.match(value)
    if m is None:
        raise SipError(400, "Malformed Via")
    name, version, transport, host, port = m.groups()
    if name.upper() != b"SIP":
        raise SipError(400, "Malformed Via protocol")
    if port is not None and not 0 < int(port) < 65536:
        raise SipError(400, "Malformed Via port")
    params = parse_params(value, m.end(), _VIA_VALUED) if m.end() < len(value) else ()
    return Via(transport.decode().upper(), host.decode().lower(),
               int(port) if port else None, params,
               f"{name.decode().upper()}/{version.decode()}", value)


# --------------------------------------------------------------------------- scalars


@dataclass(frozen=True, slots=True)
class CSeq:
    number: int
    method: str

    def __bytes__(self) -> bytes:
        return b"%d %s" % (self.number, self.method.encode())


def parse_cseq(value: bytes) -> CSeq:
    m = _CSEQ.match(value)
    if m is None:
        raise SipError(400, "Malformed CSeq")
    number = int(m.group(1))
    if number > MAX_CSEQ:
        raise SipError(400, "CSeq number too large")
    return CSeq(number, m.group(2).decode("latin-1"))


def parse_uint(value: bytes, what: str) -> int:
    m = _DIGITS.match(value)
    if m is None:
        raise SipError(400, f"Malformed {what}")
    return int(m.group(1))


def check_date(value: bytes) -> None:
    """RFC 3261 20.17: an RFC 1123 date, always in GMT."""
    if _DATE.match(value.strip()) is None:
        raise SipError(400, "Malformed Date")
