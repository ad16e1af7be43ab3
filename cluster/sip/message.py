"""SIP messages: parse a datagram, look at it, change it, serialise it.

Parsing does the framing (start line, header lines with folding, Content-Length)
and checks the headers every transaction needs (Via, From, To, Call-ID, CSeq,
Max-Forwards), so a message that comes out of ``parse`` can be matched and
answered.  The other headers are kept as bytes and parsed when first asked for;
``validate()`` parses all the structured ones for callers that want to refuse a
bad Contact or Date up front.  Headers nobody changed are serialised from their
original bytes, so an untouched message goes out byte for byte as it came.
"""

from __future__ import annotations

import functools
import re

from .errors import SipError
from .headers import (
    CSeq,
    NameAddr,
    Via,
    check_date,
    parse_cseq,
    parse_name_addr,
    parse_uint,
    parse_via,
    split_values,
)
from .uri import URI, SipURI, parse_uri

# RFC 3261 7.3.3 and the registry of compact forms.
COMPACT_FORMS = {
    "a": "accept-contact", "b": "referred-by", "c": "content-type", "d": "request-disposition",
    "e": "content-encoding", "f": "from", "i": "call-id", "j": "reject-contact", "k": "supported",
    "l": "content-length", "m": "contact", "n": "identity-info", "o": "event", "r": "refer-to",
    "s": "subject", "t": "to", "u": "allow-events", "v": "via", "x": "session-expires",
    "y": "identity",
}
# Requests kept parsed by ``parse_shared``: a call's transactions hold two or three (its
# INVITEs, a BYE), read at each of its events, which come within seconds of each other;
# 2,048 cover the calls being set up or torn down at once on one worker at several hundred
# calls a second, at a few kB each.
SHARED_PARSES = 2048
# Headers that may appear once only (RFC 3261 7.3.1 / 20).
SINGLE_VALUED = ("call-id", "cseq", "from", "to", "max-forwards", "content-type")
KNOWN_METHODS = frozenset({
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY",
    "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE",
})
REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    410: "Gone", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    429: "Too Many Requests", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

_TOKEN = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+\Z")
_VERSION = re.compile(rb"SIP/[0-9]+\.[0-9]+\Z", re.I)
_KEYS: dict[bytes, str] = {}  # raw header name (already checked) -> canonical key; bounded
_NONE: list = []  # shared "absent" marker; never mutated


def header_key(name: bytes) -> str:
    """Canonical lower-case long form of a header name (SipError if it is not a token)."""
    key = _KEYS.get(name)
    if key is None:
        if not _TOKEN.match(name):
            raise SipError(400, "Malformed header name")
        lower = name.decode("latin-1").lower()
        key = COMPACT_FORMS.get(lower, lower)
        if len(_KEYS) < 4096:  # a flood of invented names must not grow memory
            _KEYS[name] = key
    return key


class Header:
    """One header line: its key, its name as written, its unfolded value, its raw bytes."""

    __slots__ = ("key", "name", "value", "raw")

    def __init__(self, key: str, name: bytes, value: bytes, raw: bytes | None = None):
        self.key, self.name, self.value, self.raw = key, name, value, raw

    def to_bytes(self) -> bytes:
        return self.raw if self.raw is not None else self.name + b": " + self.value


