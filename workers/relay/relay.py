"""The RTP relay process: one epoll loop over every media socket and the control socket.

Per packet the loop does one recvfrom, one sendto and a few attribute
updates: latching and anything else rare is off the hot path (``_latch``,
``_short_packet``).  Redis round trips (saving sessions, heartbeats, media
timeout events) run on a writer thread, in order, so a slow or busy Redis never
holds packets back; the loop only builds the records, a bounded batch a tick.
Commands save their session themselves before they are answered.

Sessions live in Redis (``relay:session:{call}``) from the moment a command
creates or changes them, and again whenever a party latches or every
FLUSH_INTERVAL while packets flow; a relay restarted after kill -9 binds the
same ports with the same latched addresses and counters before it takes
commands.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from cluster import adoption, clusterauth
from cluster.cadence import until_next_tick
from cluster.relayctl import decode, encode
from cluster.sip.rtp import clock_rate_for
from cluster.store import Store, StoreUnavailable

from .ports import PortPool
from .session import (
    CommandError,
    Endpoint,
    Leg,
    Session,
    Side,
    StreamRequest,
    socket_address,
)

log = logging.getLogger("relay")

TICK = 0.05  # seconds between housekeeping passes
# Housekeeping visits every session once per VISIT_PERIOD, a slice per tick, so no tick
# holds packets back for long: it saves new figures (at most every FLUSH_INTERVAL) and
# checks the media timeout and the idle limit.
VISIT_PERIOD = 1.0
FLUSH_INTERVAL = 2.0
FLUSH_BATCH = 40  # sessions saved per tick at most: bounds how long packets wait
HEARTBEAT_INTERVAL = 0.5  # on the host's grid (cluster/cadence.py)
# With no session, housekeeping has only the heartbeat to do: the loop sleeps until then
# instead of ticking (20 wake-ups a second were most of an idle relay's 0.35% of a core,
# bench_idle).  A session created wakes it (the control message) and brings TICK back.
IDLE_TICK = HEARTBEAT_INTERVAL
HEARTBEAT_TTL = 3.0
GRACE = 60.0  # seconds a timed-out session outlives its timeout (for the B2BUA's delete)
REDIS_BACKOFF = 1.0  # after a Redis failure, seconds without trying again
CONTROL_BATCH = 64
REPLY_CACHE = 4096
MAX_EVENTS = 1024
RECV_SIZE = 4096
NODE_FORGET_AFTER = 86_400.0
# Another host's relay silent this long (it heartbeats every HEARTBEAT_INTERVAL) whose
# media address is on this host now is dead: its sessions are adopted here.
ADOPT_AFTER = 1.5
OTHER_FAMILY_BIND = {"127.0.0.1": "::1", "0.0.0.0": "::", "::1": "127.0.0.1", "::": "0.0.0.0"}


@dataclass(frozen=True)
class RelaySettings:
    relay_id: str  # "<host>/relay-<index>"
    host: str
    name: str
    bind: str
    advertised: str
    port_lo: int  # the relay's slice; lo (and lo + 1) are its control port
    port_hi: int
    media_timeout: float = 60.0
    media_timeout_hold: float = 3600.0
    grace: float = GRACE
    control_host: str = "127.0.0.1"  # media.control_address: what workers of every host reach
    key: bytes = b""  # relay-control key (relayctl.control_key): unsealed commands are ignored

    @property
    def control(self) -> tuple[str, int]:
        return (self.control_host, self.port_lo)

    def bind_for(self, family: int) -> str:
        """The media bind address of a family: the configured one, or its counterpart."""
        if _family_of(self.bind) == family:
            return self.bind
        other = OTHER_FAMILY_BIND.get(self.bind)
        if other is None:
            raise CommandError(f"this relay has no IPv{family} address (media.bind = {self.bind})")
        return other

    def advertised_for(self, family: int) -> str:
        if self.advertised and _family_of(self.advertised) == family:
            return self.advertised
        address = self.bind_for(family)
        if address in ("0.0.0.0", "::"):
            raise CommandError(f"no advertised IPv{family} address (set media.advertised_address)")
        return address


def _family_of(address: str) -> int:
    return 6 if ":" in address else 4


class Relay:
    def __init__(self, settings: RelaySettings, store: Store):
        self.settings = settings
        self.store = store
        self.pool = PortPool(settings.port_lo + 2, settings.port_hi)
        self.sessions: dict[str, Session] = {}
        self.endpoints: dict[int, Endpoint] = {}
        self.epoll = select.epoll()
        self.control = self._bind_control()
        self.counters: Counter[str] = Counter()
        self.replies: OrderedDict[bytes, bytes] = OrderedDict()
        self.replays = clusterauth.Replays()
        self.refused_log = clusterauth.RateLimitedLog(log)
        self.urgent: set[str] = set()  # sessions to save at the next tick (latching)
        # Sessions set up while Redis was down: no record yet, so a refresh would find them
        # "gone" and drop them; the next flush creates their records instead.
        self.unsaved: set[str] = set()
        self.forwarded = 0
        self.started = time.time()
        self.stopping = False
        self._restore_pending = True  # until the sessions of before a restart are read
        self._redis_down_until = 0.0
        self._redis_down_since = 0.0  # when the current streak of Redis failures began
        self._next_heartbeat = 0.0
        self._rotation: list[str] = []  # call ids still to visit in this period
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # for the Redis writer thread
        self.followups: queue.SimpleQueue = queue.SimpleQueue()  # its results, for the loop
        self.writer = threading.Thread(target=self._redis_writer, name="redis-writer",
                                       daemon=True)
        self._next_prune = 0.0
        self._pps = 0.0
        self._pps_mark = (time.monotonic(), 0)

    # ---------------------------------------------------------------- setup
    def _bind_control(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(self.settings.control)
        sock.setblocking(False)
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        return sock

    def restore(self) -> int:
        """Bind the sessions this relay had before a restart; returns how many.

        After a host restart Redis may still be loading its data when the relay starts:
        then housekeeping asks again, every REDIS_BACKOFF, until Redis answers."""
        try:
            records = self.store.relay_owned_sessions(self.settings.relay_id)
        except StoreUnavailable as exc:
            self._redis_failed(exc)  # logged; read again after the back-off
            return 0
        self._redis_worked()
        self._restore_pending = False
        restored = 0
        for record in records:
            if record.get("call_id") in self.sessions:
                continue  # set up anew meanwhile
            try:
                session = Session.from_record(record)
                self._bind_session(session)
            except (CommandError, OSError, KeyError, ValueError, TypeError) as exc:
                log.warning("call-id=%s cannot restore session: %s", record.get("call_id"), exc)
                continue
            self.sessions[session.call_id] = session
            restored += 1
        if restored:
            log.info("restored %d sessions", restored)
        return restored

    def _bind_session(self, session: Session) -> None:
        bound: list[Side] = []
        try:
            for side in session.sides():
                if not side.address:  # (an adopted side's port is of another relay's slice)
                    self.pool.reserve(side.port)
                bound.append(side)
                self._open(side)
                side.rtp.source = side.restored_latch
                side.rtcp.source = side.restored_latch_rtcp
                side.refresh_remotes()
        except (OSError, ValueError):
            for side in bound:
                self._close_side(side)
            raise
        for index in range(max(len(leg.sides) for leg in session.legs)):
            self._wire(session, index)
        session.last_flush = time.monotonic()

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        restored = self.restore()
        self.counters["restored"] += restored
        self.writer.start()
        self._heartbeat(time.monotonic())
        log.info("relay %s: control %s:%d, media %s ports %d-%d", self.settings.relay_id,
                 *self.settings.control, self.settings.bind, self.settings.port_lo + 2,
                 self.settings.port_hi)
        poll = self.epoll.poll
        get = self.endpoints.get
        mono = time.monotonic
        latch = self._latch
        short = self._short_packet
        forwarded = 0
        next_tick = mono() + TICK
        while not self.stopping:
            timeout = next_tick - mono()
            events = poll(timeout if timeout > 0 else 0, MAX_EVENTS)
            try:
                for fd, _ in events:
                    e = get(fd)
                    if e is None:
                        self._on_control()
                        continue
                    try:
                        data, src = e.recvfrom(RECV_SIZE)
                    except OSError:
                        continue
                    if src != e.source and not latch(e, src):
                        continue
                    if len(data) < 12:
                        short(e, data)
                        continue
                    stats = e.stats
                    if stats is not None and not 191 < data[1] < 224:
                        stats.update(data, mono())
                        out = e.out
                    else:
                        e.rtcp_packets += 1
                        out = e.rtcp_out
                    dest = out.remote
                    if dest is not None:
                        try:
                            out.sendto(data, dest)
                            forwarded += 1
                        except OSError:
                            out.send_errors += 1
            except Exception:  # a bug must not stop the media of every other call
                log.exception("packet handling failed")
                self.counters["loop_errors"] += 1
            now = mono()
            if now >= next_tick:
                self.forwarded += forwarded
                forwarded = 0
                try:
                    self._housekeeping(now)
                except Exception:
                    log.exception("housekeeping failed")
                    self.counters["loop_errors"] += 1
                next_tick = now + TICK if self._busy() else min(now + IDLE_TICK,
                                                                 self._next_heartbeat)
            elif self.sessions and next_tick - now > TICK:
                next_tick = now + TICK  # the first session since the loop went idle
        self.forwarded += forwarded
        self._save_all()
        self.jobs.put(None)
        self.writer.join(timeout=5.0)

    def stop(self, *_args) -> None:
        self.stopping = True

    def _latch(self, e: Endpoint, src: tuple) -> bool:
        """A packet from an address other than the latched one: latch on it, or drop it.

        Before signalling named the party (a callee may send RTP as its 200 OK leaves,
        before the answer reaches the relay) the first packet latches, as rtpengine does;
        after that only the signalled IP may."""
        side = e.side
        if e.source is None and (side.latch_any or not side.latch_ip
                                 or src[0] == side.latch_ip):
            e.source = src
            side.refresh_remotes()
            self.urgent.add(side.call_id)
            self.counters["latched"] += 1
            return True
        e.dropped += 1
        return False

    def _short_packet(self, e: Endpoint, data: bytes) -> None:
        # RTCP can be 8 bytes (an empty receiver report); shorter, or RTP under 12, is junk.
        if len(data) >= 8 and 191 < data[1] < 224:
            e.rtcp_packets += 1
            out = e.rtcp_out
            if out.remote is not None:
                try:
                    out.sendto(data, out.remote)
                    self.forwarded += 1
                except OSError:
                    out.send_errors += 1
            return
        e.dropped += 1

    # ---------------------------------------------------------------- control
    def _on_control(self) -> None:
        batch = []
        for _ in range(CONTROL_BATCH):
            try:
                batch.append(self.control.recvfrom(65535))
            except OSError:
                break
        answers: list[tuple[tuple, bytes, bytes | None]] = []
        to_save: set[str] = set()
        to_drop: list[str] = []
        for data, address in batch:
            try:
                nonce, body = clusterauth.unseal(self.settings.key, data)
            except clusterauth.Rejected as exc:
                # Not sealed with the cluster's key: whoever sent it, from this host or
                # another, it is not carried out (design invariant 14).
                self.counters["control_unauthenticated"] += 1
                self.refused_log.warning("control datagram from %s:%d ignored: %s",
                                         address[0], address[1], exc.reason)
                continue
            try:
                message = decode(body)
            except ValueError:
                self.counters["control_malformed"] += 1
                continue
            request_id = message["id"]
            key = request_id if isinstance(request_id, bytes) else str(request_id).encode()
            cached = self.replies.get(key)
            if cached is not None:
                self.counters["control_retransmitted"] += 1
                answers.append((address, cached, None))
                continue
            if not self.replays.first(nonce):
                # A copy of a command already carried out whose answer is no longer kept:
                # a client's retransmission never waits that long, a replayed capture does.
                self.counters["control_replayed"] += 1
                continue
            reply = self._command(message, to_save, to_drop)
            reply["id"] = request_id
            answers.append((address, clusterauth.seal(self.settings.key, encode(reply)), key))
        for _address, data, key in answers:
            if key is not None:
                self.replies[key] = data
                if len(self.replies) > REPLY_CACHE:
                    self.replies.popitem(last=False)
        self._persist(to_save, to_drop, lambda: self._send_answers(answers))

    def _send_answers(self, answers: list[tuple[tuple, bytes, bytes | None]]) -> None:
        for address, data, _key in answers:
            try:
                self.control.sendto(data, address)
            except OSError as exc:
                log.warning("cannot answer %s: %s", address, exc)

    def _command(self, message: dict, to_save: set[str], to_drop: list[str]) -> dict:
        command = message.get("cmd")
        try:
            if command == "ping":
                reply = {"ok": True, "relay": self.settings.relay_id,
                         "sessions": len(self.sessions)}
            elif command in ("offer", "answer"):
                reply = self._offer_answer(message, command == "answer")
                to_save.add(message["call_id"])
            elif command == "delete":
                reply = self._delete(_call_id(message))
                if reply["found"]:
                    to_drop.append(_call_id(message))
            elif command == "query":
                reply = self._query(_call_id(message))
            else:
                raise CommandError(f"no command {command!r}")
        except CommandError as exc:
            self.counters[f"cmd_{command}_error"] += 1
            return {"ok": False, "error": str(exc)}
        self.counters[f"cmd_{command}_ok"] += 1
        return reply

    def _offer_answer(self, message: dict, is_answer: bool) -> dict:
        call_id = _call_id(message)
        leg_name = message.get("leg")
        if not isinstance(leg_name, str) or not leg_name:
            raise CommandError("a leg name is needed")
        raw_streams = message.get("streams")
        if not isinstance(raw_streams, list) or not raw_streams:
            raise CommandError("streams must be a non-empty list")
        streams = [StreamRequest.parse(raw) for raw in raw_streams]
        session = self.sessions.get(call_id)
        created = session is None
        if session is None:
            if is_answer:
                raise CommandError(f"no session for call {call_id}")
            session = Session(call_id, [Leg(leg_name), Leg(None)], time.time())
            self.sessions[call_id] = session
            self.counters["sessions_created"] += 1
        leg, other = session.leg_named(leg_name, create=True)
        other_family = message.get("other_family")
        if other_family not in (None, 4, 6):
            raise CommandError(f"bad other_family {other_family!r}")
        try:
            self._update_leg(session, leg, other, streams, other_family,
                             bool(message.get("latch_any", False)))
        except CommandError:
            if created:
                self._close_session(session)
            raise
        leg.hold = bool(message.get("hold", False)) or all(s.null for s in streams)
        session.last_command = time.monotonic()
        if is_answer and session.answered_at is None:
            session.answered_at = session.last_command
        session.timeout_reported = False  # renegotiated: a live call again
        return {"ok": True, "relay": self.settings.relay_id,
                "streams": [self._facing(side, leg.sides[i] if i < len(leg.sides) else None)
                            for i, side in enumerate(other.sides[:len(streams)])]}

    def _update_leg(self, session: Session, leg: Leg, other: Leg, streams: list[StreamRequest],
                    other_family: int | None, latch_any: bool) -> None:
        for index, request in enumerate(streams):
            if index < len(leg.sides):
                side = leg.sides[index]
                if side.family != request.family:
                    raise CommandError(f"m-line {index}: IPv{request.family} address for a "
                                       f"leg on IPv{side.family}")
            else:
                side = self._new_side(session, request.media, request.family)
                leg.sides.append(side)
            if index >= len(other.sides):
                family = other_family or request.family
                other.sides.append(self._new_side(session, request.media, family))
            _apply_sdp(side, request, latch_any)
            if other.sides[index].sdp is None:
                other.sides[index].rtcp_mux = request.rtcp_mux  # offer what this party offered
            self._wire(session, index)

    def _new_side(self, session: Session, media: str, family: int) -> Side:
        for _ in range(len(self.pool)):
            try:
                port = self.pool.take()
            except IndexError:
                break
            side = Side(media, family, port, clock_rate_for(None, media), call_id=session.call_id)
            try:
                self._open(side)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    self.pool.release(port)
                    raise CommandError(f"cannot bind IPv{family} media ports: {exc}") from None
                self.pool.skip(port)  # someone else holds it; try it again much later
                continue
            return side
        self.counters["ports_exhausted"] += 1
        raise CommandError("no free relay ports")

    def _open(self, side: Side) -> None:
        family = socket.AF_INET6 if side.family == 6 else socket.AF_INET
        bind = side.address or self.settings.bind_for(side.family)
        socks = []
        try:
            for port in (side.port, side.port + 1):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                socks.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setblocking(False)
                sock.bind((bind, port))
        except OSError:
            for sock in socks:
                sock.close()
            raise
        side.rtp = Endpoint(socks[0], side, side.stats)
        side.rtcp = Endpoint(socks[1], side, None)
        for endpoint in (side.rtp, side.rtcp):
            fd = endpoint.sock.fileno()
            self.endpoints[fd] = endpoint
            self.epoll.register(fd, select.EPOLLIN)

    def _wire(self, session: Session, index: int) -> None:
        first, second = session.legs
        if index >= len(first.sides) or index >= len(second.sides):
            return
        for this, that in ((first.sides[index], second.sides[index]),
                           (second.sides[index], first.sides[index])):
            this.rtp.out = that.rtp
            this.rtp.rtcp_out = that.rtcp_target
            this.rtcp.out = that.rtcp_target
            this.rtcp.rtcp_out = that.rtcp_target
            this.refresh_remotes()

    def _facing(self, side: Side, peer: Side | None) -> dict:
        mux = side.rtcp_mux if side.sdp is not None else bool(peer and peer.rtcp_mux)
        return {"media": side.media,
                "address": side.address or self.settings.advertised_for(side.family),
                "port": side.port, "rtcp_port": side.port + 1, "rtcp_mux": mux,
                "family": side.family}

    def _delete(self, call_id: str) -> dict:
        session = self.sessions.get(call_id)
        if session is None:
            return {"ok": True, "found": False}
        figures = session.figures()
        self._close_session(session)
        self.counters["sessions_deleted"] += 1
        return {"ok": True, "found": True, **figures}

    def _query(self, call_id: str) -> dict:
        session = self.sessions.get(call_id)
        if session is None:
            return {"ok": True, "found": False}
        return {"ok": True, "found": True, "relay": self.settings.relay_id, **session.figures()}

    def _close_session(self, session: Session) -> None:
        for side in session.sides():
            self._close_side(side)
        self.sessions.pop(session.call_id, None)
        self.urgent.discard(session.call_id)
        self.unsaved.discard(session.call_id)

    def _close_side(self, side: Side) -> None:
        for endpoint in (side.rtp, side.rtcp):
            if endpoint is None:
                continue
            fd = endpoint.sock.fileno()
            if fd >= 0:
                self.endpoints.pop(fd, None)
                try:
                    self.epoll.unregister(fd)
                except OSError:
                    pass
            endpoint.sock.close()
        side.rtp = side.rtcp = None
        if not side.address:
            self.pool.release(side.port)

    # ---------------------------------------------------------------- Redis
    def _redis_ok(self) -> bool:
        return time.monotonic() >= self._redis_down_until

    def _redis_failed(self, exc: Exception) -> None:
        if not self._redis_down_since:  # once per streak, not once per retry
            self._redis_down_since = time.monotonic()
            log.warning("Redis unavailable: %s; retrying every %.0f s", exc, REDIS_BACKOFF)
        self.counters["redis_errors"] += 1
        self._redis_down_until = time.monotonic() + REDIS_BACKOFF

    def _redis_worked(self) -> None:
        if self._redis_down_since:
            log.info("Redis back after %.1f s", time.monotonic() - self._redis_down_since)
            self._redis_down_since = 0.0

    def _record(self, session: Session) -> tuple[str, dict, float]:
        now = time.monotonic()
        session.version += 1
        limit = self._idle_limit(session)
        left = limit - (now - self._last_activity(session))
        # Redis keeps the record a little longer than the relay keeps the session, so a
        # live session's record never expires between two saves.
        return (session.call_id,
                session.to_record(self.settings.relay_id, self.settings.control),
                max(0.0, left) + FLUSH_INTERVAL + VISIT_PERIOD)

    # ---------------------------------------------------------------- the writer thread
    def _redis_writer(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                job()
            except StoreUnavailable as exc:
                self._redis_failed(exc)
            except Exception:
                log.exception("Redis job failed")
            else:
                self._redis_worked()

    def _run_followups(self) -> None:
        while True:
            try:
                followup = self.followups.get_nowait()
            except queue.Empty:
                return
            followup()

    def _persist(self, to_save: set[str], to_drop: list[str], answer) -> None:
        """Save what commands changed, then answer them (the answer promises it).

        Done here rather than on the writer thread: handing every command to a thread
        and back costs more than the round trip.  Records carry a version, so an older
        record the writer thread still has queued never overwrites this one."""
        sessions = [self.sessions[c] for c in to_save if c in self.sessions]
        if (sessions or to_drop) and self._redis_ok():
            try:
                self.store.relay_save_sessions(self.settings.relay_id,
                                               [self._record(s) for s in sessions], drop=to_drop)
                now = time.monotonic()
                for session in sessions:
                    session.last_flush = now
                    self.unsaved.discard(session.call_id)
            except StoreUnavailable as exc:
                self._redis_failed(exc)
                self._save_later(sessions)
        else:
            self._save_later(sessions)
        answer()

    def _save_later(self, sessions: list[Session]) -> None:
        for session in sessions:
            self.urgent.add(session.call_id)
            if session.version <= 1:  # its first record: there is none in Redis yet
                self.unsaved.add(session.call_id)

    def _flush(self, sessions: list[Session], now: float) -> None:
        """Save sessions (latching changes, new figures); let go of those no longer ours."""
        records = [self._record(s) for s in sessions]
        for session in sessions:
            self.urgent.discard(session.call_id)
            session.last_flush = now
        relay_id = self.settings.relay_id
        first = [record for record in records if record[0] in self.unsaved]
        created = {record[0] for record in first}

        def job() -> None:
            if first:
                self.store.relay_create_sessions(relay_id, first)
                self.followups.put(lambda: self.unsaved.difference_update(created))
            results = self.store.relay_refresh_sessions(relay_id, records)
            gone = [(record[0], result) for record, result in zip(records, results, strict=True)
                    if result <= 0]
            if gone:
                self.followups.put(lambda: self._let_go(gone))
                self.store.relay_drop_sessions(relay_id, [c for c, _ in gone],
                                               delete_records=False)

        self.jobs.put(job)

    def _let_go(self, gone: list[tuple[str, int]]) -> None:
        # Deleted by a client that gave up on us, expired, or taken over by another relay.
        for call_id, result in gone:
            session = self.sessions.get(call_id)
            if session is None:
                continue
            log.info("call-id=%s session record %s: dropping it", call_id,
                     "taken over" if result < 0 else "gone")
            self.counters["sessions_orphaned"] += 1
            self._close_session(session)

    def _save_all(self) -> None:
        records = [self._record(s) for s in self.sessions.values()]
        self.jobs.put(lambda: self.store.relay_refresh_sessions(self.settings.relay_id,
                                                                records))

    # ---------------------------------------------------------------- timers
    def _idle_limit(self, session: Session) -> float:
        # The B2BUA gets as long as the timeout itself (at most `grace`) to hang up and delete.
        timeout = self._media_timeout(session)
        return timeout + min(self.settings.grace, self.settings.media_timeout)

    def _media_timeout(self, session: Session) -> float:
        s = self.settings
        return s.media_timeout_hold if session.hold else s.media_timeout

    def _last_activity(self, session: Session) -> float:
        return max(session.last_media(), session.last_command)

    def _housekeeping(self, now: float) -> None:
        self._run_followups()
        if self._restore_pending and self._redis_ok():
            self.counters["restored"] += self.restore()
        due = [s for call_id in self.urgent if (s := self.sessions.get(call_id))]
        for session in self._visit_slice():
            if self._check_timers(session, now):
                continue
            if (session.call_id not in self.urgent and now - session.last_flush >= FLUSH_INTERVAL
                    and session.last_media() > session.last_flush):
                due.append(session)
        if due and self._redis_ok():
            self._flush(due[:FLUSH_BATCH], now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + until_next_tick(HEARTBEAT_INTERVAL, now)
            self._heartbeat(now)

    def _busy(self) -> bool:
        """Whether housekeeping has more to do than the heartbeat."""
        return bool(self.sessions or self.urgent or self._restore_pending
                    or not self.followups.empty())

    def _visit_slice(self) -> list[Session]:
        if not self._rotation:
            self._rotation = list(self.sessions)
        count = max(1, int(len(self.sessions) * TICK / VISIT_PERIOD) + 1)
        chosen, self._rotation = self._rotation[:count], self._rotation[count:]
        return [s for call_id in chosen if (s := self.sessions.get(call_id))]

    def _check_timers(self, session: Session, now: float) -> bool:
        """Expire an idle session or report its media timeout; True when it is gone."""
        last_media = session.last_media()
        idle = now - max(last_media, session.last_command)
        if idle > self._idle_limit(session):
            log.info("call-id=%s idle %.0f s: session expired", session.call_id, idle)
            self.counters["sessions_expired"] += 1
            self._close_session(session)
            call_id, relay_id = session.call_id, self.settings.relay_id
            # (if Redis is away, the record's own TTL ends it)
            self.jobs.put(lambda: self.store.relay_drop_sessions(relay_id, [call_id]))
            return True
        if session.answered_at is None or session.timeout_reported:
            return False
        silent = now - max(last_media, session.answered_at)
        if silent > self._media_timeout(session) and self._redis_ok():
            self._report_timeout(session, silent)
        return False

    def _report_timeout(self, session: Session, silent: float) -> None:
        session.timeout_reported = True
        event = {"event": "media-timeout", "call_id": session.call_id,
                 "relay": self.settings.relay_id, "idle": round(silent, 1),
                 "hold": int(session.hold), "at": round(time.time(), 3)}
        record = self._record(session)

        def job() -> None:
            try:
                self.store.relay_report_event(event, [record], self.settings.relay_id)
            except StoreUnavailable:
                self.followups.put(lambda: setattr(session, "timeout_reported", False))
                raise
            self.counters["media_timeouts"] += 1

        self.jobs.put(job)
        log.info("call-id=%s no RTP for %.1f s: media timeout", session.call_id, silent)

    # ---------------------------------------------------------------- adoption
    def _look_for_orphans(self, nodes: list[dict]) -> None:
        """(Writer thread, after each heartbeat: ``nodes`` are every relay's.)  Sessions of
        another host's relay that died, whose media address is on this host now
        (keepalived moved the dead host's floating address here): read them, for the loop
        to bind on that address with the same ports, so their media goes on
        (cluster/adoption.py has the signalling's side of it)."""
        now = time.time()
        for node in nodes:
            if (node.get("host") == self.settings.host
                    or now - float(node.get("seen", 0)) < ADOPT_AFTER):
                continue
            address = (node.get("addresses") or {}).get("4", "")
            if not adoption.adoptable_address(address) or not adoption.is_local(address):
                continue
            records = self.store.relay_owned_sessions(node["id"])
            if records:
                self.followups.put(lambda n=node["id"], a=address, r=records:
                                   self.adopt(n, a, r))

    def adopt(self, dead: str, address: str, records: list[dict]) -> int:
        """Bind a dead relay's sessions on ``address`` (its media address, now here), with
        their ports and latched addresses, and own them from now on; returns how many.
        Another relay of this host adopting the same ones at once finds their ports taken
        and leaves them: each session ends up with exactly one of us."""
        adopted: list[Session] = []
        for record in records:
            if record.get("call_id") in self.sessions:
                continue
            try:
                session = Session.from_record(record)
                for side in session.sides():
                    side.address = side.address or address
                self._bind_session(session)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # (taken: by a sibling adopting it)
                    log.warning("call-id=%s cannot adopt session: %s", record.get("call_id"),
                                exc)
                continue
            except (CommandError, KeyError, ValueError, TypeError) as exc:
                log.warning("call-id=%s cannot adopt session: %s", record.get("call_id"), exc)
                continue
            self.sessions[session.call_id] = session
            adopted.append(session)
        if not adopted:
            return 0
        records_now = [self._record(s) for s in adopted]
        ids = [s.call_id for s in adopted]
        relay_id = self.settings.relay_id

        def job() -> None:
            self.store.relay_save_sessions(relay_id, records_now)
            self.store.relay_drop_sessions(dead, ids, delete_records=False)

        self.jobs.put(job)
        self.counters["adopted"] += len(adopted)
        log.warning("adopted %d session(s) of relay %s on %s", len(adopted), dead, address)
        return len(adopted)

    def _heartbeat(self, now: float) -> None:
        mark_time, mark_count = self._pps_mark
        if now > mark_time:
            self._pps = (self.forwarded - mark_count) / (now - mark_time)
        self._pps_mark = (now, self.forwarded)
        if not self._redis_ok():
            return
        s = self.settings
        info = {"id": s.relay_id, "role": "relay", "host": s.host, "name": s.name,
                "pid": os.getpid(), "control": list(s.control),
                "addresses": {str(f): a for f in (4, 6) if (a := _try_advertised(s, f))},
                "ports": [s.port_lo + 2, s.port_hi], "free_pairs": len(self.pool),
                "sessions": len(self.sessions),
                "streams": sum(len(leg.sides) for x in self.sessions.values() for leg in x.legs),
                "pps": round(self._pps, 1), "forwarded": self.forwarded,
                "started": self.started, "seen": time.time(), **self.counters}
        prune = now >= self._next_prune
        if prune:
            self._next_prune = now + 60.0

        def job() -> None:
            # The others' heartbeats come back in the same round trip (a look of its own
            # was half of an idle relay's round trips).
            nodes = self.store.relay_heartbeat(s.relay_id, info, HEARTBEAT_TTL)
            if prune:
                stale = [n["id"] for n in nodes
                         if time.time() - n.get("seen", 0) > NODE_FORGET_AFTER]
                self.store.relay_forget(stale)
            self._look_for_orphans(nodes)

        self.jobs.put(job)


def _call_id(message: dict) -> str:
    call_id = message.get("call_id")
    if not isinstance(call_id, str) or not call_id or len(call_id) > 256:
        raise CommandError("a call_id is needed")
    return call_id


def _apply_sdp(side: Side, request: StreamRequest, latch_any: bool) -> None:
    """New SDP for a side.  Hold keeps the latching; a new address re-latches."""
    side.latch_any = latch_any
    side.rtcp_mux = request.rtcp_mux
    side.clock_rate = side.stats.clock_rate = request.clock_rate
    if request.null:
        side.held = True
        side.refresh_remotes()
        return
    side.held = False
    sdp = socket_address(request.ip, request.port)
    sdp_rtcp = socket_address(request.ip, request.rtcp_port)
    if sdp != side.sdp or sdp_rtcp != side.sdp_rtcp or request.latch_ip != side.latch_ip:
        side.sdp, side.sdp_rtcp, side.latch_ip = sdp, sdp_rtcp, request.latch_ip
        for endpoint in (side.rtp, side.rtcp):
            endpoint.source = None  # signalling says the party moved: latch again
    side.refresh_remotes()


def _try_advertised(settings: RelaySettings, family: int) -> str | None:
    try:
        return settings.advertised_for(family)
    except CommandError:
        return None
