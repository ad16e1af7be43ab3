"""Digest authentication for SIP (RFC 2617, RFC 7616, RFC 8760), sans-IO.

A server challenges with :func:`build_challenge`, parses the client's
Authorization / Proxy-Authorization value with :func:`parse_credentials` and
checks it with :func:`verify` against the user's stored HA1. Clear passwords
only pass through :func:`ha1`, which provisioning uses to compute what the
directory stores.

Nonces are stateless (:func:`make_nonce`, :func:`check_nonce`): knowing only
the shared secret, any worker can tell a nonce another worker issued from a
forged one, and how old it is. Replay protection by nonce count needs shared
state, so it belongs to a :class:`NonceCounter` (the Redis store).

What the caller still checks itself: that ``creds.realm`` is its realm, that
``creds.uri`` designates the Request-URI, and that the nonce is VALID and its
count accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Protocol

from cluster.sip.errors import SipError

# Algorithm names are case-insensitive on the wire; key by upper case.
# value: (name as we write it, hash constructor, is a -sess variant)
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
_SCHEME = re.compile(rb"[ \t]*(?P<scheme>" + _TOKEN + rb")(?P<space>[ \t\r\n]+)?")
# One auth-param and the comma (or end) after it. Every part is optional, so
# the pattern matches at once everywhere (no backtracking), a finditer scan
# walks the list, and the first missing group tells what is malformed.
_PARAM = re.compile(
    rb"(" + _SWS + rb")(" + _TOKEN + rb")?" + _SWS + rb"(=)?" + _SWS
    + rb'(?:"(' + _QUOTED + rb')(")?|(' + _TOKEN + rb"))?" + _SWS + rb"(,|\Z)?"
)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
_NC = re.compile(r"[0-9A-Fa-f]{8}")
_REQUIRED = ("username", "realm", "nonce", "uri", "response")


@dataclass(slots=True)
class Credentials:
    """One Authorization / Proxy-Authorization value.

    Values are unquoted and unescaped; ``params`` holds every parameter by
    lower-case name. For a scheme other than Digest only ``scheme`` and
    (when they parse) ``params`` are set.
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
        """``nc`` as a number (0 when absent, as in RFC 2069 credentials)."""
        return int(self.nc, 16) if self.nc else 0


def parse_credentials(value: bytes) -> Credentials:
    """Parse a credentials header value; SipError(400, reason) if malformed."""
    m = _SCHEME.match(value)
    if m is None:
        raise SipError(400, "credentials do not start with an auth scheme")
    scheme = m["scheme"].decode("ascii")
    if scheme.lower() != "digest":
        return Credentials(scheme, params=_params_if_any(value, m.end()))
    if not value[m.end():].strip():
        raise SipError(400, "Digest credentials have no parameters")
    if m["space"] is None:
        raise SipError(400, "no whitespace after the Digest scheme")
    return _digest_credentials(scheme, _parse_params(value, m.end()))


def _params_if_any(value: bytes, pos: int) -> dict[str, str]:
    # Unknown schemes may carry token68 or anything else: never an error here.
    try:
        return _parse_params(value, pos)
    except SipError:
        return {}


def _parse_params(value: bytes, pos: int) -> dict[str, str]:
    params: dict[str, str] = {}
    for m in _PARAM.finditer(value, pos):
        _, name_bytes, eq, quoted, close, token, sep = m.groups()
        if name_bytes is None or eq is None or (close is None and token is None) or sep is None:
            _raise_malformed(value, m)
        name = name_bytes.decode("ascii").lower()
        if name in params:
            raise SipError(400, f"duplicate parameter '{name}' in credentials")
        raw = token if token is not None else _QUOTED_PAIR.sub(rb"\1", quoted) if b"\\" in quoted else quoted
        try:
            params[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SipError(400, f"parameter '{name}' is not valid UTF-8") from None
        if sep != b",":
            break
    return params


def _raise_malformed(value: bytes, m: re.Match) -> None:
    _, name_bytes, eq, quoted, close, token, _ = m.groups()
    at = m.end(1)
    if name_bytes is None:
        what = "empty parameter" if value[at:at + 1] in (b"", b",") else "expected a parameter name"
        raise SipError(400, f"{what} at offset {at} in credentials")
    name = name_bytes.decode("ascii").lower()
    if eq is None:
        raise SipError(400, f"parameter '{name}' has no '='")
    if quoted is None and token is None:
        raise SipError(400, f"parameter '{name}' has no value")
    if close is None and token is None:
        raise SipError(400, f"unterminated or badly escaped quoted string in '{name}'")
    raise SipError(400, f"unexpected character after '{name}' at offset {m.end()}")


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
    )


