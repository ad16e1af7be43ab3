"""Sans-IO SDP (RFC 4566) for a B2BUA that anchors media on a relay (RFC 3264).

A description keeps the lines it arrived with, each with its own ending (CRLF,
bare LF, or none on a last line): ``serialise(parse(body)) == body`` for every
body left unmodified.  Typed views are computed from the lines when asked.  The
dataclasses only read; ``rewrite``, ``set_direction`` and ``set_origin_version``
return a new description and replace only the lines they must, so codec lines,
telephone-event, ssrc and the rest pass through untouched and in order.

Errors.  A body that cannot be understood raises ``SipError(400, "Malformed
SDP: ...")``: an INVITE carrying it is answered 400, the request is broken.  A
well-formed body whose media the relay cannot carry (network type not IN,
address type not IP4/IP6) makes ``rewrite`` raise ``SipError(488, ...)``.
Once ``parse`` has succeeded, every view succeeds.

``parse`` checks: ``v=0`` first; one ``o=`` before the first ``m=``; every line
is ``<lowercase letter>=<value>``; the lines interpreted here (``o=``, ``c=``,
``m=``, ``a=rtcp:``) are well-formed; each stream with a non-zero port has a
``c=``; no NUL, no bare CR, no empty line but trailing ones (some UAs add one).
Missing ``s=``/``t=`` lines are tolerated, as deployed parsers do; so are odd
``a=rtpmap``/``a=fmtp`` lines, which the codec view skips: the relay does not
transcode, it passes them on.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.sip.errors import SipError

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_DIRECTION_OF_LINE = {f"a={d}".encode(): d for d in DIRECTIONS}
_HOLD_ADDRESSES = ("0.0.0.0", "::")
_BLANK_LINES = (b"\r\n", b"\n")
_MAX_DIGITS = 64  # numbers are 1*DIGIT; the bound keeps int() cheap on hostile input

# RFC 3551 static payload types, for formats offered without a=rtpmap.
_STATIC_ENCODINGS = {
    0: b"PCMU/8000", 3: b"GSM/8000", 4: b"G723/8000", 5: b"DVI4/8000", 6: b"DVI4/16000",
    7: b"LPC/8000", 8: b"PCMA/8000", 9: b"G722/8000", 10: b"L16/44100/2", 11: b"L16/44100",
    12: b"QCELP/8000", 13: b"CN/8000", 14: b"MPA/90000", 15: b"G728/8000", 16: b"DVI4/11025",
    17: b"DVI4/22050", 18: b"G729/8000", 25: b"CelB/90000", 26: b"JPEG/90000",
    28: b"nv/90000", 31: b"H261/90000", 32: b"MPV/90000", 33: b"MP2T/90000", 34: b"H263/90000",
}


@dataclass(frozen=True, slots=True)
class Origin:
    username: str
    sess_id: str
    sess_version: int
    nettype: str
    addrtype: str
    address: str


@dataclass(frozen=True, slots=True)
class Connection:
    nettype: str
    addrtype: str
    address: str  # without a multicast /ttl suffix

    @property
    def is_hold(self) -> bool:
        """The old (RFC 2543) way of putting a stream on hold, RFC 3264 section 8.4."""
        return self.address in _HOLD_ADDRESSES


@dataclass(frozen=True, slots=True)
class Rtcp:
    """``a=rtcp:`` (RFC 3605); ``connection`` is None when it names no address."""

    port: int
    connection: Connection | None


@dataclass(frozen=True, slots=True)
class Codec:
    pt: int
    name: str  # "" for a dynamic payload type without a=rtpmap
    clock: int  # 0 when not known
    channels: int | None
    fmtp: bytes | None


class _Level:
    """What a session level and a stream both say of themselves in their own lines."""

    lines: list[bytes]

    @property
    def connection(self) -> Connection | None:
        """This level's own ``c=`` (a stream without one uses the session's: see
        SessionDescription.effective_connection)."""
        line = _first_line(self.lines, b"c=")
        return None if line is None else _connection(line)

    @property
    def direction(self) -> str | None:
        """This level's own direction attribute, None when it has none (see
        effective_direction)."""
        return _direction(self.lines)


@dataclass
class MediaDescription(_Level):
    """An ``m=`` line (``lines[0]``) and the lines after it, up to the next ``m=``."""

    lines: list[bytes]

    def _fields(self) -> list[bytes]:
        return _media_fields(self.lines[0])

    @property
    def media(self) -> str:
        return _text(self._fields()[0])

    @property
    def port(self) -> int:
        return int(self._fields()[1].partition(b"/")[0])

    @property
    def port_count(self) -> int:
        return int(self._fields()[1].partition(b"/")[2] or 1)

    @property
    def proto(self) -> str:
        return _text(self._fields()[2])

    @property
    def formats(self) -> list[str]:
        return [_text(fmt) for fmt in self._fields()[3:]]

    @property
    def payload_types(self) -> list[int]:
        """The formats as RTP payload types; empty for a proto that is not RTP."""
        fields = self._fields()
        return [int(fmt) for fmt in fields[3:]] if b"RTP/" in fields[2] else []

    @property
    def rtcp_mux(self) -> bool:
        return any(_content(line) == b"a=rtcp-mux" for line in self.lines)

    @property
    def rtcp(self) -> Rtcp | None:
        line = _first_line(self.lines, b"a=rtcp:")
        return None if line is None else _rtcp(line)

    def codecs(self) -> list[Codec]:
        """One Codec per RTP payload type, in the order of the m= line."""
        encodings = _payload_attributes(self.lines, b"a=rtpmap:")
        fmtps = _payload_attributes(self.lines, b"a=fmtp:")
        codecs = []
        for pt in self.payload_types:
            encoding = encodings.get(pt) or _STATIC_ENCODINGS.get(pt, b"")
            name, _, rest = encoding.partition(b"/")
            clock, _, channels = rest.partition(b"/")
            codecs.append(Codec(pt, _text(name), _small_int(clock) or 0, _small_int(channels),
                                fmtps.get(pt)))
        return codecs


@dataclass
class SessionDescription(_Level):
    """The session-level lines (``v=`` up to the first ``m=``) and the streams."""

    lines: list[bytes]
    media: list[MediaDescription]

    @property
    def origin(self) -> Origin:
        fields = _origin_fields(_first_line(self.lines, b"o="))
        username, sess_id, version, nettype, addrtype, address = map(_text, fields)
        return Origin(username, sess_id, int(version), nettype, addrtype, address)

    def effective_connection(self, index: int) -> Connection | None:
        """The ``c=`` that applies to stream ``index``: its own, else the session's."""
        return self.media[index].connection or self.connection

    def effective_direction(self, index: int) -> str:
        """Media level overrides session level; sendrecv when neither says."""
        return self.media[index].direction or self.direction or "sendrecv"

    def is_hold(self, index: int) -> bool:
        """Stream ``index`` is on hold: sendonly or inactive, or c= 0.0.0.0 or ``::``."""
        if self.effective_direction(index) in ("sendonly", "inactive"):
            return True
        connection = self.effective_connection(index)
        return connection is not None and connection.is_hold

    def codecs(self) -> list[tuple[str, list[Codec]]]:
        """What is offered, per m= line: (media type, codecs)."""
        return [(media.media, media.codecs()) for media in self.media]


