"""A small SIP user agent for tests: raw UDP, its own digest arithmetic.

It deliberately does not use the cluster's digest code, so a test that
registers through it checks the server against an independent client (this
is also the SHA-256 client: SIPp 3.6 only does MD5).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from dataclasses import dataclass, field

_HASH = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def _h(alg: str, text: str) -> str:
    return _HASH[alg](text.encode()).hexdigest()


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_reply(data: bytes) -> Reply:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = head.split("\r\n")
    _, status, reason = (lines[0].split(" ", 2) + [""])[:3]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return Reply(int(status), reason, headers, data)


def challenge_params(value: str) -> dict[str, str]:
    return {k.lower(): v.strip('"') for k, v in
            re.findall(r'([A-Za-z-]+)=("[^"]*"|[^,\s]+)', value)}


@dataclass
class UA:
    server: tuple[str, int]
    user: str = "1002"
    domain: str = "127.0.0.1"
    auth_user: str | None = None  # the digest username, when it is not the To/From user
    bind: str = "127.0.0.1"  # any 127.0.0.0/8 address: another source address on lo
    sock: socket.socket = field(init=False)
    cseq: int = 1
    call_id: str = field(default_factory=lambda: os.urandom(8).hex() + "@test")

    def __post_init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.bind, 0))
        self.port = self.sock.getsockname()[1]

    def __enter__(self) -> UA:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    # ---------------------------------------------------------------- raw
    def send(self, data: bytes) -> None:
        self.last_sent = data  # so a test can retransmit the very same bytes
        self.sock.sendto(data, self.server)

    def datagram(self, deadline: float) -> bytes | None:
        """The next datagram to arrive before ``deadline`` (time.monotonic()), or None."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        self.sock.settimeout(left)
        try:
            data, _ = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        return data

    def receive(self, timeout: float = 2.0) -> Reply | None:
        deadline = time.monotonic() + timeout
        while True:
            data = self.datagram(deadline)
            if data is None:
                return None
            if data.startswith(b"SIP/2.0 "):
                reply = parse_reply(data)
                if reply.status >= 200 or not getattr(self, "skip_provisional", True):
                    return reply

    def request(self, method: str, uri: str, headers: list[str], body: bytes = b"",
                branch: str | None = None, cseq: int | None = None) -> bytes:
        branch = branch or "z9hG4bK" + os.urandom(6).hex()
        cseq = self.cseq if cseq is None else cseq
        lines = [f"{method} {uri} SIP/2.0",
                 f"Via: SIP/2.0/UDP {self.bind}:{self.port};branch={branch};rport",
                 "Max-Forwards: 70",
                 f"From: <sip:{self.user}@{self.domain}>;tag={self.call_id[:8]}",
                 f"To: <sip:{self.user}@{self.domain}>",
                 f"Call-ID: {self.call_id}",
                 f"CSeq: {cseq} {method}",
                 *headers,
                 f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    # ---------------------------------------------------------------- requests
    def options(self, timeout: float = 2.0) -> Reply | None:
        self.send(self.request("OPTIONS", f"sip:{self.domain}", []))
        self.cseq += 1
        return self.receive(timeout)

    def register(self, password: str | None, *, contacts: list[str] | None = None,
                 expires: int | None = 3600, algorithm: str | None = None,
                 challenge: Reply | None = None, extra: list[str] = (),
                 nc: int = 1) -> Reply | None:
        """REGISTER, answering one 401 (with ``algorithm``'s challenge) when a password is given."""
        contacts = [f"<sip:{self.user}@127.0.0.1:{self.port}>"] if contacts is None else contacts
        headers = [f"Contact: {c}" for c in contacts] + list(extra)
        if expires is not None:
            headers.append(f"Expires: {expires}")
        uri = f"sip:{self.domain}"
        if challenge is None:
            self.send(self.request("REGISTER", uri, headers))
            self.cseq += 1
            reply = self.receive()
            if reply is None or reply.status != 401 or password is None:
                return reply
            challenge = reply
        self.last_challenge = challenge
        auth = self.authorization(challenge, "REGISTER", uri, password, algorithm, nc)
        self.last_authorization = auth
        self.send(self.request("REGISTER", uri, headers + [f"Authorization: {auth}"]))
        self.cseq += 1
        return self.receive()

    def authorization(self, challenge: Reply, method: str, uri: str, password: str,
                      algorithm: str | None = None, nc: int = 1, qop: bool = True) -> str:
        """Credentials for ``challenge``; ``qop=False`` answers the RFC 2069 way (no qop,
        cnonce or nonce-count), as old clients do."""
        offers = [challenge_params(v) for v in challenge.all("WWW-Authenticate")]
        if algorithm is not None:
            offers = [o for o in offers if o.get("algorithm", "MD5").upper() == algorithm]
        params = offers[0]
        alg = params.get("algorithm", "MD5").upper()
        realm, nonce = params["realm"], params["nonce"]
        user = self.auth_user or self.user
        ha1 = _h(alg, f"{user}:{realm}:{password}")
        ha2 = _h(alg, f"{method}:{uri}")
        head = (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", '
                f'uri="{uri}", ')
        if not qop:
            return head + f'response="{_h(alg, f"{ha1}:{nonce}:{ha2}")}", algorithm={alg}'
        cnonce = os.urandom(8).hex()
        response = _h(alg, f"{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}")
        return head + (f'response="{response}", algorithm={alg}, cnonce="{cnonce}", '
                       f"nc={nc:08x}, qop=auth")