class Message:
    """What requests and responses share: headers, body and their typed views."""

    __slots__ = ("headers", "body", "_head", "_eol", "_cache", "_index", "_shared")

    def __init__(self, headers: list[Header], body: bytes = b"", head: bytes | None = None,
                 eol: bytes = b"\r\n"):
        self.headers = headers
        self.body = body
        self._head = head  # original bytes up to the body, while nothing changed
        self._eol = eol
        self._cache: dict[str, object] = {}
        self._index: dict[str, list[Header]] | None = None
        self._shared = False  # handed out by ``parse_shared``: read-only

    # ---------------------------------------------------------------- raw access
    def _lines(self, key: str) -> list[Header]:
        index = self._index
        if index is None:
            index = self._index = {}
            for h in self.headers:
                index.setdefault(h.key, []).append(h)
        return index.get(key, _NONE)

    def header(self, key: str) -> bytes | None:
        """The value of the first line of a header, or None."""
        lines = self._lines(key)
        return lines[0].value if lines else None

    def header_lines(self, key: str) -> list[bytes]:
        return [h.value for h in self._lines(key)]

    def header_values(self, key: str) -> list[bytes]:
        """All values of a header, over all its lines, split at commas."""
        values = []
        for h in self._lines(key):
            values.extend(split_values(h.value))
        return values

    def has(self, key: str) -> bool:
        return bool(self._lines(key))

    # ---------------------------------------------------------------- changes
    def _writable(self) -> None:
        if self._shared:
            raise TypeError("a message from parse_shared is shared: parse() a copy to change")

    def _changed(self, key: str) -> None:
        """Header ``key`` (or the Request-URI, "ruri") changed: only its view is stale."""
        self._head = None
        self._cache.pop(key, None)
        self._index = None

    def add_header(self, name: bytes, value: bytes, first: bool = False) -> None:
        self._writable()
        header = Header(header_key(name), name, value)
        if first:
            self.headers.insert(0, header)
        else:
            self.headers.append(header)
        self._changed(header.key)

    def set_header(self, name: bytes, value: bytes) -> None:
        """Replace every line of a header by one, where the first one stood."""
        self._writable()
        key = header_key(name)
        for i, h in enumerate(self.headers):
            if h.key == key:
                self.headers[i] = Header(key, name, value)
                self.headers[i + 1:] = [x for x in self.headers[i + 1:] if x.key != key]
                self._changed(key)
                return
        self.add_header(name, value)

    def remove_header(self, name: bytes | str) -> None:
        """Remove every line of a header, named as written (bytes) or by its key (str)."""
        self._writable()
        key = header_key(name) if isinstance(name, bytes) else header_key(name.encode())
        self.headers = [h for h in self.headers if h.key != key]
        self._changed(key)

    def set_body(self, body: bytes, content_type: bytes | None = None) -> None:
        self._writable()
        self.body = body
        if content_type is not None:
            self.set_header(b"Content-Type", content_type)
        elif not body:
            self.headers = [h for h in self.headers if h.key != "content-type"]
        self.set_header(b"Content-Length", b"%d" % len(body))

    def replace_top_via(self, via: Via) -> None:
        """Put a changed top Via in place, keeping the other values of its line."""
        self._writable()
        for i, h in enumerate(self.headers):
            if h.key == "via":
                values = split_values(h.value)
                values[0] = bytes(via)
                self.headers[i] = Header("via", h.name, b", ".join(values))
                self._changed("via")
                return

    # ---------------------------------------------------------------- typed views
    def _view(self, name: str, build):
        value = self._cache.get(name, _NONE)
        if value is _NONE:
            value = self._cache[name] = build()
        return value

    @property
    def call_id(self) -> bytes:
        return self._view("call-id", lambda: self._single("call-id") or b"")

    @property
    def cseq(self) -> CSeq:
        return self._view("cseq", lambda: parse_cseq(self._required("cseq")))

    @property
    def from_(self) -> NameAddr:
        return self._view("from", lambda: parse_name_addr(self._required("from")))

    @property
    def to(self) -> NameAddr:
        return self._view("to", lambda: parse_name_addr(self._required("to")))

    @property
    def vias(self) -> list[Via]:
        return self._view("via", lambda: [parse_via(v) for v in self.header_values("via")])

    @property
    def via(self) -> Via:
        vias = self.vias
        if not vias:
            raise SipError(400, "Missing Via")
        return vias[0]

    @property
    def max_forwards(self) -> int | None:
        def build():
            value = self._single("max-forwards")
            return None if value is None else parse_uint(value, "Max-Forwards")
        return self._view("max-forwards", build)

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values; a ``Contact: *`` shows as an empty list and ``contact_star``."""
        def build():
            values = self.header_values("contact")
            if values == [b"*"]:
                return []
            return [parse_name_addr(v) for v in values]
        return self._view("contact", build)

    @property
    def contact_star(self) -> bool:
        return self.header_values("contact") == [b"*"]

    @property
    def routes(self) -> list[NameAddr]:
        return self._view("route", lambda: [
            parse_name_addr(v) for v in self.header_values("route")])

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._view("record-route", lambda: [
            parse_name_addr(v) for v in self.header_values("record-route")])

    @property
    def expires(self) -> int | None:
        """The Expires header as seconds; absurdly large values are capped (RFC 4475 3.1.2.4)."""
        def build():
            value = self.header("expires")
            return None if value is None else min(parse_uint(value, "Expires"), 2**32 - 1)
        return self._view("expires", build)

    @property
    def content_type(self) -> bytes | None:
        value = self.header("content-type")
        return None if value is None else value.split(b";")[0].strip().lower()

    def _single(self, key: str) -> bytes | None:
        lines = self._lines(key)
        if len(lines) > 1:
            raise SipError(400, f"Multiple {key} headers")
        return lines[0].value if lines else None

    def _required(self, key: str) -> bytes:
        value = self._single(key)
        if value is None:
            raise SipError(400, f"Missing {key} header")
        return value

    def _check_framing(self) -> None:
        """The cheap checks every message gets in ``parse`` (RFC 3261 8.1.3.3 / 8.2.2)."""
        index = self._index if self._index is not None else {}
        for key in SINGLE_VALUED:
            lines = index.get(key)
            if lines is not None and len(lines) > 1:
                raise SipError(400, f"Multiple {key} headers")
        for key in ("call-id", "from", "to", "via"):
            if key not in index:
                raise SipError(400, f"Missing {key} header")
        if not index["call-id"][0].value:
            raise SipError(400, "Empty Call-ID")
        self.cseq  # noqa: B018 - parsed here: transactions and the method check need it

    def validate(self) -> None:
        """Parse every structured header, raising SipError for the first bad one.

        ``parse`` only frames the message; a server calls this before acting on it.
        """
        self.vias, self.from_, self.to, self.max_forwards  # noqa: B018
        self.contacts, self.routes, self.record_routes, self.expires  # noqa: B018
        date = self.header("date")
        if date is not None:
            check_date(date)

    # ---------------------------------------------------------------- output
    def start_line(self) -> bytes:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        if self._head is not None:
            return self._head + self.body
        eol = self._eol
        lines = [self.start_line()]
        lines.extend(h.to_bytes() for h in self.headers)
        return eol.join(lines) + eol + eol + self.body

    __bytes__ = to_bytes


class Request(Message):
    __slots__ = ("method", "uri_raw", "version")

    def __init__(self, method: str, uri_raw: bytes, headers: list[Header], body: bytes = b"",
                 head: bytes | None = None, eol: bytes = b"\r\n", version: bytes = b"SIP/2.0"):
        super().__init__(headers, body, head, eol)
        self.method = method
        self.uri_raw = uri_raw
        self.version = version

    @property
    def uri(self) -> URI:
        def build():
            uri = parse_uri(self.uri_raw)
            if isinstance(uri, SipURI) and uri.headers is not None:
                raise SipError(400, "Request-URI must not contain headers")
            return uri
        return self._view("ruri", build)

    def validate(self) -> None:
        self.uri  # noqa: B018 - a Request-URI that is not a URI is a 400
        super().validate()

    def set_uri(self, uri_raw: bytes) -> None:
        self._writable()
        self.uri_raw = uri_raw
        self._changed("ruri")

    def start_line(self) -> bytes:
        return b"%s %s %s" % (self.method.encode("latin-1"), self.uri_raw, self.version)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri_raw!r} call-id={self.call_id!r}>"


class Response(Message):
    __slots__ = ("status", "reason", "version")

    def __init__(self, status: int, reason: bytes, headers: list[Header], body: bytes = b"",
                 head: bytes | None = None, eol: bytes = b"\r\n", version: bytes = b"SIP/2.0"):
        super().__init__(headers, body, head, eol)
        self.status = status
        self.reason = reason
        self.version = version

    def start_line(self) -> bytes:
        return b"%s %d %s" % (self.version, self.status, self.reason)

    def __repr__(self) -> str:
        return f"<Response {self.status} call-id={self.call_id!r}>"


# --------------------------------------------------------------------------- parsing


def parse(data: bytes) -> Request | Response:
    """Parse one UDP datagram.  Raises SipError naming the status to answer."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n", 0, crlf if crlf >= 0 else len(data))  # only before the CRLFs
    if crlf >= 0 and lf < 0:
        eol, head_end, body_start = b"\r\n", crlf, crlf + 4
    elif lf >= 0:
        eol, head_end, body_start = b"\n", lf, lf + 2
    else:  # no empty line: the datagram ends with the headers
        eol = b"\r\n" if b"\r\n" in data else b"\n"
        head_end = body_start = len(data)
        while data.endswith(eol, 0, head_end):
            head_end -= len(eol)
    if head_end <= 0:
        raise SipError(400, "Empty message")
    head = data[:head_end]
    lines = head.split(eol)
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != (
            len(lines) - 1 if eol == b"\r\n" else 0):
        raise SipError(400, "Bare CR or LF inside a header line")
    folded = b"\n " in head or b"\n\t" in head
    headers, index = _parse_header_lines(lines, eol, folded)
    msg = _parse_start_line(lines[0], headers, eol)
    msg._index = index
    msg.body = _frame_body(msg, data, body_start)
    msg._head = data[:body_start]
    msg._check_framing()
    if isinstance(msg, Request):
        _check_method(msg)
    return msg


