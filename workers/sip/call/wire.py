"""What a call needs besides its state: its settings and inputs (Settings, Ctx, Target),
the Q.850 causes it reports, and the small builders of what it puts on the wire."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.sip.ids import ALLOW, Ids, host_part, via
from cluster.sip.message import Request, Response
from cluster.sip.transaction import TimerConfig

from .media import PASS_THROUGH, Answers, PassThrough

# Q.850 causes (name, number) used in Reason headers and CDRs.
NORMAL_CLEARING = ("NORMAL_CLEARING", 16)
ORIGINATOR_CANCEL = ("ORIGINATOR_CANCEL", 487)
NO_ANSWER = ("NO_ANSWER", 19)
RECOVERY_ON_TIMER_EXPIRE = ("RECOVERY_ON_TIMER_EXPIRE", 102)
MEDIA_TIMEOUT = ("MEDIA_TIMEOUT", 102)
HOST_DOWN = ("NETWORK_OUT_OF_ORDER", 38)  # the host carrying the call's media died
ADMIN_HANGUP = ("NORMAL_CLEARING", 16)
COMPLETED_ELSEWHERE = ("Call completed elsewhere", 200)
# SIP status of the failed call -> Q.850 cause (RFC 3398 section 8.2.6.1, abridged).
STATUS_CAUSES = {404: ("UNALLOCATED_NUMBER", 1), 408: ("RECOVERY_ON_TIMER_EXPIRE", 102),
                 480: ("NO_USER_RESPONSE", 18), 486: ("USER_BUSY", 17),
                 487: ("ORIGINATOR_CANCEL", 487), 488: ("INCOMPATIBLE_DESTINATION", 88),
                 603: ("CALL_REJECTED", 21),
                 600: ("USER_BUSY", 17)}
# The call's own timers -> the cause of the hang-up when one expires.
CALL_TIMERS = {"no-answer": NO_ANSWER, "max-duration": RECOVERY_ON_TIMER_EXPIRE,
               "session": RECOVERY_ON_TIMER_EXPIRE}
WAIT_ONLY = frozenset({"D", "I", "J", "K", "M"})  # timers whose firing only ends a transaction
RELAYED_METHODS = ("INVITE", "UPDATE", "INFO", "MESSAGE", "NOTIFY", "REFER", "PRACK")
# Headers a relayed request or response carries over to the other leg (plus the body).
RELAYED_HEADERS = ("content-type", "content-disposition", "event", "subscription-state",
                   "refer-to", "session-expires", "min-se", "info-package", "reason")


def udp_only(sock_index: int) -> bool:
    """No socket number names a connection: every transport is unreliable (UDP)."""
    return False


@dataclass
class Settings:
    """What a call needs of the configuration (not stored in the record)."""

    address: str  # advertised SIP address and port: our Via and Contact
    port: int
    user_agent: bytes = b"sipcluster"
    timers: TimerConfig = field(default_factory=TimerConfig)
    no_answer_timeout: float = 60.0
    max_duration: float = 0.0
    allow: bytes = ALLOW
    supported: bytes = b"timer"
    xcid_header: bytes = b"X-Call-ID"  # the A-leg Call-ID on B-leg requests; b"" = none
    # Route table row -> (username, password) answering a gateway's 401/407; kept out of
    # the call record so no password is ever written to Redis.
    gateway_credentials: dict[int, tuple[str, str]] = field(default_factory=dict)
    # Whether a socket number (a leg's, an arrival's) names a connection (TCP, TLS, WS,
    # WSS): a reliable transport, over which the call's transactions do not retransmit
    # (RFC 3261 17).  The shell passes envelope.is_stream.
    reliable: Callable[[int], bool] = udp_only


@dataclass
class Ctx:
    """What one event brings besides the message: the time, id sources, settings, where
    the message came from (answers to it go there), and the media's SDP rewrites."""

    now: float
    ids: Ids
    cfg: Settings
    source: tuple[str, int] | None = None
    media: PassThrough | Answers = PASS_THROUGH  # see media.py
    # The host (and its SIP socket) that received the message: the answers to an in-dialog
    # request leave from there, since the phone sent it there (with several hosts it may
    # be another one than the host its leg was set up through).
    host: str | None = None
    sock_index: int = 0


def arrival(ctx: Ctx) -> dict:
    """What a server transaction keeps of where its request arrived (see Ctx.host)."""
    return {} if ctx.host is None else {"host": ctx.host, "sock": ctx.sock_index}


def answers_reliable(ctx: Ctx, leg_sock: int) -> bool:
    """Whether the answers to the request at hand leave over a reliable transport: from
    the socket it arrived through (``arrival``), else from its leg's (``leg_sock``)."""
    return ctx.cfg.reliable(leg_sock if ctx.host is None else ctx.sock_index)


@dataclass(frozen=True)
class Target:
    """One place to ring: a registered contact, reached through ``peer`` via ``host``."""

    uri: bytes
    peer: tuple[str, int]
    host: str
    sock_index: int = 0
    route: int = -1  # the route table row of a gateway target, -1 for a registered contact


def best_final(finals: list[tuple[int, str]]) -> tuple[int, str]:
    """RFC 3261 16.7 step 6: a 6xx wins; else the lowest class, first come, a real answer
    before a timeout (408); only timeouts in that class -> 480."""
    finals = [(s, r) for s, r in finals if s >= 300]
    if not finals:
        return 480, "Temporarily Unavailable"
    six = [f for f in finals if f[0] >= 600]
    if six:
        return six[0]
    lowest = min(s // 100 for s, _ in finals)
    in_class = [f for f in finals if f[0] // 100 == lowest]
    answered = [f for f in in_class if f[0] != 408]  # in its class, a timeout says least
    if not answered:  # the contacts of that class all timed out: not reachable now
        return 480, "Temporarily Unavailable"
    return answered[0]


def our_via(cfg: Settings, branch: str) -> bytes:
    return via(cfg.address, cfg.port, branch)


def contact(user: str, cfg: Settings) -> bytes:
    return b"<sip:%s@%s:%d>" % (user.encode(), host_part(cfg.address).encode(), cfg.port)


def reason(cause: tuple[str, int]) -> bytes:
    if tuple(cause) == COMPLETED_ELSEWHERE:  # RFC 3326: the phone shows no missed call
        return b'SIP;cause=200;text="Call completed elsewhere"'
    return b'Q.850;cause=%d;text="%s"' % (cause[1], cause[0].encode())


def carried(msg: Request | Response) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers that go on to the other leg."""
    return [(h.name, h.value) for h in msg.headers if h.key in RELAYED_HEADERS]
