"""SIP over TCP and TLS in the dispatcher: the listeners and every open connection.

The dispatcher owns the SIP port, so it owns the stream listeners too (TCP on sip.port,
TLS on streams.tls_port): a phone's connection lives as long as the dispatcher, whatever
happens to the workers, which stay stateless.  Each complete message (framed by
cluster/sip/framing.py) goes to a worker by the call affinity a datagram would take, in
an envelope naming the connection (cluster/envelope.py); whatever a worker sends to that
phone comes back over the control connection and leaves through the connection here.

Everything runs on the dispatcher's main thread, in its selector: reads, the TLS
handshakes, writes (buffered while the socket is full) and the clock (``tick``): a
connection with no message nor keep-alive for ``idle_timeout``, or a message begun and
not whole within ``message_timeout`` (a slow sender holding it open), is closed.  So is
one that breaks the framing's limits, one past ``max_per_source`` from one address, one
from a banned source, and one whose unsent output grows past ``MAX_PENDING``: one log
line each, and the other connections carry on.

Which connections are open is kept in Redis (``Store.stream_opened`` and ``_closed``,
through ``events``, a queue a thread of the dispatcher writes from), so a worker about to
send a request to a phone registered over a connection (the binding names it) can tell it
is gone and try the next contact or answer 480.

WebSocket (RFC 7118: browser phones) on listeners of their own (``streams.ws_port``, and
``wss_port`` over TLS with the same certificate): the connection's framer is then a
``WebSocket`` (cluster/sip/websocket.py), which answers the upgrade, pings and closes
itself (``Reply``) and yields one SIP message per WebSocket message; whatever is sent to
such a connection goes in a frame of its own.  The two lowest bits of a connection's id
say its transport (cluster/envelope.py), so a worker writes WS or WSS into the Via and
Contact of what it sends there.
"""

from __future__ import annotations

import logging
import queue
import random
import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field

from . import adoption
from .config import Config
from .envelope import TRANSPORT_CODES
from .sip.framing import PONG, Framer, FramingError, Ping
from .sip.websocket import Reply, WebSocket

log = logging.getLogger("streams")
MAX_PENDING = 1024 * 1024  # bytes of output waiting for a slow reader before it is cut off
READ_SIZE = 65536


@dataclass
class Connection:
    id: int
    sock: socket.socket
    peer: tuple[str, int]
    transport: str  # "TCP", "TLS", "WS" or "WSS"
    framer: Framer | WebSocket
    opened: float
    last_message: float
    partial_since: float | None = None
    handshaking: bool = False
    out: bytearray = field(default_factory=bytearray)


