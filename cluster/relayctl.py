"""Talking to the RTP relays: the control protocol and the client the B2BUA uses.

Protocol: one msgpack map per UDP datagram to a relay's control port, answered
by one map carrying the same ``id``.  Every command is idempotent, so a client
that hears nothing sends the same datagram again.  Requests and replies are
sealed with the cluster's relay-control key (cluster/clusterauth.py: HMAC, time
window, nonce): a relay ignores, and counts, any datagram that is not, from
whichever address it comes.  The control port is on loopback for one host; with
several hosts each relay binds and announces an address the other hosts reach
(``media.control_address``), since any worker on any host may have to change a
call's session at the relay that owns it.

Why straight to the owning relay rather than through the inter-host hand-off: the
hand-off is one-way (a datagram leaves another host's SIP socket) and has no way
back for the reply; carrying replies through it would add two dispatcher hops (~7 µs
of CPU each, design figures) and a second failure point to every command, where
sealing and opening cost ~3 µs each per message (cluster/clusterauth.py).

  {"id": <bytes>, "cmd": "offer",  "call_id": str, "leg": str, "streams": [stream...],
   "hold": bool, "other_family": 4|6, "latch_any": bool}
  {"id": <bytes>, "cmd": "answer", "call_id": str, "leg": str, "streams": [stream...],
   "hold": bool, "latch_any": bool}
  {"id": <bytes>, "cmd": "delete", "call_id": str}
  {"id": <bytes>, "cmd": "query",  "call_id": str}
  {"id": <bytes>, "cmd": "ping"}

  stream = {"media": "audio"|"video"|..., "addr": ip, "port": int, "rtcp_port": int (default
            port + 1), "rtcp_mux": bool, "family": 4|6 (default: from addr), "clock_rate":
            int (default: 8000 for audio, 90000 for video), "latch_ip": ip (default addr)}

``offer`` and ``answer`` both tell the relay where leg ``leg``'s party
receives media (its SDP) and return, per m-line in order, the relay address
and ports that go into the SDP sent to the *other* party.  ``offer`` creates
the session (ports for both legs) when it is new; ``answer`` needs it to exist
and starts the media timeout.  A repeated offer or answer (re-INVITE, UPDATE,
retransmission) keeps every port.  Replies: {"id", "ok": true, "relay": id,
"streams": [{"media", "address", "port", "rtcp_port", "rtcp_mux", "family"}]}
for offer/answer; {"id", "ok": true, "found": bool, "legs": [...]} for
delete (final figures) and query; {"id", "ok": false, "error": text} for a
command the relay refuses.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from cluster import clusterauth
from cluster.bounded import BoundedCache
from cluster.store import Store, pack, unpack

MAX_DATAGRAM = 65_000
COMMANDS = ("offer", "answer", "delete", "query", "ping")
# Retransmission schedule (seconds to wait for each try).  A relay answers in well under a
# millisecond; the longer schedule covers a relay being restarted by supervisord.
NEW_SESSION_TIMEOUTS = (0.05, 0.1, 0.2)
OWNER_TIMEOUTS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
RELAY_DEAD_AFTER = 2.0  # a relay whose heartbeat is older than this is not picked
NODES_REFRESH = 1.0  # seconds between reads of relay:nodes
SUSPECT_FOR = 5.0  # a relay that did not answer is skipped this long for new sessions
# Calls whose relay this client remembers (it made their session or was told where it is):
# their answer and delete go there without reading the session's record first (one Redis
# round trip each); a relay that refuses, or does not know the session, sends it back to
# the record.  ~150 bytes an entry.
OWNERS_REMEMBERED = 20_000
SILENT_TRY_FOR = 30.0  # a relay without a heartbeat this long is no longer tried at all


class RelayError(Exception):
    """The relay refused the command (the message says why)."""


class RelayUnavailable(RelayError):
    """No relay answered."""


# --------------------------------------------------------------------------- codec


def encode(message: dict) -> bytes:
    data = pack(message)
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"control message too large: {len(data)} bytes")
    return data


def decode(data: bytes) -> dict:
    """A control message (request or reply); ValueError for anything else."""
    try:
        message = unpack(data)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ValueError("a control message is a map")
    request_id = message.get("id")
    if not isinstance(request_id, (bytes, int)) or isinstance(request_id, bool):
        raise ValueError("a control message needs an id")
    if isinstance(request_id, bytes) and len(request_id) > 64:
        raise ValueError("request id longer than 64 bytes")
    if "cmd" in message and message["cmd"] not in COMMANDS:
        raise ValueError(f"unknown command {message['cmd']!r}")
    return message


def new_request_id() -> bytes:
    return os.urandom(8)


def control_key(secret: str | bytes) -> bytes:
    """The relay-control key every host derives from the cluster's ``auth.secret``."""
    return clusterauth.derive_key(secret, clusterauth.PURPOSE_RELAY)


