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
from pathlib import Path

from calls_helpers import callee, caller, provision, register, start_listening
from harness import Cluster

FLOODER = "127.0.0.77"
CALLER, CALLEE = "1001", "1002"
# In-flight grace: answers to what the workers had been handed before the ban may
# still arrive this long after it (their queue_limit sheds anything older than 0.2 s).
IN_FLIGHT = 0.25
# Distinct datagrams built before the flood starts and sent in turn: building each one
# as it goes cost the test process more CPU than the dispatcher spends dropping it, on
# a 2-core machine that also runs the cluster and SIPp.
POOL = 20_000
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
        pairs = zip(itertools.cycle(self.methods), itertools.cycle(self.users), strict=False)
        pool = [new_request(method, user, self.address, n)
                for n, (method, user) in zip(range(min(self.limit, POOL)), pairs, strict=False)]
        cycle = itertools.cycle(pool)
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
                try:
                    sendto(next(cycle), server)
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


def flood_during_calls(cluster: Cluster, tmp: Path, seconds: float, rate: float = 20_000,
                       call_rate: float = 20.0) -> dict:
    """The flood and the calls at once; every figure the assertions need, exactly."""
    calls = int(call_rate * seconds)
    provision(cluster, [CALLER, CALLEE])
    uas = start_listening(callee(cluster, tmp / "uas", calls=calls, timeout=seconds + 40))
    register(cluster, CALLEE, [uas.port])
    uac = caller(cluster, tmp / "uac", CALLER, CALLEE, calls=calls, rate=call_rate,
                 timeout=seconds + 40)
    flooder = Flooder(cluster.address, FLOODER, rate, seconds)
    try:
        flooder.start()
        uac.sipp.start()
        uac.result = uac.sipp.wait()
        flooder.wait()
    finally:  # the callee waits for calls that failed: not for its whole timeout

        uac.sipp.stop()
        uas.sipp.stop()
    bans = {b["ip"]: b for b in cluster.store.bans()}
    ban = bans.get(FLOODER)
    dispatcher = next(p for p in cluster.store.processes("dispatcher"))
    figures = {
        "calls": calls, "created": uac.result.created, "successful": uac.result.successful,
        "failed": uac.result.failed, "flood_sent": flooder.sent,
        "flood_seconds": round(flooder.ended - flooder.started, 2),
        "flood_answers": len(flooder.answers),
        "flood_finals": sum(1 for _t, status in flooder.answers if status >= 200),
        "ban": ban, "banned_dropped": dispatcher.get("banned_dropped", 0),
        "legit_banned": "127.0.0.1" in bans,
    }
    if ban is not None:
        figures["ban_latency"] = round(ban["at"] - flooder.started, 3)
        figures["answers_after_ban"] = len(flooder.answers_after(ban["at"]))
        figures["answers_after_grace"] = len(flooder.answers_after(ban["at"] + IN_FLIGHT))
        figures["last_answer_after_ban"] = round(
            max((t for t, _ in flooder.answers), default=ban["at"]) - ban["at"], 3)
    figures["report"] = uac.report() + "\n" + uas.report()
    return figures


def assert_flood_contained(figures: dict, seconds: float, limits) -> None:
    shown = {k: v for k, v in figures.items() if k != "report"}
    print("flood figures:", shown)
    assert figures["ban"] is not None, f"the flooder was never banned: {shown}"
    assert figures["ban"]["reason"].startswith("flood-"), shown
    assert figures["ban_latency"] <= 2.0, shown
    # it kept sending all along, and its datagrams were dropped, not answered
    assert figures["flood_seconds"] >= seconds - 0.5, shown
    assert figures["flood_sent"] >= 0.9 * 20_000 * seconds, shown
    assert figures["answers_after_grace"] == 0, shown
    # answered (finally): at most what the three buckets let through before the ban, their
    # bursts and what they refilled meanwhile
    admitted = (limits.invite_burst + limits.register_burst + limits.other_burst
                + (limits.invite_rate + limits.register_rate + limits.other_rate)
                * figures["ban_latency"] + 3)
    assert figures["flood_finals"] <= admitted, shown
    assert figures["banned_dropped"] >= figures["flood_sent"] - 2_000, shown
    assert not figures["legit_banned"], shown
    assert figures["created"] == figures["calls"], figures["report"]
    assert figures["successful"] >= 0.99 * figures["calls"], figures["report"]
