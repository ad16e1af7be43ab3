"""HEP capture: a cluster with hep.address set copies each SIP message a worker receives or
sends to the collector, here a UDP socket on loopback, with its addresses and the call's
correlation id."""

from __future__ import annotations

import socket
import time

from harness import running_cluster
from sipua import UA

from cluster.sip import hep
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
