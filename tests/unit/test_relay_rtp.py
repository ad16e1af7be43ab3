"""RTP/RTCP headers and RFC 3550 reception figures (cluster/sip/rtp.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.sip.rtp import (
    StreamStats,
    clock_rate_for,
    is_rtcp,
    jitter_step,
    parse_rtcp,
    parse_rtp,
)


def rtp(seq: int, timestamp: int, ssrc: int = 0x1234, pt: int = 8, marker: bool = False,
        payload: bytes = b"\xd5" * 160, csrcs: tuple[int, ...] = (),
        extension: bytes | None = None) -> bytes:
    first = 0x80 | len(csrcs) | (0x10 if extension is not None else 0)
    header = struct.pack("!BBHII", first, pt | (0x80 if marker else 0), seq & 0xFFFF,
                         timestamp & 0xFFFFFFFF, ssrc)
    header += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        header += struct.pack("!HH", 0xBEDE, len(extension) // 4) + extension
    return header + payload


def receiver_report(ssrc: int = 0xABCD) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


# --------------------------------------------------------------------------- headers


def test_parse_rtp_fixed_header():
    header = parse_rtp(rtp(4711, 160_000, ssrc=0xDEADBEEF, pt=0, marker=True))
    assert (header.version, header.payload_type, header.marker) == (2, 0, True)
    assert (header.sequence, header.timestamp, header.ssrc) == (4711, 160_000, 0xDEADBEEF)
    assert header.header_length == 12 and not header.extension and not header.padding


def test_parse_rtp_csrcs_and_extension_move_the_payload():
    header = parse_rtp(rtp(1, 2, csrcs=(7, 8), extension=b"\x10\xaa\x00\x00"))
    assert header.csrc_count == 2 and header.extension
    assert header.header_length == 12 + 8 + 4 + 4


@pytest.mark.parametrize("data, reason", [
    (b"\x80\x08\x00", "shorter"),
    (b"\x40" + bytes(11), "version"),
    (rtp(1, 2, csrcs=(1, 2, 3), payload=b"")[:20], "truncated"),
    (bytes([0x90]) + bytes(11), "extension"),
])
def test_parse_rtp_rejects_malformed(data, reason):
    with pytest.raises(ValueError, match=reason):
        parse_rtp(data)


def test_rtcp_is_told_apart_from_rtp_on_a_muxed_port():
    assert is_rtcp(receiver_report())
    assert is_rtcp(struct.pack("!BBHI", 0x81, 200, 6, 1) + bytes(24))  # sender report
    assert not is_rtcp(rtp(1, 2, pt=8))
    assert not is_rtcp(rtp(1, 2, pt=0, marker=True))  # second byte 128
    assert not is_rtcp(rtp(1, 2, pt=101, marker=True))  # telephone-event with marker: 229
    assert not is_rtcp(b"\x80")


def test_parse_rtcp_header():
    header = parse_rtcp(receiver_report(0x55))
    assert (header.packet_type, header.length, header.ssrc, header.count) == (201, 8, 0x55, 0)
    with pytest.raises(ValueError, match="not an RTCP"):
        parse_rtcp(rtp(1, 2))
    with pytest.raises(ValueError, match="truncated"):
        parse_rtcp(struct.pack("!BBHI", 0x80, 200, 6, 1))


def test_clock_rates():
    assert clock_rate_for(0) == clock_rate_for(8) == clock_rate_for(None) == 8000
    assert clock_rate_for(None, "video") == 90000
    assert clock_rate_for(10) == 44100


# --------------------------------------------------------------------------- RFC 3550 figures


def test_jitter_step_is_rfc3550_formula():
    # J(i) = J(i-1) + (|D(i-1,i)| - J(i-1)) / 16
    assert jitter_step(0.0, 40.0, 0.0) == 2.5
    assert jitter_step(16.0, 0.0, 0.0) == 15.0
    assert jitter_step(0.0, -32.0, 0.0) == 2.0


def test_jitter_of_a_late_packet():
    stats = StreamStats(8000)
    # 20 ms packets (160 samples); the third arrives 5 ms late: D = 40 timestamp units
    stats.update(rtp(1, 0), 10.000)
    stats.update(rtp(2, 160), 10.020)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)
    stats.update(rtp(3, 320), 10.045)
    assert stats.jitter == pytest.approx(40 / 16)
    stats.update(rtp(4, 480), 10.060)  # back on time: D = -40 -> |D| = 40
    assert stats.jitter == pytest.approx(2.5 + (40 - 2.5) / 16)
    assert stats.jitter_ms == pytest.approx(stats.jitter / 8)


def test_perfect_spacing_has_no_jitter():
    stats = StreamStats(8000)
    for i in range(100):
        stats.update(rtp(1000 + i, 5000 + 160 * i), 3.0 + 0.02 * i)
    assert stats.jitter == pytest.approx(0.0, abs=1e-6)
    assert (stats.packets, stats.lost, stats.gaps, stats.expected) == (100, 0, 0, 100)
    assert stats.bytes == 100 * 172


def test_loss_is_expected_minus_received():
    stats = StreamStats()
    for seq in (1, 2, 4, 5, 9, 10):
        stats.update(rtp(seq, seq * 160), seq * 0.02)
    assert stats.expected == 10
    assert stats.lost == 4
    assert stats.gaps == 2


def test_sequence_wrap_counts_cycles_not_loss():
    stats = StreamStats()
    for i, seq in enumerate((65533, 65534, 65535, 0, 1, 2)):
        stats.update(rtp(seq, i * 160), i * 0.02)
    assert stats.cycles == 65536
    assert (stats.expected, stats.lost, stats.gaps) == (6, 0, 0)


def test_gap_across_the_wrap():
    stats = StreamStats()
    for i, seq in enumerate((65534, 65535, 3)):
        stats.update(rtp(seq, i * 160), i * 0.02)
    assert (stats.expected, stats.lost, stats.cycles) == (6, 3, 65536)


def test_duplicates_and_late_packets_are_not_loss():
    stats = StreamStats()
    for seq in (1, 2, 2, 4, 3, 5):
        stats.update(rtp(seq, seq * 160), seq * 0.02)
    assert stats.packets == 6
    assert stats.duplicates == 2  # the repeated 2, the late 3
    assert stats.lost == 0


def test_new_ssrc_starts_a_new_sequence_and_keeps_earlier_loss():
    stats = StreamStats()
    for seq in (1, 2, 5):  # 2 lost
        stats.update(rtp(seq, seq * 160, ssrc=1), seq * 0.02)
    for seq in (40000, 40001, 40003):  # another sender: 1 lost
        stats.update(rtp(seq, seq * 160, ssrc=2), seq * 0.02)
    assert stats.ssrc == 2
    assert stats.lost == 3


def test_large_jump_is_a_restart_not_loss():
    stats = StreamStats()
    stats.update(rtp(100, 0), 0.0)
    stats.update(rtp(101, 160), 0.02)
    stats.update(rtp(30000, 320), 0.04)
    stats.update(rtp(30001, 480), 0.06)
    assert stats.lost == 0 and stats.base_seq == 30000


def test_record_round_trip_continues_counting():
    stats = StreamStats()
    for seq in range(1, 6):
        stats.update(rtp(seq, seq * 160), seq * 0.02)
    copy = StreamStats.from_record(stats.to_record())
    copy.update(rtp(8, 8 * 160), 0.16)
    assert copy.packets == 6 and copy.lost == 2 and copy.gaps == 1
    assert copy.figures()["packets"] == 6


@given(st.lists(st.integers(min_value=0, max_value=65535), min_size=1, max_size=200))
def test_any_sequence_keeps_figures_sane(sequence):
    stats = StreamStats()
    for i, seq in enumerate(sequence):
        stats.update(rtp(seq, i * 160), i * 0.02)
    assert stats.packets == len(sequence)
    assert stats.lost >= 0 and stats.jitter >= 0