@functools.lru_cache(maxsize=SHARED_PARSES)
def parse_shared(data: bytes) -> Request | Response:
    """``parse(data)``, read-only, and the same object for the same bytes while it is among
    the last SHARED_PARSES parsed: what a call keeps as bytes in its record (its
    transactions' requests) is parsed once per worker, not at every event of the call, and
    so are the views read from it (Via, From, To, CSeq, the Request-URI).  Changing it
    raises TypeError."""
    msg = parse(data)
    msg._shared = True
    return msg


def _parse_header_lines(lines: list[bytes], eol: bytes, folded: bool
                        ) -> tuple[list[Header], dict[str, list[Header]]]:
    headers: list[Header] = []
    index: dict[str, list[Header]] = {}
    keys = _KEYS
    folds: list[bytes] = []  # continuation lines of the last header, unfolded once at its end
    for i in range(1, len(lines)):
        line = lines[i]
        if folded and line[:1] in (b" ", b"\t"):  # continuation of the previous line
            if not headers:
                raise SipError(400, "Continuation line before any header")
            folds.append(line)
            continue
        if folds:
            _unfold(headers[-1], folds, eol)
            folds = []
        colon = line.find(b":")
        if colon <= 0:
            raise SipError(400, "Malformed header line")
        name = line[:colon]
        key = keys.get(name)
        if key is None:
            name = name.rstrip(b" \t")
            key = header_key(name)
        header = Header(key, name, line[colon + 1:].strip(b" \t"), line)
        headers.append(header)
        same = index.get(key)
        if same is None:
            index[key] = [header]
        else:
            same.append(header)
    if folds:
        _unfold(headers[-1], folds, eol)
    return headers, index


