"""A copy of every SIP message a worker receives or sends, as HEP3 over UDP, to Homer (or
any HEP collector) at hep.address:hep.port (off while hep.address is empty).

Both legs of a call carry the same correlation id, the call's tag (what the B-leg Call-ID
embeds and the A-leg Call-ID hashes to), so Homer shows them as one call.  A copy that
cannot be sent is counted and dropped: capture never holds up signalling.
"""

from __future__ import annotations

import socket
import time
from collections import Counter

from cluster.config import Config
from cluster.sip import hep, scan

from .b2bua import call_tag


class HepMirror:
    def __init__(self, config: Config, counters: Counter):
        self.collector = (config.hep.address, config.hep.port)
        self.capture_id = config.hep.capture_id
        self.auth_key = config.hep.password
        self.local = (config.sip.effective_address, config.sip.effective_port)
        family = socket.AF_INET6 if ":" in config.hep.address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.counters = counters

    def received(self, data: bytes, source: tuple[str, int]) -> None:
        self._send(data, source[:2], self.local)

    def sent(self, data: bytes, dest: tuple[str, int]) -> None:
        self._send(data, self.local, dest[:2])

    def _send(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        call_id = scan.call_id(data)
        try:
            packet = hep.encode(hep.Packet(
                payload=data, src=src, dst=dst, time=time.time(), capture_id=self.capture_id,
                auth_key=self.auth_key,
                correlation_id=call_tag(call_id).encode() if call_id else b""))
            self.sock.sendto(packet, self.collector)
            self.counters["hep_sent"] += 1
        except (OSError, ValueError):  # a full buffer, an unreachable collector, a bad address
            self.counters["hep_errors"] += 1
