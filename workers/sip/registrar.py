"""The registrar (RFC 3261 section 10, RFC 5626 instance ids and outbound).

One REGISTER costs one Lua call when the user's HA1 is cached: the script
absorbs a retransmission, rejects a replayed nonce-count, purges expired
bindings, applies the changes and returns the bindings, atomically.

RFC 5626 outbound: a Contact with ``+sip.instance`` and ``reg-id`` names a flow, the
connection the REGISTER came over (its id, ``conn``), or over UDP the address it came
from.  Each reg-id of an instance is a binding of its own (the key is
``<instance>;reg-id=<n>``), so a phone's second flow is kept beside the first, and a
REGISTER over the same flow again replaces its binding.  Requests reach the phone only
over a live flow (workers/sip/b2bua.py: one flow per instance, the newest live one; a
closed flow is never dialed again: the phone makes a new one).  When the REGISTER says
``Supported: outbound`` the 200 says ``Require: outbound`` (section 6); a REGISTER that
asks for a flow but came through a proxy (more than one Via: there is no Path support
here) gets 439 First Hop Lacks Outbound Support.
"""

from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass

from cluster.envelope import is_stream
from cluster.logsetup import call_log
from cluster.sip.errors import SipError
from cluster.sip.headers import NameAddr
from cluster.sip.message import Request, Response
from cluster.sip.uri import SipURI
from cluster.store import Binding, Store, aor_of, tx_key

from .auth import Authenticator, Verdict

log = logging.getLogger("registrar")


@dataclass
class Source:
    """Where a request came from and which of our sockets got it: a UDP socket's index,
    or a stream connection's id (cluster/envelope.py)."""

    addr: tuple[str, int]
    host: str
    sock_index: int = 0
    answered: bool = False  # a final answer went out: Redis trouble after it must not add a 503
    keep_until: float = 0.0  # a deferred hang-up tried again: when the worker gives up on it
    arrived: float = 0.0  # time.monotonic() when the worker got it (0: unknown)


@dataclass
class RegistrarSettings:
    realm: str
    min_expires: int
    max_expires: int
    default_expires: int
    max_contacts: int
    nonce_lifetime: float
    tx_ttl: float


