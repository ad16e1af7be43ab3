"""A relay session: two legs, one Side per leg and m-line, one Endpoint per bound socket.

A Side is one party's end of one m-line: the relay's even/odd port pair that
party talks to, where that party said it receives (its SDP), where packets
from it really come from (latched), and the figures of the RTP it sends.
Packets that arrive on leg A's side leave through leg B's side of the same
m-line, to B's latched address, or to its SDP address until B has sent.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from cluster.sip.rtp import StreamStats, clock_rate_for


class CommandError(ValueError):
    """A control command the relay refuses; the message goes back to the client."""


class Endpoint:
    """One bound relay socket (the RTP or the RTCP port of a Side): the forwarding hot path."""

    __slots__ = ("sock", "recvfrom", "sendto", "side", "source", "remote", "out", "rtcp_out",
                 "stats", "dropped", "rtcp_packets", "send_errors")

    def __init__(self, sock, side: Side, stats: StreamStats | None):
        self.sock = sock
        self.recvfrom = sock.recvfrom
        self.sendto = sock.sendto
        self.side = side
        self.source: tuple | None = None  # latched: the only address packets are taken from
        self.remote: tuple | None = None  # where packets for this side's party are sent
        self.out: Endpoint | None = None  # RTP towards the other party leaves here
        self.rtcp_out: Endpoint | None = None  # RTCP towards the other party leaves here
        self.stats = stats  # None for an RTCP port: everything arriving there is RTCP
        self.dropped = 0  # from a source other than the latched one, or malformed
        self.rtcp_packets = 0
        self.send_errors = 0


@dataclass
class Side:
    media: str
    family: int
    port: int  # the relay's RTP port; RTCP is port + 1
    clock_rate: int = 8000
    rtcp_mux: bool = False
    sdp: tuple | None = None  # (ip, port[, 0, 0]) the party's RTP address from SDP
    sdp_rtcp: tuple | None = None
    latch_ip: str = ""
    latch_any: bool = False
    held: bool = False  # signalled hold with a null address: send nothing to it
    stats: StreamStats = field(default_factory=StreamStats)
    call_id: str = ""
    # Latched addresses read from Redis, applied when a restarted relay binds the side.
    restored_latch: tuple | None = None
    restored_latch_rtcp: tuple | None = None
    # The media address of an adopted session's side (a dead host's floating address,
    # now on this host: workers/relay/relay.py ``adopt``); empty = this relay's own.
    address: str = ""
    rtp: Endpoint | None = field(default=None, repr=False)
    rtcp: Endpoint | None = field(default=None, repr=False)

    @property
    def rtcp_target(self) -> Endpoint:
        """The endpoint RTCP for this party leaves from: its RTP port when it multiplexes."""
        return self.rtp if self.rtcp_mux else self.rtcp

    def refresh_remotes(self) -> None:
        """Where to send: nowhere while held, the latched source, else the SDP address."""
        for endpoint, signalled in ((self.rtp, self.sdp), (self.rtcp, self.sdp_rtcp)):
            if endpoint is None:
                continue
            if self.held or signalled is None:
                endpoint.remote = None
            else:
                endpoint.remote = endpoint.source or signalled

    def to_record(self, epoch_offset: float) -> dict:
        stats = self.stats.to_record()
        return {"media": self.media, "family": self.family, "port": self.port,
                "clock_rate": self.clock_rate, "rtcp_mux": self.rtcp_mux,
                "sdp": _address_record(self.sdp), "sdp_rtcp": _address_record(self.sdp_rtcp),
                "latch_ip": self.latch_ip, "latch_any": self.latch_any, "held": self.held,
                "latched": _address_record(self.rtp.source if self.rtp else None),
                "latched_rtcp": _address_record(self.rtcp.source if self.rtcp else None),
                "dropped": _sum(self, "dropped"), "rtcp_packets": _sum(self, "rtcp_packets"),
                "stats": stats, **({"address": self.address} if self.address else {}),
                "last_packet": (self.stats.last_time + epoch_offset
                                if self.stats.packets else None)}

    @classmethod
    def from_record(cls, record: dict, call_id: str) -> Side:
        stats = StreamStats.from_record(record.get("stats", {}))
        return cls(record["media"], record["family"], record["port"],
                   record.get("clock_rate", 8000), record.get("rtcp_mux", False),
                   _address(record.get("sdp")), _address(record.get("sdp_rtcp")),
                   record.get("latch_ip", ""), record.get("latch_any", False),
                   record.get("held", False), stats, call_id,
                   _address(record.get("latched")), _address(record.get("latched_rtcp")),
                   str(record.get("address") or ""))

    def figures(self, epoch_offset: float) -> dict:
        figures = {"media": self.media, "family": self.family, "port": self.port,
                   "rtcp_port": self.port + 1, "rtcp_mux": self.rtcp_mux,
                   "sdp": _address_record(self.sdp),
                   "latched": _address_record(self.rtp.source if self.rtp else None),
                   "latched_rtcp": _address_record(self.rtcp.source if self.rtcp else None),
                   "rtcp_packets": _sum(self, "rtcp_packets"), "dropped": _sum(self, "dropped"),
                   "last_packet": (self.stats.last_time + epoch_offset
                                   if self.stats.packets else None)}
        figures.update(self.stats.figures())
        return figures


@dataclass
class Leg:
    name: str | None
    sides: list[Side] = field(default_factory=list)
    hold: bool = False

    def to_record(self, epoch_offset: float) -> dict:
        return {"name": self.name, "hold": self.hold,
                "sides": [s.to_record(epoch_offset) for s in self.sides]}

    @classmethod
    def from_record(cls, record: dict, call_id: str) -> Leg:
        sides = [Side.from_record(s, call_id) for s in record.get("sides", [])]
        return cls(record.get("name"), sides, record.get("hold", False))


@dataclass
class Session:
    call_id: str
    legs: list[Leg]
    created: float  # epoch
    answered_at: float | None = None  # monotonic; the media timeout runs from here
    timeout_reported: bool = False
    last_command: float = 0.0  # monotonic
    last_flush: float = 0.0  # monotonic
    version: int = 0  # of the last record built: Redis never takes an older one

    @property
    def hold(self) -> bool:
        return any(leg.hold for leg in self.legs)

    def sides(self):
        for leg in self.legs:
            yield from leg.sides

    def endpoints(self):
        for side in self.sides():
            if side.rtp is not None:
                yield side.rtp
            if side.rtcp is not None:
                yield side.rtcp

    def last_media(self) -> float:
        """Monotonic time of the last RTP packet on any leg (0 when none came)."""
        last = 0.0
        for leg in self.legs:
            for side in leg.sides:
                if side.stats.last_time > last:
                    last = side.stats.last_time
        return last

    def leg_named(self, name: str, create: bool) -> tuple[Leg, Leg]:
        """(that leg, the other one); the first command naming a second leg names it."""
        first, second = self.legs
        if first.name == name:
            return first, second
        if second.name == name:
            return second, first
        if second.name is None and create:
            second.name = name
            return second, first
        raise CommandError(f"call {self.call_id} has no leg {name!r}")

    def to_record(self, relay_id: str, control: tuple[str, int]) -> dict:
        now_mono, now = time.monotonic(), time.time()
        offset = now - now_mono
        return {"relay": relay_id, "control": list(control), "call_id": self.call_id,
                "version": self.version, "created": self.created, "updated": now,
                "answered_at": None if self.answered_at is None else self.answered_at + offset,
                "timeout_reported": self.timeout_reported,
                "legs": [leg.to_record(offset) for leg in self.legs]}

    @classmethod
    def from_record(cls, record: dict) -> Session:
        offset = time.time() - time.monotonic()
        answered = record.get("answered_at")
        call_id = record["call_id"]
        return cls(call_id, [Leg.from_record(leg, call_id) for leg in record["legs"]],
                   record.get("created", time.time()),
                   None if answered is None else answered - offset,
                   record.get("timeout_reported", False), last_command=time.monotonic(),
                   version=record.get("version", 0))

    def figures(self) -> dict:
        offset = time.time() - time.monotonic()
        return {"call_id": self.call_id, "created": self.created,
                "answered": self.answered_at is not None, "hold": self.hold,
                "timeout_reported": self.timeout_reported,
                "legs": [{"name": leg.name, "hold": leg.hold,
                          "streams": [side.figures(offset) for side in leg.sides]}
                         for leg in self.legs]}


def _sum(side: Side, attribute: str) -> int:
    return sum(getattr(e, attribute) for e in (side.rtp, side.rtcp) if e is not None)


def _address_record(address: tuple | None) -> list | None:
    return None if address is None else [address[0], address[1]]


def _address(record) -> tuple | None:
    if record is None:
        return None
    return socket_address(record[0], record[1])


def socket_address(ip: str, port: int) -> tuple:
    """The tuple recvfrom returns for (ip, port): 4 items for IPv6, so they compare equal."""
    return (ip, port, 0, 0) if ":" in ip else (ip, port)


def normalise_ip(text: str) -> tuple[str, int]:
    """(canonical text, family) of an IP address; CommandError for anything else."""
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, text)), version
        except (OSError, ValueError):
            continue
    raise CommandError(f"not an IP address: {text!r}")


def is_null_address(ip: str) -> bool:
    """c=0.0.0.0 (or ::): RFC 2543 hold, the party wants nothing sent to it (canonical text)."""
    return ip in ("0.0.0.0", "::")


@dataclass(frozen=True)
class StreamRequest:
    """One m-line of a command, checked."""

    media: str
    family: int
    ip: str
    port: int
    rtcp_port: int
    rtcp_mux: bool
    clock_rate: int
    latch_ip: str

    @classmethod
    def parse(cls, raw) -> StreamRequest:
        if not isinstance(raw, dict):
            raise CommandError("a stream is a map")
        media = str(raw.get("media", "audio"))
        ip, family = normalise_ip(str(raw.get("addr", "")))
        if "family" in raw and raw["family"] != family:
            raise CommandError(f"family {raw['family']} does not match {ip}")
        port = _port(raw.get("port"), "port")
        rtcp_port = _port(raw.get("rtcp_port", port + 1 if port else 0), "rtcp_port")
        clock_rate = raw.get("clock_rate") or clock_rate_for(None, media)
        if not isinstance(clock_rate, int) or clock_rate <= 0:
            raise CommandError(f"bad clock_rate {clock_rate!r}")
        latch_ip = ip
        if raw.get("latch_ip"):
            latch_ip, latch_family = normalise_ip(str(raw["latch_ip"]))
            if latch_family != family:
                raise CommandError("latch_ip and addr are of different families")
        return cls(media, family, ip, port, rtcp_port, bool(raw.get("rtcp_mux", False)),
                   clock_rate, latch_ip)

    @property
    def null(self) -> bool:
        return self.port == 0 or is_null_address(self.ip)


def _port(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise CommandError(f"bad {name} {value!r}")
    return value
