"""A hostile source for flood and scanner tests: new requests from one address of
127.0.0.0/8 (all of it is loopback on Linux), paced at a rate, bounded in count and
time, stopping by itself; every answer it gets is recorded with its arrival time.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass, field

TICK = 0.005  # seconds between sending bursts: 100 datagrams a burst at 20,000/s


def new_request(method: str, user: str, bind: tuple[str, int], n: int) -> bytes:
    """An out-of-dialog request from ``bind`` with a fresh Call-ID and branch."""
    host, port = bind
    branch = f"z9hG4bK{n:x}{os.urandom(3).hex()}"
    ruri = "sip:127.0.0.1" if method == "REGISTER" else f"sip:{user}@127.0.0.1"
    return (f"{method} {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};branch={branch};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{user}@127.0.0.1>;tag={n:x}\r\n"
            f"To: <sip:{user}@127.0.0.1>\r\nCall-ID: {branch}@flood\r\n"
            f"CSeq: 1 {method}\r\nContact: <sip:{user}@{host}:{port}>\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


@dataclass
class Flooder:
    server: tuple[str, int]
    bind: str  # e.g. "127.0.0.77"
    rate: float  # datagrams per second
    seconds: float  # how long it sends (and the hard limit of its thread)
    methods: tuple[str, ...] = ("INVITE", "REGISTER", "OPTIONS")
    users: list[str] = field(default_factory=lambda: ["1002"])  # taken in turn
    sent: int = 0
    started: float = 0.0  # epoch seconds of the first datagram
    ended: float = 0.0
    answers: list[tuple[float, int]] = field(default_factory=list)  # (epoch, status)

    def __post_init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((self.bind, 0))
        self.address = self.sock.getsockname()
        self.limit = int(self.rate * self.seconds)
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def start(self) -> Flooder:
        for thread in self._threads:
            thread.start()
        return self

    def wait(self, linger: float = 2.0) -> Flooder:
        """Until it stopped sending, then ``linger`` seconds more for late answers."""
        self._threads[0].join(self.seconds + 10)
        time.sleep(linger)
        self._done.set()
        self._threads[1].join(5)
        self.sock.close()
        return self

    def answers_after(self, moment: float) -> list[tuple[float, int]]:
        return [a for a in self.answers if a[0] > moment]

    def _send(self) -> None:
        # The n-th datagram: methods[n % len], users[n % len]: every user asked in turn.
        cycle = zip(itertools.cycle(self.methods), itertools.cycle(self.users), strict=False)
        sendto, server = self.sock.sendto, self.server
        self.started = time.time()
        begun = time.monotonic()
        deadline = begun + self.seconds
        while self.sent < self.limit:
            now = time.monotonic()
            if now >= deadline:
                break
            due = min(self.limit, int((now - begun) * self.rate) + 1)
            while self.sent < due:
                method, user = next(cycle)
                try:
                    sendto(new_request(method, user, self.address, self.sent), server)
                except OSError:
                    pass  # a full send queue: counted as sent, it left our hands
                self.sent += 1
            time.sleep(TICK)
        self.ended = time.time()

    def _receive(self) -> None:
        self.sock.settimeout(0.1)
        while not self._done.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if data.startswith(b"SIP/2.0 "):
                self.answers.append((time.time(), int(data[8:11])))