def _unfold(header: Header, folds: list[bytes], eol: bytes) -> None:
    """Join a header's continuation lines (RFC 3261 7.3.1: folding is one SP)."""
    header.raw = eol.join([header.raw, *folds])
    parts = [header.value, *(f.strip(b" \t") for f in folds)]
    header.value = b" ".join(p for p in parts if p)


def _parse_start_line(line: bytes, headers: list[Header], eol: bytes) -> Request | Response:
    if line[:4].upper() == b"SIP/":
        version, _, rest = line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        _check_version(version)
        if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 699:
            raise SipError(400, "Malformed status code")
        return Response(int(code), reason, headers, eol=eol, version=version)
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise SipError(400, "Malformed Request-Line")
    method, uri_raw, version = parts
    if not _TOKEN.match(method):
        raise SipError(400, "Malformed method")
    _check_version(version)
    return Request(method.decode("latin-1"), uri_raw, headers, eol=eol, version=version)


def _check_version(version: bytes) -> None:
    if version.upper() != b"SIP/2.0":
        if _VERSION.match(version):
            raise SipError(505, "Version Not Supported")
        raise SipError(400, "Malformed SIP version")


def _frame_body(msg: Message, data: bytes, body_start: int) -> bytes:
    body = data[body_start:]
    lengths = msg.header_lines("content-length")
    if not lengths:
        return body  # RFC 3261 18.3: over UDP the body runs to the end of the datagram
    if len(set(lengths)) > 1:
        raise SipError(400, "Conflicting Content-Length headers")
    length = parse_uint(lengths[0], "Content-Length")
    if length > len(body):
        raise SipError(400, "Content-Length larger than message")
    return body[:length]