def first_audio_codec(body: bytes | None) -> str:
    """The first format of the first audio stream ("PCMA/8000", or its payload type when
    neither an rtpmap nor the static table names it); "" for no body or no SDP.  In an
    answer it is the codec in use (RFC 3264 6.1)."""
    if not body:
        return ""
    try:
        description = parse(body)
    except SipError:
        return ""
    for media, codecs in description.codecs():
        if media == "audio" and codecs:
            codec = codecs[0]
            name = codec.name or str(codec.pt)
            return f"{name}/{codec.clock}" if codec.clock else name
    return ""


# What the relay carries: it forwards each UDP datagram as it is, so RTP and RTCP, plain
# or SRTP keyed in the SDP (SDES), and T.38 over UDPTL.  DTLS-SRTP (UDP/TLS/RTP/SAVP(F),
# all a browser offers) would need ICE and the DTLS handshake at the relay; TCP media
# cannot be relayed at all.
RELAYABLE_PROTOS = frozenset({"RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF", "UDPTL"})


def unrelayable_protos(sd: SessionDescription) -> list[str]:
    """The transport protocols of the active streams (port not 0) the relay cannot
    carry, in order, without repeats."""
    found: list[str] = []
    for media in sd.media:
        proto = media.proto
        if media.port != 0 and proto.upper() not in RELAYABLE_PROTOS and proto not in found:
            found.append(proto)
    return found


