"""The worker's thin gevent transport.

Datagrams arrive from the dispatcher on a loopback UDP port, wrapped with
their source address.  Answers leave through copies of the dispatcher's SIP
sockets (received over the control connection), so they come from the SIP
port; requests for a phone registered through another host go to that host's
dispatcher (its egress port), which sends them from its own SIP socket.  Those
hand-offs are sealed with the cluster's hand-off key (cluster/clusterauth.py) and
leave from this host's inter-host address: the receiving dispatcher forwards
nothing else.

Messages for a phone connected over TCP, TLS, WS or WSS (a socket number that is a stream
connection's id: cluster/envelope.py) go back to the dispatcher over the control
connection, which holds the phone's connection and sends them on it; the Via and
Contact say the stream's transport (cluster/sip/framing.py ``stamp``).  A connection of
another host's dispatcher is reached through that host, like a datagram.

When the dispatcher dies the control connection reaches end of file at once; a
greenlet waiting on it reconnects every ``RECONNECT_EVERY`` seconds while the
worker goes on sending through the SIP sockets it holds.  A restarted
dispatcher that finds the SIP port taken (by those very sockets) asks for them
back as the first thing on the new connection.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter

import gevent
import gevent.lock
import msgpack

from cluster import clusterauth, envelope
from cluster.adoption import ADOPTED_BASE, SOCKETS_PER_HOST, virtual_base
from cluster.backoff import Backoff
from cluster.cadence import until_next_tick
from cluster.logsetup import call_log
from cluster.sip import scan
from cluster.sip.errors import SipError
from cluster.sip.framing import stamp
from cluster.sip.message import Request, build_response, parse
from cluster.store import Store, StoreUnavailable

log = logging.getLogger("transport")
RECV_BUFFER = 4 * 1024 * 1024
RECONNECT_EVERY = 0.1  # seconds between attempts to reach a missing dispatcher
CONTROL_TIMEOUT = 2.0  # seconds a dispatcher has to answer a connecting worker
STILL_MISSING_EVERY = 10.0  # seconds between log lines while the dispatcher stays away
REFUSED_LOG_EVERY = 10.0  # seconds between log lines about envelopes from elsewhere
# Seconds another host's hand-off address is kept: one Redis GET per host and second at
# most, and a dead host (its announcement lapses 3 s after its death) is noticed 1 s later.
EGRESS_CACHE = 1.0
ADOPTED_REREAD = 0.5  # seconds between reads of the hosts for an unknown adopted socket


class Transport:
    def __init__(self, control_path: str, name: str, host: str, heartbeat_interval: float,
                 store: Store, on_datagram, load=lambda: 0, counters: Counter | None = None,
                 handoff_key: bytes = b"", egress_bind: str = ""):
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
        if egress_bind:
            # Other hosts' dispatchers take hand-offs only from the hosts' announced
            # inter-host addresses: leave from this one, whatever the routing table picks.
            self.egress.bind((egress_bind, 0))
        self.handoff_key = handoff_key
        self.sip_sockets: list[socket.socket] = []
        self.control: socket.socket | None = None
        # Where envelopes may come from: the current dispatcher's forwarding socket (named
        # in its welcome); None while no dispatcher is connected, when none is taken.
        self.dispatcher_addr: tuple[str, int] | None = None
        self._refused_logged = 0.0
        self._refused_since_log = 0
        # host -> (until, its egress address or None, the virtual socket index its own
        # sockets have at the host that adopted it, 0 when not adopted)
        self._hosts: dict[str, tuple[float, tuple[str, int] | None, int]] = {}
        self._adopted: dict[int, str] = {}  # virtual socket index base -> adopted host
        self._adopted_read = -1e9
        self.sent = 0
        # What leaves, for the heartbeat: responses_<N>xx by class, sent_<METHOD> requests.
        self.counters = Counter() if counters is None else counters
        self.leaving = False
        # Asked with (data, dest) before anything is sent: False keeps it (a banned source).
        self.watch = None
        self.mirror = None  # a HepMirror when hep.address is set: a copy of every message
        # (advertised address, UDP port, TLS port): what ``stamp`` writes into messages that
        # leave over a stream; set by the worker.
        self.stream_ports: tuple[str, int, int] | None = None
        self.ws_ports: tuple[int, int] = (0, 0)  # (WS port, WSS port), for ``stamp`` too
        self._control_lock = gevent.lock.Semaphore()  # heartbeats and stream messages
        # A request longer than this for a UDP target goes over TCP (RFC 3261 18.1.1);
        # 0: never.  Set by the worker (streams.udp_max_request).
        self.udp_max_request = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> list[gevent.Greenlet]:
        self._connect()
        return [gevent.spawn(self._receive_loop), gevent.spawn(self._heartbeat_loop),
                gevent.spawn(self._control_loop)]

    def _connect(self) -> None:
        """Get the SIP sockets from the dispatcher and say hello; retries until it answers.

        Meanwhile the SIP sockets held from the last dispatcher stay in use for sending."""
        since = time.monotonic()
        note_after = RECONNECT_EVERY
        while not self.leaving:
            try:
                conn, welcome, fds = self._handshake()
                break
            except (OSError, ValueError) as exc:
                waited = time.monotonic() - since
                if waited >= note_after:
                    # Told after 0.1, 0.2, 0.4... s, then every STILL_MISSING_EVERY s.  These
                    # lines also wake supervisord, which respawns an exited program only on
                    # the next turn of its loop, and that turn waits up to a second for some
                    # program's output: a line at 0.1 s and 0.2 s after the loss brings the
                    # dispatcher back within a few hundred ms instead of a second.
                    log.warning("dispatcher not reachable at %s for %.0f ms (%s); retrying "
                                "every %.1f s", self.control_path, 1000 * waited, exc,
                                RECONNECT_EVERY)
                    note_after = min(2 * note_after, waited + STILL_MISSING_EVERY)
                gevent.sleep(RECONNECT_EVERY)
        else:
            return
        old, self.sip_sockets = self.sip_sockets, [socket.socket(fileno=fd) for fd in fds]
        for sock in old:
            sock.close()  # our copies of the old descriptors; the dispatcher keeps its own
        self.control = conn
        self.dispatcher_host = welcome.get("host")
        ip, port = self.inbound.getsockname()
        log.info("connected to dispatcher %s after %.0f ms; reading on %s:%d",
                 self.dispatcher_host, 1000 * (time.monotonic() - since), ip, port)

    def _handshake(self) -> tuple[socket.socket, dict, list[int]]:
        """Connect, hand the SIP sockets back if asked, take the welcome, say hello."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            conn.settimeout(CONTROL_TIMEOUT)
            conn.connect(self.control_path)
            if not envelope.peer_trusted(conn):
                raise ValueError("the control socket is served by another user's process")
            message, fds = self._receive_control(conn)
            if message["type"] == "reclaim":
                # A new dispatcher found the SIP port taken by the sockets we hold.
                held = [(s.family, s.getsockname()) for s in self.sip_sockets]
                payload = envelope.sockets_message(self.name, held)
                if self.sip_sockets:
                    envelope.send_fds(conn, payload, [s.fileno() for s in self.sip_sockets])
                else:
                    conn.sendall(payload)  # none to give: it closes and waits for another
                message, fds = self._receive_control(conn)
            if message["type"] != "welcome" or len(fds) != len(message.get("sockets", ())):
                raise ValueError(f"unexpected {message['type']} from the dispatcher")
            # Before the hello: the dispatcher forwards as soon as it has read it.
            self.dispatcher_addr = envelope.forward_of(message)  # ValueError: names none
            ip, port = self.inbound.getsockname()
            conn.sendall(msgpack.packb({"type": "hello", "name": self.name, "ip": ip,
                                        "port": port, "pid": os.getpid()}))
            conn.settimeout(None)
        except BaseException:
            for fd in fds:
                os.close(fd)
            conn.close()
            raise
        return conn, message, fds

    @staticmethod
    def _receive_control(conn: socket.socket) -> tuple[dict, list[int]]:
        payload, fds = envelope.recv_fds(conn)
        try:
            return envelope.parse_control(payload), fds
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise

    def leave(self) -> None:
        """Stop taking traffic: the dispatcher drops this worker when the connection closes."""
        self.leaving = True
        if self.control is not None:
            self.control.close()

    def _control_loop(self) -> None:
        """Wait for the control connection to close (the dispatcher sends nothing after its
        welcome), then reconnect: a dead dispatcher is noticed at once, not at the next
        heartbeat."""
        unpacker = msgpack.Unpacker(raw=False)
        while not self.leaving:
            conn = self.control
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if self.leaving:
                return
            if data:
                unpacker.feed(data)
                for message in unpacker:
                    self._on_control(message)
                continue
            unpacker = msgpack.Unpacker(raw=False)  # a message cut by the loss is dropped
            log.warning("lost the dispatcher; reconnecting")
            self.control = None
            # Its forwarding port is free now and anyone may bind it: nothing is taken
            # until the next dispatcher's welcome names its own.
            self.dispatcher_addr = None
            conn.close()
            self._connect()

    def _heartbeat_loop(self) -> None:
        backoff = Backoff(log, "dispatcher heartbeat")
        while not self.leaving:
            gevent.sleep(until_next_tick(self.heartbeat_interval))
            conn = self.control
            if self.leaving or conn is None:
                continue
            try:
                with self._control_lock:
                    conn.sendall(msgpack.packb({"type": "hb", "load": self.load()}))
            except OSError:
                # The control greenlet reconnects; shutting down wakes it if it has not
                # seen the end of the connection yet.
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            except Exception as exc:  # whatever it is, the heartbeat goes on
                gevent.sleep(backoff.failed(exc))
            else:
                backoff.ok()

    def _receive_loop(self) -> None:
        backoff = Backoff(log, "receiving")
        recvfrom = self.inbound.recvfrom
        while True:
            try:
                data, source = recvfrom(65600)
                if source != self.dispatcher_addr:
                    self._refuse(source)
                    continue
                try:
                    addr, index, payload = envelope.unwrap(data)
                except ValueError:
                    continue
                if self.mirror is not None:
                    self.mirror.received(payload, addr)
                self.on_datagram(payload, addr, index)
            except Exception as exc:  # one datagram's trouble must not stop the others
                self.counters["receive_errors"] += 1
                gevent.sleep(backoff.failed(exc) if isinstance(exc, OSError) else 0)

    def _refuse(self, source: tuple[str, int]) -> None:
        """An envelope from anywhere but the dispatcher: dropped, counted, and told in one
        line per REFUSED_LOG_EVERY (a flood of them must not flood the log too)."""
        self.counters["envelopes_refused"] += 1
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_EVERY:
            expected = self.dispatcher_addr
            log.warning("dropped %d envelope(s) not from the dispatcher (%s), the last "
                        "from %s:%d", self._refused_since_log,
                        f"{expected[0]}:{expected[1]}" if expected else "none",
                        source[0], source[1])
            self._refused_logged = now
            self._refused_since_log = 0

    # ---------------------------------------------------------------- sending
    def send(self, data: bytes, dest: tuple[str, int], *, host: str | None = None,
             sock_index: int = 0) -> None:
        """Send from the SIP port; through another host when the peer's NAT expects it."""
        if self.watch is not None and not self.watch(data, dest):
            return
        stream = envelope.is_stream(sock_index)
        fallback = None
        if (not stream and self.udp_max_request and len(data) > self.udp_max_request
                and not data.startswith(b"SIP/2.0 ") and (not host or host == self.host)):
            # RFC 3261 18.1.1: too long for UDP (fragments are lost whole behind many
            # NATs): over TCP, and over UDP after all (this copy) if the target refuses.
            fallback, sock_index, stream = data, envelope.DIAL_TCP, True
        if stream and self.stream_ports is not None:
            address, udp_port, tls_port = self.stream_ports
            transport = envelope.stream_transport(sock_index)
            port = {"TLS": tls_port, "WS": self.ws_ports[0],
                    "WSS": self.ws_ports[1]}.get(transport, udp_port)
            data = stamp(data, transport, address, udp_port, port)
        # A socket of an address this host's dispatcher adopted (cluster/adoption.py):
        # only the dispatcher holds it, so the message goes through its egress port.
        adopted = not stream and sock_index >= ADOPTED_BASE
        if adopted and not host:
            host = self.host
        if host and (host != self.host or adopted):
            egress, base = self._egress_of(host)
            if egress is not None:
                if base and not stream and sock_index < ADOPTED_BASE:
                    # The host is dead and another serves its address: its socket there.
                    sock_index += base
                try:
                    sealed = clusterauth.seal(self.handoff_key,
                                              envelope.wrap(dest, sock_index, data))
                    self.egress.sendto(sealed, egress)
                except (ValueError, OSError) as exc:  # no key (auth.secret empty), or sending
                    call_log(log, scan.call_id(data) or b"-").warning(
                        "hand-off to host %s at %s:%d failed: %s", host, *egress, exc)
                    return
                self._count(data, dest)
                return
        if sock_index == envelope.DIAL_TCP:
            self._dial(data, dest, fallback)
            return
        if stream:
            self._send_stream(data, dest, sock_index)
            return
        if sock_index >= ADOPTED_BASE:
            sock_index = 0  # (no egress to the adopted address: from our own one)
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
            self._count(data, dest)
        except OSError as exc:
            call_log(log, scan.call_id(data) or b"-").warning(
                "send to %s:%d failed: %s", dest[0], dest[1], exc)

    def _send_stream(self, data: bytes, dest: tuple[str, int], conn_id: int) -> None:
        """Through the dispatcher, which holds the connection (it drops what is for a
        connection closed meanwhile; the phone's next one carries on)."""
        conn = self.control
        if conn is None:
            call_log(log, scan.call_id(data) or b"-").warning(
                "no dispatcher to send to %s:%d over connection %x", dest[0], dest[1], conn_id)
            return
        try:
            with self._control_lock:
                conn.sendall(envelope.stream_out(conn_id, data, dest))
        except OSError as exc:
            call_log(log, scan.call_id(data) or b"-").warning(
                "send to %s:%d over connection %x failed: %s", dest[0], dest[1], conn_id, exc)
            return
        self._count(data, dest)

    def _dial(self, data: bytes, dest: tuple[str, int], fallback: bytes | None) -> None:
        """Over a TCP connection the dispatcher opens (or has opened) to ``dest``
        (cluster/dialer.py); a failure comes back as ``failed`` (``_on_control``)."""
        conn = self.control
        if conn is None:
            call_log(log, scan.call_id(data) or b"-").warning(
                "no dispatcher to open a TCP connection to %s:%d", dest[0], dest[1])
            return
        if not envelope.is_address(dest[0]):
            # A route's host name: resolved here (gevent's resolver), never in the
            # dispatcher, whose loop must not wait on DNS.
            try:
                info = socket.getaddrinfo(dest[0], dest[1], type=socket.SOCK_STREAM)
            except OSError as exc:
                call_log(log, scan.call_id(data) or b"-").warning(
                    "cannot resolve %s for a TCP connection: %s", dest[0], exc)
                self.transport_error(data, dest)
                return
            dest = (info[0][4][0], dest[1])
        try:
            with self._control_lock:
                conn.sendall(envelope.stream_dial(dest, data, fallback))
        except OSError as exc:
            call_log(log, scan.call_id(data) or b"-").warning(
                "asking for a TCP connection to %s:%d failed: %s", dest[0], dest[1], exc)
            return
        self._count(data, dest)

    def _on_control(self, message) -> None:
        """What the dispatcher tells after its welcome: a message it could not send."""
        if not isinstance(message, dict) or message.get("type") != "failed":
            return
        dest, data = message.get("dest"), message.get("data")
        if isinstance(dest, list) and len(dest) == 2 and isinstance(data, bytes):
            self.transport_error(data, (str(dest[0]), int(dest[1])))

    def transport_error(self, data: bytes, dest: tuple[str, int]) -> None:
        """A request that could not be sent is a transport error to its transaction, which
        takes it as a 503 received (RFC 3261 8.1.3.1): the 503 is made here and handled
        as if it had arrived, so the call goes on to its next contact or fails with the
        B2BUA's answer at once, not after Timer B.  Responses and ACKs are only counted:
        nothing waits for them."""
        self.counters["transport_errors"] += 1
        clog = call_log(log, scan.call_id(data) or b"-")
        try:
            request = parse(data)
        except SipError:
            return
        if not isinstance(request, Request) or request.method == "ACK":
            clog.info("%s to %s:%d not sent: the connection is gone",
                      "ACK" if isinstance(request, Request) else "response", *dest)
            return
        clog.warning("%s to %s:%d not sent (transport error): taken as a 503",
                     request.method, *dest)
        answer = build_response(request, 503, "Service Unavailable (transport error)",
                                to_tag=os.urandom(4).hex())
        self.on_datagram(answer.to_bytes(), dest, 0)

    def _count(self, data: bytes, dest: tuple[str, int]) -> None:
        self.sent += 1
        if self.mirror is not None:
            self.mirror.sent(data, dest)
        if data.startswith(b"SIP/2.0 "):
            self.counters["responses_" + data[8:11].decode("latin-1")] += 1
        else:
            self.counters["sent_" + data[:data.find(b" ")].decode("latin-1")] += 1

    def origin(self, sock_index: int) -> str:
        """The host whose SIP address received a datagram: this one, or, for a socket of
        an address this host's dispatcher adopted, the dead host it belonged to, so what
        is recorded (a binding, a call leg) is sent "from that host" (its address) later,
        by whichever host serves it then."""
        if sock_index < ADOPTED_BASE or envelope.is_stream(sock_index):
            return self.host
        base = sock_index - (sock_index - ADOPTED_BASE) % SOCKETS_PER_HOST
        host = self._adopted.get(base)
        if host is None and time.monotonic() >= self._adopted_read + ADOPTED_REREAD:
            self._adopted_read = time.monotonic()
            try:
                hosts = self.store.hosts()
            except StoreUnavailable:
                hosts = {}
            # Every host's base is known from its id; one this host serves wins a clash.
            ranked = sorted(hosts.items(), key=lambda item: item[1].get("by") == self.host)
            self._adopted = {virtual_base(h): h for h, _info in ranked if h != self.host}
            host = self._adopted.get(base)
        return host or self.host

    def _egress_of(self, host: str) -> tuple[tuple[str, int] | None, int]:
        """Where hand-offs for ``host`` go, and the index base of its sockets there."""
        now = time.monotonic()
        cached = self._hosts.get(host)
        if cached is None or cached[0] < now:
            try:
                info = self.store.host_info(host)
            except StoreUnavailable:
                info = None
            egress = tuple(info["egress"]) if info and info.get("egress") else None
            base = int(info.get("base", 0)) if info and info.get("by", host) != host else 0
            cached = self._hosts[host] = (now + EGRESS_CACHE, egress, base)
        return cached[1], cached[2]

