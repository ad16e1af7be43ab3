"""The test user agent (sipua.py) over one TCP or TLS connection, and a phone's side of a
call: answer an INVITE that arrives over the connection, or place one."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sipua import UA, Reply, parse_reply

from cluster.sip.framing import Framer, Ping


def self_signed(folder: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True, timeout=60)
    return str(cert), str(key)


@dataclass
class StreamUA(UA):
    """A UA whose messages travel over one connection to ``server``: TLS when ``cafile``
    (the server's certificate, trusted) is given, else TCP."""

    cafile: str | None = None
    tls_version: ssl.TLSVersion | None = None  # the only version offered (None: any)
    inbox: list[bytes] = field(default_factory=list, init=False)  # requests not read yet

    def __post_init__(self):
        raw = socket.create_connection(self.server, timeout=5, source_address=(self.bind, 0))
        if self.cafile:
            context = ssl.create_default_context(cafile=self.cafile)
            if self.tls_version is not None:
                # The client's own security level would refuse TLS 1.1 before the server
                # could: lowered, so that a refusal is the server's.
                context.set_ciphers("DEFAULT:@SECLEVEL=0")
                context.minimum_version = context.maximum_version = self.tls_version
            raw = context.wrap_socket(raw, server_hostname=self.server[0])
        self.sock = raw
        self.port = raw.getsockname()[1]
        self.transport = "TLS" if self.cafile else "TCP"
        self.framer = Framer(max_header=65536, max_body=65536)
        self.pongs = 0

    def send(self, data: bytes) -> None:
        self.last_sent = data
        self.sock.sendall(data)

    def request(self, *args, **kwargs) -> bytes:
        data = super().request(*args, **kwargs)
        return data.replace(b"Via: SIP/2.0/UDP ", b"Via: SIP/2.0/%s " % self.transport.encode(),
                            1)

    def _read(self, deadline: float) -> bool:
        """Read what comes within the deadline into the inbox; False when nothing came."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return False
        if not data:
            raise ConnectionError("closed by the server")
        for item in self.framer.feed(data):
            if isinstance(item, Ping):
                continue
            self.inbox.append(item)
        if self.framer.buffer == b"\r\n":  # a pong (a lone CRLF) to our ping
            self.framer.buffer.clear()
            self.pongs += 1
        return True

    def next_message(self, match, timeout: float = 3.0) -> bytes | None:
        """The first message ``match(data)`` accepts (taken out of the inbox)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, data in enumerate(self.inbox):
                if match(data):
                    return self.inbox.pop(i)
            if not self._read(deadline) and time.monotonic() >= deadline:
                return None

    def receive(self, timeout: float = 2.0) -> Reply | None:
        skip = getattr(self, "skip_provisional", True)
        data = self.next_message(lambda d: d.startswith(b"SIP/2.0 ") and not (
            skip and d[8:9] == b"1"), timeout)
        return None if data is None else parse_reply(data)

    def next_request(self, method: str, timeout: float = 5.0) -> bytes | None:
        return self.next_message(lambda d: d.startswith(method.encode() + b" "), timeout)

    def closed_within(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._read(deadline)
        except (ConnectionError, OSError):
            return True
        return False

    # ---------------------------------------------------------------- answering
    def answer(self, request: bytes, status: int, reason: str, *, to_tag: str = "",
               headers: list[str] = (), body: bytes = b"") -> None:
        """A response to ``request``: its Vias, From, To (with ``to_tag``), Call-ID, CSeq."""
        head = request.split(b"\r\n\r\n", 1)[0].decode()
        keep = []
        for line in head.split("\r\n")[1:]:
            name = line.split(":", 1)[0].strip().lower()
            if name in ("via", "v", "from", "f", "call-id", "i", "cseq"):
                keep.append(line)
            elif name in ("to", "t"):
                keep.append(line + (f";tag={to_tag}" if to_tag and "tag=" not in line else ""))
        lines = [f"SIP/2.0 {status} {reason}", *keep, *headers,
                 f"Contact: <sip:{self.user}@{self.bind}:{self.port};transport="
                 f"{self.transport.lower()}>", f"Content-Length: {len(body)}"]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def header_of(message: bytes, name: str) -> str | None:
    """The first value of header ``name`` in a raw message."""
    for line in message.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def tag() -> str:
    return os.urandom(4).hex()


SDP = (b"v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
