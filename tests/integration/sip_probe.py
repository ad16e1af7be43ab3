"""OPTIONS probes: how long a fault keeps the SIP port from answering.

Used by the dispatcher-restart tests and by the fault matrix (tests/ha).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class OptionsProbe:
    """OPTIONS every ``every`` seconds from a thread, each with its own Call-ID (so the
    probes spread over the workers); when each was sent and when its answer came."""

    server: tuple[str, int]
    every: float = 0.05  # seconds between probes
    sent: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> OptionsProbe:
        return self.start()

    def start(self) -> OptionsProbe:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, linger: float = 2.0) -> None:
        """Stop sending; collect answers for ``linger`` more seconds."""
        if not self.stop_event.is_set():
            self.stop_event.set()
            self.thread.join(timeout=linger + 5)
            self.sock.close()
            self.linger = linger

    def _run(self, max_seconds: float = 300.0) -> None:
        port = self.sock.getsockname()[1]
        started = time.monotonic()
        next_send = started
        stop_at = None
        while time.monotonic() - started < max_seconds:
            now = time.monotonic()
            if self.stop_event.is_set():
                stop_at = stop_at or now + 2.0
                if now >= stop_at:
                    return
            elif now >= next_send:
                call_id = f"probe-{len(self.sent)}-{os.urandom(4).hex()}"
                self.sock.sendto(options_request(port, call_id), self.server)
                self.sent[call_id] = time.monotonic()
                next_send += self.every
            self.sock.settimeout(max(0.001, next_send - time.monotonic()))
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            match = re.search(rb"\r\nCall-ID: *([^\r\n]+)", data)
            if data.startswith(b"SIP/2.0 ") and match:
                self.answered.setdefault(match.group(1).decode(), time.monotonic())

    def silence_around(self, moment: float, before: float = 0.5, after: float = 4.0) -> float:
        """The longest time without any answer around ``moment`` (monotonic), seconds."""
        times = sorted(t for t in self.answered.values() if moment - before <= t <= moment + after)
        if not times:
            return after + before
        return max(b - a for a, b in zip([moment - before, *times], times, strict=False))

    def unanswered(self) -> list[str]:
        """Probes never answered (those sent too late to be answered are left out)."""
        last = max(self.sent.values(), default=0.0)
        return [cid for cid, at in self.sent.items()
                if cid not in self.answered and at < last - 0.5]

    def delayed(self, limit: float = 0.2) -> int:
        """Probes answered later than ``limit`` seconds: those that waited in the socket."""
        return sum(1 for cid, at in self.answered.items() if at - self.sent[cid] > limit)


    def worst(self, since: float, until: float) -> tuple[float, int]:
        """For the probes sent between ``since`` and ``until`` (monotonic): the longest wait
        for an answer (seconds) and how many were never answered."""
        window = {c: t for c, t in self.sent.items() if since <= t <= until}
        waits = [self.answered[c] - t for c, t in window.items() if c in self.answered]
        return max(waits, default=0.0), sum(1 for c in window if c not in self.answered)


def options_request(port: int, call_id: str) -> bytes:
    """An OPTIONS from 127.0.0.1:``port`` (answers come back there)."""
    branch = "z9hG4bK" + os.urandom(6).hex()
    return (f"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag={branch[-8:]}\r\n"
            f"To: <sip:127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
            f"Content-Length: 0\r\n\r\n").encode()
