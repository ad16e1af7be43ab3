"""A load client for SIP over TLS (SIPp in this build has none): many connections in one
process, one selector, non-blocking sockets.

Each connection is one phone: a TLS connection to the cluster, a user of its own, one
Call-ID for all its registrations (RFC 3261 10.2.4) and a CSeq that grows.  A
registration is REGISTER, 401, REGISTER with MD5 digest (qop=auth), 200; its time runs
from the first REGISTER to the 200.  ``Load.step`` starts registrations at a fixed rate,
each on the connection that has waited longest, for a bounded time.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import re
import resource
import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field

from cluster.sip.framing import Framer, Ping

TIMEOUT = 5.0  # seconds a registration may take before it counts as failed
_PARAM = re.compile(rb'([A-Za-z-]+)=("[^"]*"|[^,\s]+)')


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's descriptor limit to ``wanted`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@dataclass
class Phone:
    user: str
    password: str
    raw: socket.socket
    sock: socket.socket | None = None  # the TLS socket, once the TCP connect is done
    state: str = "connecting"  # connecting, handshake, idle, challenged, authorizing, closed
    port: int = 0
    cseq: int = 0
    call_id: str = field(default_factory=lambda: os.urandom(8).hex() + "@tlsload")
    started: float = 0.0
    framer: Framer = field(default_factory=lambda: Framer(65536, 65536))
    out: bytearray = field(default_factory=bytearray)


class Load:
    """``count`` TLS connections from ``bind`` to ``server`` (``cafile`` trusted), one per
    (user, password) of ``users``."""

    def __init__(self, server: tuple[str, int], cafile: str, users: list[tuple[str, str]],
                 domain: str, bind: str = "127.0.0.1"):
        self.server = server
        self.domain = domain
        self.bind = bind
        self.context = ssl.create_default_context(cafile=cafile)
        self.users = users
        self.selector = selectors.DefaultSelector()
        self.phones: list[Phone] = []
        self.idle: collections.deque[Phone] = collections.deque()
        self.results: list = []  # (phone, ok, seconds) of the registrations that ended
        self.closed = 0
        self._next_expiry = 0.0

    # ---------------------------------------------------------------- connections
    def connect(self, deadline: float, at_once: int = 100) -> float:
        """Open a TLS connection per user, ``at_once`` handshakes at a time; the seconds it
        took.  RuntimeError when not all are open by ``deadline``."""
        started = time.monotonic()
        waiting = list(self.users)
        pending = 0
        while waiting or pending:
            while waiting and pending < at_once:
                user, password = waiting.pop()
                raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                raw.setblocking(False)
                raw.bind((self.bind, 0))
                code = raw.connect_ex(self.server)
                if code not in (0, errno.EINPROGRESS):
                    raw.close()
                    raise RuntimeError(f"connect: {os.strerror(code)}")
                phone = Phone(user, password, raw, port=raw.getsockname()[1])
                self.phones.append(phone)
                self.selector.register(raw, selectors.EVENT_WRITE, phone)
                pending += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pending + len(waiting)} connections not open in time")
            for key, _ in self.selector.select(0.1):
                phone = key.data
                was = phone.state
                self._ready(phone)
                if was in ("connecting", "handshake") and phone.state not in (
                        "connecting", "handshake"):
                    pending -= 1
                    if phone.state == "closed":
                        raise RuntimeError("a connection failed during its handshake")
        return time.monotonic() - started

    def _start_tls(self, phone: Phone) -> None:
        code = phone.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.selector.unregister(phone.raw)
        if code:
            phone.state = "closed"
            phone.raw.close()
            return
        phone.sock = self.context.wrap_socket(phone.raw, server_hostname=self.server[0],
                                              do_handshake_on_connect=False)
        phone.state = "handshake"
        self.selector.register(phone.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, phone)
        self._handshake(phone)

    def _handshake(self, phone: Phone) -> None:
        try:
            phone.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(phone, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(phone, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        except (OSError, ValueError):
            self._close(phone)
            return
        phone.state = "idle"
        self.idle.append(phone)
        self._want(phone, selectors.EVENT_READ)

    def _want(self, phone: Phone, events: int) -> None:
        if self.selector.get_key(phone.sock).events != events:
            self.selector.modify(phone.sock, events, phone)

    def _close(self, phone: Phone) -> None:
        if phone.state == "closed":
            return
        if phone.state in ("challenged", "authorizing"):
            self.results.append((phone, "closed", time.monotonic() - phone.started))
        phone.state = "closed"
        self.closed += 1
        sock = phone.sock or phone.raw
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def close(self) -> None:
        for phone in self.phones:
            self._close(phone)
        self.selector.close()

    # ---------------------------------------------------------------- SIP
    def _request(self, phone: Phone, authorization: str = "") -> bytes:
        phone.cseq += 1
        uri = f"sip:{self.domain}"
        lines = [f"REGISTER {uri} SIP/2.0",
                 f"Via: SIP/2.0/TLS {self.bind}:{phone.port};branch=z9hG4bK"
                 f"{os.urandom(6).hex()};rport",
                 "Max-Forwards: 70",
                 f"From: <sip:{phone.user}@{self.domain}>;tag={phone.call_id[:8]}",
                 f"To: <sip:{phone.user}@{self.domain}>",
                 f"Call-ID: {phone.call_id}",
                 f"CSeq: {phone.cseq} REGISTER",
                 f"Contact: <sip:{phone.user}@{self.bind}:{phone.port};transport=tls>",
                 "Expires: 3600"]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _authorization(self, phone: Phone, challenge: bytes) -> str:
        params = {}
        for line in challenge.split(b"\r\n"):
            if line.lower().startswith(b"www-authenticate:"):
                params = {k.lower().decode(): v.strip(b'"').decode()
                          for k, v in _PARAM.findall(line.split(b":", 1)[1])}
                break
        realm, nonce = params["realm"], params["nonce"]
        uri = f"sip:{self.domain}"
        ha1 = _md5(f"{phone.user}:{realm}:{phone.password}")
        ha2 = _md5(f"REGISTER:{uri}")
        cnonce = os.urandom(8).hex()
        response = _md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
        return (f'Digest username="{phone.user}", realm="{realm}", nonce="{nonce}", '
                f'uri="{uri}", response="{response}", algorithm=MD5, cnonce="{cnonce}", '
                f"nc=00000001, qop=auth")

    def begin(self, phone: Phone, now: float) -> None:
        phone.started = now
        phone.state = "challenged"
        self._send(phone, self._request(phone))

    def _send(self, phone: Phone, data: bytes) -> None:
        phone.out += data
        self._flush(phone)

    def _flush(self, phone: Phone) -> None:
        while phone.out:
            try:
                sent = phone.sock.send(phone.out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except (OSError, ValueError):
                self._close(phone)
                return
            del phone.out[:sent]
        self._want(phone, selectors.EVENT_READ | (selectors.EVENT_WRITE if phone.out else 0))

    def _ready(self, phone: Phone) -> None:
        if phone.state == "connecting":
            self._start_tls(phone)
        elif phone.state == "handshake":
            self._handshake(phone)
        elif phone.state != "closed":
            if phone.out:
                self._flush(phone)
            self._read(phone)

    def _read(self, phone: Phone) -> None:
        while phone.state != "closed":
            try:
                data = phone.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (OSError, ValueError):
                self._close(phone)
                return
            if not data:
                self._close(phone)
                return
            for item in phone.framer.feed(data):
                if not isinstance(item, Ping):
                    self._message(phone, item)
            if not phone.sock.pending():
                return

    def _message(self, phone: Phone, data: bytes) -> None:
        if not data.startswith(b"SIP/2.0 ") or data[8:9] == b"1":
            return
        cseq = re.search(rb"\r\nCSeq:\s*(\d+)", data, re.IGNORECASE)
        if cseq is None or int(cseq.group(1)) != phone.cseq:
            return  # the answer to a registration already counted as failed
        status = data[8:11]
        now = time.monotonic()
        if phone.state == "challenged" and status == b"401":
            phone.state = "authorizing"
            self._send(phone, self._request(phone, self._authorization(phone, data)))
            return
        ok = phone.state == "authorizing" and status == b"200"
        self.results.append((phone, "ok" if ok else status.decode(errors="replace"),
                             now - phone.started))
        phone.state = "idle"
        self.idle.append(phone)

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        self._next_expiry = now + 0.25
        for phone in self.phones:
            if phone.state in ("challenged", "authorizing") and now - phone.started > TIMEOUT:
                self.results.append((phone, "timeout", now - phone.started))
                phone.state = "idle"  # a late answer has an old CSeq: ignored
                self.idle.append(phone)

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(max(timeout, 0)):
            self._ready(key.data)

    # ---------------------------------------------------------------- load
    def register_all(self, deadline: float, at_once: int = 50) -> tuple[int, int, dict]:
        """Register every open connection once, ``at_once`` at a time: (ok, failed, how
        the failed ended).  Not more at once: past half of workers.max_inflight (200) new
        requests without credentials are refused with 503, by design."""
        self.results.clear()
        todo = [p for p in self.idle]
        self.idle.clear()
        busy = 0
        while (todo or busy) and time.monotonic() < deadline:
            now = time.monotonic()
            while todo and busy < at_once:
                self.begin(todo.pop(), now)
                busy += 1
            done = len(self.results)
            self.poll(0.05)
            self._expire(time.monotonic())
            busy -= len(self.results) - done
        ok = sum(1 for _, outcome, _ in self.results if outcome == "ok")
        return ok, len(self.users) - ok, self.outcomes()

    def outcomes(self) -> dict[str, int]:
        """How the registrations that did not succeed ended (status, timeout, closed)."""
        return dict(collections.Counter(o for _, o, _ in self.results if o != "ok"))

    def step(self, rate: float, seconds: float) -> dict:
        """Start ``rate`` registrations a second for ``seconds``, then wait for the last
        ones (at most TIMEOUT): scheduled, ok, failed (non-200, timed out, connection
        lost, or no connection free when one was due), the times of the ok ones, and
        this process's own CPU seconds (if it is near the wall time, the client is the
        limit, not the cluster)."""
        self.results.clear()
        interval = 1.0 / rate
        started = time.monotonic()
        cpu_started = time.process_time()
        end = started + seconds
        due = started
        scheduled = missed = 0
        while True:
            now = time.monotonic()
            while due <= now and due < end:
                scheduled += 1
                if self.idle:
                    self.begin(self.idle.popleft(), now)
                else:
                    missed += 1
                due += interval
            busy = any(p.state in ("challenged", "authorizing") for p in self.phones) \
                if now >= end else True
            if now >= end and (not busy or now > end + TIMEOUT):
                break
            self.poll(min(due - now, 0.02) if due < end else 0.02)
            self._expire(time.monotonic())
        elapsed = time.monotonic() - started
        times = [seconds for _, outcome, seconds in self.results if outcome == "ok"]
        return {"scheduled": scheduled, "ok": len(times), "failed": scheduled - len(times),
                "missed": missed, "outcomes": self.outcomes(), "elapsed": elapsed, "times": times,
                "client_cpu": time.process_time() - cpu_started,
                "open": sum(1 for p in self.phones if p.state != "closed")}
