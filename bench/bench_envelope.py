"""What checking an envelope's origin costs a worker, per envelope sent and read.

Three ways for a worker to accept envelopes only from its dispatcher, each timed as one
envelope (a 600-byte datagram behind the envelope header) sent over loopback UDP and read
back, best of 3 runs of 200,000:
  (a) recv() and unwrap: no check (the cost before the check existed);
  (b) recvfrom(), the source compared with the dispatcher's forwarding address: what the
      worker does (workers/sip/transport.py);
  (c) an HMAC-SHA256 of the envelope computed by the sender and checked by the reader.

Run with `python -m bench.bench_envelope` or through `python -m bench envelope`.
"""

from __future__ import annotations

import hmac
import os
import socket
import time

from cluster import envelope

COUNT = 200_000
BATCH = 100  # datagrams sent before they are read: well within the socket's buffer
RUNS = 3


def per_envelope_us(read, send) -> float:
    best = float("inf")
    for _ in range(RUNS):
        started = time.perf_counter()
        for _ in range(COUNT // BATCH):
            for _ in range(BATCH):
                send()
            for _ in range(BATCH):
                read()
        best = min(best, (time.perf_counter() - started) / COUNT * 1e6)
    return best


def main() -> dict[str, float]:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reader = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    reader.bind(("127.0.0.1", 0))
    target, source = reader.getsockname(), sender.getsockname()
    data = envelope.wrap(("192.0.2.1", 5060), 0, b"x" * 600)
    key = os.urandom(32)

    def send() -> None:
        sender.sendto(data, target)

    def plain() -> None:
        envelope.unwrap(reader.recv(65600))

    def checked() -> None:
        payload, addr = reader.recvfrom(65600)
        if addr != source:
            raise AssertionError(addr)
        envelope.unwrap(payload)

    def send_signed() -> None:
        sender.sendto(hmac.digest(key, data, "sha256") + data, target)

    def signed() -> None:
        payload = reader.recv(65600)
        if not hmac.compare_digest(payload[:32], hmac.digest(key, payload[32:], "sha256")):
            raise AssertionError("bad mac")
        envelope.unwrap(payload[32:])

    try:
        figures = {"no check (us)": per_envelope_us(plain, send),
                   "source address (us)": per_envelope_us(checked, send),
                   "HMAC-SHA256 (us)": per_envelope_us(signed, send_signed)}
    finally:
        sender.close()
        reader.close()
    for name, value in figures.items():
        print(f"{name:>22}: {value:6.2f} per envelope sent and read")
    return figures


if __name__ == "__main__":
    main()
