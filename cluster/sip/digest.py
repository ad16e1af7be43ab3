"""Digest authentication for SIP (RFC 2617, RFC 7616, RFC 8760), sans-IO.

Challenge with :func:`build_challenge`, parse the answer with
:func:`parse_credentials`, check it with :func:`verify` against the stored HA1
(clear passwords only pass through :func:`ha1`, for provisioning). The caller
also checks the realm, that ``creds.uri`` is the Request-URI (:func:`uri_matches`), the nonce
(:func:`check_nonce`: stateless, any worker can authenticate and date any
worker's nonce) and its count (:class:`NonceCounter`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from cluster.sip.errors import SipError
from cluster.sip.uri import SipURI, parse_uri, unescape

# Wire names are case-insensitive: keyed by upper case.
# value: (name as written in challenges, hash constructor, is a -sess variant)
_ALGORITHMS: dict[str, tuple[str, Callable, bool]] = {
    "MD5": ("MD5", hashlib.md5, False),
    "MD5-SESS": ("MD5-sess", hashlib.md5, True),
    "SHA-256": ("SHA-256", hashlib.sha256, False),
    "SHA-256-SESS": ("SHA-256-sess", hashlib.sha256, True),
}
_QOP_OFFERS = frozenset({"auth", "auth-int"})

_TOKEN = rb"[A-Za-z0-9.!%*_+`'~-]+"
_SWS = rb"[ \t]*+(?:\r?\n[ \t]++)*+"  # optional whitespace, folded lines included
_QDTEXT = rb'[^"\\\x00-\x08\x0a-\x1f\x7f]*+'
_QUOTED = _QDTEXT + rb"(?:(?:\r?\n[ \t]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])" + _QDTEXT + rb")*+"
_SCHEME = re.compile(rb"[ \t]*(" + _TOKEN + rb")([ \t\r\n]+)?")
# One auth-param and the comma (or end) after it. Every part is optional, so
# the pattern matches at once wherever it starts (no backtracking), a finditer
# scan walks the whole list, and the first missing group says what is wrong.
_PARAM = re.compile(
    rb"(" + _SWS + rb")(" + _TOKEN + rb")?" + _SWS + rb"(=)?" + _SWS
    + rb'(?:"(' + _QUOTED + rb')(")?|(' + _TOKEN + rb"))?" + _SWS + rb"(,|\Z)?"
)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
_NC = re.compile(r"[0-9A-Fa-f]{8}")
_REQUIRED = ("username", "realm", "nonce", "uri", "response")


@dataclass(slots=True)
class Credentials:
    """One Authorization / Proxy-Authorization value, unquoted and unescaped.

    ``params`` holds every parameter by lower-case name. For a scheme other
    than Digest only ``scheme`` and (when they parse) ``params`` are set.
    """

    scheme: str
    username: str = ""
    realm: str = ""
    nonce: str = ""
    uri: str = ""
    response: str = ""
    algorithm: str = "MD5"
    cnonce: str | None = None
    nc: str | None = None  # as sent: 8 hex digits
    qop: str | None = None
    opaque: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_digest(self) -> bool:
        return self.scheme.lower() == "digest"

    @property
    def nonce_count(self) -> int:
        """``nc`` as a number; 0 when absent (RFC 2069 credentials)."""
        return int(self.nc, 16) if self.nc else 0


def parse_credentials(value: bytes) -> Credentials:
    """Parse a credentials header value; SipError(400, reason) if malformed."""
    m = _SCHEME.match(value)
    if m is None:
        raise SipError(400, "credentials do not start with an auth scheme")
    scheme = m[1].decode("ascii")
    if scheme.lower() != "digest":
        try:  # other schemes may carry token68 or anything else: not our business
            return Credentials(scheme, params=_parse_params(value, m.end()))
        except SipError:
            return Credentials(scheme)
    if not value[m.end() :].strip():
        raise SipError(400, "Digest credentials have no parameters")
    if m[2] is None:
        raise SipError(400, "no whitespace after the Digest scheme")
    return _digest_credentials(scheme, _parse_params(value, m.end()))


def _parse_params(value: bytes, pos: int) -> dict[str, str]:
    params: dict[str, str] = {}
    for m in _PARAM.finditer(value, pos):
        _, name, eq, quoted, close, token, sep = m.groups()
        if name is None or eq is None or (close is None and token is None) or sep is None:
            _raise_malformed(value, m)
        key = name.decode("ascii").lower()
        if key in params:
            raise SipError(400, f"duplicate parameter '{key}' in credentials")
        if token is None:
            token = _QUOTED_PAIR.sub(rb"\1", quoted) if b"\\" in quoted else quoted
        try:
            params[key] = token.decode("utf-8")
        except UnicodeDecodeError:
            raise SipError(400, f"parameter '{key}' is not valid UTF-8") from None
        if sep != b",":
            break
    return params


def _raise_malformed(value: bytes, m: re.Match) -> None:
    _, name, eq, quoted, close, token, _ = m.groups()
    if name is None:
        at = m.end(1)
        what = "empty parameter" if value[at : at + 1] in (b"", b",") else "expected a name"
        raise SipError(400, f"{what} at offset {at} in credentials")
    key = name.decode("ascii").lower()
    if eq is None:
        raise SipError(400, f"parameter '{key}' has no '='")
    if quoted is None and token is None:
        raise SipError(400, f"parameter '{key}' has no value")
    if close is None and token is None:
        raise SipError(400, f"unterminated or badly escaped quoted string in '{key}'")
    raise SipError(400, f"unexpected character after '{key}' at offset {m.end()}")


def _digest_credentials(scheme: str, params: dict[str, str]) -> Credentials:
    missing = [name for name in _REQUIRED if name not in params]
    if missing:
        raise SipError(400, "Digest credentials lack " + ", ".join(missing))
    qop, nc, cnonce = params.get("qop"), params.get("nc"), params.get("cnonce")
    if qop is not None and (nc is None or cnonce is None):
        raise SipError(400, "Digest credentials with qop lack nc or cnonce")
    if nc is not None and not _NC.fullmatch(nc):
        raise SipError(400, "Digest nonce count 'nc' is not 8 hex digits")
    return Credentials(
        scheme, params["username"], params["realm"], params["nonce"], params["uri"],
        params["response"], params.get("algorithm", "MD5"), cnonce, nc, qop,
        params.get("opaque"), params,
    )  # fmt: skip


# URI parameters that, present in both URIs, must agree (RFC 3261 19.1.4 names these as
# the ones that change the target; any other parameter may differ or be absent).
_TARGET_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def uri_matches(digest_uri: str, request_uri: bytes) -> bool:
    """Whether the credentials' ``uri`` names the Request-URI (RFC 7616 3.4.6, RFC 3261
    22.4): a mismatch is a 400, as credentials computed for another target were taken
    from elsewhere.

    SIP and SIPS URIs are compared as RFC 3261 19.1.4 compares them, with allowances
    for what clients in the field send: parameters count only when both URIs carry them
    (phones copy the Request-URI with or without its parameters, and a proxy before us
    may add some: ``;transport=``, ``;lr``...); a port counts only when both carry one;
    and a uri without a user part naming our host is taken as naming this server, which
    is what SIPp sends (``uri="sip:192.0.2.1:5060"`` for ``INVITE sip:1011@192.0.2.1``
    as for ``REGISTER sip:192.0.2.1``).  Scheme (sip vs sips), host and password must
    agree, and a uri that names a user must name the Request-URI's (escapes decoded):
    credentials computed for a call to one callee never serve for another.  Headers are
    ignored (a Request-URI has none).  Other schemes must match byte for byte, scheme
    case aside.
    """
    try:
        theirs = parse_uri(digest_uri.encode("utf-8"))
        ours = parse_uri(request_uri)
    except SipError:
        return False
    if not isinstance(ours, SipURI) or not isinstance(theirs, SipURI):
        return (theirs.scheme == ours.scheme
                and bytes(theirs).partition(b":")[2] == bytes(ours).partition(b":")[2])
    if theirs.scheme != ours.scheme or theirs.host != ours.host:
        return False
    if theirs.user is not None and theirs.user_unescaped != ours.user_unescaped:
        return False
    if _unescaped(theirs.password) != _unescaped(ours.password):
        return False
    if theirs.port is not None and ours.port is not None and theirs.port != ours.port:
        return False
    for name in _TARGET_PARAMS:
        a, b = theirs.param(name), ours.param(name)
        if a is not None and b is not None and a.lower() != b.lower():
            return False
    return True


def _unescaped(value: bytes | None) -> bytes | None:
    return None if value is None else unescape(value)


def build_challenge(
    realm: str, nonce: str, *, algorithm: str = "MD5", qop: str | None = "auth",
    opaque: str | None = None, stale: bool = False,
) -> bytes:  # fmt: skip
    """A WWW-Authenticate / Proxy-Authenticate value; ``qop`` None is RFC 2069 style.

    To offer several algorithms, send one header each, preferred first (RFC 8760).
    """
    parts = [f"Digest realm={_quote(realm)}", f"nonce={_quote(nonce)}"]
    parts.append(f"algorithm={_algorithm(algorithm)[0]}")
    if qop:
        if not set(qop.replace(" ", "").split(",")) <= _QOP_OFFERS:
            raise ValueError(f"unsupported qop {qop!r}")
        parts.append(f"qop={_quote(qop)}")
    if opaque is not None:
        parts.append(f"opaque={_quote(opaque)}")
    if stale:
        parts.append("stale=true")
    return ", ".join(parts).encode("utf-8")


def _quote(text: str) -> str:
    if any(c < " " and c != "\t" or c == "\x7f" for c in text):
        raise ValueError(f"control character in {text!r}")  # it would split the header
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _algorithm(name: str) -> tuple[str, Callable, bool]:
    try:
        return _ALGORITHMS[name.upper()]
    except KeyError:
        raise ValueError(f"unsupported digest algorithm {name!r}") from None


def ha1_algorithm(algorithm: str) -> str | None:
    """Which stored HA1, "MD5" or "SHA-256", credentials of ``algorithm`` need."""
    entry = _ALGORITHMS.get(algorithm.upper())
    return entry[0].removesuffix("-sess") if entry else None


def ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """H(username:realm:password) in hex: what the directory stores."""
    return _hex(_algorithm(algorithm)[1], f"{username}:{realm}:{password}")


def _hex(hash_fn: Callable, text: str) -> str:
    return hash_fn(text.encode("utf-8")).hexdigest()


def verify(creds: Credentials, method: str, ha1_hex: str, *, body: bytes = b"") -> bool:
    """Whether the response is right; False for unsupported scheme, algorithm or qop."""
    expected = _expected_response(creds, method, ha1_hex.lower(), body)
    if expected is None:
        return False
    return hmac.compare_digest(expected.encode("ascii"), creds.response.lower().encode("utf-8"))


def _expected_response(creds: Credentials, method: str, ha1_hex: str, body: bytes) -> str | None:
    entry = _ALGORITHMS.get(creds.algorithm.upper())
    if entry is None or not creds.is_digest:
        return None
    _, hash_fn, sess = entry
    if sess:
        if creds.cnonce is None:
            return None
        ha1_hex = _hex(hash_fn, f"{ha1_hex}:{creds.nonce}:{creds.cnonce}")
    qop = creds.qop
    if qop is None:  # RFC 2069
        return _hex(hash_fn, f"{ha1_hex}:{creds.nonce}:{_hex(hash_fn, f'{method}:{creds.uri}')}")
    if qop.lower() == "auth":
        ha2 = _hex(hash_fn, f"{method}:{creds.uri}")
    elif qop.lower() == "auth-int":
        ha2 = _hex(hash_fn, f"{method}:{creds.uri}:{hash_fn(body).hexdigest()}")
    else:
        return None
    return _hex(hash_fn, f"{ha1_hex}:{creds.nonce}:{creds.nc}:{creds.cnonce}:{qop}:{ha2}")


class NonceState(Enum):
    VALID = "valid"
    STALE = "stale"  # authentic but too old: challenge again with stale=true
    INVALID = "invalid"  # forged or garbled


# A nonce is base64url, unpadded, of: creation time in ms (8 bytes, big-endian)
# | salt (>= 8 random bytes) | HMAC-SHA256(secret, time | salt) truncated to
# 128 bits (RFC 2104 section 5), which keeps it unforgeable and the header short.
_TIME_BYTES, _MIN_SALT, _MAC_BYTES = 8, 8, 16
_NONCE_SHAPE = re.compile(r"[A-Za-z0-9_-]{43,200}")  # 43 characters: the shortest, 32 bytes


def make_nonce(secret: bytes, now: float, salt: bytes) -> str:
    """A nonce any holder of ``secret`` can authenticate and date."""
    if len(salt) < _MIN_SALT:
        raise ValueError(f"nonce salt must be at least {_MIN_SALT} random bytes")
    signed = int(now * 1000).to_bytes(_TIME_BYTES, "big") + salt
    return _b64(signed + _nonce_mac(secret, signed))


def check_nonce(secret: bytes, nonce: str, now: float, lifetime: float) -> NonceState:
    """VALID, STALE (authentic, older than ``lifetime`` seconds) or INVALID."""
    if not _NONCE_SHAPE.fullmatch(nonce):
        return NonceState.INVALID
    try:
        raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
    except ValueError:
        return NonceState.INVALID
    # Spare bits let several spellings decode to the same bytes; accepting them
    # would let a replay dodge nonce-count tracking, which is keyed by the text.
    if _b64(raw) != nonce:
        return NonceState.INVALID
    signed, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    if len(signed) < _TIME_BYTES + _MIN_SALT:
        return NonceState.INVALID
    if not hmac.compare_digest(mac, _nonce_mac(secret, signed)):
        return NonceState.INVALID
    age = now - int.from_bytes(signed[:_TIME_BYTES], "big") / 1000
    return NonceState.STALE if age > lifetime else NonceState.VALID


def _nonce_mac(secret: bytes, signed: bytes) -> bytes:
    return hmac.new(secret, signed, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class NonceCounter(Protocol):
    """Replay protection by nonce count, shared by all workers (the Redis store).

    ``accept_nc`` records ``nc`` as the highest count of ``nonce`` and returns
    True, or False when ``nc`` is not greater than the last accepted (a replay).
    It is one atomic compare-and-set across workers and forgets a nonce after
    its lifetime. Call it after :func:`verify` succeeded (forgeries must not
    burn counts) and only for new requests: a retransmission repeats its nc and
    is answered from its transaction first. Credentials without qop have no
    nc; passing 0 for them makes such a nonce single-use.
    """

    def accept_nc(self, nonce: str, nc: int) -> bool: ...


def authorization(challenge: bytes, *, method: str, uri: str, username: str, password: str,
                  cnonce: str, nc: int = 1, body: bytes = b"") -> bytes | None:
    """The credentials answering ``challenge`` (a WWW-/Proxy-Authenticate value), for a
    client of ours such as a B2BUA leg towards a gateway; None for a challenge it cannot
    answer (another scheme or algorithm).  ``cnonce`` comes from the caller's random source.
    """
    m = _SCHEME.match(challenge)
    if m is None or m[1].decode("ascii").lower() != "digest":
        return None
    params = _parse_params(challenge, m.end())
    if "nonce" not in params or "realm" not in params:
        return None
    algorithm = params.get("algorithm", "MD5")
    entry = _ALGORITHMS.get(algorithm.upper())
    if entry is None:
        return None
    qops = [q.strip() for q in params.get("qop", "").split(",") if q.strip()]
    qop = "auth" if "auth" in qops else ("auth-int" if "auth-int" in qops else None)
    creds = Credentials(
        "Digest", username, params["realm"], params["nonce"], uri, "", algorithm,
        cnonce if qop else None, f"{nc:08x}" if qop else None, qop, params.get("opaque"), {})
    base_ha1 = _hex(entry[1], f"{username}:{creds.realm}:{password}")
    response = _expected_response(creds, method, base_ha1, body)
    parts = [f"username={_quote(username)}", f"realm={_quote(creds.realm)}",
             f"nonce={_quote(creds.nonce)}", f"uri={_quote(uri)}",
             f"response={_quote(response)}", f"algorithm={entry[0]}"]
    if qop:
        parts += [f"qop={qop}", f"nc={creds.nc}", f"cnonce={_quote(cnonce)}"]
    if creds.opaque is not None:
        parts.append(f"opaque={_quote(creds.opaque)}")
    return ("Digest " + ", ".join(parts)).encode("utf-8")