class Registrar:
    """``answers`` (answers.py): builds the answers (their To tag and Server header) and
    holds this worker's answers not yet written to Redis, which a retransmission gets."""

    def __init__(self, store: Store, auth: Authenticator, settings: RegistrarSettings,
                 answers):
        self.store = store
        self.auth = auth
        self.settings = settings
        self.answers = answers

    def handle(self, req: Request, source: Source,
               server_key: str) -> tuple[Response | bytes, str | None, bool]:
        """The answer to a REGISTER, the transaction key it belongs under (None: not kept),
        and whether it is new (to be kept)."""
        user = self._user_of(req)
        result = self.auth.check(req, source.addr, proxy=False)
        if result.verdict in (Verdict.CHALLENGE, Verdict.STALE):
            headers = self.auth.challenge_headers(proxy=False,
                                                  stale=result.verdict is Verdict.STALE)
            return self._reply(req, 401, headers=headers), None, False
        if result.verdict is not Verdict.OK:
            return self._reply(req, 403), None, False
        if result.username != user:
            self.auth.refused(req, source.addr, result.username, "user-mismatch")
            return self._reply(req, 403, "Username does not match the To user"), None, False
        if _asks_for_flow(req) and len(req.vias) > 1:
            return (self._reply(req, 439, "First Hop Lacks Outbound Support"), None, False)
        return self._update(req, source, user, result.credentials, server_key)

    def _user_of(self, req: Request) -> str:
        to_uri = req.to.uri
        if not isinstance(to_uri, SipURI) or to_uri.user is None:
            raise SipError(400, "To must be a SIP or SIPS address of record")
        return to_uri.user_name  # 400 (SipError) when it decodes to a control

    def _update(self, req: Request, source: Source, user: str, creds, server_key: str):
        now = time.time()
        aor = aor_of(user, self.settings.realm)
        star = req.contact_star
        if star and (req.expires != 0 or len(req.header_values("contact")) != 1):
            raise SipError(400, "Contact: * needs Expires: 0 and no other Contact")
        set_bindings, remove_keys = [], []
        for contact in req.contacts:
            expires = self._expires_of(contact, req)
            if 0 < expires < self.settings.min_expires:
                return self._reply(req, 423, headers=[
                    (b"Min-Expires", b"%d" % self.settings.min_expires)]), None, False
            binding = self._binding(req, contact, min(expires, self.settings.max_expires),
                                    now, source)
            if expires == 0:
                remove_keys.append(binding.key)
            else:
                set_bindings.append(binding)
        tx = tx_key(aor, server_key)
        outcome = self.store.register(
            aor, tx, now=now, nonce=creds.nonce, nc=creds.nonce_count if creds.nc else None,
            nonce_ttl=self.settings.nonce_lifetime, tx_ttl=self.settings.tx_ttl,
            max_contacts=self.settings.max_contacts, call_id=req.call_id.decode("latin-1"),
            cseq=req.cseq.number, set_bindings=set_bindings, remove_keys=remove_keys, star=star)
        clog = call_log(log, req.call_id)
        if outcome.outcome == "dup":
            pending = self.answers.pending  # this worker's answers not yet in Redis
            if outcome.response or tx in pending:
                return outcome.response or pending[tx], tx, False
            # The first copy was registered by a worker that died before it kept its answer
            # (retransmissions of a live worker's request never get here: affinity and its
            # in-flight set absorb them).  The bindings it wrote are the answer.
            return self._ok(req, self.store.bindings(aor, now), now), tx, True
        if outcome.outcome == "replay":
            self.auth.refused(req, source.addr, user, "replayed-nonce-count")
            return (self._reply(req, 401, headers=self.auth.challenge_headers(proxy=False)),
                    None, False)
        if outcome.outcome == "stale-cseq":
            return (self._reply(req, 400, "Out of order REGISTER (CSeq not above the last)"),
                    None, False)
        if outcome.outcome == "too-many":
            return self._reply(req, 403, "Too many registered contacts"), None, False
        clog.info("%s: %d binding(s) after REGISTER from %s:%d", aor, len(outcome.bindings),
                  *source.addr)
        return self._ok(req, outcome.bindings, now), tx, True

    def _expires_of(self, contact: NameAddr, req: Request) -> int:
        value = contact.param("expires")
        if value is not None:
            if not value.isdigit():
                raise SipError(400, "Malformed expires parameter")
            return min(int(value), 2**32 - 1)
        header = req.expires
        return self.settings.default_expires if header is None else header

    def _binding(self, req: Request, contact: NameAddr, expires: int, now: float,
                 source: Source) -> Binding:
        uri = bytes(contact.uri)
        instance = contact.param("+sip.instance")
        reg_id = contact.param("reg-id")
        if instance:
            key = f"{instance};reg-id={reg_id}" if reg_id else instance
        else:
            key = uri.decode("latin-1")
        q = contact.param("q")
        return Binding(
            key=key, contact=uri, expires_at=now + expires, call_id=req.call_id.decode("latin-1"),
            cseq=req.cseq.number, source=source.addr, host=source.host,
            nat=_behind_nat(req, source.addr),
            q=float(q) if q and _is_number(q) else None, instance=instance,
            reg_id=int(reg_id) if reg_id and reg_id.isdigit() else None,
            user_agent=(req.header("user-agent") or b"").decode("utf-8", "replace")[:200],
            transport=req.via.transport.lower(),
            conn=source.sock_index if is_stream(source.sock_index) else 0, registered_at=now,
            params={k: v for k, v in contact.params if k not in ("expires", "q")})

    def _ok(self, req: Request, bindings: list[Binding], now: float) -> Response:
        headers = [(b"Contact", _contact_value(b, now)) for b in bindings]
        headers.append((b"Date", email.utils.formatdate(now, usegmt=True).encode()))
        if _asks_for_flow(req) and _supports(req, b"outbound"):
            headers.append((b"Require", b"outbound"))  # RFC 5626 section 6
        return self._reply(req, 200, headers=headers)

    def _reply(self, req: Request, status: int, reason: str | None = None, *,
               headers: list[tuple[bytes, bytes]] = ()) -> Response:
        return self.answers.build(req, status, reason, headers=headers)


def _contact_value(binding: Binding, now: float) -> bytes:
    params = b";expires=%d" % max(0, int(binding.expires_at - now + 0.5))
    for name, value in binding.params.items():
        params += b";" + name.encode() + (b"" if value is None else b"=" + value.encode("latin-1"))
    return b"<" + binding.contact + b">" + params


def _asks_for_flow(req: Request) -> bool:
    """Whether a REGISTER's Contact asks for an RFC 5626 flow (+sip.instance and reg-id)."""
    return any(c.param("+sip.instance") and c.param("reg-id") for c in req.contacts)


def _supports(req: Request, option: bytes) -> bool:
    return any(option == part.strip().lower()
               for value in req.header_values("supported") for part in value.split(b","))


def _behind_nat(req: Request, source: tuple[str, int]) -> bool:
    """Whether the REGISTER came from another address than its Via says (RFC 3581).

    Then only the address it came from reaches the phone (its NAT's mapping); otherwise
    the Contact is where it listens.
    """
    host, port = req.via.sent_by
    return (host.strip("[]"), port) != (source[0], source[1])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
