"""SIP over WebSocket (RFC 7118) on RFC 6455: bytes in, SIP messages and replies out.

Sans-IO, like framing.py's ``Framer`` beside which it serves (cluster/streams.py): the
dispatcher feeds what it read from a WS or WSS connection and gets back, in order, the
SIP messages it completes (``bytes``, one per WebSocket message, RFC 7118 section 5) and
the bytes to send back (``Reply``: the handshake's answer, a pong, the close frame), and
``Ping`` for a message that is a double CRLF (RFC 5626 keep-alive, sent by SIP.js): the
caller answers it with a CRLF in a frame, as over TCP, and the connection is not idle.  A
``Reply`` with ``close`` set ends the connection once sent; ``close`` says why, for the
one log line.

A small framer of our own rather than wsproto: the server side of RFC 6455 that SIP needs
is ~250 lines, every limit is checked from a frame's header before its payload is
buffered (wsproto buffers a frame's payload whatever its announced length), a client's
frame rate is bounded here with the same clock, and the dispatcher takes no new
dependency (nor h11 with it).

The handshake (RFC 6455 section 4.2): a GET on ``path`` with ``Upgrade: websocket``,
``Connection: Upgrade``, a 16-byte ``Sec-WebSocket-Key``, ``Sec-WebSocket-Version: 13``
(else 426 naming it) and ``Sec-WebSocket-Protocol`` offering ``sip`` (RFC 7118 section
4: a client that does not offer it is answered 400 and the connection closed); the
answer is 101 with ``Sec-WebSocket-Protocol: sip``.  Other paths get 404.

Frames (section 5): every client frame must be masked (5.1); the RSV bits must be clear
(no extension is negotiated); control frames are whole and at most 125 bytes; a message
(data frame and continuations) of more than ``max_header + max_body`` bytes, or whose
head (up to the blank line) exceeds ``max_header``, closes the connection with 1009
before its payload is read; a text message must be UTF-8 (1007).  A ping is answered
with a pong carrying its payload; a close with the same close code, then the connection
ends.  More than ``frame_rate`` frames per second (a burst of twice that allowed) from
one connection closes it (1008): a flood of tiny frames costs the dispatcher a loop turn
each and nothing else does.  Outgoing messages (``message``) are unmasked text frames,
binary when the message is not UTF-8.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .framing import PING as PING_MESSAGE
from .framing import FramingError, Ping

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = b"sip"
# Opcodes
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Close codes (RFC 6455 section 7.4.1)
NORMAL, GOING_AWAY, PROTOCOL_ERROR, INVALID_DATA, POLICY, TOO_BIG = (
    1000, 1001, 1002, 1007, 1008, 1009)


class WebSocketError(FramingError):
    """A client broke RFC 6455 or a limit: close with ``code`` (the message says why)."""

    def __init__(self, why: str, code: int = PROTOCOL_ERROR):
        super().__init__(why)
        self.code = code


@dataclass(frozen=True)
class Reply:
    """Bytes for the client; ``close``: end the connection once sent, and why (``quiet``:
    an ordinary end, not worth a warning)."""

    data: bytes
    close: str | None = None
    quiet: bool = False


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frame(opcode: int, payload: bytes, *, mask: bytes | None = None) -> bytes:
    """One whole frame (FIN set); masked when ``mask`` (4 bytes: a client's) is given."""
    length = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, mask_bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, length)
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte key (RFC 6455 5.3), as one big integer: 25 MB/s in pure Python
    byte loops would be the dispatcher's bottleneck, this is ~1 GB/s."""
    if not payload:
        return b""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


def close_frame(code: int, why: str = "") -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + why.encode("utf-8", "replace")[:120])


