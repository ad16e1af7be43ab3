"""A browser phone's SIP over WebSocket (RFC 7118), as SIP.js and JsSIP do it: one WS or
WSS connection, the HTTP upgrade offering the ``sip`` subprotocol, every message in a
masked frame, and a Via and Contact naming a made-up ``<random>.invalid`` host that no
one can reach: everything for it must come back over the connection."""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass, field

from rtp_phone import Media, build_sdp, parse_sdp
from sipua import UA, Reply, parse_reply
from streamua import StreamUA, header_of, tag

from cluster.sip import websocket as ws
from cluster.sip.websocket import frame, server_frames


@dataclass
class WsUA(StreamUA):
    """``cafile`` given: WSS trusting that certificate, else WS.  ``protocol``: what the
    upgrade offers in Sec-WebSocket-Protocol (None: no such header)."""

    path: str = "/"
    protocol: str | None = "sip"
    upgrade: bool = True  # False: connected only (a test sends its own upgrade)
    status: int = field(default=0, init=False)  # the upgrade's answer
    answer_head: bytes = field(default=b"", init=False)

    def __post_init__(self):
        raw = socket.create_connection(self.server, timeout=5, source_address=(self.bind, 0))
        if self.cafile:
            context = ssl.create_default_context(cafile=self.cafile)
            raw = context.wrap_socket(raw, server_hostname=self.server[0])
        self.sock = raw
        self.port = raw.getsockname()[1]
        self.transport = "WSS" if self.cafile else "WS"
        self.host = os.urandom(5).hex() + ".invalid"
        self.contact = f"<sip:{self.user}@{self.host};transport={self.transport.lower()}>"
        self.buffer = bytearray()
        self.pongs = 0
        self.close_frames: list[bytes] = []
        if self.upgrade:
            self.handshake()

    def handshake(self) -> int:
        key = "x3JJHMbDL1EzLkh9GBhXDw=="
        lines = [f"GET {self.path} HTTP/1.1", f"Host: {self.server[0]}:{self.server[1]}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", "Origin: https://phone.test"]
        if self.protocol is not None:
            lines.append(f"Sec-WebSocket-Protocol: {self.protocol}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.answer_head = head
        self.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        if self.status == 101:
            assert header_of(b"X\r\n" + head.split(b"\r\n", 1)[1],
                             "Sec-WebSocket-Accept") == ws.accept_key(key.encode()).decode()
        self.buffer += rest
        return self.status

    # ---------------------------------------------------------------- frames
    def send(self, data: bytes) -> None:
        self.last_sent = data
        self.sock.sendall(frame(ws.TEXT, data, mask=os.urandom(4)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ping(self, payload: bytes = b"ping") -> None:
        self.sock.sendall(frame(ws.PING, payload, mask=os.urandom(4)))

    def request(self, method: str, uri: str, headers: list[str], body: bytes = b"",
                branch: str | None = None, cseq: int | None = None) -> bytes:
        data = UA.request(self, method, uri, headers, body, branch, cseq)
        # SIP.js's Via: the transport, the .invalid host, no port, no rport.
        old = f"Via: SIP/2.0/UDP {self.bind}:{self.port};".encode()
        new = f"Via: SIP/2.0/{self.transport} {self.host};".encode()
        return data.replace(old, new, 1).replace(b";rport\r\n", b"\r\n", 1)

    def _read(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not self._take():
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                return False
            if not data:
                raise ConnectionError("closed by the server")
            self.buffer += data
            self._take()
        return True

    def _take(self) -> bool:
        took = False
        for opcode, payload in server_frames(self.buffer):
            took = True
            if opcode in (ws.TEXT, ws.BINARY):
                self.inbox.append(payload)
            elif opcode == ws.PONG:
                self.pongs += 1
            elif opcode == ws.CLOSE:
                self.close_frames.append(payload)
        return took

    # ---------------------------------------------------------------- SIP
    def register_digest(self, password: str) -> Reply | None:
        return self.register(password, contacts=[self.contact])

    def answer(self, request: bytes, status: int, reason: str, *, to_tag: str = "",
               headers: list[str] = (), body: bytes = b"") -> None:
        head = request.split(b"\r\n\r\n", 1)[0].decode()
        keep = []
        for line in head.split("\r\n")[1:]:
            name = line.split(":", 1)[0].strip().lower()
            if name in ("via", "v", "from", "f", "call-id", "i", "cseq"):
                keep.append(line)
            elif name in ("to", "t"):
                keep.append(line + (f";tag={to_tag}" if to_tag and "tag=" not in line else ""))
        lines = [f"SIP/2.0 {status} {reason}", *keep, *headers, f"Contact: {self.contact}",
                 f"Content-Length: {len(body)}"]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def invite(self, callee: str, password: str, body: bytes) -> Reply | None:
        """INVITE ``callee`` answering the 407; the final answer (ACKed when a failure).
        The dialog (``self.dialog``) is kept for ack() and bye()."""
        uri = f"sip:{callee}@{self.domain}"
        self.call_id = os.urandom(8).hex() + "@ws"
        headers = [f"Contact: {self.contact}", "Content-Type: application/sdp"]
        auth: list[str] = []
        for cseq in (1, 2):
            self.send(self._to(self.request("INVITE", uri, headers + auth, body, cseq=cseq),
                               uri))
            reply = self.receive(10)
            if reply is None:
                return None
            if reply.status == 407 and not auth:
                self.send(self._ack_for(reply, uri, cseq, failure=True))
                reply.headers = [("WWW-Authenticate" if k.lower() == "proxy-authenticate"
                                  else k, v) for k, v in reply.headers]
                auth = [f"Proxy-Authorization: "
                        f"{self.authorization(reply, 'INVITE', uri, password)}"]
                continue
            if reply.status >= 300:
                self.send(self._ack_for(reply, uri, cseq, failure=True))
            self.dialog = (uri, reply, cseq)
            return reply
        return None

    def ack(self) -> None:
        uri, ok, cseq = self.dialog
        self.send(self._ack_for(ok, ok.header("Contact").strip("<>").split(">")[0], cseq))

    def bye(self) -> Reply | None:
        uri, ok, cseq = self.dialog
        target = ok.header("Contact").strip("<>").split(">")[0]
        data = self.request("BYE", target, [], cseq=cseq + 1)
        self.send(data.replace(f"To: <sip:{self.user}@{self.domain}>".encode(),
                               b"To: " + ok.header("To").encode(), 1))
        return self.receive(5)

    def _to(self, data: bytes, uri: str) -> bytes:
        return data.replace(f"To: <sip:{self.user}@{self.domain}>".encode(),
                            f"To: <{uri}>".encode(), 1)

    def _ack_for(self, reply: Reply, uri: str, cseq: int, *, failure: bool = False) -> bytes:
        data = self.request("ACK", uri, [], cseq=cseq)
        if failure:  # the ACK of a failure is in the INVITE's transaction: its branch
            via = header_of(self.last_sent, "Via")
            data = data.replace(data.split(b"\r\n")[1], f"Via: {via}".encode(), 1)
        return data.replace(f"To: <sip:{self.user}@{self.domain}>".encode(),
                            b"To: " + reply.header("To").encode(), 1)


def ws_offer(media: Media) -> bytes:
    return build_sdp(media, codecs=(0,))


def take_media(media: Media, reply_or_body) -> None:
    """Send ``media`` where an SDP answer (a Reply's body, or a body) says."""
    body = reply_or_body.raw.split(b"\r\n\r\n", 1)[1] if isinstance(reply_or_body, Reply) \
        else reply_or_body
    sdp = parse_sdp(body)
    address = sdp.address()
    media.send_to((address, sdp.media[0].port), (address, sdp.rtcp_port()))
    media.start()


def answer_ws_call(ua: WsUA, media: Media, timeout: float = 10) -> tuple[bytes, bytes]:
    """Take an INVITE over the WebSocket: 180, 200 with our SDP, the ACK; start media.
    The INVITE and the ACK."""
    invite = ua.next_request("INVITE", timeout=timeout)
    assert invite is not None, "no INVITE over the WebSocket"
    to_tag = ua.answered_tag = tag()
    ua.answer(invite, 180, "Ringing", to_tag=to_tag)
    ua.answer(invite, 200, "OK", to_tag=to_tag, headers=["Content-Type: application/sdp"],
              body=ws_offer(media))
    ack = ua.next_request("ACK")
    assert ack is not None, "no ACK for the 200"
    take_media(media, invite.split(b"\r\n\r\n", 1)[1])
    return invite, ack


__all__ = ["WsUA", "answer_ws_call", "parse_reply", "take_media", "ws_offer"]