def parse(body: bytes) -> SessionDescription:
    """Split an SDP body into lines, checking what this module relies on.

    Raises SipError(400, "Malformed SDP: ...") and nothing else.
    """
    if not body.startswith(b"v=0"):
        raise _malformed("it must start with v=0")
    if b"\0" in body:
        raise _malformed("NUL byte")
    if body.count(b"\r") != body.count(b"\r\n"):
        raise _malformed("CR without LF")
    lines = body.splitlines(keepends=True)
    if _content(lines[0]) != b"v=0":
        raise _malformed("it must start with v=0")
    session: list[bytes] = []
    media: list[MediaDescription] = []
    current = session
    origins = 0
    blank_seen = False
    for line in lines:
        kind = line[:2]
        if kind == b"a=":
            if line.startswith(b"a=rtcp:"):
                _rtcp(line)
        elif kind == b"m=":
            _media_fields(line)
            current = []
            media.append(MediaDescription(current))
        elif kind == b"c=":
            _connection_fields(line)
        elif kind == b"o=" and current is session:
            _origin_fields(line)
            origins += 1
        elif line in _BLANK_LINES:
            blank_seen = True
        elif line[1:2] != b"=" or not 0x61 <= line[0] <= 0x7A:
            raise _malformed(f"line {_content(line)[:24]!r} is not <type>=<value>")
        if blank_seen and line not in _BLANK_LINES:
            raise _malformed("empty line before the end")
        current.append(line)
    if origins != 1:
        raise _malformed("it needs exactly one o= line before the first m=")
    if _first_line(session, b"c=") is None:
        for number, stream in enumerate(media, 1):
            if stream.port != 0 and _first_line(stream.lines, b"c=") is None:
                raise _malformed(f"no c= line for m= line {number}")
    return SessionDescription(session, media)


def serialise(sd: SessionDescription) -> bytes:
    return b"".join(sd.lines) + b"".join(b"".join(media.lines) for media in sd.media)


def rewrite(
    sd: SessionDescription,
    *,
    address: str,
    ports: list[int | None],
    rtcp_ports: list[int | None] | None = None,
    bump_version: bool = True,
) -> SessionDescription:
    """Point every stream at the relay; returns a new description.

    Every ``c=`` (session and media level) becomes ``IN IP4|IP6 address`` (IP6
    when the address has a colon), except one saying 0.0.0.0 or ``::``: that
    stream was put on hold the old way and the far end must still see a hold,
    so the line stays.  Direction attributes are never touched.  ``ports[i]``
    replaces stream i's m= port; None leaves it, and a port 0 (rejected or
    disabled) stream always stays 0.  ``a=rtcp:`` gets ``rtcp_ports[i]``, else
    the new port + 1, and the relay address when it named one; ``a=rtcp-mux``
    is kept.  A caller that wants ``a=rtcp`` equal to the RTP port (RFC 5761
    mux) passes ``rtcp_ports``.  If the result differs from ``sd`` and
    ``bump_version`` is set, the o= sess-version goes up by one, as RFC 3264
    section 8 requires of a changed description.  Raises SipError(488) for
    media the relay cannot carry, ValueError for a bad address or port list.
    """
    if len(ports) != len(sd.media) or (rtcp_ports is not None and len(rtcp_ports) != len(ports)):
        raise ValueError("rewrite needs one port (or None) per m= line")
    if not address or any(char.isspace() for char in address):
        raise ValueError(f"not a relay address: {address!r}")
    if any(port is not None and not 0 < port < 65535 for port in [*ports, *(rtcp_ports or [])]):
        raise ValueError("relay ports must be within 1-65534")
    relay = Connection("IN", "IP6" if ":" in address else "IP4", address)
    streams = zip(sd.media, ports, rtcp_ports or [None] * len(ports), strict=True)
    result = SessionDescription(
        [_relay_connection(line, relay) for line in sd.lines],
        [_relay_media(media, relay, port, rtcp_port) for media, port, rtcp_port in streams],
    )
    if bump_version and result != sd:
        result = set_origin_version(result, sd.origin.sess_version + 1)
    return result


