"""RTP and RTCP headers and per-stream reception figures (RFC 3550), sans-IO.

The relay calls ``StreamStats.update`` for every RTP packet it forwards, so
that method is written for speed: plain attributes, no allocation.  Arrival
times are passed in by the caller, in seconds, from any monotonic clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
RTP_HEADER_LENGTH = 12
SEQ_MOD = 1 << 16
# RFC 3550 A.1: a jump larger than this is a restart, not loss; older than
# MAX_MISORDER packets are late duplicates.
MAX_DROPOUT = 3000
MAX_MISORDER = 100
# RFC 5761 section 4: with rtcp-mux, a second byte of 192-223 is an RTCP packet
# type (SR 200, RR 201, SDES 202, BYE 203, APP 204, feedback 205/206...), never
# an RTP marker bit plus payload type in use.
RTCP_TYPES = range(192, 224)
# Static payload types (RFC 3551) whose RTP clock is not 8000 Hz.
STATIC_CLOCK_RATES = {10: 44100, 11: 44100, 14: 90000, 25: 90000, 26: 90000, 28: 90000,
                      31: 90000, 32: 90000, 33: 90000, 34: 90000}

_RTP = struct.Struct("!BBHII")
_RTCP = struct.Struct("!BBHI")
_TIMESTAMP = struct.Struct("!I")


@dataclass(frozen=True)
class RtpHeader:
    version: int
    padding: bool
    extension: bool
    csrc_count: int
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    header_length: int  # fixed header + CSRCs + extension: where the payload starts


@dataclass(frozen=True)
class RtcpHeader:
    version: int
    count: int  # reception report count / source count / subtype
    packet_type: int
    length: int  # in bytes, this packet of a compound packet
    ssrc: int


def is_rtcp(data: bytes) -> bool:
    """True for an RTCP packet on a multiplexed RTP/RTCP port (RFC 5761)."""
    return len(data) >= 2 and data[1] in RTCP_TYPES


def parse_rtp(data: bytes) -> RtpHeader:
    """The RTP fixed header, CSRCs and extension length; ValueError when malformed."""
    if len(data) < RTP_HEADER_LENGTH:
        raise ValueError("shorter than an RTP header")
    first, second, sequence, timestamp, ssrc = _RTP.unpack_from(data)
    version = first >> 6
    if version != RTP_VERSION:
        raise ValueError(f"RTP version {version}")
    csrc_count = first & 0x0F
    length = RTP_HEADER_LENGTH + 4 * csrc_count
    extension = bool(first & 0x10)
    if extension:
        if len(data) < length + 4:
            raise ValueError("truncated header extension")
        words = int.from_bytes(data[length + 2:length + 4], "big")
        length += 4 + 4 * words
    if len(data) < length:
        raise ValueError("truncated RTP header")
    return RtpHeader(version, bool(first & 0x20), extension, csrc_count, bool(second & 0x80),
                     second & 0x7F, sequence, timestamp, ssrc, length)


def parse_rtcp(data: bytes) -> RtcpHeader:
    """The first RTCP header of a (compound) packet; ValueError when malformed."""
    if len(data) < _RTCP.size:
        raise ValueError("shorter than an RTCP header")
    first, packet_type, words, ssrc = _RTCP.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        raise ValueError(f"RTCP version {first >> 6}")
    if packet_type not in RTCP_TYPES:
        raise ValueError(f"not an RTCP packet type: {packet_type}")
    length = 4 * (words + 1)
    if len(data) < length:
        raise ValueError("truncated RTCP packet")
    return RtcpHeader(RTP_VERSION, first & 0x1F, packet_type, length, ssrc)


def clock_rate_for(payload_type: int | None, media: str = "audio") -> int:
    """The RTP clock of a static payload type; 90 kHz for video, else 8 kHz."""
    if payload_type is not None and payload_type in STATIC_CLOCK_RATES:
        return STATIC_CLOCK_RATES[payload_type]
    return 90000 if media == "video" else 8000


def jitter_step(jitter: float, transit: float, previous_transit: float) -> float:
    """RFC 3550 6.4.1: J(i) = J(i-1) + (|D(i-1,i)| - J(i-1)) / 16, in timestamp units."""
    d = transit - previous_transit
    if d < 0:
        d = -d
    return jitter + (d - jitter) / 16.0


class StreamStats:
    """Reception figures of one RTP stream: counts, loss from sequence numbers, jitter.

    ``lost`` is RFC 3550's cumulative number of packets lost (expected minus
    received, A.3), ``gaps`` the number of forward jumps in the sequence, and
    ``jitter`` the interarrival jitter estimate in timestamp units (A.8).  A
    new SSRC, or a jump beyond MAX_DROPOUT, starts the sequence over (A.1).
    """

    __slots__ = ("clock_rate", "packets", "bytes", "first_time", "last_time", "ssrc",
                 "base_seq", "max_seq", "cycles", "received", "gaps", "duplicates",
                 "transit", "jitter", "next_seq", "lost_earlier")

    def __init__(self, clock_rate: int = 8000):
        self.clock_rate = clock_rate
        self.packets = 0  # every packet counted, including duplicates and late ones
        self.bytes = 0
        self.first_time = 0.0
        self.last_time = 0.0
        self.ssrc = -1
        self.base_seq = 0
        self.max_seq = 0
        self.cycles = 0
        self.received = 0  # packets counted towards loss since the sequence (re)started
        self.gaps = 0
        self.duplicates = 0
        self.transit = 0.0
        self.jitter = 0.0
        self.next_seq = -1  # the in-order successor of max_seq; -1 before the first packet
        self.lost_earlier = 0  # packets lost in sequences before the current one

    def update(self, data: bytes, arrival: float) -> None:
        """Count one RTP packet (at least 12 bytes) that arrived at ``arrival`` seconds."""
        self.packets += 1
        self.bytes += len(data)
        self.last_time = arrival
        seq = (data[2] << 8) | data[3]
        transit = arrival * self.clock_rate - _TIMESTAMP.unpack_from(data, 4)[0]
        if seq == self.next_seq:  # the common case: the next packet, in order
            self.next_seq = (seq + 1) & 0xFFFF
            if seq == 0:
                self.cycles += SEQ_MOD
            self.max_seq = seq
            self.received += 1
            d = transit - self.transit
            if d < 0:
                d = -d
            self.jitter += (d - self.jitter) * 0.0625
            self.transit = transit
            return
        self._irregular(data, seq, transit, arrival)

    def _irregular(self, data: bytes, seq: int, transit: float, arrival: float) -> None:
        ssrc = int.from_bytes(data[8:12], "big")
        if self.next_seq < 0 or ssrc != self.ssrc:
            if self.next_seq < 0:
                self.first_time = arrival
            self._start(seq, ssrc, transit)
            return
        delta = (seq - self.max_seq) & 0xFFFF
        if delta == 0 or delta > SEQ_MOD - MAX_MISORDER:
            # a duplicate or a late packet: counted, but no new sequence number
            self.duplicates += 1
            self.received += 1
            return
        if delta < MAX_DROPOUT:
            self.gaps += 1
            if seq < self.max_seq:
                self.cycles += SEQ_MOD
            self.max_seq = seq
            self.next_seq = (seq + 1) & 0xFFFF
            self.received += 1
            self.transit = transit  # a gap says nothing about spacing: no jitter sample
            return
        self._start(seq, ssrc, transit)  # a big jump: the sender restarted its sequence

    def _start(self, seq: int, ssrc: int, transit: float) -> None:
        self.lost_earlier = self.lost
        self.ssrc = ssrc
        self.base_seq = seq
        self.max_seq = seq
        self.cycles = 0
        self.received = 1
        self.next_seq = (seq + 1) & 0xFFFF
        self.transit = transit

    @property
    def expected(self) -> int:
        if self.next_seq < 0:
            return 0
        return self.cycles + self.max_seq - self.base_seq + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost over every sequence the stream has had."""
        return self.lost_earlier + max(0, self.expected - self.received)

    @property
    def jitter_ms(self) -> float:
        return 1000.0 * self.jitter / self.clock_rate

    FIELDS = ("clock_rate", "packets", "bytes", "first_time", "last_time", "ssrc", "base_seq",
              "max_seq", "cycles", "received", "gaps", "duplicates", "transit", "jitter",
              "next_seq", "lost_earlier")

    def to_record(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_record(cls, record: dict) -> StreamStats:
        stats = cls()
        for name in cls.FIELDS:
            if name in record:
                setattr(stats, name, record[name])
        return stats

    def figures(self) -> dict:
        """What an operator or a CDR wants to see."""
        return {"packets": self.packets, "bytes": self.bytes, "lost": self.lost,
                "gaps": self.gaps, "duplicates": self.duplicates,
                "jitter_ms": round(self.jitter_ms, 3), "ssrc": self.ssrc}
