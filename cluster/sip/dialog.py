"""Dialogs (RFC 3261 section 12): the state both ends of a call keep, and the in-dialog
requests built from it.

A ``Dialog`` is a plain record persisted in Redis at every change (``to_record`` /
``Dialog.from_record``): its CSeq counters, route set and remote target are never derived
again after a takeover, so a call that moves to another worker keeps sending in order.
Local means this side (the UA the record belongs to), remote the peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .headers import NameAddr, parse_name_addr
from .ids import via as _via
from .message import Message, Request, Response, build_request
from .transaction import key_part
from .uri import SipURI, parse_uri

EARLY, CONFIRMED = "early", "confirmed"
TARGET_REFRESH = frozenset({"INVITE", "UPDATE"})  # requests whose 2xx may move the remote target
NO_CONTACT = frozenset({"BYE", "CANCEL"})  # RFC 3261 table 3: Contact does not apply
SEQUENCE_FREE = frozenset({"ACK", "CANCEL"})  # they reuse the INVITE's CSeq number


def dialog_id(call_id: bytes | str, local_tag: str | None, remote_tag: str | None) -> str:
    """The dialog's identity as a string usable inside a Redis key.

    For a request that arrives, the local tag is its To tag and the remote tag its From
    tag; for a response to our own request, the other way round.
    """
    return "|".join((key_part(call_id), key_part(local_tag or ""), key_part(remote_tag or "")))


@dataclass
class Dialog:
    """RFC 3261 12.1: call_id, tags, URIs (From/To name-addr bytes without the tag),
    CSeq counters, remote target (a URI), route set (Route values, in the order they go
    into a request), state (early or confirmed), secure flag, and the local target: the
    Contact URI this side advertised, which a 2xx to a re-INVITE must carry again.

    ``remote_seq`` is None until the peer sends a request in the dialog.
    """

    call_id: bytes
    local_tag: str
    remote_tag: str
    local_uri: bytes
    remote_uri: bytes
    local_seq: int
    remote_seq: int | None
    remote_target: bytes
    route_set: list[bytes] = field(default_factory=list)
    state: str = EARLY
    secure: bool = False
    local_target: bytes = b""

    @property
    def id(self) -> str:
        return dialog_id(self.call_id, self.local_tag, self.remote_tag)

    # ---------------------------------------------------------------- creation
    @classmethod
    def from_uac(cls, invite: Request, response: Response, *, secure: bool = False) -> Dialog:
        """RFC 3261 12.1.2: the dialog a 1xx (with a To tag) or a 2xx to our INVITE creates.

        The route set is the response's Record-Route reversed.  A provisional response
        without Contact leaves the INVITE's Request-URI as remote target until one comes.
        """
        remote_tag = response.to.tag
        if not remote_tag or response.status >= 300 or response.status == 100:
            raise ValueError("only a 101-299 response with a To tag creates a dialog")
        return cls(
            call_id=invite.call_id, local_tag=invite.from_.tag or "", remote_tag=remote_tag,
            local_uri=_address(invite.from_), remote_uri=_address(invite.to),
            local_seq=invite.cseq.number, remote_seq=None,
            remote_target=_contact_uri(response) or invite.uri_raw,
            route_set=[bytes(r) for r in reversed(response.record_routes)],
            state=CONFIRMED if response.status >= 200 else EARLY, secure=secure,
            local_target=_contact_uri(invite) or b"")

    @classmethod
    def from_uas(cls, invite: Request, local_tag: str, local_contact: bytes, *,
                 secure: bool = False) -> Dialog:
        """RFC 3261 12.1.1: the dialog our response with ``local_tag`` to ``invite`` creates.

        The route set is the INVITE's Record-Route in order.  An RFC 2543 INVITE may lack
        Contact: its From URI is then the remote target.  The local CSeq starts at the
        INVITE's number, so the first request this side sends has a higher one: some user
        agents wrongly compare the two directions' numbers.
        """
        return cls(
            call_id=invite.call_id, local_tag=local_tag, remote_tag=invite.from_.tag or "",
            local_uri=_address(invite.to), remote_uri=_address(invite.from_),
            local_seq=invite.cseq.number, remote_seq=invite.cseq.number,
            remote_target=_contact_uri(invite) or bytes(invite.from_.uri),
            route_set=[bytes(r) for r in invite.record_routes], state=EARLY, secure=secure,
            local_target=local_contact)

    # ---------------------------------------------------------------- changes
    def confirm(self) -> None:
        """The UAS sent its 2xx (or the UAC got one): the dialog is confirmed."""
        self.state = CONFIRMED

    def update_from_response(self, resp: Response) -> bool:
        """Apply a response to a request of ours in this dialog; True when it applied.

        A 2xx to the INVITE confirms an early dialog and recomputes its route set
        (RFC 3261 13.2.2.4); a 1xx/2xx to INVITE or UPDATE with a Contact moves the remote
        target (target refresh, 12.2.1.2).  A response of another dialog (To tag) or
        another method changes nothing.
        """
        if resp.to.tag != self.remote_tag or resp.status >= 300:
            return False
        if resp.cseq.method not in TARGET_REFRESH:
            return False
        if resp.status >= 200 and resp.cseq.method == "INVITE" and self.state == EARLY:
            self.route_set = [bytes(r) for r in reversed(resp.record_routes)]
            self.state = CONFIRMED
        self.remote_target = _contact_uri(resp) or self.remote_target
        return True

    def update_from_request(self, req: Request) -> bool:
        """A target refresh request from the peer (re-INVITE, UPDATE) moves the remote
        target to its Contact (RFC 3261 12.2.2); True when it did."""
        contact = _contact_uri(req) if req.method in TARGET_REFRESH else None
        if contact is None:
            return False
        self.remote_target = contact
        return True

    def check_remote_cseq(self, req: Request) -> bool:
        """RFC 3261 12.2.2: whether a new request from the peer is in order, and if so
        record its CSeq number.  False (a lower or equal number) means: answer 500.
        ACK and CANCEL carry the INVITE's number and are always in order."""
        if req.method in SEQUENCE_FREE:
            return True
        number = req.cseq.number
        if self.remote_seq is not None and number <= self.remote_seq:
            return False
        self.remote_seq = number
        return True

    # ---------------------------------------------------------------- requests
    def create_request(self, method: str, *, branch: str, via_host: str, via_port: int,
                       contact: bytes, headers: tuple[tuple[bytes, bytes], ...] = (),
                       body: bytes = b"", content_type: bytes | None = None,
                       cseq: int | None = None) -> tuple[Request, tuple[str, int] | None]:
        """An in-dialog request (RFC 3261 12.2.1.1) and the (host, port) of its next hop.

        The local CSeq goes up by one, except for ACK and CANCEL, which reuse the INVITE's
        number (``cseq``; by default the current local number).  ``contact`` (our Contact
        URI) is left out of BYE and CANCEL.  The next hop is the first route, else the
        remote target (port 5060 by default; maddr wins over the host); None when that is
        not a SIP URI.  The caller may send elsewhere when it knows better (NAT).
        """
        number = self._next_cseq(method, cseq)
        uri, routes = self._request_uri_and_routes()
        hs = [(b"Via", _via(via_host, via_port, branch)), (b"Max-Forwards", b"70"),
              (b"From", _with_tag(self.local_uri, self.local_tag)),
              (b"To", _with_tag(self.remote_uri, self.remote_tag)),
              (b"Call-ID", self.call_id), (b"CSeq", b"%d %s" % (number, method.encode()))]
        hs += [(b"Route", route) for route in routes]
        if contact and method not in NO_CONTACT:
            hs.append((b"Contact", contact if b"<" in contact else b"<" + contact + b">"))
        hs += list(headers)
        request = build_request(method, uri, hs, body, content_type)
        first = parse_name_addr(self.route_set[0]).uri if self.route_set else None
        return request, _next_hop(first if first is not None else parse_uri(self.remote_target))

    def _next_cseq(self, method: str, cseq: int | None) -> int:
        if method in SEQUENCE_FREE:
            return self.local_seq if cseq is None else cseq
        number = self.local_seq + 1 if cseq is None else cseq
        self.local_seq = max(self.local_seq, number)
        return number

    def _request_uri_and_routes(self) -> tuple[bytes, list[bytes]]:
        """Loose routing when the first route has ``lr``; else strict routing: the first
        route becomes the Request-URI and the remote target goes last in Route."""
        if not self.route_set:
            return self.remote_target, []
        first = parse_name_addr(self.route_set[0]).uri
        if not isinstance(first, SipURI) or first.has_param("lr"):
            return self.remote_target, list(self.route_set)
        uri = bytes(first.replace(headers=None)) if first.headers is not None else bytes(first)
        return uri, self.route_set[1:] + [b"<" + self.remote_target + b">"]

    # ---------------------------------------------------------------- records
    def to_record(self) -> dict:
        """The dialog as msgpack-friendly values.  Built field by field: dataclasses.asdict
        deep-copies, and took 2.9% of a worker's CPU under load (py-spy, bench_profile)."""
        record = {f.name: getattr(self, f.name) for f in _FIELDS}
        record["route_set"] = list(self.route_set)
        return record

    @classmethod
    def from_record(cls, record: dict) -> Dialog:
        values = {f.name: record[f.name] for f in _FIELDS}
        values["route_set"] = list(values["route_set"])
        return cls(**values)


_FIELDS = fields(Dialog)


def _address(addr: NameAddr) -> bytes:
    """A From/To value without its tag: the dialog's local or remote URI."""
    if addr.tag is None and addr.raw:
        return addr.raw.strip()
    return addr.with_params(tuple(p for p in addr.params if p[0] != "tag")).build()


def _with_tag(address: bytes, tag: str) -> bytes:
    return address + b";tag=" + tag.encode() if tag else address


def _contact_uri(msg: Message) -> bytes | None:
    contacts = msg.contacts
    return bytes(contacts[0].uri) if contacts else None


def _next_hop(uri: object) -> tuple[str, int] | None:
    if not isinstance(uri, SipURI):
        return None
    host = uri.param("maddr") or uri.host_bare
    return host, uri.port or 5060