def set_direction(sd: SessionDescription, media_index: int, direction: str) -> SessionDescription:
    """Set stream ``media_index``'s own direction attribute: the existing one is
    replaced, else one is added after its last line.  The o= version is left to
    the caller (``set_origin_version``)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"not an SDP direction: {direction!r}")
    content = b"a=" + direction.encode()
    lines = sd.media[media_index].lines
    if _direction(lines) is None:
        lines = _append_line(lines, content, _ending(sd.lines[0]))
    else:
        lines = [_with_content(ln, content) if _content(ln) in _DIRECTION_OF_LINE else ln
                 for ln in lines]
    media = list(sd.media)
    media[media_index] = MediaDescription(lines)
    return SessionDescription(list(sd.lines), media)


def set_origin_version(sd: SessionDescription, version: int) -> SessionDescription:
    """Put ``version`` into the o= sess-version, e.g. a leg's own counter."""
    if version < 0:
        raise ValueError(f"sess-version cannot be negative: {version}")
    lines = []
    for line in sd.lines:
        if line.startswith(b"o="):
            fields = line[2:].split()
            fields[2] = str(version).encode()
            line = _with_content(line, b"o=" + b" ".join(fields))
        lines.append(line)
    return SessionDescription(lines, list(sd.media))


# Helpers.  A ``line`` always includes its ending; its content is the rest.


def _malformed(what: str) -> SipError:
    return SipError(400, f"Malformed SDP: {what}")


