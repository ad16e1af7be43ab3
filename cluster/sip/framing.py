"""SIP over a stream (TCP, TLS): bytes in, whole messages out (RFC 3261 section 18.3).

Sans-IO: the dispatcher feeds what it read from a connection and gets back the complete
messages, the keep-alive pings to answer, or a ``FramingError`` that closes the connection.

- A message ends after its headers' blank line plus ``Content-Length`` bytes of body.  On
  a stream the header is mandatory (18.3): without it the end of the message cannot be
  known, so it is a violation, as is a value that is not a number or two that differ.
- A double CRLF between messages is a keep-alive ping (RFC 5626 section 3.5.1), answered
  with a single CRLF (``PONG``).  A lone CRLF before a start line is ignored (RFC 3261
  7.5: implementations ignore CRLFs before the start line).
- ``max_header`` bounds the start line and headers (with their blank line), ``max_body``
  the Content-Length: past either the connection is closed, before the rest is read, so
  a peer cannot make the dispatcher buffer more than ``max_header + max_body`` bytes.

This module also writes the transport into the messages a worker sends over a stream
(``stamp``): the transport layer sets the Via's transport (18.1.1), and our Contact says
it, so the phone sends its in-dialog requests over the same kind of transport.
"""

from __future__ import annotations

from dataclasses import dataclass

PONG = b"\r\n"
PING = b"\r\n\r\n"


class FramingError(Exception):
    """The stream broke a rule: the connection is to be closed (the message says why)."""


@dataclass(frozen=True)
class Ping:
    """A CRLF keep-alive ping: answer with ``PONG``."""


class Framer:
    """Split one connection's bytes into SIP messages."""

    def __init__(self, max_header: int = 16384, max_body: int = 32768):
        self.max_header = max_header
        self.max_body = max_body
        self.buffer = bytearray()
        self._body_length: int | None = None  # of the message whose headers are read
        self._header_end = 0

    @property
    def partial(self) -> bool:
        """Whether part of a message is buffered (a keep-alive's first CRLF is not)."""
        return bool(self.buffer.strip(b"\r\n"))

    def feed(self, data: bytes) -> list[bytes | Ping]:
        """The messages (bytes) and pings ``data`` completes, in order.  FramingError
        when the stream breaks a rule; the framer is of no further use then."""
        self.buffer += data
        out: list[bytes | Ping] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def _next(self) -> bytes | Ping | None:
        buf = self.buffer
        if self._body_length is None:
            if buf[:2] == b"\r\n":
                if buf[:4] == PING:
                    del buf[:4]
                    return Ping()
                if len(buf) < 4 and PING.startswith(bytes(buf)):
                    return None  # maybe the start of a ping
                del buf[:2]  # a stray CRLF before a start line
                return self._next()
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_header:
                    raise FramingError(f"headers longer than {self.max_header} bytes")
                return None
            if end + 4 > self.max_header:
                raise FramingError(f"headers longer than {self.max_header} bytes")
            length = content_length(bytes(buf[:end]))
            if length > self.max_body:
                raise FramingError(f"Content-Length {length} over {self.max_body} bytes")
            self._header_end, self._body_length = end + 4, length
        total = self._header_end + self._body_length
        if len(buf) < total:
            return None
        message = bytes(buf[:total])
        del buf[:total]
        self._body_length = None
        return message


def content_length(head: bytes) -> int:
    """The Content-Length of a message's start line and headers (``l`` is its compact
    form, RFC 3261 7.3.3; folded values are not allowed for it).  FramingError when it
    is missing, not a number, or given twice with different values."""
    values = set()
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() in (b"content-length", b"l"):
            value = value.strip()
            if not value.isdigit() or len(value) > 10:
                raise FramingError("Content-Length is not a number")
            values.add(int(value))
    if not values:
        raise FramingError("no Content-Length (required on a stream)")
    if len(values) > 1:
        raise FramingError("two different Content-Length values")
    return values.pop()


def stamp(data: bytes, transport: str, address: str, udp_port: int, port: int) -> bytes:
    """``data`` as it leaves over a stream of ``transport`` ("TCP", "TLS", "WS", "WSS")
    whose listener has ``port``: our own top Via (a request's, ``SIP/2.0/UDP
    <address>:<udp_port>``) names the transport and that port, and our own Contact
    (``@<address>:<udp_port>>``) gets that port and ``;transport=tcp|tls|ws|wss``.
    Anything else (a response's Via, which is the phone's, a Contact of another party,
    the body) is left as it is."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return data
    head, rest = data[:head_end], data[head_end:]
    lines = head.split(b"\r\n")
    ours = b"%s:%d" % (address.encode(), udp_port)
    udp_via = b"SIP/2.0/UDP " + ours
    stream_via = b"SIP/2.0/%s %s:%d" % (transport.encode(), address.encode(), port)
    old_contact = b"@" + ours + b">"
    new_contact = b"@%s:%d;transport=%s>" % (address.encode(), port, transport.lower().encode())
    via_done = lines[0].startswith(b"SIP/2.0 ")  # a response's top Via is the phone's
    for i in range(1, len(lines)):
        name, colon, value = lines[i].partition(b":")
        key = name.strip().lower()
        if not via_done and key in (b"via", b"v"):
            via_done = True  # only the top Via can be ours
            stripped = value.strip()
            after = stripped[len(udp_via):len(udp_via) + 1]
            if stripped.startswith(udp_via) and not after.isdigit():
                lines[i] = name + b": " + stream_via + stripped[len(udp_via):]
        elif key in (b"contact", b"m") and old_contact in value:
            lines[i] = lines[i].replace(old_contact, new_contact, 1)
    return b"\r\n".join(lines) + rest
