"""A test phone: a SIP user agent for one call, with real RTP and RTCP sockets.

``Phone`` registers, places a call (answering the proxy's 407 with digest
credentials) or answers one, sends re-INVITEs and BYE, and answers what the
far end sends inside the dialog (re-INVITE, BYE, OPTIONS) on a reader thread.
``Media`` is its RTP endpoint: an RTP socket and an RTCP socket (one socket
with rtcp-mux) that send paced G.711 packets (160-byte payload every 20 ms,
an RTCP sender report every half second) and record every packet received
with its source address, so a test sees where media really came from.

The SIP and SDP code here is the test's own (it reuses only the digest
parameter parsing of sipua.py), so the cluster is checked against an
independent implementation.
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from sipua import challenge_params

PAYLOAD_BYTES = 160  # 20 ms of G.711 at 8 kHz
PACKET_INTERVAL = 0.020
RTCP_EVERY = 25  # packets between sender reports (0.5 s)
RTP_HEADER = struct.Struct("!BBHII")
RTCP_SR = struct.Struct("!BBHIIIIII")  # header, SSRC, NTP time, RTP time, packet and octet count
RTCP_TYPES = range(192, 224)  # RFC 5761 section 4: RTCP on a muxed port
CODECS = {0: ("PCMU/8000", None), 8: ("PCMA/8000", None), 18: ("G729/8000", "annexb=no"),
          101: ("telephone-event/8000", "0-16")}
# What a party answers to a direction it is offered (RFC 3264 section 6.1).
ANSWER_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly",
                    "inactive": "inactive"}


# ---------------------------------------------------------------------------- media
@dataclass(frozen=True)
class RtpPacket:
    seq: int
    timestamp: int
    ssrc: int
    payload_type: int
    size: int  # the whole datagram
    source: tuple[str, int]
    at: float  # monotonic


@dataclass(frozen=True)
class RtcpPacket:
    packet_type: int
    ssrc: int
    size: int
    source: tuple[str, int]
    at: float
    socket: str  # "rtp" (muxed) or "rtcp": the local socket it arrived on


class Media:
    """One audio stream's sockets, a paced sender and a recorder of what arrives."""

    def __init__(self, host: str = "127.0.0.1", *, rtcp_mux: bool = False,
                 payload_type: int = 0):
        self.host = host
        self.rtcp_mux = rtcp_mux
        self.payload_type = payload_type
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self.rtp, self.rtcp = _socket_pair(host, rtcp_mux)
        self.port = self.rtp.getsockname()[1]
        self.rtcp_port = self.port if rtcp_mux else self.rtcp.getsockname()[1]
        self.remote: tuple[str, int] | None = None
        self.remote_rtcp: tuple[str, int] | None = None
        self.sending = False
        self.sent = 0  # RTP packets
        self.first_seq: int | None = None  # of the first packet sent
        self.sent_bytes = 0
        self.rtcp_sent = 0
        self.send_errors = 0
        self.received: list[RtpPacket] = []
        self.rtcp_received: list[RtcpPacket] = []
        self._lock = threading.Lock()  # the record and the destination
        self._send_lock = threading.Lock()  # sequence numbers and send counts
        self._tick = 0
        self._closed = threading.Event()
        self._seq = int.from_bytes(os.urandom(2), "big") & 0x3FFF
        self._threads = [threading.Thread(target=self._send_loop, daemon=True),
                         threading.Thread(target=self._receive_loop, daemon=True)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------ control
    def send_to(self, rtp: tuple[str, int], rtcp: tuple[str, int]) -> None:
        with self._lock:
            self.remote, self.remote_rtcp = rtp, rtcp

    def start(self, immediately: bool = False) -> None:
        """Send from the next 20 ms tick on (``immediately``: one packet now, first)."""
        if immediately and not self.sending:
            self._send_one(self._tick * PAYLOAD_BYTES)
        self.sending = True

    def stop(self) -> None:
        self.sending = False

    def close(self) -> None:
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self.rtp.close()
        if self.rtcp is not self.rtp:
            self.rtcp.close()

    # ------------------------------------------------------------ reading the record
    def packets(self, since: float = 0.0) -> list[RtpPacket]:
        with self._lock:
            return [p for p in self.received if p.at >= since]

    def rtcp_packets(self, since: float = 0.0) -> list[RtcpPacket]:
        with self._lock:
            return [p for p in self.rtcp_received if p.at >= since]

    def wait_packets(self, count: int, timeout: float, since: float = 0.0) -> list[RtpPacket]:
        """Packets received since ``since`` once there are ``count`` of them (or the timeout)."""
        deadline = time.monotonic() + timeout
        while len(got := self.packets(since)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return got

    # ------------------------------------------------------------ threads
    def _send_loop(self) -> None:
        start = time.monotonic()
        ticks = 0
        while not self._closed.is_set():
            ticks += 1
            self._tick += 1  # the RTP clock runs on while the phone is silent
            due = start + ticks * PACKET_INTERVAL
            late = time.monotonic() - due
            if late > 0.2:  # the machine stalled: pace from now on rather than burst
                start, ticks = time.monotonic(), 0
            elif late < 0:
                time.sleep(-late)
            if self.sending:
                self._send_one(self._tick * PAYLOAD_BYTES)

    def _send_one(self, timestamp: int) -> None:
        with self._lock:
            remote, remote_rtcp = self.remote, self.remote_rtcp
        if remote is None:
            return
        with self._send_lock:
            self._send_packet(timestamp, remote, remote_rtcp)

    def _send_packet(self, timestamp: int, remote, remote_rtcp) -> None:
        packet = RTP_HEADER.pack(0x80, self.payload_type, self._seq & 0xFFFF,
                                 timestamp & 0xFFFFFFFF, self.ssrc) + b"\xd5" * PAYLOAD_BYTES
        try:
            self.rtp.sendto(packet, remote)
            if self.first_seq is None:
                self.first_seq = self._seq & 0xFFFF
            self._seq += 1
            self.sent += 1
            self.sent_bytes += len(packet)
            if self.sent % RTCP_EVERY == 0:
                self._send_report(timestamp, remote_rtcp)
        except OSError:
            self.send_errors += 1

    def _send_report(self, timestamp: int, remote_rtcp: tuple[str, int]) -> None:
        now = time.time() + 2_208_988_800  # NTP epoch
        report = RTCP_SR.pack(0x80, 200, 6, self.ssrc, int(now), int((now % 1) * 2**32),
                              timestamp & 0xFFFFFFFF, self.sent, self.sent * PAYLOAD_BYTES)
        self.rtcp.sendto(report, remote_rtcp)
        self.rtcp_sent += 1

    def _receive_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.rtp, selectors.EVENT_READ, "rtp")
        if self.rtcp is not self.rtp:
            selector.register(self.rtcp, selectors.EVENT_READ, "rtcp")
        try:
            while not self._closed.is_set():
                for key, _ in selector.select(timeout=0.05):
                    try:
                        data, source = key.fileobj.recvfrom(2048)
                    except OSError:
                        continue
                    self._record(data, source[:2], key.data, time.monotonic())
        finally:
            selector.close()

    def _record(self, data: bytes, source: tuple[str, int], on: str, at: float) -> None:
        if len(data) < 8:
            return
        if on == "rtcp" or data[1] in RTCP_TYPES:
            packet = RtcpPacket(data[1], int.from_bytes(data[4:8], "big"), len(data), source,
                                at, on)
            with self._lock:
                self.rtcp_received.append(packet)
            return
        if len(data) < RTP_HEADER.size:
            return
        _, marker_type, seq, timestamp, ssrc = RTP_HEADER.unpack_from(data)
        with self._lock:
            self.received.append(RtpPacket(seq, timestamp, ssrc, marker_type & 0x7F,
                                           len(data), source, at))


def _socket_pair(host: str, rtcp_mux: bool) -> tuple[socket.socket, socket.socket]:
    """An RTP socket on an even port and an RTCP socket on the next one, as phones bind
    them (the same socket twice with rtcp-mux)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        rtp = socket.socket(family, socket.SOCK_DGRAM)
        rtp.bind((host, 0))
        port = rtp.getsockname()[1]
        if rtcp_mux:
            return rtp, rtp
        if port % 2 == 0 and port < 65535:
            rtcp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                rtcp.bind((host, port + 1))
                return rtp, rtcp
            except OSError:
                rtcp.close()
        rtp.close()
    raise RuntimeError("no free even/odd port pair")


def in_order_without_loss(packets: list[RtpPacket]) -> bool:
    """Every packet the next sequence number of the one before it (one SSRC)."""
    return all(b.seq == (a.seq + 1) & 0xFFFF and b.ssrc == a.ssrc
               for a, b in zip(packets, packets[1:], strict=False))


# ---------------------------------------------------------------------------- SDP
@dataclass
class MediaLine:
    media: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None
    attributes: list[str]  # "rtpmap:0 PCMU/8000", "sendonly", ...

    def attribute(self, name: str) -> str | None:
        """The value of a=name:value ("" for a flag), None when absent."""
        for attr in self.attributes:
            key, _, value = attr.partition(":")
            if key == name:
                return value
        return None

    @property
    def direction(self) -> str:
        for name in ANSWER_DIRECTION:
            if self.attribute(name) is not None:
                return name
        return "sendrecv"


@dataclass
class Sdp:
    lines: list[str]
    connection: str | None
    origin_version: int
    media: list[MediaLine] = field(default_factory=list)

    def address(self, index: int = 0) -> str:
        return self.media[index].connection or self.connection or ""

    def rtcp_port(self, index: int = 0) -> int:
        """Where the party receives RTCP: a=rtcp, else the RTP port (mux) or the next one."""
        line = self.media[index]
        if (rtcp := line.attribute("rtcp")) is not None:
            return int(rtcp.split()[0])
        return line.port if line.attribute("rtcp-mux") is not None else line.port + 1


def parse_sdp(body: bytes | str) -> Sdp:
    text = body.decode() if isinstance(body, bytes) else body
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    sdp = Sdp(lines, None, 0)
    for line in lines:
        kind, _, value = line.partition("=")
        if kind == "o":
            sdp.origin_version = int(value.split()[2])
        elif kind == "m":
            media, port, proto, *formats = value.split()
            sdp.media.append(MediaLine(media, int(port.split("/")[0]), proto, formats, None, []))
        elif kind == "c":
            address = value.split()[2]
            if sdp.media:
                sdp.media[-1].connection = address
            else:
                sdp.connection = address
        elif kind == "a" and sdp.media:
            sdp.media[-1].attributes.append(value)
    return sdp


def build_sdp(media: Media, *, codecs=(0, 8, 101), direction: str = "sendrecv",
              version: int = 1, session_id: int = 0, announce_rtcp: bool = True) -> bytes:
    ip = "IP6" if ":" in media.host else "IP4"
    lines = ["v=0", f"o=- {session_id} {version} IN {ip} {media.host}", "s=rtp_phone",
             f"c=IN {ip} {media.host}", "t=0 0",
             f"m=audio {media.port} RTP/AVP {' '.join(map(str, codecs))}"]
    for pt in codecs:
        name, fmtp = CODECS[pt]
        lines.append(f"a=rtpmap:{pt} {name}")
        if fmtp:
            lines.append(f"a=fmtp:{pt} {fmtp}")
    lines.append("a=ptime:20")
    if announce_rtcp:
        lines.append(f"a=rtcp:{media.rtcp_port}")
    if media.rtcp_mux:
        lines.append("a=rtcp-mux")
    lines.append(f"a={direction}")
    return ("\r\n".join(lines) + "\r\n").encode()


# ---------------------------------------------------------------------------- SIP
@dataclass
class SipMessage:
    first_line: str
    headers: list[tuple[str, str]]
    body: bytes
    source: tuple[str, int]
    at: float = 0.0

    @property
    def is_response(self) -> bool:
        return self.first_line.startswith("SIP/2.0 ")

    @property
    def status(self) -> int:
        return int(self.first_line.split()[1]) if self.is_response else 0

    @property
    def method(self) -> str:
        if self.is_response:
            return self.header("CSeq").split()[-1]
        return self.first_line.split()[0]

    @property
    def cseq(self) -> int:
        return int(self.header("CSeq").split()[0])

    @property
    def call_id(self) -> str:
        return self.header("Call-ID")

    def header(self, name: str, default: str = "") -> str:
        values = self.all(name)
        return values[0] if values else default

    def all(self, name: str) -> list[str]:
        names = {name.lower(), _COMPACT.get(name.lower(), name.lower())}
        return [v for k, v in self.headers if k.lower() in names]

    @property
    def sdp(self) -> Sdp | None:
        return parse_sdp(self.body) if self.body.strip() else None


_COMPACT = {"call-id": "i", "from": "f", "to": "t", "via": "v", "contact": "m",
            "content-type": "c", "content-length": "l"}


def parse_message(data: bytes, source: tuple[str, int]) -> SipMessage:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # a folded line continues the header before
            headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return SipMessage(lines[0], headers, body, source, time.monotonic())


def uri_address(uri: str) -> tuple[str, int]:
    """host and port of a sip: URI (in angle brackets or not)."""
    match = re.search(r"sip:(?:[^@;>]*@)?(\[[^\]]+\]|[^:;>]+)(?::(\d+))?", uri)
    return match.group(1).strip("[]"), int(match.group(2) or 5060)


def _tag(value: str) -> str | None:
    match = re.search(r";\s*tag=([^;>\s]+)", value)
    return match.group(1) if match else None


def _digest(challenge: str, method: str, uri: str, user: str, password: str) -> str:
    params = challenge_params(challenge)
    realm, nonce = params["realm"], params["nonce"]
    algorithm = params.get("algorithm", "MD5").upper()
    digest = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}[algorithm]

    def h(text: str) -> str:
        return digest(text.encode()).hexdigest()

    ha1, ha2 = h(f"{user}:{realm}:{password}"), h(f"{method}:{uri}")
    cnonce = os.urandom(8).hex()
    response = h(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm={algorithm}, cnonce="{cnonce}", nc=00000001, '
            f'qop=auth')


class Phone:
    """A SIP phone for one call, with one audio stream (``media``).

    ``codecs`` are the payload types it offers or answers with; ``announce_rtcp``
    adds a=rtcp to its SDP; ``host`` is the address it binds (SIP and media) and
    names in its Via and Contact; ``respond_to_source`` sends its responses to where the
    request came from instead of its Via (as phones and NAT helpers behind NAT often do).
    Everything it receives is kept in ``messages``.
    """

    def __init__(self, server: tuple[str, int], user: str, password: str, *,
                 domain: str = "127.0.0.1", media: Media | None = None,
                 codecs=(0, 8, 101), announce_rtcp: bool = True, host: str = "127.0.0.1",
                 respond_to_source: bool = False):
        self.server = server
        self.host = host
        self.respond_to_source = respond_to_source
        self.user = user
        self.password = password
        self.domain = domain
        self.media = media or Media(host)
        self.codecs = tuple(codecs)
        self.announce_rtcp = announce_rtcp
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.contact = f"<sip:{user}@{host}:{self.port}>"
        self.messages: list[SipMessage] = []  # everything received, in order
        self.sdp_version = 1
        self.session_id = int.from_bytes(os.urandom(4), "big")
        self.remote_sdp: Sdp | None = None  # the last SDP the far end sent
        self.sent_sdp: list[bytes] = []  # every SDP body we sent, offers and answers
        # dialog
        self.call_id = ""
        self.local_tag = os.urandom(4).hex()
        self.local_uri = f"<sip:{user}@{domain}>"
        self.remote_uri = ""
        self.remote_tag = ""
        self.remote_target = ""
        self.cseq = 0
        self._answered: dict[tuple[str, int, str], bytes] = {}  # request -> our response
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    def __enter__(self) -> Phone:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._reader.join(timeout=2)
        self.sock.close()
        self.media.close()

    # ------------------------------------------------------------ registration
    def register(self, expires: int = 300) -> int:
        call_id = os.urandom(8).hex() + "@rtp-phone"
        uri = f"sip:{self.domain}"
        auth = []
        for cseq in (1, 2):
            since = time.monotonic()
            self._send_request("REGISTER", uri, call_id, cseq, self.local_uri, self.local_uri,
                               [f"Contact: {self.contact}", f"Expires: {expires}", *auth],
                               dest=self.server)
            reply = self.wait_response(call_id, cseq, since=since)
            if reply is None:
                raise AssertionError(f"{self.user}: no answer to REGISTER")
            if reply.status != 401 or auth:
                return reply.status
            credentials = _digest(reply.header("WWW-Authenticate"), "REGISTER", uri, self.user,
                                  self.password)
            auth = [f"Authorization: {credentials}"]
        return 0

    # ------------------------------------------------------------ calling
    def offer(self, direction: str = "sendrecv") -> bytes:
        self.sdp_version += 1
        body = build_sdp(self.media, codecs=self.codecs, direction=direction,
                         version=self.sdp_version, session_id=self.session_id,
                         announce_rtcp=self.announce_rtcp)
        self.sent_sdp.append(body)
        return body

    def call(self, callee: str, timeout: float = 5.0) -> SipMessage:
        """INVITE ``callee`` (answering a 407), ACK the 200 and start sending media to it."""
        self.call_id = os.urandom(8).hex() + "@rtp-phone"
        uri = f"sip:{callee}@{self.domain}"
        self.remote_uri = f"<{uri}>"
        body = self.offer()
        auth: list[str] = []
        for _ in range(2):
            self.cseq += 1
            since = time.monotonic()
            branch = self._send_request("INVITE", uri, self.call_id, self.cseq,
                                        self._from(), self.remote_uri,
                                        [f"Contact: {self.contact}", *auth], body,
                                        dest=self.server)
            reply = self.wait_response(self.call_id, self.cseq, timeout, since=since)
            if reply is None:
                raise AssertionError(f"{self.user}: no final answer to INVITE")
            if reply.status == 407 and not auth:
                self._ack_failure(uri, reply, branch)
                challenge = reply.header("Proxy-Authenticate")
                auth = [f"Proxy-Authorization: "
                        f"{_digest(challenge, 'INVITE', uri, self.user, self.password)}"]
                continue
            break
        if not 200 <= reply.status < 300:
            raise AssertionError(f"{self.user}: call failed: {reply.first_line}")
        self.remote_tag = _tag(reply.header("To"))
        self.remote_target = reply.header("Contact").strip("<>").split(">")[0]
        self._send_ack(self.cseq)
        self._use_remote(reply.sdp)
        return reply

    def reinvite(self, direction: str, timeout: float = 5.0) -> SipMessage:
        """A re-INVITE with our SDP in ``direction``; ACKs the 200 and follows its SDP."""
        self.cseq += 1
        since = time.monotonic()
        self._send_in_dialog("INVITE", [f"Contact: {self.contact}"], self.offer(direction))
        reply = self.wait_response(self.call_id, self.cseq, timeout, since=since)
        if reply is None or not 200 <= reply.status < 300:
            raise AssertionError(f"{self.user}: re-INVITE failed: {reply and reply.first_line}")
        self._send_ack(self.cseq)
        self._use_remote(reply.sdp)
        return reply

    def hangup(self, timeout: float = 5.0) -> SipMessage | None:
        self.media.stop()
        self.cseq += 1
        since = time.monotonic()
        self._send_in_dialog("BYE", [])
        return self.wait_response(self.call_id, self.cseq, timeout, since=since)

    # ------------------------------------------------------------ being called
    def wait_call(self, timeout: float = 5.0) -> SipMessage:
        invite = self.wait_request("INVITE", timeout)
        if invite is None:
            raise AssertionError(f"{self.user}: no INVITE arrived")
        return invite

    def answer(self, invite: SipMessage, timeout: float = 5.0, *,
               media_from: str = "ack") -> SipMessage:
        """200 OK with our SDP (codecs: ours that the offer has), wait for the ACK.

        Media starts when the ACK arrives (``media_from="ack"``), or with a first packet
        sent the moment the 200 has left (``"answer"``, as RFC 3264 allows an answerer)."""
        self.call_id = invite.call_id
        self.remote_uri = invite.header("From")
        self.remote_tag = _tag(self.remote_uri)
        self.remote_target = invite.header("Contact").strip("<>").split(">")[0]
        self.local_uri = invite.header("To")
        self.cseq = 0
        offer = invite.sdp
        since = time.monotonic()
        self._respond(invite, 200, "OK", self._answer_sdp(offer))
        if media_from == "answer":
            self._use_remote(offer, immediately=True)
        ack = self.wait_request("ACK", timeout, since=since)
        if ack is None:
            raise AssertionError(f"{self.user}: no ACK for the 200")
        if media_from == "ack":
            self._use_remote(offer)
        return ack

    def _answer_sdp(self, offer: Sdp) -> bytes:
        offered = offer.media[0]
        codecs = [pt for pt in self.codecs if str(pt) in offered.formats]
        self.sdp_version += 1
        body = build_sdp(self.media, codecs=codecs,
                         direction=ANSWER_DIRECTION[offered.direction],
                         version=self.sdp_version, session_id=self.session_id,
                         announce_rtcp=self.announce_rtcp)
        self.sent_sdp.append(body)
        return body

    # ------------------------------------------------------------ waiting
    def wait_response(self, call_id: str, cseq: int, timeout: float = 5.0,
                      since: float = 0.0) -> SipMessage | None:
        """The final response to request ``cseq`` of ``call_id``."""
        return self._wait(lambda m: m.is_response and m.call_id == call_id
                          and m.cseq == cseq and m.status >= 200 and m.at >= since, timeout)

    def wait_request(self, method: str, timeout: float = 5.0,
                     since: float = 0.0) -> SipMessage | None:
        return self._wait(lambda m: not m.is_response and m.method == method and m.at >= since,
                          timeout)

    def requests(self, method: str) -> list[SipMessage]:
        with self._cond:
            return [m for m in self.messages if not m.is_response and m.method == method]

    def _wait(self, match, timeout: float) -> SipMessage | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if match(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    # ------------------------------------------------------------ the reader thread
    def _read_loop(self) -> None:
        self.sock.settimeout(0.05)
        while not self._closed:
            try:
                data, source = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if not data.strip():
                continue  # keep-alive
            message = parse_message(data, source[:2])
            if message.is_response:
                self._on_response(message)
            else:
                self._on_request(message)

    def _on_response(self, message: SipMessage) -> None:
        if message.method == "INVITE" and 200 <= message.status < 300 and self._seen(message):
            self._send_ack(message.cseq)  # our ACK was lost: the 200 is retransmitted
            return
        self._keep(message)

    def _seen(self, response: SipMessage) -> bool:
        with self._cond:
            return any(m.is_response and m.call_id == response.call_id
                       and m.cseq == response.cseq and m.status == response.status
                       for m in self.messages)

    def _on_request(self, request: SipMessage) -> None:
        key = (request.call_id, request.cseq, request.method)
        if request.method != "ACK" and key in self._answered:
            self.sock.sendto(self._answered[key], self._response_address(request))  # again
            return
        self._keep(request)
        if request.method == "INVITE" and _tag(request.header("To")):
            self._on_reinvite(request)
        elif request.method == "BYE":
            self.media.stop()
            self._respond(request, 200, "OK")
        elif request.method in ("OPTIONS", "UPDATE", "INFO", "NOTIFY"):
            self._respond(request, 200, "OK")

    def _on_reinvite(self, request: SipMessage) -> None:
        offer = request.sdp
        if offer is None:
            self._respond(request, 200, "OK", self.offer())
            return
        self._use_remote(offer)
        self._respond(request, 200, "OK", self._answer_sdp(offer))

    def _keep(self, message: SipMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def _use_remote(self, sdp: Sdp | None, immediately: bool = False) -> None:
        """Send media where the far end's SDP says, if its direction lets us send
        (``immediately``: the first packet now, not at the next tick)."""
        if sdp is None:
            return
        self.remote_sdp = sdp
        address = sdp.address()
        self.media.send_to((address, sdp.media[0].port), (address, sdp.rtcp_port()))
        if sdp.media[0].direction in ("sendrecv", "recvonly") and address not in ("0.0.0.0", "::"):
            self.media.start(immediately)
        else:
            self.media.stop()

    # ------------------------------------------------------------ sending
    def _from(self) -> str:
        return f"{self.local_uri};tag={self.local_tag}"

    def _send_request(self, method: str, uri: str, call_id: str, cseq: int, from_: str,
                      to: str, headers: list[str], body: bytes = b"", *,
                      dest: tuple[str, int], branch: str | None = None) -> str:
        branch = branch or "z9hG4bK" + os.urandom(6).hex()
        lines = [f"{method} {uri} SIP/2.0",
                 f"Via: SIP/2.0/UDP {self.host}:{self.port};branch={branch};rport",
                 "Max-Forwards: 70", f"From: {from_}", f"To: {to}", f"Call-ID: {call_id}",
                 f"CSeq: {cseq} {method}", *headers, "User-Agent: rtp_phone"]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode() + body, dest)
        return branch

    def _send_in_dialog(self, method: str, headers: list[str], body: bytes = b"",
                        cseq: int | None = None) -> None:
        to = self.remote_uri
        if not _tag(to):
            to += f";tag={self.remote_tag}"
        from_ = self.local_uri if _tag(self.local_uri) else self._from()
        self._send_request(method, self.remote_target, self.call_id,
                           self.cseq if cseq is None else cseq, from_, to, headers, body,
                           dest=uri_address(self.remote_target))

    def _send_ack(self, cseq: int) -> None:
        self._send_in_dialog("ACK", [], cseq=cseq)

    def _ack_failure(self, uri: str, reply: SipMessage, branch: str) -> None:
        """ACK for a non-2xx final response: same branch, the To of the response."""
        self._send_request("ACK", uri, self.call_id, reply.cseq, self._from(), reply.header("To"),
                           [], dest=self.server, branch=branch)

    def _respond(self, request: SipMessage, status: int, reason: str, body: bytes = b"") -> None:
        to = request.header("To")
        if not _tag(to):
            to += f";tag={self.local_tag}"
        lines = [f"SIP/2.0 {status} {reason}", *(f"Via: {v}" for v in request.all("Via")),
                 f"From: {request.header('From')}", f"To: {to}",
                 f"Call-ID: {request.call_id}", f"CSeq: {request.header('CSeq')}",
                 f"Contact: {self.contact}", "User-Agent: rtp_phone"]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self._answered[(request.call_id, request.cseq, request.method)] = data
        self.sock.sendto(data, self._response_address(request))

    def _response_address(self, request: SipMessage) -> tuple[str, int]:
        return request.source if self.respond_to_source else self._via_address(request)

    @staticmethod
    def _via_address(request: SipMessage) -> tuple[str, int]:
        """Where a response goes: the top Via's received/rport, else its sent-by, else the
        source (RFC 3261 18.2.2, RFC 3581)."""
        via = request.header("Via")
        match = re.match(r"SIP/2\.0/UDP\s+(\[[^\]]+\]|[^:;\s]+)(?::(\d+))?", via, re.I)
        if match is None:
            return request.source
        host, port = match.group(1).strip("[]"), int(match.group(2) or 5060)
        if (received := re.search(r";\s*received=([^;\s]+)", via)) is not None:
            host = received.group(1)
        if (rport := re.search(r";\s*rport=(\d+)", via)) is not None:
            port = int(rport.group(1))
        return host, port


@dataclass
class Call:
    """Two test phones in an answered call through the cluster."""

    caller: Phone
    callee: Phone
    invite: SipMessage  # as the callee received it
    ok: SipMessage  # the 200 as the caller received it
    tag: str  # the cluster's call tag: the relay session id

    @property
    def caller_relay_port(self) -> int:
        """The relay port the caller sends to and receives from."""
        return self.ok.sdp.media[0].port

    @property
    def callee_relay_port(self) -> int:
        return self.invite.sdp.media[0].port