def _content(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")


def _with_content(line: bytes, content: bytes) -> bytes:
    """A replacement line that keeps the original's line ending."""
    return content + _ending(line)


def _ending(line: bytes) -> bytes:
    return line[len(_content(line)):]


def _append_line(lines: list[bytes], content: bytes, ending: bytes) -> list[bytes]:
    """Insert after the last non-empty line; ``ending`` is the body's usual one."""
    position = len(lines)
    while lines[position - 1] in _BLANK_LINES:
        position -= 1
    last = lines[position - 1]
    if _ending(last):
        added = [last, content + _ending(last)]
    else:  # the body ended without a line ending, and still does
        added = [last + ending, content]
    return lines[: position - 1] + added + lines[position:]


def _first_line(lines: list[bytes], prefix: bytes) -> bytes | None:
    return next((line for line in lines if line.startswith(prefix)), None)


def _text(field: bytes) -> str:
    return field.decode("utf-8", "replace")


def _number(field: bytes, what: str, maximum: int) -> int:
    if not field.isdigit() or len(field) > _MAX_DIGITS or int(field) > maximum:
        raise _malformed(f"bad {what} {field[:24]!r}")
    return int(field)


def _small_int(field: bytes) -> int | None:
    return int(field) if field.isdigit() and len(field) <= 9 else None


def _direction(lines: list[bytes]) -> str | None:
    directions = (_DIRECTION_OF_LINE.get(_content(line)) for line in lines)
    return next((d for d in directions if d is not None), None)


def _payload_attributes(lines: list[bytes], prefix: bytes) -> dict[int, bytes]:
    """``a=rtpmap:``/``a=fmtp:`` values by payload type; the first one wins."""
    values: dict[int, bytes] = {}
    for line in lines:
        if line.startswith(prefix):
            pt, _, value = _content(line)[len(prefix):].partition(b" ")
            if pt.isdigit() and len(pt) <= 3:
                values.setdefault(int(pt), value.strip())
    return values


def _origin_fields(line: bytes | None) -> list[bytes]:
    fields = [] if line is None else line[2:].split()
    if len(fields) != 6:
        raise _malformed("o= needs username sess-id sess-version nettype addrtype address")
    _number(fields[2], "o= sess-version", 10**_MAX_DIGITS)
    return fields


def _connection_fields(line: bytes) -> list[bytes]:
    fields = line[2:].split()
    if len(fields) != 3:
        raise _malformed(f"c= needs nettype addrtype address, got {_content(line)[:40]!r}")
    return fields


def _connection(line: bytes) -> Connection:
    nettype, addrtype, address = map(_text, _connection_fields(line))
    return Connection(nettype, addrtype, address.partition("/")[0])


def _media_fields(line: bytes) -> list[bytes]:
    """The fields of an m= line (RFC 4566 section 5.14), checked."""
    fields = line[2:].split()
    if len(fields) < 4:
        raise _malformed("m= needs media, port, proto and at least one format")
    port, slash, count = fields[1].partition(b"/")
    _number(port, "m= port", 65535)
    if slash:
        _number(count, "m= port count", 65535)
    if b"RTP/" in fields[2]:
        for fmt in fields[3:]:
            if not (fmt.isdigit() and len(fmt) <= 3 and int(fmt) <= 127):
                raise _malformed(f"bad RTP payload type {fmt[:24]!r}")
    return fields


def _rtcp(line: bytes) -> Rtcp:
    fields = line[7:].split()
    if len(fields) not in (1, 4):
        raise _malformed("a=rtcp: needs a port, optionally nettype addrtype address")
    port = _number(fields[0], "a=rtcp port", 65535)
    if len(fields) == 1:
        return Rtcp(port, None)
    nettype, addrtype, address = map(_text, fields[1:])
    return Rtcp(port, Connection(nettype, addrtype, address))


# Rewriting for the relay.


def _relay_connection(line: bytes, relay: Connection) -> bytes:
    if not line.startswith(b"c="):
        return line
    current = _connection(line)
    if current.is_hold:
        return line
    _check_relayable(current)
    return _with_content(line, f"c={relay.nettype} {relay.addrtype} {relay.address}".encode())


def _check_relayable(connection: Connection) -> None:
    if connection.nettype != "IN" or connection.addrtype not in ("IP4", "IP6"):
        raise SipError(488, f"SDP network {connection.nettype} {connection.addrtype} "
                            "cannot be relayed")


def _relay_media(media: MediaDescription, relay: Connection, port: int | None,
                 rtcp_port: int | None) -> MediaDescription:
    if media.port == 0:  # a rejected stream stays rejected (RFC 3264 section 6)
        port = rtcp_port = None
    if rtcp_port is None and port is not None:
        rtcp_port = port + 1
    lines = [_relay_port(media.lines[0], port)]
    for line in media.lines[1:]:
        if line.startswith(b"a=rtcp:"):
            line = _relay_rtcp(line, relay, rtcp_port)
        lines.append(_relay_connection(line, relay))
    return MediaDescription(lines)


def _relay_port(m_line: bytes, port: int | None) -> bytes:
    if port is None:
        return m_line
    fields = _media_fields(m_line)
    _, slash, count = fields[1].partition(b"/")
    fields[1] = str(port).encode() + slash + count
    return _with_content(m_line, b"m=" + b" ".join(fields))


def _relay_rtcp(line: bytes, relay: Connection, port: int | None) -> bytes:
    current = _rtcp(line)
    content = f"a=rtcp:{current.port if port is None else port}"
    if current.connection is not None:
        connection = current.connection
        if not connection.is_hold:
            _check_relayable(connection)
            connection = relay
        content += f" {connection.nettype} {connection.addrtype} {connection.address}"
    return _with_content(line, content.encode())