def build_challenge(realm: str, nonce: str, *, algorithm: str = "MD5", qop: str | None = "auth",
                    opaque: str | None = None, stale: bool = False) -> bytes:
    """The value of a WWW-Authenticate / Proxy-Authenticate header.

    ``qop`` is "auth", "auth-int", "auth,auth-int" or None (RFC 2069 style).
    Offer several algorithms with one header each, preferred first (RFC 8760).
    """
    parts = [f"Digest realm={_quote(realm)}", f"nonce={_quote(nonce)}",
             f"algorithm={_algorithm(algorithm)[0]}"]
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
    if any(ord(c) < 0x20 and c != "\t" or c == "\x7f" for c in text):
        raise ValueError(f"control character in {text!r}")  # would split the header
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _algorithm(name: str) -> tuple[str, Callable, bool]:
    try:
        return _ALGORITHMS[name.upper()]
    except KeyError:
        raise ValueError(f"unsupported digest algorithm {name!r}") from None


def ha1_algorithm(algorithm: str) -> str | None:
    """Which stored HA1 ("MD5" or "SHA-256") credentials of this algorithm need."""
    entry = _ALGORITHMS.get(algorithm.upper())
    return None if entry is None else entry[0].removesuffix("-sess")


def ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """H(username:realm:password) in hex: what the directory stores."""
    return _hex(_algorithm(algorithm)[1], f"{username}:{realm}:{password}")


def _hex(hash_fn: Callable, text: str) -> str:
    return hash_fn(text.encode("utf-8")).hexdigest()


def verify(creds: Credentials, method: str, ha1_hex: str, *, body: bytes = b"") -> bool:
    """Whether ``creds.response`` is right for this method, HA1 and body.

    False, never an error, for an unsupported scheme, algorithm or qop.
    """
    expected = _expected_response(creds, method, ha1_hex, body)
    if expected is None:
        return False
    return hmac.compare_digest(expected.encode("ascii"), creds.response.lower().encode("utf-8"))


def _expected_response(creds: Credentials, method: str, ha1_hex: str, body: bytes) -> str | None:
    entry = _ALGORITHMS.get(creds.algorithm.upper())
    if entry is None or not creds.is_digest:
        return None
    _, hash_fn, sess = entry
    secret = ha1_hex.lower()
    if sess:
        if creds.cnonce is None:
            return None
        secret = _hex(hash_fn, f"{secret}:{creds.nonce}:{creds.cnonce}")
    qop = creds.qop
    if qop is None:  # RFC 2069
        return _hex(hash_fn, f"{secret}:{creds.nonce}:{_hex(hash_fn, f'{method}:{creds.uri}')}")
    if qop.lower() == "auth":
        a2 = f"{method}:{creds.uri}"
    elif qop.lower() == "auth-int":
        a2 = f"{method}:{creds.uri}:{hash_fn(body).hexdigest()}"
    else:
        return None
    return _hex(hash_fn, f"{secret}:{creds.nonce}:{creds.nc}:{creds.cnonce}:{qop}:{_hex(hash_fn, a2)}")


class NonceState(Enum):
    VALID = "valid"
    STALE = "stale"  # authentic but older than its lifetime: challenge again with stale=true
    INVALID = "invalid"  # forged or garbled


# Nonce layout, then base64url without padding:
#   creation time (ms, 8 bytes big-endian) | salt (>= 8 bytes) | HMAC-SHA256(secret, time|salt)
# The MAC is truncated to 128 bits (RFC 2104 section 5): still unforgeable, shorter headers.
_TIME_BYTES, _MIN_SALT, _MAC_BYTES = 8, 8, 16
_NONCE_SHAPE = re.compile(r"[A-Za-z0-9_-]{43,200}")  # 43 chars = the 32 bytes of the shortest


def make_nonce(secret: bytes, now: float, salt: bytes) -> str:
    """A nonce any holder of ``secret`` can authenticate and date; ``salt`` is random bytes."""
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
    # Several spellings decode to the same bytes; accepting them would let a
    # replay dodge nonce-count tracking, which is keyed by the nonce text.
    if _b64(raw) != nonce:
        return NonceState.INVALID
    signed, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    if len(signed) < _TIME_BYTES + _MIN_SALT or not hmac.compare_digest(mac, _nonce_mac(secret, signed)):
        return NonceState.INVALID
    age = now - int.from_bytes(signed[:_TIME_BYTES], "big") / 1000
    return NonceState.STALE if age > lifetime else NonceState.VALID


def _nonce_mac(secret: bytes, signed: bytes) -> bytes:
    return hmac.new(secret, signed, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class NonceCounter(Protocol):
    """Replay protection by nonce count, shared by all workers (the Redis store).

    ``accept_nc`` records ``nc`` as the highest count seen for ``nonce`` and
    returns True, or returns False when ``nc`` is not greater than the last
    accepted one (a replay). It must be atomic across workers (compare and set
    in one step) and forget a nonce once its lifetime is over. Call it only
    after :func:`verify` succeeded, so that forged requests cannot burn counts,
    and only for new requests: a retransmission repeats its nc and must be
    answered from its transaction before it gets here. Credentials without
    qop carry no nc; passing 0 for them makes such a nonce single-use.
    """

    def accept_nc(self, nonce: str, nc: int) -> bool: ...
