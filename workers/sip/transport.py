"""The worker's thin gevent transport.

Datagrams arrive from the dispatcher on a loopback UDP port, wrapped with
their source address.  Answers leave through copies of the dispatcher's SIP
sockets (received over the control connection), so they come from the SIP
port; requests for a phone registered through another host go to that host's
dispatcher (its egress port), which sends them from its own SIP socket.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter

import gevent
import msgpack

from cluster import envelope
from cluster.backoff import Backoff
from cluster.logsetup import call_log
from cluster.sip import scan
from cluster.store import Store, StoreUnavailable

log = logging.getLogger("transport")
RECV_BUFFER = 4 * 1024 * 1024


class Transport:
    def __init__(self, control_path: str, name: str, host: str, heartbeat_interval: float,
                 store: Store, on_datagram, load=lambda: 0, counters: Counter | None = None):
        self.control_path = control_path
        self.name = name
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self.store = store
        self.on_datagram = on_datagram
        self.load = load
        self.inbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inbound.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        self.inbound.bind(("127.0.0.1", 0))
        self.egress = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip_sockets: list[socket.socket] = []
        self.control: socket.socket | None = None
        self._hosts: dict[str, tuple[float, tuple[str, int] | None]] = {}
        self.sent = 0
        # What leaves, for the heartbeat: responses_<N>xx by class, sent_<METHOD> requests.
        self.counters = Counter() if counters is None else counters
        self.leaving = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> list[gevent.Greenlet]:
        self._connect()
        return [gevent.spawn(self._receive_loop), gevent.spawn(self._heartbeat_loop)]

    def _connect(self) -> None:
        """Get the SIP sockets from the dispatcher and say hello; retries until it answers."""
        while True:
            try:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(self.control_path)
                payload, fds = envelope.recv_fds(conn)
                hello = msgpack.unpackb(payload, raw=False)
                break
            except OSError as exc:
                log.warning("dispatcher not reachable at %s (%s); retrying",
                            self.control_path, exc)
                gevent.sleep(0.5)
        for sock in self.sip_sockets:
            sock.close()  # our copies of the old descriptors; the dispatcher keeps its own
        self.sip_sockets = [socket.socket(fileno=fd) for fd in fds]
        self.control = conn
        self.dispatcher_host = hello.get("host")
        ip, port = self.inbound.getsockname()
        self._send_control({"type": "hello", "name": self.name, "ip": ip, "port": port,
                            "pid": os.getpid()})
        log.info("connected to dispatcher %s; reading on %s:%d", self.dispatcher_host, ip, port)

    def _send_control(self, message: dict) -> None:
        self.control.sendall(msgpack.packb(message))

    def leave(self) -> None:
        """Stop taking traffic: the dispatcher drops this worker when the connection closes."""
        self.leaving = True
        if self.control is not None:
            self.control.close()

    def _heartbeat_loop(self) -> None:
        backoff = Backoff(log, "dispatcher heartbeat")
        while not self.leaving:
            gevent.sleep(self.heartbeat_interval)
            if self.leaving:
                return
            try:
                try:
                    self._send_control({"type": "hb", "load": self.load()})
                except OSError:
                    log.warning("lost the dispatcher; reconnecting")
                    self._connect()
            except Exception as exc:  # whatever it is, the heartbeat goes on
                gevent.sleep(backoff.failed(exc))
            else:
                backoff.ok()

    def _receive_loop(self) -> None:
        backoff = Backoff(log, "receiving")
        while True:
            try:
                data = self.inbound.recv(65600)
                try:
                    addr, index, payload = envelope.unwrap(data)
                except ValueError:
                    continue
                self.on_datagram(payload, addr, index)
            except Exception as exc:  # one datagram's trouble must not stop the others
                self.counters["receive_errors"] += 1
                gevent.sleep(backoff.failed(exc) if isinstance(exc, OSError) else 0)

    # ---------------------------------------------------------------- sending
    def send(self, data: bytes, dest: tuple[str, int], *, host: str | None = None,
             sock_index: int = 0) -> None:
        """Send from the SIP port; through another host when the peer's NAT expects it."""
        if host and host != self.host:
            egress = self._egress_of(host)
            if egress is not None:
                self.egress.sendto(envelope.wrap(dest, sock_index, data), egress)
                self._count(data)
                return
        if ":" in dest[0]:
            sock_index = next((i for i, s in enumerate(self.sip_sockets)
                               if s.family == socket.AF_INET6), None)
            if sock_index is None:
                call_log(log, scan.call_id(data) or b"-").warning(
                    "no IPv6 SIP socket to reach %s", dest[0])
                return
        elif self.sip_sockets[sock_index].family != socket.AF_INET:
            sock_index = 0
        try:
            self.sip_sockets[sock_index].sendto(data, dest)
            self._count(data)
        except OSError as exc:
            call_log(log, scan.call_id(data) or b"-").warning(
                "send to %s:%d failed: %s", dest[0], dest[1], exc)

    def _count(self, data: bytes) -> None:
        self.sent += 1
        if data.startswith(b"SIP/2.0 "):
            self.counters[f"responses_{data[8:9].decode('latin-1')}xx"] += 1
        else:
            self.counters["sent_" + data[:data.find(b" ")].decode("latin-1")] += 1

    def _egress_of(self, host: str) -> tuple[str, int] | None:
        now = time.monotonic()
        cached = self._hosts.get(host)
        if cached is None or cached[0] < now:
            try:
                info = self.store.host_info(host)
            except StoreUnavailable:
                info = None
            egress = tuple(info["egress"]) if info and info.get("egress") else None
            cached = self._hosts[host] = (now + 5.0, egress)
        return cached[1]
