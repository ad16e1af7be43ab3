"""HEP3 encoding (cluster/sip/hep.py) and the worker's mirror (workers/sip/hep.py)."""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections import Counter

import pytest

from cluster.config import Config
from cluster.sip import hep
from workers.sip.b2bua import call_tag
from workers.sip.hep import HepMirror

INVITE = (b"INVITE sip:1009@10.0.0.9 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.7:5062;branch=z9hG4bKa\r\n"
          b"Call-ID: a-leg@10.0.0.7\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


def chunks(data: bytes) -> dict[int, bytes]:
    found, at = {}, 6
    while at < len(data):
        vendor, kind, length = struct.unpack_from("!HHH", data, at)
        assert vendor == 0 and length >= 6
        found[kind] = data[at + 6:at + length]
        at += length
    assert at == len(data)
    return found


def test_an_ipv4_packet_has_the_chunks_homer_reads():
    packet = hep.Packet(INVITE, ("10.0.0.7", 5062), ("192.0.2.1", 5060), 1_800_000_000.25,
                        capture_id=2001, auth_key="secret", correlation_id=b"tag")
    data = hep.encode(packet)
    assert data[:4] == b"HEP3" and struct.unpack_from("!H", data, 4)[0] == len(data)
    found = chunks(data)
    assert found[hep.IP_FAMILY] == b"\x02" and found[hep.IP_PROTO] == b"\x11"
    assert found[hep.IPV4_SRC] == bytes([10, 0, 0, 7])
    assert found[hep.IPV4_DST] == bytes([192, 0, 2, 1])
    assert struct.unpack("!H", found[hep.SRC_PORT]) == (5062,)
    assert struct.unpack("!H", found[hep.DST_PORT]) == (5060,)
    assert struct.unpack("!I", found[hep.TIME_SEC]) == (1_800_000_000,)
    assert struct.unpack("!I", found[hep.TIME_USEC]) == (250_000,)
    assert found[hep.PROTO_TYPE] == b"\x01"
    assert struct.unpack("!I", found[hep.CAPTURE_ID]) == (2001,)
    assert found[hep.AUTH_KEY] == b"secret" and found[hep.CORRELATION_ID] == b"tag"
    assert found[hep.PAYLOAD] == INVITE
    assert hep.decode(data) == packet


def test_ipv6_and_a_mixed_pair():
    packet = hep.Packet(INVITE, ("2001:db8::7", 5062), ("2001:db8::1", 5060), 1.5)
    assert hep.decode(hep.encode(packet)) == packet
    mixed = hep.decode(hep.encode(hep.Packet(INVITE, ("10.0.0.7", 1), ("2001:db8::1", 2), 1.0)))
    assert mixed.src == ("::ffff:a00:7", 1) and mixed.dst == ("2001:db8::1", 2)


@pytest.mark.parametrize("data", [b"", b"HEP2\x00\x06", b"HEP3\x00\x09abc",
                                  b"HEP3\x00\x0a\x00\x00\x00\x01"])
def test_decode_refuses_what_is_not_a_hep3_packet(data):
    with pytest.raises(ValueError):
        hep.decode(data)


def test_the_mirror_gives_both_legs_of_a_call_one_correlation_id():
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(2)
    config = Config()
    config = dataclasses.replace(config, hep=dataclasses.replace(
        config.hep, address="127.0.0.1", port=collector.getsockname()[1], capture_id=7))
    counters = Counter()
    mirror = HepMirror(config, counters)
    tag = call_tag(b"a-leg@10.0.0.7")
    b_leg = INVITE.replace(b"a-leg@10.0.0.7", f"sc12.{tag}.0".encode())
    try:
        mirror.received(INVITE, ("10.0.0.7", 5062))
        mirror.sent(b_leg, ("10.0.0.9", 5060))
        first, second = (hep.decode(collector.recv(65535)) for _ in range(2))
    finally:
        collector.close()
        mirror.sock.close()
    local = (config.sip.effective_address, config.sip.effective_port)
    assert (first.src, first.dst, first.payload) == (("10.0.0.7", 5062), local, INVITE)
    assert (second.src, second.dst, second.payload) == (local, ("10.0.0.9", 5060), b_leg)
    assert first.correlation_id == second.correlation_id == tag.encode()
    assert first.capture_id == 7 and counters == Counter(hep_sent=2)


def test_a_copy_that_cannot_leave_is_counted_not_raised():
    config = Config()
    config = dataclasses.replace(config, hep=dataclasses.replace(config.hep,
                                                                 address="127.0.0.1"))
    counters = Counter()
    mirror = HepMirror(config, counters)
    mirror.sent(INVITE, ("not an address", 5060))  # cannot be encoded
    mirror.sock.close()
    mirror.sent(INVITE, ("10.0.0.9", 5060))  # cannot be sent
    assert counters == Counter(hep_errors=2)
