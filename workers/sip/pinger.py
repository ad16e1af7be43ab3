"""OPTIONS pings to registered contacts (registrar.ping_interval > 0).

They keep NAT bindings open and find phones that went away without
unregistering: a contact that leaves ``MAX_UNANSWERED`` pings in a row
unanswered is dropped.  Each host pings the contacts that registered through
it (their NAT only lets in what comes from that host), and the host's workers
share the AORs by hash.  The AOR and the binding travel in the ping's Call-ID,
so whichever worker gets the answer can note it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import zlib

import gevent

from cluster.backoff import Backoff
from cluster.sip.ids import host_part, via
from cluster.sip.message import Response, build_request
from cluster.store import Binding, unpack

log = logging.getLogger("pinger")
MAX_UNANSWERED = 3
PREFIX = b"ping."


def _field(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


class Pinger:
    """Pings from ``host``'s contacts, the share of worker ``index`` of ``count``;
    ``address`` and ``port``: ours, in the Via and From."""

    def __init__(self, store, transport, ids, *, host: str, interval: float, address: str,
                 port: int, user_agent: bytes, index: int, count: int):
        self.store = store
        self.transport = transport
        self.ids = ids
        self.host = host
        self.interval = interval
        self.address, self.port = address, port
        self.user_agent = user_agent
        self.index, self.count = index, max(count, 1)

    def loop(self) -> None:
        backoff = Backoff(log, "pings")
        while self.interval > 0:
            gevent.sleep(self.interval)
            try:
                self.ping_all()
            except Exception as exc:  # whatever it is, this round is skipped, not the next
                backoff.failed(exc)
            else:
                backoff.ok()

    def ping_all(self) -> None:
        for aor in self.store.registered_aors():
            if zlib.crc32(aor.encode()) % self.count == self.index:
                self._ping_aor(aor)

    def _ping_aor(self, aor: str) -> None:
        for key, packed in self.store.raw_bindings(aor).items():
            binding = Binding.from_record(unpack(packed))
            if binding.host != self.host or binding.destination is None:
                continue
            field = _field(key)
            unanswered = self.store.count_ping(aor, field, 10 * self.interval)
            if unanswered > MAX_UNANSWERED:
                if self.store.drop_binding(aor, key, packed):
                    log.info("%s: dropped %s after %d unanswered pings", aor,
                             binding.contact.decode("latin-1"), MAX_UNANSWERED)
                    self.store.ping_answered(aor, field)
                continue
            self._send(aor, field, binding)

    def _send(self, aor: str, field: str, binding: Binding) -> None:
        host, port = self.address, self.port
        token = base64.urlsafe_b64encode(aor.encode()).decode().rstrip("=")
        ids = self.ids
        call_id = PREFIX + f"{token}.{field}.{ids.token(4)}".encode()
        request = build_request("OPTIONS", binding.contact, [
            (b"Via", via(host, port, ids.branch())), (b"Max-Forwards", b"70"),
            (b"From", b"<sip:ping@%s>;tag=%s" % (host_part(host).encode(), ids.tag().encode())),
            (b"To", b"<" + binding.contact + b">"), (b"Call-ID", call_id),
            (b"CSeq", b"1 OPTIONS"), (b"User-Agent", self.user_agent)])
        self.transport.send(request.to_bytes(), binding.destination, host=binding.host,
                            sock_index=binding.conn)

    def on_response(self, resp: Response) -> None:
        """Any answer, even an error, shows the phone is there."""
        try:
            token, field, _ = resp.call_id[len(PREFIX):].decode().split(".")
            aor = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return
        self.store.ping_answered(aor, field)


def is_ping(call_id: bytes) -> bool:
    return call_id.startswith(PREFIX)
