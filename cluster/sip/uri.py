"""SIP, SIPS and tel URIs (RFC 3261 section 19.1, RFC 3966), and other schemes kept opaque.

A URI is parsed once into a small immutable record; ``raw`` keeps the exact bytes
so that a URI that nobody changed is sent on exactly as it came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import SipError

_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*\Z")
_PORT = re.compile(rb"[0-9]{1,5}\Z")
# Host names and IPv4 addresses; IPv6 references are checked separately.
_HOSTNAME = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?\Z|[A-Za-z0-9]\Z")
_IPV6_REF = re.compile(rb"\[[0-9A-Fa-f:.]+\]\Z")
# Characters that may never appear raw inside a URI (white space, controls, <>, quotes).
_FORBIDDEN = re.compile(rb'[\x00-\x20\x7f<>"]')
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
# What an escape may not decode to in a name: C0 controls, DEL and C1 controls.
_NAME_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def unescape(value: bytes) -> bytes:
    """Decode %HH escapes (RFC 3261 19.1.4: escaped and unescaped forms compare equal)."""
    if b"%" not in value:
        return value
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), value)


def _split_params(text: bytes) -> tuple[tuple[str, str | None], ...]:
    params = []
    for part in text.split(b";"):
        if not part:
            raise SipError(400, "Empty URI parameter")
        name, eq, value = part.partition(b"=")
        if not name:
            raise SipError(400, "URI parameter without a name")
        params.append((name.decode("latin-1").lower(), value.decode("latin-1") if eq else None))
    return tuple(params)


@dataclass(frozen=True, slots=True)
class SipURI:
    scheme: str  # "sip" or "sips"
    user: bytes | None  # as written, escapes kept; see user_unescaped
    password: bytes | None
    host: str  # lower-cased; IPv6 references keep their brackets
    port: int | None
    params: tuple[tuple[str, str | None], ...] = ()
    headers: bytes | None = None  # the part after '?', escapes kept
    raw: bytes = field(default=b"", compare=False)

    @property
    def user_unescaped(self) -> bytes | None:
        return None if self.user is None else unescape(self.user)

    @property
    def user_name(self) -> str | None:
        """The user part as a name (a user, a dialled number): unescaped, read as UTF-8.

        ``user_unescaped`` keeps every byte (escaped forms compare equal to unescaped
        ones, and RFC 4475's escnull REGISTER must parse), but a name goes on into the
        directory, CDRs, logs and sipctl listings, so one that decodes to a control
        (``%0d%0a``, ``%00``, ``%1b``) is refused with 400: the answer is decided from
        the message alone, the same for every user, so it tells nothing about the
        directory (404 would read as "looked up, not found"), and it tells the sender
        that the request itself is at fault, not the user's presence.
        """
        if self.user is None:
            return None
        name = unescape(self.user).decode("utf-8", "replace")
        if _NAME_CONTROL.search(name):
            raise SipError(400, "Control character in the user part")
        return name

    def param(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.params:
            if key == name:
                return value if value is not None else ""
        return default

    def has_param(self, name: str) -> bool:
        return any(key == name for key, _ in self.params)

    @property
    def transport(self) -> str:
        return (self.param("transport") or ("tls" if self.scheme == "sips" else "udp")).lower()

    @property
    def host_bare(self) -> str:
        """The host without IPv6 brackets, as sockets want it."""
        return self.host[1:-1] if self.host.startswith("[") else self.host

    def __bytes__(self) -> bytes:
        return self.raw or self.build()

    def build(self) -> bytes:
        out = [self.scheme.encode(), b":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [b":", self.password]
            out.append(b"@")
        out.append(self.host.encode())
        if self.port is not None:
            out.append(b":%d" % self.port)
        for key, value in self.params:
            tail = b"" if value is None else b"=" + value.encode("latin-1")
            out.append(b";" + key.encode() + tail)
        if self.headers is not None:
            out += [b"?", self.headers]
        return b"".join(out)

    def replace(self, **changes) -> SipURI:
        """A copy with fields changed; the copy is serialised from its fields."""
        values = {name: getattr(self, name) for name in
                  ("scheme", "user", "password", "host", "port", "params", "headers")}
        values.update(changes)
        return SipURI(**values)

    def aor(self) -> str:
        """The address-of-record key: sip:user@host, unescaped user, no port or params."""
        user = self.user_unescaped
        if user is None:
            return f"sip:{self.host}"
        return f"sip:{user.decode('utf-8', 'replace')}@{self.host}"


@dataclass(frozen=True, slots=True)
class TelURI:
    number: str
    params: tuple[tuple[str, str | None], ...] = ()
    raw: bytes = field(default=b"", compare=False)
    scheme: str = "tel"

    def __bytes__(self) -> bytes:
        return self.raw


@dataclass(frozen=True, slots=True)
class AbsoluteURI:
    """Any other scheme (http:, isbn:, urn:, ...): kept, never interpreted."""

    scheme: str
    raw: bytes

    def __bytes__(self) -> bytes:
        return self.raw


URI = SipURI | TelURI | AbsoluteURI


def parse_uri(raw: bytes) -> URI:
    """Parse one URI.  Raises SipError(400) for anything that is not a URI."""
    if not raw or _FORBIDDEN.search(raw):
        raise SipError(400, "Malformed URI")
    scheme_raw, colon, rest = raw.partition(b":")
    if not colon or not _SCHEME.match(scheme_raw):
        raise SipError(400, "Malformed URI scheme")
    scheme = scheme_raw.decode().lower()
    if scheme in ("sip", "sips"):
        return _parse_sip(scheme, rest, raw)
    if scheme == "tel":
        number, _, params = rest.partition(b";")
        if not number:
            raise SipError(400, "Empty tel URI")
        return TelURI(number.decode("latin-1"), _split_params(params) if params else (), raw)
    if not rest:
        raise SipError(400, "Empty URI")
    return AbsoluteURI(scheme, raw)


def _parse_sip(scheme: str, rest: bytes, raw: bytes) -> SipURI:
    # '@' cannot appear unescaped after the user part, while '?' and ';' can appear
    # inside it (RFC 3261 25.1 user-unreserved), so the user part ends at the '@'.
    user = password = None
    at = rest.find(b"@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1:]
        if not userinfo:
            raise SipError(400, "Empty user part in URI")
        user, colon, pw = userinfo.partition(b":")
        password = pw if colon else None
    rest, qmark, headers = rest.partition(b"?")
    hostport, semi, params = rest.partition(b";")
    host, port = _split_hostport(hostport)
    return SipURI(scheme, user, password, host, port,
                  _split_params(params) if semi else (),
                  headers if qmark else None, raw)


def _split_hostport(hostport: bytes) -> tuple[str, int | None]:
    if hostport.startswith(b"["):
        end = hostport.find(b"]")
        if end < 0 or not _IPV6_REF.match(hostport[:end + 1]):
            raise SipError(400, "Malformed IPv6 reference")
        host, tail = hostport[:end + 1], hostport[end + 1:]
        if tail and not tail.startswith(b":"):
            raise SipError(400, "Malformed host")
        port_raw = tail[1:] if tail else None
    else:
        host, colon, port_raw = hostport.partition(b":")
        if not colon:
            port_raw = None
        if not _HOSTNAME.match(host):
            raise SipError(400, "Malformed host")
    port = None
    if port_raw is not None:
        if not _PORT.match(port_raw) or not 0 < int(port_raw) < 65536:
            raise SipError(400, "Malformed port")
        port = int(port_raw)
    return host.decode("ascii").lower(), port


def hostport(host: str, port: int) -> str:
    """"host:port", an IPv6 address in brackets (as in a URI)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
