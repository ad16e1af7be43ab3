"""TCP connections the cluster opens itself (RFC 3261 18.1.1), held by the dispatcher.

A worker that must send a request over TCP where no connection to the target exists (a
request longer than ``streams.udp_max_request`` for a UDP target; a target whose URI says
``;transport=tcp``) asks its dispatcher, which owns every connection, to send it over one
(``envelope.stream_dial``).  The dispatcher reuses the connection it opened to that address
before, or opens one without blocking: the connect is finished in its selector
(``("stream-dial", peer)`` until the socket is writable), and the messages asked for
meanwhile wait here.  Once connected it is a connection like an accepted one (cluster/
streams.py): read, framed, its messages delivered to the workers by call affinity (the
target's responses come back this way), closed when idle, listed in Redis
(streams:<host>).

When it cannot be had (refused, reset, unreachable, or not connected within
``streams.connect_timeout``), each waiting message goes over UDP instead when the worker
gave a UDP copy of it (18.1.1: a request moved to TCP only for its size is retried over
UDP), else it is reported to the worker that sent it as a transport error (8.1.3.1); and
so is every message for that target during the next ``FAILED_MEMORY`` seconds, without
connecting again.  One log line per failed connection, and counters (streams_dial_*).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from dataclasses import dataclass, field

from .sip.framing import Framer
from .streams import Connection, Streams

log = logging.getLogger("streams")
# Seconds a target whose connection failed is not tried again: the retransmissions of a
# request (Timer A: 0.5, 1, 2 s...) and the next requests go over UDP (or are reported) at
# once, without one more connect, and one more log line, each.
FAILED_MEMORY = 10.0


@dataclass
class Waiting:
    data: bytes
    fallback: bytes | None
    origin: object  # who asked (a worker link's key), told when it fails


@dataclass
class Dialing:
    sock: socket.socket
    started: float
    messages: list[Waiting] = field(default_factory=list)


class Dialer:
    """``fallback(dest, data)``: send over UDP; ``failed(origin, dest, data)``: tell the
    worker that asked."""

    def __init__(self, streams: Streams, fallback, failed):
        self.streams = streams
        self.settings = streams.settings
        self.fallback = fallback
        self.failed = failed
        self.dialed: dict[tuple[str, int], int] = {}  # peer -> id of the connection opened
        self.dialing: dict[tuple[str, int], Dialing] = {}
        self.refusing: dict[tuple[str, int], float] = {}  # peer -> until when it is not tried

    def send(self, dest: tuple[str, int], data: bytes, fallback: bytes | None,
             origin: object) -> None:
        dest = (dest[0], int(dest[1]))
        conn_id = self.dialed.get(dest)
        if conn_id is not None:
            if conn_id in self.streams.connections:
                self._count("reused")
                if not self.streams.send(conn_id, data):
                    self._fail(dest, Waiting(data, fallback, origin))
                return
            del self.dialed[dest]  # closed since (idle, or by the peer): a new one
        if dest in self.refusing:
            if time.monotonic() < self.refusing[dest]:
                self._fail(dest, Waiting(data, fallback, origin))
                return
            del self.refusing[dest]
        pending = self.dialing.get(dest)
        if pending is None:
            pending, error = self._connect(dest)
            if pending is None:
                self._give_up(dest, [Waiting(data, fallback, origin)], error)
                return
        pending.messages.append(Waiting(data, fallback, origin))

    def _connect(self, dest: tuple[str, int]) -> tuple[Dialing | None, str]:
        """Start connecting to ``dest``; (None, why) when it failed at once."""
        family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            code = sock.connect_ex(dest)
        except (OSError, OverflowError) as exc:  # an address that is none, a port past 65535
            code, error = -1, str(exc)
        else:
            error = f"connect failed: {errno.errorcode.get(code, code)}"
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return None, error
        self._count("opening")
        pending = self.dialing[dest] = Dialing(sock, time.monotonic())
        self.streams.selector.register(sock, selectors.EVENT_WRITE, ("stream-dial", dest))
        return pending, ""

    def ready(self, dest: tuple[str, int]) -> None:
        """The socket being connected to ``dest`` is writable: connected, or failed."""
        pending = self.dialing.pop(dest, None)
        if pending is None:
            return
        sock = pending.sock
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._unregister(sock)
            sock.close()
            self._give_up(dest, pending.messages,
                          f"connect failed: {errno.errorcode.get(code, code)}")
            return
        streams, now = self.streams, time.monotonic()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn_id = streams.new_id("TCP")
        conn = Connection(conn_id, sock, dest, "TCP",
                          Framer(self.settings.max_header_bytes, self.settings.max_body_bytes),
                          now, now)
        streams.connections[conn_id] = conn
        self.dialed[dest] = conn_id
        streams.selector.modify(sock, selectors.EVENT_READ, ("stream", conn_id))
        self._count("connected")
        if streams.events is not None:
            streams.events.put(("open", conn_id, {"transport": "TCP", "peer": list(dest),
                                                  "dialed": True}))
        log.info("TCP connection %x to %s:%d opened by the cluster", conn_id, *dest)
        for waiting in pending.messages:
            if not streams.send(conn_id, waiting.data):
                self._fail(dest, waiting)

    def tick(self, now: float | None = None) -> None:
        """Give up on the connects past ``streams.connect_timeout``."""
        now = time.monotonic() if now is None else now
        for dest, pending in list(self.dialing.items()):
            if now - pending.started > self.settings.connect_timeout:
                del self.dialing[dest]
                self._unregister(pending.sock)
                pending.sock.close()
                self._give_up(dest, pending.messages, f"not connected within "
                              f"{self.settings.connect_timeout:g} s (streams.connect_timeout)")

    def close_all(self) -> None:
        for pending in self.dialing.values():
            self._unregister(pending.sock)
            pending.sock.close()
        self.dialing.clear()

    def _give_up(self, dest: tuple[str, int], messages: list[Waiting], why: str) -> None:
        self._count("failed")
        retried = sum(1 for m in messages if m.fallback is not None)
        log.warning("TCP connection to %s:%d failed: %s; %d message(s) retried over UDP, "
                    "%d reported to the worker as a transport error (not tried again for "
                    "%g s)", *dest, why, retried, len(messages) - retried, FAILED_MEMORY)
        if len(self.refusing) >= 4096:  # bounded: the oldest memories go first
            now = time.monotonic()
            self.refusing = {d: t for d, t in self.refusing.items() if t > now}
            while len(self.refusing) >= 4096:
                self.refusing.pop(next(iter(self.refusing)))
        self.refusing[dest] = time.monotonic() + FAILED_MEMORY
        for waiting in messages:
            self._fail(dest, waiting)

    def _fail(self, dest: tuple[str, int], waiting: Waiting) -> None:
        if waiting.fallback is not None:
            self._count("fallback_udp")
            self.fallback(dest, waiting.fallback)
        else:
            self._count("transport_errors")
            self.failed(waiting.origin, dest, waiting.data)

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self.streams.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _count(self, name: str) -> None:
        self.streams._count(f"dial_{name}")