# --------------------------------------------------------------------------- records


@dataclass
class StreamSpec:
    """One m-line of a party's SDP: where that party receives media."""

    media: str
    addr: str
    port: int
    rtcp_port: int | None = None
    rtcp_mux: bool = False
    family: int | None = None
    clock_rate: int | None = None
    latch_ip: str | None = None

    def to_message(self) -> dict:
        # Not asdict(): it deep-copies every value (1% of a loaded worker's CPU, py-spy).
        return {name: value for name in _SPEC_FIELDS
                if (value := getattr(self, name)) is not None}


_SPEC_FIELDS = tuple(f.name for f in fields(StreamSpec))


@dataclass(frozen=True)
class RelayStream:
    """Where the other party must send one m-line's media: goes into the SDP sent to it."""

    media: str
    address: str
    port: int
    rtcp_port: int
    rtcp_mux: bool
    family: int


@dataclass(frozen=True)
class MediaResult:
    relay: str
    streams: list[RelayStream]


@dataclass(frozen=True)
class RelayInfo:
    id: str
    host: str
    control: tuple[str, int]
    sessions: int
    pps: float
    seen: float

    @classmethod
    def from_record(cls, record: dict) -> RelayInfo:
        return cls(record["id"], record.get("host", ""), tuple(record["control"]),
                   int(record.get("sessions", 0)), float(record.get("pps", 0.0)),
                   float(record.get("seen", 0.0)))


def address_family(address: str) -> int:
    """4 or 6; ValueError for something that is not an IP address."""
    return ipaddress.ip_address(address).version


# --------------------------------------------------------------------------- client


