"""The SIP ladder of a call: its traced messages as arrows between three columns,
caller | cluster | callee, in the order the cluster saw them (like sngrep, or the table at
the top of the seed's call-flow document).

The input is the call's trace (``trace:{tag}`` in Redis, see cluster/store/schema.py): entries
{"t", "dir", "leg", "peer", "first", "data"} where "dir" is seen from the cluster ("in":
it arrived, "out": the cluster sent it) and "leg" is "a" for the caller's leg and "b0",
"b1"... for the forks towards the callee's contacts.  Pure: no Redis, no clock.

    +0.000   |-------- INVITE (SDP) -------->|                              |  a 10.0.0.5:5060
    +0.001   |<----- 407 Proxy Authent ------|                              |  a 10.0.0.5:5060
    +0.030   |                               |-------- INVITE (SDP) ------->|  b0 10.0.0.9:5062
"""

from __future__ import annotations

from dataclasses import dataclass

from .escape import escape_controls
from .sip import sdp

LANE = 30  # characters between two column bars
TIME_WIDTH = 9
SDP_MARK = " (SDP)"


@dataclass(frozen=True)
class Arrow:
    """One message drawn: on the caller's or the callee's side of the cluster."""

    t: float
    side: str  # "caller" or "callee"
    to_cluster: bool  # the message arrived at the cluster (else the cluster sent it)
    label: str  # "INVITE", "200 OK", with " (SDP)" when it carries a session description
    leg: str
    peer: str  # "ip:port" of the phone or gateway on that leg
    retransmission: bool  # a byte-identical copy of an earlier message of the same leg
    data: bytes

    @property
    def rightwards(self) -> bool:
        """Drawn left to right: caller -> cluster, or cluster -> callee."""
        return self.to_cluster == (self.side == "caller")

    def to_json(self) -> dict:
        return {"t": self.t, "side": self.side,
                "direction": "to cluster" if self.to_cluster else "from cluster",
                "label": self.label, "leg": self.leg, "peer": self.peer,
                "retransmission": self.retransmission}


def arrows(entries: list[dict]) -> list[Arrow]:
    """The trace entries as arrows, in time order: two workers can append to one call's
    trace (a hang-up carried out on one, the answer arriving at the other), so the list
    order may lag the wire order by the time one write takes."""
    seen: set[tuple[str, str, bytes]] = set()
    out = []
    for entry in sorted(entries, key=lambda e: float(e.get("t", 0.0))):
        data = _bytes(entry.get("data", b""))
        leg = str(entry.get("leg", "?"))
        direction = str(entry.get("dir", "in"))
        key = (direction, leg, data)
        out.append(Arrow(
            t=float(entry.get("t", 0.0)), side=side_of(leg, data), to_cluster=direction == "in",
            label=label_of(str(entry.get("first", "")) or _first_line(data), data), leg=leg,
            peer=_peer(entry.get("peer")), retransmission=bool(data) and key in seen, data=data))
        seen.add(key)
    return out


def side_of(leg: str, data: bytes = b"") -> str:
    """B-legs face the callee; an entry whose leg was not known goes by its Call-ID."""
    if leg.startswith("b"):
        return "callee"
    if leg == "a":
        return "caller"
    return "callee" if _call_id(data).startswith(b"sc") else "caller"


def label_of(first_line: str, data: bytes = b"") -> str:
    """"INVITE" for a request, "180 Ringing" for a response; " (SDP)" when it has one."""
    parts = first_line.split(" ", 2)
    if first_line.startswith("SIP/2.0 ") and len(parts) >= 2:
        label = " ".join(parts[1:])
    else:
        label = parts[0] if parts else "?"
    return label + (SDP_MARK if _has_sdp(data) else "")


