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
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import signal
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field

import msgpack

from . import envelope, metrics
from .backoff import Backoff
from .config import Config, load
from .envelope import SLOTS, affinity_key
from .logsetup import setup_logging
from .sip import scan, stun
from .store import Store

log = logging.getLogger("dispatcher")
RECV_BUFFER = 4 * 1024 * 1024
BURST = 64  # datagrams read from one socket before looking at the others


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


class Dispatcher:
    def __init__(self, config: Config):
        self.config = config
        self.host = config.sip.effective_host_id
        self.sip_sockets = self._bind_sip()
        self.forward = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.forward.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RECV_BUFFER)
        self.control = self._bind_control(config.dispatcher.control_path)
        self.egress = self._bind_egress()
        self.links: dict[int, WorkerLink] = {}
        self.slots: list[WorkerLink | None] = [None] * SLOTS
        self.counters = Counters()
        self.selector = selectors.DefaultSelector()
        self.running = True
        self.started = time.time()

    # ---------------------------------------------------------------- sockets
    def _bind_sip(self) -> list[socket.socket]:
        sip = self.config.sip
        socks = [_udp_socket(socket.AF_INET, sip.bind, sip.port)]
        if sip.bind6:
            socks.append(_udp_socket(socket.AF_INET6, sip.bind6, sip.port))
        return socks

    def _bind_control(self, path: str) -> socket.socket:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _bind_egress(self) -> socket.socket | None:
        port = self.config.dispatcher.inter_host_port
        if not port:
            return None
        return _udp_socket(socket.AF_INET, self.config.sip.bind, port)

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        """SIP sockets are read by a thread each; this thread keeps the workers' links."""
        self.selector.register(self.control, selectors.EVENT_READ, ("accept", None))
        if self.egress is not None:
            self.selector.register(self.egress, selectors.EVENT_READ, ("egress", None))
        for index, sock in enumerate(self.sip_sockets):
            threading.Thread(target=self._sip_loop, args=(sock, index), daemon=True).start()
        threading.Thread(target=self._publish_loop, daemon=True).start()
        metrics.start(self.config, self.host)  # this host's Prometheus endpoint
        log.info("dispatcher %s listening on %s", self.host,
                 ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.sip_sockets))
        next_check = time.monotonic()
        while self.running:
            for key, _ in self.selector.select(timeout=0.25):
                kind, arg = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "link":
                    self._read_link(arg)
                elif kind == "egress":
                    self._read_egress()
            if time.monotonic() >= next_check:
                self._expire_silent_workers()
                next_check = time.monotonic() + 0.25

    def _sip_loop(self, sock: socket.socket, index: int) -> None:
        """Wait for datagrams, then drain the socket: one poll per burst, not per datagram.

        The socket stays non-blocking: workers share its file description (their copies
        came over SCM_RIGHTS), so a blocking mode set here would also be theirs.
        """
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        recvfrom, route, counters = sock.recvfrom, self._route, self.counters
        while self.running:
            if not poller.poll(250):
                continue
            while True:
                try:
                    data, addr = recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:
                    counters.dropped += 1
                    break
                counters.received += 1
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

    def _read_egress(self) -> None:
        for _ in range(BURST):
            try:
                data = self.egress.recv(65535)
            except BlockingIOError:
                return
            try:
                dest, index, payload = envelope.unwrap(data)
                self.sip_sockets[index].sendto(payload, dest)
                self.counters.egress += 1
            except (ValueError, IndexError, OSError):
                self.counters.dropped += 1

    # ---------------------------------------------------------------- workers
    def _accept(self) -> None:
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        families = [s.family.name for s in self.sip_sockets]
        hello = msgpack.packb({"host": self.host, "sockets": families})
        try:
            envelope.send_fds(conn, hello, [s.fileno() for s in self.sip_sockets])
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
        link.load = int(message.get("load", 0))
        if message.get("type") == "hello":
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

    # ---------------------------------------------------------------- reporting
    def _publish_loop(self) -> None:
        store = Store(self.config.redis.url, timeout=1.0, max_connections=2)
        backoff = Backoff(log, "heartbeat")
        while self.running:
            info = {"role": "dispatcher", "host": self.host, "name": "dispatcher",
                    "pid": os.getpid(), "started": self.started, "seen": time.time(),
                    "workers": sorted(link.name for link in self.links.values() if link.addr),
                    **vars(self.counters)}
            try:
                store.heartbeat("dispatcher", self.host, "dispatcher", info, ttl=5)
                sip = self.sip_sockets[0].getsockname()
                host = {"sip": [sip[0], sip[1]], "egress": None}
                if self.egress is not None:
                    bound, port = self.egress.getsockname()[:2]
                    # What other hosts send to: a bind address of 0.0.0.0 reaches no one.
                    host["egress"] = [self.config.dispatcher.inter_host_address or bound, port]
                store.announce_host(self.host, host, ttl=5)
            except Exception as exc:  # whatever it is, this thread must not end (it did)
                time.sleep(backoff.failed(exc))
                continue
            backoff.ok()
            time.sleep(1.0)

    def stop(self, *_args) -> None:
        self.running = False


def _udp_socket(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def main() -> None:
    config = load()
    setup_logging(config, "dispatcher")
    dispatcher = Dispatcher(config)
    signal.signal(signal.SIGTERM, dispatcher.stop)
    signal.signal(signal.SIGINT, dispatcher.stop)
    dispatcher.run()


if __name__ == "__main__":
    main()
