"""The UDP dispatcher: owns the SIP port and hands each datagram to a live worker.

It does no SIP work.  It reads the Call-ID with a byte search, maps it to one
of 1024 slots and forwards the datagram (wrapped with its source address) to
the worker that owns the slot.  Slots are dealt to live workers by rendezvous
hashing, so when a worker dies only its slots move and they come back when it
returns.  A worker is dead when its control connection closes (kill -9 closes
it at once) or when its heartbeats stop for ``dead_after`` seconds.

Workers send straight from copies of the SIP sockets they get over the control
connection, so every message leaves from the SIP port (design invariant 3).
The dispatcher answers NAT keepalives itself: CRLFs are dropped, STUN binding
requests answered.

Before anything else, the source address is looked up in the bans (a dict):
a banned source's datagrams are dropped unread, unanswered and unforwarded.
Then the per-source token buckets (cluster/limits.py) are charged; a source
that empties one is banned here at once, and the ban is written to Redis and
announced, so every host's dispatcher drops it too.  Bans issued elsewhere (by
another host, by a worker that saw a scanner, by the operator) arrive over
pub/sub, and so do the trusted sources (a request from them authenticated; the
workers announce them): their buckets are limits.trusted_factor times larger.

With several hosts it also takes hand-offs (``dispatcher.inter_host_port``): SIP
messages another host's workers need sent from this host's SIP socket, to a phone
whose NAT knows only this host.  They are forwarded only when they come from an
announced host's inter-host address and are sealed with the cluster's hand-off key
within the time window, once (cluster/clusterauth.py); anything else is counted,
logged at most once per 10 s, and dropped, since this port would otherwise send
whatever anyone asks from the SIP port.

Those copies keep the SIP sockets open when the dispatcher dies (kill -9): the
port stays bound, and datagrams queue in the sockets' buffers.  A restarted
dispatcher that finds the port taken asks the first worker that reconnects for
the sockets it holds and carries on with them, so queued datagrams are only
delayed.  It reads nothing before the workers are back (or ``STARTUP_GRACE``
has passed): a datagram read with no worker to take it would be dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import selectors
import signal
import socket
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

import msgpack

from . import adoption, cadence, clusterauth, envelope
from .adoption import ADOPTED_BASE, Adopted
from .cadence import until_next_tick
from .config import Config, load_or_exit
from .dialer import Dialer
from .envelope import SLOTS, affinity_key
from .limits import Bans, Limiter, Trusted, ban_line, reason_of
from .logsetup import setup_logging
from .sip import scan, stun
from .streams import Streams

# The store and the metrics endpoint (redis-py, http.server) are imported by the thread
# that publishes, not here: they take longer to import than the rest of the dispatcher,
# and a dispatcher restarted after a crash should take the SIP socket back first.

log = logging.getLogger("dispatcher")
banlog = logging.getLogger("ban")  # the security line of a ban (deploy/fail2ban/)
RECV_BUFFER = 4 * 1024 * 1024
BURST = 64  # datagrams read from one socket before looking at the others
# A restarted dispatcher finds the SIP port held by the workers; they reconnect every
# 0.1 s, so one of them hands the sockets back well within this.  Past it, the port is
# someone else's.
RECLAIM_WAIT = 5.0
RECLAIM_POLL = 0.1
# The main loop's housekeeping (silent workers, connection timeouts) and the heartbeat
# thread's, on the host's grid (cluster/cadence.py).
CHECK_SECONDS = 0.5
PUBLISH_SECONDS = 1.0
IDLE_WAIT = 2.0  # seconds a SIP socket's thread waits before it looks at its stop flag
HANDBACK_TIMEOUT = 1.0  # seconds a worker has to answer the reclaim request
# Seconds after start the SIP sockets wait for every configured worker to join; past
# it they are read as soon as one has.
STARTUP_GRACE = 2.0
# The host announcement (host:<id>) lives this long after the last one, renewed every
# second: the other hosts' workers stop handing off to a dead host once it lapses (and
# their 1 s cache of it: workers/sip/transport.py), 2 to 4 s after the death, where a
# 5 s TTL and a 5 s cache made it up to 10 s.  Three renewals must fail in a row (a
# Redis outage of 3 s) before a live host looks dead; meanwhile its phones are sent to
# straight, not through it, which only a strict NAT drops.
HOST_TTL = 3.0
HOSTS_REFRESH = 1.0  # seconds between reads of the cluster's hosts (hand-off sources)
HOST_TRUSTED_FOR = 86_400.0  # a host announced this recently may hand off (it restarts)


class BindError(Exception):
    """The SIP port cannot be had: the message is the one log line that says why."""


@dataclass
class WorkerLink:
    conn: socket.socket
    name: str = ""
    addr: tuple[str, int] | None = None
    last_seen: float = field(default_factory=time.monotonic)
    load: int = 0
    buffer: msgpack.Unpacker = field(default_factory=lambda: msgpack.Unpacker(raw=False))


@dataclass
class Counters:
    received: int = 0
    forwarded: int = 0
    dropped: int = 0
    keepalives: int = 0
    stun: int = 0
    egress: int = 0
    banned_dropped: int = 0  # datagrams from banned sources, dropped unread
    handoff_foreign: int = 0  # hand-offs from an address that is no host of the cluster
    handoff_unauthenticated: int = 0  # not sealed with the hand-off key, or out of the window
    handoff_replayed: int = 0  # a second copy of a sealed hand-off


class Dispatcher:
    def __init__(self, config: Config):
        self.config = config
        self.host = config.sip.effective_host_id
        self.links: dict[int, WorkerLink] = {}
        self.slots: list[WorkerLink | None] = [None] * SLOTS
        self.counters = Counters()
        self.bans = Bans()
        self.trusted = Trusted()  # proven sources, as the workers announce them
        self.limiter = Limiter.from_config(config.limits, self.trusted)
        self.ban_seconds = float(config.limits.ban_seconds)
        self.bans_issued: dict[str, int] = {}  # bans_<reason> -> count (metrics)
        self.to_announce: queue.SimpleQueue = queue.SimpleQueue()  # (ip, reason) for Redis
        self.selector = selectors.DefaultSelector()
        self.running = True
        self.started = time.time()
        self.started_monotonic = time.monotonic()
        # Set while datagrams can be routed (a worker has joined): until then they wait
        # in the kernel's buffer instead of being read and dropped.
        self.routable = threading.Event()
        self.warmed_up = False  # every worker joined once, or STARTUP_GRACE passed
        # The control socket first: workers reconnect to it to hand back the SIP sockets.
        self.control = self._bind_control(config.dispatcher.control_path)
        self.sip_sockets, handed_by = self._bind_sip()
        # The envelopes' source: workers take envelopes from this address only (see
        # cluster/envelope.py), so it is bound before any welcome names it, on loopback.
        self.forward = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.forward.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RECV_BUFFER)
        self.forward.bind(("127.0.0.1", 0))
        self.egress = self._bind_egress()
        # SIP over TCP and TLS: the connections live here, beside the UDP sockets.
        self.stream_events: queue.SimpleQueue = queue.SimpleQueue()  # for Redis
        self.streams = Streams(config, self.selector, self._deliver_stream, self.bans.banned,
                               self.stream_events)
        try:
            self.streams.listen()
        except OSError as exc:  # a port taken, or the TLS files unusable: the one line
            raise BindError(exc.strerror or str(exc)) from exc
        self.stream_figures: dict[str, int] = self.streams.figures()
        self.dialer = Dialer(self.streams, self._dial_fallback, self._report_failed)
        self.handoff_key = clusterauth.handoff_key(config.auth.secret)
        self.handoff_sources: frozenset[str] = frozenset()  # set by the publishing thread
        self.handoff_replays = clusterauth.Replays()
        self.handoff_log = clusterauth.RateLimitedLog(log)
        # Hosts whose floating SIP address is on this host now (cluster/adoption.py):
        # host id -> Adopted; ``adopt_wanted`` is set by the publishing thread, applied by
        # the main loop.
        self.adopted: dict[str, Adopted] = {}
        self.adopted_index: dict[int, socket.socket] = {}  # virtual socket index -> socket
        self.adopt_wanted: dict[str, tuple[str, int]] | None = None
        self.standby = False  # True while our floating SIP address is on another host
        if handed_by is not None:
            self._welcome(handed_by)  # the worker that handed them back is the first link

    # ---------------------------------------------------------------- sockets
    def _wanted_sip(self) -> list[tuple[int, str, int]]:
        sip = self.config.sip
        wanted = [(socket.AF_INET, sip.bind, sip.port)]
        if sip.bind6:
            wanted.append((socket.AF_INET6, sip.bind6, sip.port))
        return wanted

    def _bind_sip(self) -> tuple[list[socket.socket], socket.socket | None]:
        """The SIP sockets, bound anew or handed back by a worker; and that worker's
        control connection (None when bound anew).  BindError when neither works."""
        socks = self._try_bind_sip()
        if socks is not None:
            return socks, None
        for family, host, port in self._wanted_sip():
            stranger = _stranger_holding(family, port)
            if stranger:
                # Not our workers' socket: waiting RECLAIM_WAIT for one to hand it back
                # would only delay the one line that says why nothing works.
                raise BindError(f"cannot bind {_hostport(host, port)}: Address already in use "
                                f"({stranger})")
        deadline = time.monotonic() + RECLAIM_WAIT
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.control], [], [], RECLAIM_POLL)
            if readable:
                try:
                    conn, _ = self.control.accept()
                except BlockingIOError:
                    conn = None
                if conn is not None:
                    socks = self._reclaim_from(conn)
                    if socks is not None:
                        return socks, conn
                    conn.close()
            # The workers may have died too, and the port with them.
            socks = self._try_bind_sip()
            if socks is not None:
                return socks, None
        wanted = self._wanted_sip()
        _family, host, port = next((w for w in wanted if _port_taken(*w)), wanted[0])
        raise BindError(f"cannot bind {_hostport(host, port)}: Address already in use")

    def _try_bind_sip(self) -> list[socket.socket] | None:
        """Bind every SIP socket; None when a port is taken (the workers may hold it)."""
        socks: list[socket.socket] = []
        try:
            for family, host, port in self._wanted_sip():
                socks.append(_udp_socket(family, host, port, freebind=True))
        except OSError as exc:
            for sock in socks:
                sock.close()
            if exc.errno == errno.EADDRINUSE:
                return None
            raise BindError(f"cannot bind {_hostport(host, port)}: {exc.strerror}") from exc
        return socks

    def _reclaim_from(self, conn: socket.socket) -> list[socket.socket] | None:
        """Ask a connecting worker for the SIP sockets it holds: the ones this dispatcher's
        predecessor bound, and the reason the port is taken."""
        if not _trusted(conn):
            return None
        conn.settimeout(HANDBACK_TIMEOUT)
        offered: list[socket.socket] = []
        try:
            conn.sendall(envelope.reclaim_request())
            payload, fds = envelope.recv_fds(conn)
            offered = [socket.socket(fileno=fd) for fd in fds]
            message = envelope.parse_control(payload)
        except (OSError, ValueError) as exc:
            for sock in offered:
                sock.close()
            log.debug("no SIP socket handed back: %s", exc)
            return None
        order = envelope.match_sockets(
            self._wanted_sip(), [(s.family, s.type, s.getsockname()) for s in offered])
        if order is None:
            if offered:
                log.warning("worker %s handed back sockets bound elsewhere (%s); not taken",
                            message.get("name", "?"),
                            ", ".join(_hostport(*s.getsockname()[:2]) for s in offered))
            for sock in offered:
                sock.close()
            return None
        socks = [offered[i] for i in order]
        for sock in offered:
            if sock not in socks:
                sock.close()
        for sock in socks:
            sock.setblocking(False)
        log.info("took the SIP socket(s) back from worker %s, %.0f ms after start",
                 message.get("name", "?"), 1000 * (time.monotonic() - self.started_monotonic))
        return socks

    def _bind_control(self, path: str) -> socket.socket:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Whoever connects gets the SIP sockets: only this user may (peer credentials are
        # checked on top, in case the folder's permissions are looser than the file's).
        previous = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(previous)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _bind_egress(self) -> socket.socket | None:
        port = self.config.dispatcher.inter_host_port
        if not port:
            return None
        # On the inter-host address when one is set: with a floating SIP address in
        # sip.bind, that one moves to another host when this one dies, the hand-offs'
        # address must not.
        address = self.config.dispatcher.inter_host_address or self.config.sip.bind
        try:
            return _udp_socket(socket.AF_INET, address, port)
        except OSError as exc:
            raise BindError(f"cannot bind {_hostport(address, port)} "
                            f"(dispatcher.inter_host_port): {exc.strerror}") from exc

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        """SIP sockets are read by a thread each; this thread keeps the workers' links."""
        self.selector.register(self.control, selectors.EVENT_READ, ("accept", None))
        if self.egress is not None:
            self.selector.register(self.egress, selectors.EVENT_READ, ("egress", None))
        for index, sock in enumerate(self.sip_sockets):
            threading.Thread(target=self._sip_loop, args=(sock, index), daemon=True).start()
        threading.Thread(target=self._publish_loop, daemon=True).start()
        threading.Thread(target=self._announce_bans, daemon=True).start()
        threading.Thread(target=self._follow_bans, daemon=True).start()
        threading.Thread(target=self._publish_streams, daemon=True).start()
        log.info("dispatcher %s listening on %s, forwarding from %s:%d", self.host,
                 ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.sip_sockets)
                 + (", " + self.streams.describe() if self.streams.listeners else ""),
                 *self.forward.getsockname()[:2])
        next_check = time.monotonic()
        while self.running:
            for key, mask in self.selector.select(timeout=max(0.0, next_check - time.monotonic())):
                kind, arg = key.data
                if kind == "stream":
                    self.streams.ready(arg, mask)
                elif kind == "stream-accept":
                    self.streams.accept(*arg)
                elif kind == "stream-dial":
                    self.dialer.ready(arg)
                elif kind == "accept":
                    self._accept()
                elif kind == "link":
                    self._read_link(arg)
                elif kind == "egress":
                    self._read_egress()
            if time.monotonic() >= next_check:
                self._apply_adoptions()
                self._expire_silent_workers()
                self._update_routable()
                self.streams.tick()
                self.dialer.tick()
                self.stream_figures = self.streams.figures()  # read by the heartbeat thread
                next_check = time.monotonic() + until_next_tick(CHECK_SECONDS)
        self.dialer.close_all()
        self.streams.close_all()

    def _sip_loop(self, sock: socket.socket, index: int,
                  stop: threading.Event | None = None) -> None:
        """Wait for datagrams, then drain the socket: one poll per burst, not per datagram.

        The socket stays non-blocking: workers share its file description (their copies
        came over SCM_RIGHTS), so a blocking mode set here would also be theirs.
        """
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        recvfrom, route, counters = sock.recvfrom, self._route, self.counters
        routable = self.routable.is_set
        banned, check, clock = self.bans.banned, self.limiter.check, time.monotonic
        while self.running and not (stop is not None and stop.is_set()):
            # The waits end only to look at ``stop`` (an adopted address given back: its
            # thread ends within IDLE_WAIT); at 0.25 s they woke an idle dispatcher 8 times
            # a second per socket.
            if not self.routable.wait(IDLE_WAIT):
                continue  # no worker: leave the datagrams in the kernel's buffer meanwhile
            if not poller.poll(IDLE_WAIT * 1000):
                continue
            while routable():
                try:
                    data, addr = recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:
                    counters.dropped += 1
                    break
                counters.received += 1
                # Bans and limits first: a flood costs one dict look-up per datagram.
                ip, now = addr[0], clock()
                if banned(ip, now):
                    counters.banned_dropped += 1
                    continue
                kind = check(ip, data, now)
                if kind is not None:
                    self.ban(addr, reason_of(kind), now)
                    counters.banned_dropped += 1
                    continue
                route(sock, index, data, addr)

    def _route(self, sock: socket.socket, index: int, data: bytes, addr: tuple) -> None:
        if len(data) <= 8 and stun.is_crlf_keepalive(data):
            self.counters.keepalives += 1
            return
        if stun.is_stun(data):
            self.counters.stun += 1
            answer = stun.binding_response(data, addr[0], addr[1])
            if answer is not None:
                sock.sendto(answer, addr)
            return
        call_id = scan.call_id(data)
        key = affinity_key(call_id) if call_id else zlib.crc32(addr[0].encode()) % SLOTS
        link = self.slots[key]
        if link is None or link.addr is None:
            self.counters.dropped += 1
            return
        try:
            self.forward.sendto(envelope.wrap(addr, index, data), link.addr)
            self.counters.forwarded += 1
        except OSError:
            self.counters.dropped += 1

    def _deliver_stream(self, conn: int, addr: tuple, data: bytes) -> bool:
        """A message read from a stream connection: to the worker its call's slot names,
        in an envelope naming the connection; the bans and buckets as for a datagram
        (streams_messages_<transport> counts it, not ``received``)."""
        ip, now = addr[0], time.monotonic()
        if self.bans.banned(ip, now):
            self.counters.banned_dropped += 1
            return False
        kind = self.limiter.check(ip, data, now)
        if kind is not None:
            self.ban(addr, reason_of(kind), now)
            self.counters.banned_dropped += 1
            return False
        call_id = scan.call_id(data)
        key = affinity_key(call_id) if call_id else zlib.crc32(ip.encode()) % SLOTS
        link = self.slots[key]
        if link is None or link.addr is None or not self.routable.is_set():
            self.counters.dropped += 1
            return False
        try:
            self.forward.sendto(envelope.wrap(addr, conn, data), link.addr)
        except OSError:
            self.counters.dropped += 1
            return False
        self.counters.forwarded += 1
        return True

    def _dial(self, link: WorkerLink, message: dict) -> None:
        """A worker's request to send over a TCP connection of this host's own
        (cluster/dialer.py)."""
        dest, data, fallback = message.get("dest"), message.get("data"), message.get("fallback")
        if (not isinstance(dest, list) or len(dest) != 2 or not isinstance(dest[0], str)
                or not isinstance(dest[1], int) or not isinstance(data, bytes)
                or not isinstance(fallback, (bytes, type(None)))
                or not envelope.is_address(dest[0])):  # never a name: no DNS here
            self.counters.dropped += 1
            return
        self.dialer.send((dest[0], dest[1]), data, fallback, link.conn.fileno())

    def _dial_fallback(self, dest: tuple[str, int], data: bytes) -> None:
        """A request that was to go over TCP only for its size, sent over UDP after all."""
        family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
        sock = next((s for s in self.sip_sockets if s.family == family), None)
        if sock is None:
            self.counters.dropped += 1
            return
        try:
            sock.sendto(data, dest)
            self.counters.egress += 1
        except OSError:
            self.counters.dropped += 1

    def _report_failed(self, origin, dest: tuple[str, int], data: bytes) -> None:
        """Tell the worker that asked that ``data`` could not be sent (a transport error to
        its transaction); a hand-off from another host (no origin here) is only counted."""
        link = self.links.get(origin) if origin is not None else None
        if link is None:
            return
        payload = envelope.stream_failed(dest, data)
        try:
            sent = link.conn.send(payload)
        except OSError:  # its link is full or gone: the transaction times out instead
            self.counters.dropped += 1
            return
        if sent != len(payload):
            # Half a message would garble the link: the worker reconnects (its calls are in
            # Redis, its slots come back with it).
            self._drop_link(origin, "control connection full")

    def _publish_streams(self) -> None:
        """Keep Redis's list of this host's open connections (workers read it before they
        send a request to a binding made over one)."""
        from .backoff import Backoff
        from .store import Store

        store = Store(self.config.redis.url, timeout=1.0, max_connections=2)
        backoff = Backoff(log, "connection list")
        while self.running:  # the previous dispatcher's connections died with it
            try:
                store.streams_reset(self.host)
                backoff.ok()
                break
            except Exception as exc:
                time.sleep(backoff.failed(exc))
        while self.running:
            event, conn, info = self.stream_events.get()
            while True:
                try:
                    if event == "open":
                        store.stream_opened(self.host, conn, info)
                    else:
                        store.stream_closed(self.host, conn)
                    backoff.ok()
                    break
                except Exception as exc:  # kept until Redis takes it
                    time.sleep(backoff.failed(exc))

    # ---------------------------------------------------------------- bans
    def ban(self, addr: tuple, reason: str, now: float) -> None:
        """Ban a source here at once; Redis and the other hosts learn it from a thread."""
        self.bans.add(addr[0], self.ban_seconds, now)
        key = "bans_" + reason.replace("-", "_")
        self.bans_issued[key] = self.bans_issued.get(key, 0) + 1
        banlog.warning("%s", ban_line(addr, reason, self.ban_seconds))
        self.to_announce.put((addr[0], reason))

    def _announce_bans(self) -> None:
        from .backoff import Backoff
        from .store import Store

        store = Store(self.config.redis.url, timeout=1.0, max_connections=2)
        backoff = Backoff(log, "ban announcement")
        while self.running:
            ip, reason = self.to_announce.get()
            while True:
                try:
                    store.ban(ip, self.ban_seconds, reason, f"dispatcher@{self.host}")
                    backoff.ok()
                    break
                except Exception as exc:  # kept until Redis takes it: the ban holds here
                    time.sleep(backoff.failed(exc))

    def _follow_bans(self) -> None:
        """Apply the bans other hosts, the workers and the operator issue or lift."""
        from .backoff import Backoff
        from .store import Store

        store = Store(self.config.redis.url, timeout=2.0, max_connections=2)
        backoff = Backoff(log, "ban subscription")
        while self.running:
            try:
                for event, ip, seconds, _reason in store.ban_events():
                    backoff.ok()
                    if event == "trust":
                        self.trusted.add(ip, seconds, time.monotonic())
                    elif event == "unban":
                        self.bans.remove(ip)
                        self.limiter.forget(ip)
                    elif ip not in self.limiter.allow:
                        self.bans.add(ip, seconds)
            except Exception as exc:  # whatever ends the subscription, it is made again
                time.sleep(backoff.failed(exc))

    def _read_egress(self) -> None:
        """Hand-offs to send from a SIP socket: one of this host's own, or, from
        ADOPTED_BASE on, one of an adopted host's address (cluster/adoption.py)."""
        for _ in range(BURST):
            try:
                data, source = self.egress.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                self.counters.dropped += 1
                return
            try:
                sealed = self._handoff(data, source)
            except clusterauth.Rejected as exc:
                self.handoff_log.warning("hand-off from %s:%d dropped: %s", source[0],
                                         source[1], exc.reason)
                continue
            try:
                dest, index, payload = envelope.unwrap(sealed)
                if index == envelope.DIAL_TCP:  # a target to reach over TCP from here
                    self.dialer.send(dest, payload, None, None)
                    self.counters.egress += 1
                    continue
                if envelope.is_stream(index):  # for a phone connected to this host
                    if self.streams.send(index, payload):
                        self.counters.egress += 1
                    continue
                if index >= ADOPTED_BASE:
                    sock = self.adopted_index[index]
                else:
                    sock = self.sip_sockets[index]
                sock.sendto(payload, dest)
                self.counters.egress += 1
            except (ValueError, IndexError, KeyError, OSError):
                self.counters.dropped += 1

    def _handoff(self, data: bytes, source: tuple) -> bytes:
        """The envelope of a hand-off from another host of the cluster; Rejected (counted)
        for anything else."""
        if source[0] not in self.handoff_sources:
            self.counters.handoff_foreign += 1
            raise clusterauth.Rejected("not a host of the cluster")
        try:
            nonce, body = clusterauth.unseal(self.handoff_key, data)
        except clusterauth.Rejected:
            self.counters.handoff_unauthenticated += 1
            raise
        if not self.handoff_replays.first(nonce):
            self.counters.handoff_replayed += 1
            raise clusterauth.Rejected("replayed")
        return body

    # ---------------------------------------------------------------- workers
    def _accept(self) -> None:
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        self._welcome(conn)

    def _welcome(self, conn: socket.socket) -> None:
        """Pass the SIP sockets to a new worker link and start reading it."""
        if not _trusted(conn):
            conn.close()
            return
        families = [s.family.name for s in self.sip_sockets]
        forward = self.forward.getsockname()[:2]
        try:
            envelope.send_fds(conn, envelope.welcome(self.host, families, forward),
                              [s.fileno() for s in self.sip_sockets])
        except OSError:
            conn.close()
            return
        conn.setblocking(False)
        self.links[conn.fileno()] = WorkerLink(conn)
        self.selector.register(conn, selectors.EVENT_READ, ("link", conn.fileno()))

    def _read_link(self, fd: int) -> None:
        link = self.links.get(fd)
        if link is None:
            return
        try:
            data = link.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_link(fd, "connection closed")
            return
        link.buffer.feed(data)
        for message in link.buffer:
            self._on_link_message(link, message)

    def _on_link_message(self, link: WorkerLink, message: dict) -> None:
        link.last_seen = time.monotonic()
        kind = message.get("type")
        if kind == "out":  # a worker's message for a stream connection held here
            conn, data = message.get("conn"), message.get("data")
            if isinstance(conn, int) and isinstance(data, bytes):
                if not self.streams.send(conn, data):
                    dest = message.get("dest")
                    if not (isinstance(dest, list) and len(dest) == 2
                            and isinstance(dest[0], str) and isinstance(dest[1], int)):
                        dest = ["0.0.0.0", 0]  # a worker that did not say: still reported
                    self._report_failed(link.conn.fileno(), (dest[0], dest[1]), data)
            return
        if kind == "dial":
            self._dial(link, message)
            return
        link.load = int(message.get("load", 0))
        if kind == "hello":
            link.name = str(message["name"])
            link.addr = (str(message["ip"]), int(message["port"]))
            log.info("worker %s joined (udp %s:%d)", link.name, *link.addr)
            self._rebalance()

    def _drop_link(self, fd: int, why: str) -> None:
        link = self.links.pop(fd, None)
        if link is None:
            return
        try:
            self.selector.unregister(link.conn)
        except (KeyError, ValueError):
            pass
        link.conn.close()
        log.warning("worker %s left: %s", link.name or "?", why)
        self._rebalance()

    def _expire_silent_workers(self) -> None:
        limit = time.monotonic() - self.config.dispatcher.dead_after
        for fd, link in list(self.links.items()):
            if link.last_seen < limit:
                self._drop_link(fd, "no heartbeat")

    def _rebalance(self) -> None:
        live = [link for link in self.links.values() if link.addr is not None]
        for slot in range(SLOTS):
            self.slots[slot] = max(
                live, key=lambda w: zlib.crc32(b"%d/%s" % (slot, w.name.encode())), default=None)
        self._update_routable()

    def _update_routable(self) -> None:
        """Open the SIP sockets to reading once workers can take what is read.

        Right after a start the queued datagrams wait until every configured worker has
        joined (they reconnect within a fraction of a second), so they are dealt to the
        workers their calls' slots name; a worker that does not come back holds them up
        for STARTUP_GRACE at most."""
        live = sum(1 for link in self.links.values() if link.addr is not None)
        if not self.warmed_up and (
                live >= self.config.workers.count
                or time.monotonic() - self.started_monotonic >= STARTUP_GRACE):
            self.warmed_up = True
        if live and self.warmed_up:
            self.routable.set()
        else:
            self.routable.clear()

    # ---------------------------------------------------------------- reporting
    def _publish_loop(self) -> None:
        from . import metrics
        from .backoff import Backoff
        from .store import Store

        metrics.start(self.config, self.host)  # this host's Prometheus endpoint
        store = Store(self.config.redis.url, timeout=1.0, max_connections=2)
        backoff = Backoff(log, "heartbeat")
        next_hosts = 0.0
        while self.running:
            info = {"role": "dispatcher", "host": self.host, "name": "dispatcher",
                    "pid": os.getpid(), "started": self.started, "seen": time.time(),
                    "workers": sorted(link.name for link in self.links.values() if link.addr),
                    **vars(self.counters), **self.bans_issued, **self.stream_figures,
                    "trusted_sources": self.trusted.live(time.monotonic())}
            try:
                store.heartbeat("dispatcher", self.host, "dispatcher", info, ttl=5)
                sip = self.sip_sockets[0].getsockname()
                host = {"sip": [sip[0], sip[1]], "egress": None}
                if self.egress is not None:
                    bound, port = self.egress.getsockname()[:2]
                    # What other hosts send to: a bind address of 0.0.0.0 reaches no one.
                    host["egress"] = [self.config.dispatcher.inter_host_address or bound, port]
                self._note_standby(adoption.standby(sip[0]), sip[0])
                if not self.standby:
                    store.announce_host(self.host, host, ttl=HOST_TTL)
                if self.egress is not None and time.monotonic() >= next_hosts:
                    hosts = store.hosts()
                    self.handoff_sources = _handoff_sources(hosts)
                    self.adopt_wanted = adoption.wanted(hosts, self.host, time.time())
                    next_hosts = time.monotonic() + HOSTS_REFRESH
                for adopted in list(self.adopted.values()):
                    # In the dead host's stead: its hand-offs come to this host's egress
                    # port, its socket i named base + i.
                    store.announce_host(adopted.host, {
                        "sip": list(adopted.address), "by": self.host, "base": adopted.base,
                        "egress": host["egress"]}, ttl=HOST_TTL)
            except Exception as exc:  # whatever it is, this thread must not end (it did)
                time.sleep(backoff.failed(exc))
                continue
            backoff.ok()
            time.sleep(until_next_tick(PUBLISH_SECONDS))

    def stop(self, *_args) -> None:
        self.running = False

    # ---------------------------------------------------------------- adopted hosts
    def _note_standby(self, standby: bool, address: str) -> None:
        if standby != self.standby:
            if standby:
                log.warning("%s is not on this host: passive (not announcing host %s) until "
                            "it is back", address, self.host)
            else:
                log.info("%s is on this host: announcing host %s", address, self.host)
        self.standby = standby

    def _apply_adoptions(self) -> None:
        """Serve the hosts whose floating address came here; let go of those whose
        address left (main loop: the selector and the links are its own)."""
        wanted, self.adopt_wanted = self.adopt_wanted, None
        if wanted is None:
            return
        for host in [h for h in self.adopted if h not in wanted]:
            self._release(self.adopted.pop(host))
        for host, address in wanted.items():
            if host not in self.adopted:
                self._adopt(host, address)

    def _adopt(self, host: str, address: tuple[str, int]) -> None:
        base = adoption.virtual_base(host)
        if any(a.base == base for a in self.adopted.values()):
            log.error("cannot adopt host %s: its socket numbers are taken by another "
                      "adopted host (rename one of them)", host)
            return
        adopted = Adopted(host, address, base, stop=threading.Event())
        try:
            adopted.sockets.append(_udp_socket(socket.AF_INET, *address))
        except OSError as exc:
            log.warning("cannot adopt host %s on %s: %s", host, _hostport(*address), exc)
            return
        self.adopted[host] = adopted
        for i, sock in enumerate(adopted.sockets):
            self.adopted_index[base + i] = sock
            threading.Thread(target=self._sip_loop, args=(sock, base + i, adopted.stop),
                             daemon=True).start()
        log.warning("adopted host %s: its address %s is on this host now; serving its SIP "
                    "port and its phones", host, _hostport(*address))

    def _release(self, adopted: Adopted) -> None:
        adopted.stop.set()
        for i in range(len(adopted.sockets)):
            self.adopted_index.pop(adopted.base + i, None)
        # Its reading thread sees the stop flag before anything else once its poll ends.
        for sock in adopted.sockets:
            sock.close()
        log.warning("released host %s: %s is no longer on this host", adopted.host,
                    _hostport(*adopted.address))