@dataclass
class RelayClient:
    """The worker side: picks relays, sends commands, retries, falls back.

    ``host`` limits new sessions to this host's relays (media stays near the host
    that set the call up); None allows any.  A session that exists is always changed
    at the relay that owns it, on whichever host.  ``key`` seals the commands
    (``control_key``).  Safe to share between greenlets and threads.
    """

    store: Store
    host: str | None = None
    key: bytes = b""
    new_session_timeouts: Sequence[float] = NEW_SESSION_TIMEOUTS
    owner_timeouts: Sequence[float] = OWNER_TIMEOUTS
    dead_after: float = RELAY_DEAD_AFTER
    _nodes: dict[str, RelayInfo] = field(default_factory=dict, repr=False)
    _nodes_read: float = field(default=-1e9, repr=False)
    _suspect: dict[str, float] = field(default_factory=dict, repr=False)
    _picked: dict[str, int] = field(default_factory=dict, repr=False)
    _spare: dict[tuple, list[socket.socket]] = field(default_factory=dict, repr=False)
    # Hosts known dead (media.follow_dead_hosts): their relays are not waited for.
    dead_hosts: set[str] = field(default_factory=set, repr=False)
    # call -> the relay of its session, as this client last knew it (see OWNERS_REMEMBERED)
    _owners: BoundedCache = field(
        default_factory=lambda: BoundedCache(OWNERS_REMEMBERED, OWNERS_REMEMBERED * 150),
        repr=False)
    # call -> its session's relay (None: no session) as read from Redis for the event in
    # hand (``read_owner``): its first offer needs no read of its own.
    _read: dict[str, str | None] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- commands
    def offer(self, call_id: str, leg: str, streams: Sequence[StreamSpec], *, hold: bool = False,
              other_family: int | None = None, latch_any: bool = False,
              relay: str | None = None) -> MediaResult:
        """Leg ``leg``'s media addresses; returns the relay ports for the other party's SDP.

        A new call goes to the least loaded live relay (another one if it does not answer);
        a call that has a session keeps its relay, and its ports."""
        message = {"cmd": "offer", "call_id": call_id, "leg": leg,
                   "streams": [s.to_message() for s in streams], "hold": hold,
                   "latch_any": latch_any}
        if other_family is not None:
            message["other_family"] = other_family
        if relay is not None:
            owner = relay
        elif call_id in self._read:
            owner = self._read[call_id]
        else:
            owner = self._owner(call_id)
        if owner is not None:
            result = _media_result(self._to_owner(owner, call_id, message))
            self._remember(call_id, owner)
            return result
        for candidate in self.candidates():
            try:
                reply = self._exchange(candidate.control, message, self.new_session_timeouts)
            except RelayUnavailable:
                self._suspect[candidate.id] = time.monotonic()
                continue
            self._picked[candidate.id] = self._picked.get(candidate.id, 0) + 1
            result = _media_result(_checked(reply))
            self._remember(call_id, candidate.id)
            return result
        raise RelayUnavailable("no live relay answered the offer")

    def answer(self, call_id: str, leg: str, streams: Sequence[StreamSpec], *,
               hold: bool = False, latch_any: bool = False,
               relay: str | None = None) -> MediaResult:
        """The other leg's media addresses; returns the relay ports for the first party's SDP."""
        message = {"cmd": "answer", "call_id": call_id, "leg": leg,
                   "streams": [s.to_message() for s in streams], "hold": hold,
                   "latch_any": latch_any}
        remembered = None if relay else self._owners.get(call_id)
        if remembered is not None:
            try:
                return _media_result(self._to_owner(remembered, call_id, message))
            except RelayError as exc:  # no such session there (moved?), or it is away
                self._owners.pop(call_id)
                owner = self._owner(call_id)
                if owner is None:
                    raise RelayError(f"no relay session for call {call_id}") from exc
                if owner == remembered:
                    raise  # the record says the same relay: its answer stands
        else:
            owner = relay or self._owner(call_id)
        if owner is None:
            raise RelayError(f"no relay session for call {call_id}")
        result = _media_result(self._to_owner(owner, call_id, message))
        self._remember(call_id, owner)
        return result

    def delete(self, call_id: str, *, relay: str | None = None) -> dict | None:
        """End the session; returns its final figures, None when no session exists."""
        message = {"cmd": "delete", "call_id": call_id}
        remembered = None if relay else self._owners.pop(call_id)
        failed: RelayUnavailable | None = None
        if remembered is not None:
            try:
                reply = self._to_owner(remembered, call_id, message)
            except RelayUnavailable as exc:
                failed = exc
            else:
                if reply.get("found"):
                    return reply
        owner = relay or self._owner(call_id)  # none remembered, or not found there
        if owner is None:
            return None
        if owner == remembered and failed is None:
            return None  # the record's relay said it has no such session
        try:
            if owner == remembered:
                raise failed
            reply = self._to_owner(owner, call_id, message)
        except RelayUnavailable:
            # The relay is gone: drop the record so a restart does not bring the session back.
            self.store.relay_drop_sessions(owner, [call_id])
            raise
        return reply if reply.get("found") else None

    def read_owner(self, call_id: str, owner: str | None) -> None:
        """The relay of ``call_id``'s session (None: it has none), just read from Redis with
        the call; used by the next offer, until ``forget_read``."""
        self._read[call_id] = owner

    def forget_read(self, call_id: str) -> None:
        self._read.pop(call_id, None)

    def _remember(self, call_id: str, owner: str) -> None:
        self._owners.put(call_id, owner, len(call_id) + len(owner) + 100)

    def query(self, call_id: str, *, relay: str | None = None) -> dict | None:
        """Per-leg, per-stream figures of a live session, None when there is none."""
        owner = relay or self._owner(call_id)
        if owner is None:
            return None
        reply = self._to_owner(owner, call_id, {"cmd": "query", "call_id": call_id})
        return reply if reply.get("found") else None

    def ping(self, relay: RelayInfo) -> dict:
        return _checked(self._exchange(relay.control, {"cmd": "ping"},
                                       self.new_session_timeouts))

    # ---------------------------------------------------------------- choosing relays
    def relays(self) -> list[RelayInfo]:
        """Live relays (on ``host`` when set), least loaded first."""
        now = time.monotonic()
        if now - self._nodes_read >= NODES_REFRESH:
            records = self.store.relay_nodes()
            self._nodes = {r["id"]: RelayInfo.from_record(r) for r in records}
            self._nodes_read = now
            self._picked.clear()
        wall = time.time()
        live = [r for r in self._nodes.values()
                if wall - r.seen <= self.dead_after and (self.host is None or r.host == self.host)]
        return sorted(live, key=lambda r: (r.sessions + self._picked.get(r.id, 0), r.pps,
                                           random.random()))

    def candidates(self) -> list[RelayInfo]:
        """Live relays to try for a new session: answering ones first, least loaded first;
        then, as a last resort, relays silent for less than SILENT_TRY_FOR.  A relay's
        heartbeat lives in Redis: after a Redis outage or failover the relays only look
        dead until their next heartbeat (about 2 s), and they answer meanwhile."""
        now = time.monotonic()
        live = self.relays()
        fresh = [r for r in live if now - self._suspect.get(r.id, -1e9) > SUSPECT_FOR]
        wall = time.time()
        silent = sorted((r for r in self._nodes.values()
                         if self.dead_after < wall - r.seen <= SILENT_TRY_FOR
                         and (self.host is None or r.host == self.host)),
                        key=lambda r: -r.seen)
        return fresh + [r for r in live if r not in fresh] + silent

    def _owner(self, call_id: str) -> str | None:
        record = self.store.relay_session(call_id)
        return None if record is None else record["relay"]

    def _to_owner(self, relay_id: str, call_id: str, message: dict) -> dict:
        if relay_id.split("/", 1)[0] in self.dead_hosts:
            raise RelayUnavailable(f"relay {relay_id} is on a dead host")
        control = self._control_of(relay_id, call_id)
        return _checked(self._exchange(control, message, self.owner_timeouts))

    def _control_of(self, relay_id: str, call_id: str) -> tuple[str, int]:
        self.relays()  # refreshes the cache when due
        if relay_id in self._nodes:
            return self._nodes[relay_id].control
        record = self.store.relay_session(call_id)
        if record is not None and record.get("relay") == relay_id:
            return tuple(record["control"])
        raise RelayUnavailable(f"relay {relay_id} is unknown")

    # ---------------------------------------------------------------- transport
    def _exchange(self, control: tuple[str, int], message: dict,
                  timeouts: Sequence[float]) -> dict:
        request_id = new_request_id()
        try:
            data = clusterauth.seal(self.key, encode({"id": request_id, **message}),
                                    nonce=request_id)
        except ValueError as exc:  # no key: auth.secret is empty
            raise RelayError(str(exc)) from None
        control = tuple(control)
        sock = self._socket(control)
        try:
            for timeout in timeouts:
                deadline = time.monotonic() + timeout
                try:
                    sock.send(data)
                except ConnectionRefusedError:
                    pass
                reply = _receive(sock, request_id, deadline, self.key)
                if reply is not None:
                    self._spare.setdefault(control, []).append(sock)  # (answers matched by id)
                    sock = None
                    return reply
        finally:
            if sock is not None:
                sock.close()  # a relay that did not answer: start afresh next time
        raise RelayUnavailable(f"relay at {control[0]}:{control[1]} did not answer "
                               f"{message['cmd']}")

    def _socket(self, control: tuple[str, int]) -> socket.socket:
        """A socket connected to a relay's control port: a spare one, else a new one.
        Connected, it hears only that relay, and ICMP errors too.  One exchange at a time
        uses a socket, so greenlets and threads can share the client."""
        spare = self._spare.get(control)
        if spare:
            try:
                return spare.pop()
            except IndexError:
                pass
        family = socket.AF_INET6 if ":" in control[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.connect(control)
        return sock


def _receive(sock: socket.socket, request_id: bytes, deadline: float,
             key: bytes) -> dict | None:
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(MAX_DATAGRAM)
        except TimeoutError:
            return None
        except ConnectionRefusedError:  # nothing listens (yet): wait out this try
            time.sleep(max(0.0, deadline - time.monotonic()))
            return None
        try:
            reply = decode(clusterauth.unseal(key, data)[1])
        except ValueError:  # (Rejected is one): not the relay's
            continue
        if reply.get("id") == request_id:
            return reply
    return None


def _checked(reply: dict) -> dict:
    if not reply.get("ok"):
        raise RelayError(str(reply.get("error", "refused")))
    return reply


def _media_result(reply: dict) -> MediaResult:
    streams = [RelayStream(s["media"], s["address"], s["port"], s["rtcp_port"], s["rtcp_mux"],
                           s["family"]) for s in reply["streams"]]
    return MediaResult(reply["relay"], streams)
