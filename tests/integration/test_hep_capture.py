"""HEP capture: a cluster with hep.address set copies each SIP message a worker receives or
sends to the collector, here a UDP socket on loopback, with its addresses and the call's
correlation id; and sngrep, an independent HEP reader, listening as the collector, reads
the same messages with the same addresses."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest
from harness import running_cluster
from sipua import UA

from cluster.sip import hep
from conftest import free_udp_port
from workers.sip.b2bua import call_tag


def test_every_message_of_a_registration_reaches_the_collector(tmp_path, redis_url):
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(0.5)
    settings = {"hep": {"address": "127.0.0.1", "port": collector.getsockname()[1],
                        "capture_id": 4242}}
    try:
        with running_cluster(tmp_path, redis_url, workers=1, settings=settings) as cluster:
            cluster.add_user("1002", "secret")
            drain(collector)  # the start-up's OPTIONS probes
            with UA(cluster.address, user="1002") as ua:
                assert ua.register("secret").status == 200
                packets = []
                deadline = time.monotonic() + 5
                while len(packets) < 4 and time.monotonic() < deadline:
                    packets += [p for p in drain(collector)
                                if p.payload.split(b"\r\n", 1)[0].startswith(
                                    (b"REGISTER", b"SIP/2.0 401", b"SIP/2.0 200"))]
                ua_addr = ("127.0.0.1", ua.port)
                call_id = ua.call_id.encode()
    finally:
        collector.close()
    lines = [(p.payload.split(b"\r\n", 1)[0].split(b" ")[0 if p.src == ua_addr else 1],
              p.src == ua_addr) for p in packets]
    assert lines == [(b"REGISTER", True), (b"401", False), (b"REGISTER", True), (b"200", False)]
    server = cluster.address
    for p in packets:
        assert (p.src, p.dst) in ((ua_addr, server), (server, ua_addr))
        assert p.capture_id == 4242 and p.correlation_id == call_tag(call_id).encode()
        assert b"Call-ID: " + call_id in p.payload
        assert abs(p.time - time.time()) < 30


def drain(sock: socket.socket) -> list[hep.Packet]:
    found = []
    while True:
        try:
            found.append(hep.decode(sock.recv(65535)))
        except TimeoutError:
            return found


SNGREP = shutil.which("sngrep")


@pytest.mark.skipif(SNGREP is None, reason="sngrep is not installed (apt package sngrep)")
def test_sngrep_as_the_collector_reads_every_message_of_a_registration(tmp_path, redis_url):
    """sngrep's HEP listener (-L) decodes what the workers send and writes it as a pcap of
    the original UDP datagrams (-O): the addresses, ports, time and SIP text come back."""
    port, pcap = free_udp_port(), tmp_path / "hep.pcap"
    sngrep = subprocess.Popen([SNGREP, "-N", "-q", "-L", f"udp:127.0.0.1:{port}", "-O", str(pcap)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = {"hep": {"address": "127.0.0.1", "port": port, "capture_id": 4242}}
    try:
        with running_cluster(tmp_path, redis_url, workers=1, settings=settings) as cluster:
            cluster.add_user("1002", "secret")
            with UA(cluster.address, user="1002") as ua:
                assert ua.register("secret").status == 200
                ua_addr, call_id = ("127.0.0.1", ua.port), ua.call_id.encode()
                server = cluster.address
            time.sleep(0.5)  # the last copies are on their way to sngrep
    finally:
        sngrep.send_signal(signal.SIGINT)  # sngrep writes out its capture and exits
        sngrep.wait(timeout=10)
    datagrams = [d for d in read_pcap(pcap) if b"Call-ID: " + call_id in d[2]]
    heads = [(payload.split(b"\r\n", 1)[0].split(b" ")[0 if src == ua_addr else 1], src, dst)
             for src, dst, payload, _ in datagrams]
    assert heads == [(b"REGISTER", ua_addr, server), (b"401", server, ua_addr),
                     (b"REGISTER", ua_addr, server), (b"200", server, ua_addr)]
    assert all(abs(when - time.time()) < 60 for *_, when in datagrams)


def read_pcap(path) -> list[tuple[tuple[str, int], tuple[str, int], bytes, float]]:
    """The IPv4/UDP datagrams of a little-endian Ethernet pcap: (src, dst, payload, time)."""
    data = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert magic == 0xA1B2C3D4 and linktype == 1, (hex(magic), linktype)
    found, at = [], 24
    while at + 16 <= len(data):
        sec, usec, length, _ = struct.unpack_from("<IIII", data, at)
        frame, at = data[at + 16:at + 16 + length], at + 16 + length
        if frame[12:14] != b"\x08\x00" or frame[23] != 17:  # IPv4, UDP
            continue
        ihl = (frame[14] & 0x0F) * 4
        src_ip, dst_ip = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
        sport, dport, ulen = struct.unpack_from("!HHH", frame, 14 + ihl)
        payload = frame[14 + ihl + 8:14 + ihl + ulen]
        found.append(((src_ip, sport), (dst_ip, dport), payload, sec + usec / 1e6))
    return found