class Streams:
    """``deliver(conn_id, peer, message)``: hands one message to a worker (False: dropped);
    ``banned(ip, now)``: whether a source is banned; ``events``: a queue of
    ("open", id, info) / ("close", id, None) for Redis."""

    def __init__(self, config: Config, selector: selectors.BaseSelector, deliver, banned,
                 events: queue.SimpleQueue | None = None):
        self.config = config
        self.settings = config.streams
        self.selector = selector
        self.deliver = deliver
        self.banned = banned
        self.events = events
        self.listeners: list[tuple[socket.socket, str]] = []
        self.connections: dict[int, Connection] = {}
        self.per_source: dict[str, int] = {}
        self.tls_context: ssl.SSLContext | None = None
        # Upper bits drawn at start: a binding naming a previous dispatcher's connection
        # never finds a new one under the same id (cluster/envelope.py).
        self._epoch = random.SystemRandom().randrange(1, 1 << 20) << 32
        self._next = 0
        self.counters: dict[str, int] = {}

    # ---------------------------------------------------------------- listeners
    def listen(self) -> None:
        """Bind the listeners: TCP beside every UDP SIP socket, TLS when configured.
        OSError when one cannot be bound (the dispatcher says which and exits)."""
        sip, streams = self.config.sip, self.settings
        addresses = [(socket.AF_INET, sip.bind)]
        if sip.bind6:
            addresses.append((socket.AF_INET6, sip.bind6))
        wanted = []
        if streams.tcp:
            wanted += [(family, host, sip.port, "TCP") for family, host in addresses]
        if streams.tls_cert and streams.tls_key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(streams.tls_cert, streams.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise OSError(f"cannot load the TLS certificate {streams.tls_cert} and key "
                              f"{streams.tls_key} (streams.tls_cert, streams.tls_key): "
                              f"{exc}") from exc
            self.tls_context = context
            wanted += [(family, host, streams.tls_port, "TLS") for family, host in addresses]
        wanted += websocket_listeners(streams, addresses, self.tls_context is not None)
        for family, host, port, transport in wanted:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                adoption.freebind(sock)  # (a floating sip.bind on another host for now)
                sock.bind((host, port))
                sock.listen(512)
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot bind {transport} {host}:{port}: "
                                         f"{exc.strerror}") from exc
            sock.setblocking(False)
            self.listeners.append((sock, transport))
            self.selector.register(sock, selectors.EVENT_READ, ("stream-accept", (sock, transport)))

    def describe(self) -> str:
        return ", ".join(f"{t} {s.getsockname()[0]}:{s.getsockname()[1]}"
                         for s, t in self.listeners)

    # ---------------------------------------------------------------- events
    def accept(self, listener: socket.socket, transport: str) -> None:
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the others carry on
                log.warning("%s accept failed: %s", transport, exc)
                return
            self._open(sock, peer, transport)

    def _open(self, sock: socket.socket, peer: tuple, transport: str) -> None:
        now = time.monotonic()
        ip = peer[0]
        if self.banned(ip, now):
            self._count("refused_banned")
            sock.close()
            return
        if self.per_source.get(ip, 0) >= self.settings.max_per_source:
            self._count("refused_per_source")
            log.warning("%s connection from %s:%d refused: %d open from that address "
                        "(streams.max_per_source)", transport, ip, peer[1],
                        self.per_source[ip])
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshaking = False
        if transport in ("TLS", "WSS"):
            try:
                sock = self.tls_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                log.warning("TLS connection from %s:%d closed: %s", ip, peer[1], exc)
                sock.close()
                return
            handshaking = True
        conn_id = self.new_id(transport)
        websocket = transport in ("WS", "WSS")
        conn = Connection(conn_id, sock, (ip, peer[1]), transport,
                          self._websocket() if websocket else
                          Framer(self.settings.max_header_bytes, self.settings.max_body_bytes),
                          now, now, partial_since=now if handshaking or websocket else None,
                          handshaking=handshaking)
        self.connections[conn_id] = conn
        self.per_source[ip] = self.per_source.get(ip, 0) + 1
        self._count(f"opened_{transport.lower()}")
        self.selector.register(sock, selectors.EVENT_READ, ("stream", conn_id))
        if self.events is not None:
            self.events.put(("open", conn_id, {"transport": transport, "peer": list(conn.peer)}))

    def ready(self, conn_id: int, mask: int) -> None:
        conn = self.connections.get(conn_id)
        if conn is None:
            return
        if conn.handshaking:
            self._handshake(conn)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn_id in self.connections:
            self._read(conn)

    def _handshake(self, conn: Connection) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as exc:
            self.close(conn, f"TLS handshake failed: {exc}")
            return
        conn.handshaking = False
        # A WebSocket's upgrade request is still to come, within the same time.
        conn.partial_since = time.monotonic() if conn.framer.partial else None
        self._flush(conn)  # what was queued meanwhile; and it watches for reading again
        if conn.id in self.connections:
            self._read(conn)  # records that came with the handshake wait inside the SSL object

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                return
            except (OSError, ValueError) as exc:
                self.close(conn, f"read failed: {exc}", quiet=True)
                return
            if not data:
                self.close(conn, "closed by the peer", quiet=True)
                return
            if not self._take(conn, data):
                return
            if conn.transport not in ("TLS", "WSS") or not conn.sock.pending():
                return

    def _take(self, conn: Connection, data: bytes) -> bool:
        """Frame what was read and pass the messages on; False when it closed."""
        now = time.monotonic()
        self._count(f"bytes_in_{conn.transport.lower()}", len(data))
        try:
            items = conn.framer.feed(data)
        except FramingError as exc:
            self._count("closed_framing")
            self.close(conn, str(exc))
            return False
        for item in items:
            conn.last_message = now
            if isinstance(item, Ping):
                self._count("pings")
                self.send(conn.id, PONG)
            elif isinstance(item, Reply):
                self._websocket_reply(conn, item)
            else:
                self._count(f"messages_{conn.transport.lower()}")
                if not self.deliver(conn.id, conn.peer, item):
                    self._count("messages_dropped")
            if conn.id not in self.connections:
                return False
        if not conn.framer.partial:
            conn.partial_since = None
        elif items or conn.partial_since is None:
            conn.partial_since = now
        return True

    # ---------------------------------------------------------------- output
    def send(self, conn_id: int, data: bytes, *, raw: bool = False) -> bool:
        """Queue ``data`` on a connection; False when it is no longer open.  Over a
        WebSocket a message goes in a frame of its own, unless ``raw``."""
        conn = self.connections.get(conn_id)
        if conn is None:
            self._count("sent_to_closed")
            return False
        if not raw and isinstance(conn.framer, WebSocket):
            data = conn.framer.message(data)
        if len(conn.out) + len(data) > MAX_PENDING:
            self.close(conn, f"more than {MAX_PENDING} bytes unsent: the peer reads no more")
            return False
        conn.out += data
        if not conn.handshaking:
            self._flush(conn)
        return True

    def _flush(self, conn: Connection) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                    ssl.SSLWantReadError):
                break
            except (OSError, ValueError) as exc:
                self.close(conn, f"write failed: {exc}", quiet=True)
                return
            del conn.out[:sent]
            self._count(f"bytes_out_{conn.transport.lower()}", sent)
        self._want(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))

    def _want(self, conn: Connection, events: int) -> None:
        try:
            if self.selector.get_key(conn.sock).events != events:
                self.selector.modify(conn.sock, events, ("stream", conn.id))
        except (KeyError, ValueError):
            pass

    # ---------------------------------------------------------------- closing
    def tick(self, now: float | None = None) -> None:
        """Close the connections past their time (called a few times a second)."""
        now = time.monotonic() if now is None else now
        idle, whole = self.settings.idle_timeout, self.settings.message_timeout
        for conn in list(self.connections.values()):
            if conn.partial_since is not None and now - conn.partial_since > whole:
                self._count("closed_slow")
                self.close(conn, f"{'handshake' if conn.handshaking else 'message'} not "
                                 f"complete within {whole:g} s (streams.message_timeout)")
            elif now - conn.last_message > idle:
                self._count("closed_idle")
                self.close(conn, f"idle for {idle:g} s (streams.idle_timeout)", quiet=True,
                           going_away="idle")

    def close(self, conn: Connection, why: str, *, quiet: bool = False,
              going_away: str | None = None) -> None:
        """``going_away``: the server closes on its own, for this reason; a WebSocket is
        told so in a close frame first, if it can take one without waiting (best effort:
        the connection closes either way)."""
        if self.connections.pop(conn.id, None) is None:
            return
        if going_away is not None and isinstance(conn.framer, WebSocket) and not conn.out \
                and not conn.handshaking:
            goodbye = conn.framer.goodbye(going_away)
            if goodbye is not None:
                try:
                    conn.sock.send(goodbye)
                except (OSError, ValueError):
                    pass
        (log.info if quiet else log.warning)("%s connection %x from %s:%d closed: %s",
                                             conn.transport, conn.id, *conn.peer, why)
        left = self.per_source.get(conn.peer[0], 1) - 1
        if left:
            self.per_source[conn.peer[0]] = left
        else:
            self.per_source.pop(conn.peer[0], None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self._count(f"closed_{conn.transport.lower()}")
        if self.events is not None:
            self.events.put(("close", conn.id, None))

    def close_all(self) -> None:
        for conn in list(self.connections.values()):
            self.close(conn, "dispatcher stopping", quiet=True, going_away="shutting down")
        for sock, _ in self.listeners:
            sock.close()

    def new_id(self, transport: str) -> int:
        """An id for a new connection, accepted or opened by the cluster (cluster/dialer.py):
        its two lowest bits say its transport (envelope.stream_transport)."""
        conn_id = self._epoch | (self._next << 2) | TRANSPORT_CODES[transport]
        self._next += 1
        return conn_id

    # ---------------------------------------------------------------- reporting
    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def figures(self) -> dict[str, int]:
        """Counters (streams_<what>) and the connections open now, per transport."""
        figures = {f"streams_{k}": v for k, v in self.counters.items()}
        for transport in TRANSPORT_CODES:
            figures[f"streams_open_{transport.lower()}"] = 0
        for conn in self.connections.values():
            figures[f"streams_open_{conn.transport.lower()}"] += 1
        return figures

    # ---------------------------------------------------------------- WebSocket
    def _websocket(self) -> WebSocket:
        s = self.settings
        return WebSocket(s.ws_path, s.max_header_bytes, s.max_body_bytes, s.ws_frame_rate,
                         clock=time.monotonic)

    def _websocket_reply(self, conn: Connection, reply: Reply) -> None:
        """The handshake's answer, a pong or a close frame; the connection ends after the
        last (as much of it as the socket takes at once: the peer is not waited for)."""
        self.send(conn.id, reply.data, raw=True)
        if reply.close is not None and conn.id in self.connections:
            if not reply.quiet:
                self._count("closed_websocket")
            self.close(conn, reply.close, quiet=reply.quiet)


def websocket_listeners(streams, addresses: list[tuple], tls: bool) -> list[tuple]:
    """(family, host, port, transport) of the WS listener when ``streams.ws`` is set, and
    of the WSS one when ``streams.wss`` is set and TLS is configured (the same certificate
    as SIP/TLS: ``tls`` says whether it is loaded)."""
    wanted = []
    if streams.ws:
        wanted += [(family, host, streams.ws_port, "WS") for family, host in addresses]
    if streams.wss and tls:
        wanted += [(family, host, streams.wss_port, "WSS") for family, host in addresses]
    return wanted