def draw(entries: list[dict], *, caller: str = "", callee: str = "", full: bool = False,
         lane: int = LANE) -> str:
    """The ladder as text; ``full`` prints every message under its arrow."""
    drawn = arrows(entries)
    lines = [_header(caller, callee, lane, drawn[0].t if drawn else None)]
    start = drawn[0].t if drawn else 0.0
    for arrow in drawn:
        lines.append(_row(arrow, start, lane))
        if full:
            lines.extend(_message_lines(arrow.data))
    if not drawn:
        lines.append("(no messages traced)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- drawing
def _header(caller: str, callee: str, lane: int, start: float | None) -> str:
    names = [f"caller {escape_controls(caller)}".strip(), "cluster",
             f"callee {escape_controls(callee)}".strip()]
    head = "".join(name[:lane].ljust(lane + 1) for name in names[:2]) + names[2]
    return "time".ljust(TIME_WIDTH) + head


def _row(arrow: Arrow, start: float, lane: int) -> str:
    drawn = _lane(escape_controls(arrow.label), arrow.rightwards, lane)
    empty = " " * lane
    left, right = (drawn, empty) if arrow.side == "caller" else (empty, drawn)
    offset = f"+{arrow.t - start:.3f}".ljust(TIME_WIDTH)
    note = f"  {escape_controls(arrow.leg)} {escape_controls(arrow.peer)}" + (
        "  retransmission" if arrow.retransmission else "")
    return f"{offset}|{left}|{right}|{note.rstrip()}"


def _lane(label: str, rightwards: bool, lane: int) -> str:
    """An arrow exactly ``lane`` characters wide with the label in its middle."""
    room = lane - 5  # the arrow head, a space each side, one dash at least each side
    if len(label) > room:
        keep = room - len(SDP_MARK) if label.endswith(SDP_MARK) else room
        label = label[:keep].rstrip() + (SDP_MARK if label.endswith(SDP_MARK) else "")
    body = f" {label} "
    dashes = lane - 1 - len(body)
    before, after = dashes // 2, dashes - dashes // 2
    if rightwards:
        return "-" * before + body + "-" * after + ">"
    return "<" + "-" * after + body + "-" * before


def _message_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    return [" " * TIME_WIDTH + "    " + escape_controls(line) for line in text.split("\n")] + [""]


# ------------------------------------------------------------------------------- reading
def _bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "replace")


def _first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("utf-8", "replace")


def _peer(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        host = str(value[0])
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    return "" if value is None else str(value)


def _head_and_body(data: bytes) -> tuple[bytes, bytes]:
    for blank in (b"\r\n\r\n", b"\n\n"):
        head, found, body = data.partition(blank)
        if found:
            return head, body
    return data, b""


def _header_value(head: bytes, names: tuple[bytes, ...]) -> bytes:
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() in names:
            return value.strip()
    return b""


def _call_id(data: bytes) -> bytes:
    return _header_value(_head_and_body(data)[0], (b"call-id", b"i"))


def _has_sdp(data: bytes) -> bool:
    head, body = _head_and_body(data)
    if not body.strip():
        return False
    content_type = _header_value(head, (b"content-type", b"c")).lower()
    return content_type.startswith(b"application/sdp")


# --------------------------------------------------------------------------- codec
CODEC_HEAD = 24  # trace entries read per call for its codec: the offer/answer are early


def codec_of(entries: list[dict]) -> str:
    """The call's audio codec: the first format of the answer the caller got, else of the
    caller's offer (RFC 3264: the answer's first format is the one in use)."""
    offer = answer = None
    for entry in entries:
        data = entry.get("data") or b""
        if entry.get("leg") != "a" or not isinstance(data, bytes):
            continue
        body = data.partition(b"\r\n\r\n")[2]
        if not body.strip():
            continue
        if entry.get("dir") == "out" and data.startswith(b"SIP/2.0 "):
            answer = body
        elif entry.get("dir") == "in" and offer is None:
            offer = body
    for body in (answer, offer):
        codec = sdp.first_audio_codec(body)
        if codec:
            return codec
    return ""