def http_response(status: int, reason: str, headers: list[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    if status != 101:
        lines += ["Connection: close", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WebSocket:
    """One server-side connection: the handshake, then frames."""

    def __init__(self, path: str = "/", max_header: int = 16384, max_body: int = 32768,
                 frame_rate: float = 100.0, clock: Callable[[], float] | None = None):
        self.path = path
        self.max_header = max_header
        self.max_body = max_body
        self.max_message = max_header + max_body
        self.frame_rate = frame_rate
        self.clock = clock
        self.open = False  # the handshake is done
        self.closed = False
        self.buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self._fragment_size = 0
        self._tokens = 2 * frame_rate
        self._refilled: float | None = None
        self.frames = 0

    def goodbye(self, why: str) -> bytes | None:
        """The close frame (1001, going away) for a connection the server closes on its own
        (idle, shutting down), if it is open and no close was sent yet (RFC 6455 7.1.2)."""
        if not self.open or self.closed:
            return None
        self.closed = True
        return close_frame(GOING_AWAY, why)

    @property
    def partial(self) -> bool:
        """Whether the handshake is not done yet, or part of a frame or message is buffered."""
        return not self.open or bool(self.buffer) or bool(self._fragments)

    def feed(self, data: bytes) -> list[bytes | Reply | Ping]:
        if self.closed:
            return []
        self.buffer += data
        out: list[bytes | Reply] = []
        try:
            if not self.open:
                reply = self._handshake()
                if reply is None:
                    return out
                out.append(reply)
                if reply.close:
                    self.closed = True
                    return out
            while True:
                item = self._next_frame()
                if item is None:
                    return out
                if item:
                    out.append(item)
                if isinstance(item, Reply) and item.close:
                    self.closed = True
                    return out
        except WebSocketError as exc:
            self.closed = True
            out.append(Reply(close_frame(exc.code, str(exc)), close=str(exc)))
            return out

    def message(self, data: bytes) -> bytes:
        """A SIP message for the client: one unmasked frame, text when it is UTF-8."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return frame(BINARY, data)
        return frame(TEXT, data)

    # ---------------------------------------------------------------- handshake
    def _handshake(self) -> Reply | None:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.max_header:
                return Reply(http_response(400, "Bad Request"),
                             close=f"handshake longer than {self.max_header} bytes")
            return None
        if end + 4 > self.max_header:
            return Reply(http_response(400, "Bad Request"),
                         close=f"handshake longer than {self.max_header} bytes")
        head = bytes(buf[:end])
        del buf[:end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return Reply(http_response(400, "Bad Request"), close="not an HTTP request")
        method, target, _version = parts
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return Reply(http_response(400, "Bad Request"),
                             close="a malformed header in the handshake")
            headers.setdefault(name.lower(), []).append(value.strip())
        if method != b"GET":
            return Reply(http_response(405, "Method Not Allowed", [("Allow", "GET")]),
                         close=f"handshake method {method[:16]!r} is not GET")
        if target.partition(b"?")[0].decode("latin-1") != self.path:
            return Reply(http_response(404, "Not Found"),
                         close=f"handshake path {target[:64]!r} is not {self.path!r} "
                               "(streams.ws_path)")
        if b"websocket" not in _tokens(headers.get(b"upgrade", [])) or \
                b"upgrade" not in _tokens(headers.get(b"connection", [])):
            return Reply(http_response(400, "Bad Request"),
                         close="handshake without Upgrade: websocket")
        if _tokens(headers.get(b"sec-websocket-version", [])) != [b"13"]:
            return Reply(http_response(426, "Upgrade Required",
                                       [("Sec-WebSocket-Version", "13")]),
                         close="handshake without Sec-WebSocket-Version: 13")
        key = headers.get(b"sec-websocket-key", [])
        if len(key) != 1 or not _valid_key(key[0]):
            return Reply(http_response(400, "Bad Request"),
                         close="handshake without a valid Sec-WebSocket-Key")
        if SUBPROTOCOL not in _tokens(headers.get(b"sec-websocket-protocol", [])):
            return Reply(http_response(400, "Bad Request"),
                         close="handshake without Sec-WebSocket-Protocol: sip (RFC 7118)")
        self.open = True
        return Reply(http_response(101, "Switching Protocols", [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(key[0]).decode()),
            ("Sec-WebSocket-Protocol", "sip")]))

    # ---------------------------------------------------------------- frames
    def _next_frame(self) -> bytes | Reply | Ping | None | bool:
        """A message, a reply, a keep-alive, None (more bytes needed) or False (a frame
        that gives nothing to pass on: a continuation, a pong)."""
        buf = self.buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        fin, opcode = first & 0x80, first & 0x0F
        if first & 0x70:
            raise WebSocketError("a frame with RSV bits set (no extension was agreed)")
        if not second & 0x80:
            raise WebSocketError("an unmasked frame from the client (RFC 6455 5.1)")
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = struct.unpack_from("!H", buf, 2)[0]
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = struct.unpack_from("!Q", buf, 2)[0]
            offset = 10
        if opcode >= 0x8:
            if opcode not in (CLOSE, PING, PONG):
                raise WebSocketError(f"unknown control opcode {opcode:#x}")
            if not fin or length > 125:
                raise WebSocketError("a fragmented or long control frame")
        elif opcode not in (CONTINUATION, TEXT, BINARY):
            raise WebSocketError(f"unknown data opcode {opcode:#x}")
        elif opcode == CONTINUATION and not self._fragments and self._fragment_opcode == 0:
            raise WebSocketError("a continuation frame with no message begun")
        elif opcode != CONTINUATION and self._fragment_opcode:
            raise WebSocketError("a new message inside a fragmented one")
        elif self._fragment_size + length > self.max_message:
            raise WebSocketError(f"a message of more than {self.max_message} bytes "
                                 "(streams.max_header_bytes + max_body_bytes)", TOO_BIG)
        if len(buf) < offset + 4 + length:
            return None
        self._count_frame()
        mask = bytes(buf[offset:offset + 4])
        payload = apply_mask(bytes(buf[offset + 4:offset + 4 + length]), mask)
        del buf[:offset + 4 + length]
        if opcode == PING:
            return Reply(frame(PONG, payload))
        if opcode == PONG:
            return False
        if opcode == CLOSE:
            return self._closing(payload)
        if opcode != CONTINUATION:
            self._fragment_opcode = opcode
        self._fragments.append(payload)
        self._fragment_size += length
        if not fin:
            return False
        message = b"".join(self._fragments)
        kind = self._fragment_opcode
        self._fragments, self._fragment_opcode, self._fragment_size = [], 0, 0
        if kind == TEXT:
            try:
                message.decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketError("a text message that is not UTF-8", INVALID_DATA) from None
        head_end = message.find(b"\r\n\r\n")
        if (head_end < 0 and len(message) > self.max_header) or head_end + 4 > self.max_header:
            raise WebSocketError(f"headers longer than {self.max_header} bytes", TOO_BIG)
        if head_end >= 0 and len(message) - head_end - 4 > self.max_body:
            raise WebSocketError(f"a body of more than {self.max_body} bytes", TOO_BIG)
        if message == PING_MESSAGE:
            return Ping()  # RFC 5626's keep-alive as SIP.js sends it: answered with a CRLF
        if not message.strip(b"\r\n"):
            return False
        return message

    def _closing(self, payload: bytes) -> Reply:
        if len(payload) == 1:
            raise WebSocketError("a close frame with a one-byte body")
        code = struct.unpack("!H", payload[:2])[0] if payload else NORMAL
        return Reply(close_frame(code if payload else NORMAL),
                     close=f"closed by the peer (WebSocket close {code})", quiet=True)

    def _count_frame(self) -> None:
        self.frames += 1
        if self.clock is None:
            return
        now = self.clock()
        if self._refilled is not None:
            self._tokens = min(2 * self.frame_rate,
                               self._tokens + (now - self._refilled) * self.frame_rate)
        self._refilled = now
        self._tokens -= 1
        if self._tokens < 0:
            raise WebSocketError(f"more than {self.frame_rate:g} frames a second "
                                 "(streams.ws_frame_rate)", POLICY)


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip().lower() for v in values for t in v.split(b",") if t.strip()]


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def server_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """A client's reading of a server's frames (unmasked, not fragmented): (opcode,
    payload) of each whole frame in ``buffer``, taken out of it.  For test clients."""
    out = []
    while len(buffer) >= 2:
        length, offset = buffer[1] & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                break
            length, offset = struct.unpack_from("!H", buffer, 2)[0], 4
        elif length == 127:
            if len(buffer) < 10:
                break
            length, offset = struct.unpack_from("!Q", buffer, 2)[0], 10
        if len(buffer) < offset + length:
            break
        out.append((buffer[0] & 0x0F, bytes(buffer[offset:offset + length])))
        del buffer[:offset + length]
    return out