def _check_method(req: Request) -> None:
    if req.cseq.method != req.method:
        # An unknown method is answered 501 whatever else is wrong (RFC 4475 3.1.2.18).
        if req.method not in KNOWN_METHODS:
            raise SipError(501, "Not Implemented")
        raise SipError(400, "CSeq method does not match the request method")


# --------------------------------------------------------------------------- building


def build_request(method: str, uri: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes = b"", content_type: bytes | None = None) -> Request:
    """A new request; Content-Type and Content-Length are added from the body."""
    hs = [Header(header_key(n), n, v) for n, v in headers]
    if body and content_type is not None:
        hs.append(Header("content-type", b"Content-Type", content_type))
    hs.append(Header("content-length", b"Content-Length", b"%d" % len(body)))
    return Request(method, uri, hs, body)


def build_response(request: Request, status: int, reason: str | None = None, *,
                   to_tag: str | None = None, headers: list[tuple[bytes, bytes]] = (),
                   body: bytes = b"", content_type: bytes | None = None) -> Response:
    """A response to ``request`` per RFC 3261 8.2.6.2: Via, From, To, Call-ID, CSeq copied.

    ``to_tag`` is added to To unless the request already had one or this is a 100.
    """
    hs = []
    for h in request.headers:
        if h.key in ("via", "from", "call-id", "cseq"):
            hs.append(Header(h.key, h.name, h.value))
        elif h.key == "to":
            value = h.value
            if to_tag and status > 100 and request.to.tag is None:
                value += b";tag=" + to_tag.encode()
            hs.append(Header("to", h.name, value))
    hs.extend(Header(header_key(n), n, v) for n, v in headers)
    if body and content_type is not None:
        hs.append(Header("content-type", b"Content-Type", content_type))
    hs.append(Header("content-length", b"Content-Length", b"%d" % len(body)))
    phrase = reason if reason is not None else REASONS.get(status, "Unknown")
    return Response(status, phrase.encode("utf-8"), hs, body)


def error_response(data: bytes, error: SipError, extra: tuple[bytes, ...] = (),
                   to_tag: str | None = None) -> bytes | None:
    """Best-effort answer to a request ``parse`` refused, or None when none can be made.

    A 400 is only useful if it reaches the sender's transaction, so it needs the
    request's Via, From, To, Call-ID and CSeq lines; they are copied as they are
    (RFC 3261 8.2.6.2; ``to_tag`` is added to a To without one), then the ``extra``
    header lines.  Responses, ACKs and unreadable requests get nothing.
    """
    if data[:4].upper() == b"SIP/" or data[:4] == b"ACK " or not data.strip():
        return None
    eol = b"\r\n" if b"\r\n" in data else b"\n"
    head = data.split(eol + eol, 1)[0]
    copied, seen, copying = [], set(), False
    for line in head.split(eol)[1:]:
        if line[:1] in (b" ", b"\t"):  # a folded continuation goes with its header
            if copying:
                copied.append(line)
            continue
        name, colon, _ = line.partition(b":")
        lower = name.strip().decode("latin-1").lower()
        key = COMPACT_FORMS.get(lower, lower)
        copying = bool(colon) and key in ("via", "from", "to", "call-id", "cseq")
        if copying:
            if key == "to" and to_tag and b";tag=" not in line.lower().replace(b" ", b""):
                line += b";tag=" + to_tag.encode()  # RFC 3261 8.2.6.2 (unless folded on)
            copied.append(line)
            seen.add(key)
    if not {"via", "from", "to", "call-id", "cseq"} <= seen:
        return None
    reason = error.reason.encode("latin-1", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    lines = [b"SIP/2.0 %d %s" % (error.status, reason), *copied, *extra, b"Content-Length: 0"]
    return b"\r\n".join(lines) + b"\r\n\r\n"