def _handoff_sources(hosts: dict[str, dict]) -> frozenset[str]:
    """The addresses hand-offs may come from: every recently announced host's egress IP
    (workers send hand-offs from it: workers/sip/transport.py)."""
    now = time.time()
    return frozenset(str(info["egress"][0]) for info in hosts.values()
                     if info.get("egress") and now - float(info.get("seen", 0))
                     <= HOST_TRUSTED_FOR)



def _udp_socket(family: int, host: str, port: int, freebind: bool = False) -> socket.socket:
    """``freebind``: bound even when ``host`` is not on this host yet (a floating address
    another host holds: cluster/adoption.py); it receives once the address is here."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        if freebind:
            adoption.freebind(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _trusted(conn: socket.socket) -> bool:
    """Whether a control connection comes from this user's (or root's) process; logged
    when not, since nothing of the cluster's own connects as another user."""
    try:
        if envelope.peer_trusted(conn):
            return True
    except OSError:
        pass
    log.warning("control connection from another user refused")
    return False


def _port_taken(family: int, host: str, port: int) -> bool:
    try:
        _udp_socket(family, host, port).close()
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    return False


def _stranger_holding(family: int, port: int) -> str:
    """Who holds UDP ``port`` when it is not a SIP worker: "held by pid N name", or "" when
    a worker holds it (a previous dispatcher's socket, to be reclaimed) or when it cannot be
    told (no /proc, or a holder that is not ours to look at: keep waiting for a worker)."""
    table = "/proc/net/udp6" if family == socket.AF_INET6 else "/proc/net/udp"
    try:
        with open(table) as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return ""
    inodes = {f"socket:[{row[9]}]" for row in rows
              if len(row) > 9 and int(row[1].rsplit(":", 1)[1], 16) == port}
    holders: dict[str, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or len(holders) == len(inodes):
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                link = os.readlink(fd.path)
                if link in inodes:
                    holders.setdefault(link, int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    if not inodes or len(holders) < len(inodes):
        return ""  # a holder we cannot see: maybe a worker of another user's cluster
    strangers = []
    for pid in sorted(set(holders.values())):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return ""
        if b"workers.sip" in argv or b"cluster.dispatcher" in argv:
            return ""  # a worker, or a previous dispatcher still on its way out
        strangers.append(f"pid {pid} {os.path.basename(argv[0].decode(errors='replace'))}")
    return "held by " + ", ".join(strangers)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main() -> None:
    config = load_or_exit()
    setup_logging(config, "dispatcher")
    cadence.set_phase_for(f"{config.sip.effective_host_id}/dispatcher")
    try:
        dispatcher = Dispatcher(config)
    except BindError as exc:
        log.error("%s", exc)
        sys.exit(1)
    signal.signal(signal.SIGTERM, dispatcher.stop)
    signal.signal(signal.SIGINT, dispatcher.stop)
    dispatcher.run()


if __name__ == "__main__":
    main()
