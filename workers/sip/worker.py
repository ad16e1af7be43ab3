"""The SIP worker: stateless, everything it needs to carry on lives in Redis.

Order of work for a datagram, cheapest first, so that overload sheds load
instead of collapsing (every retransmission of a slow request would otherwise
start the same Redis work again):

  1. too many requests in flight here -> 503 with Retry-After, no Redis;
  2. a retransmission of a request this worker is working on -> dropped;
  3. parse and validate -> 400/416/420/483/505... from the parser's verdict;
  4. the method's handler; a Redis failure anywhere -> 503 with Retry-After.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter

import gevent
import gevent.event
import gevent.pool

from cluster import clusterauth, metrics
from cluster.adoption import ADOPTED_BASE
from cluster.backoff import Backoff
from cluster.bounded import BoundedCache
from cluster.cadence import until_next_tick
from cluster.config import Config
from cluster.envelope import STREAM_BASE
from cluster.escape import escape_controls
from cluster.leanclient import Coalescing
from cluster.logsetup import call_log
from cluster.sip import scan
from cluster.sip.errors import SipError
from cluster.sip.ids import ALLOW, ALLOWED, Ids
from cluster.sip.message import KNOWN_METHODS, Request, Response, parse
from cluster.sip.transaction import response_dest, server_key
from cluster.store import Store, StoreUnavailable

from .answers import Answers, mark_of
from .auth import Authenticator
from .b2bua import B2BUA
from .hep import HepMirror
from .media import follow_dead_hosts, follow_media_timeouts, media_for
from .operator import hangup_loop
from .pinger import Pinger, is_ping
from .registrar import Registrar, RegistrarSettings, Source
from .scanners import ScanWatch
from .transport import Transport

log = logging.getLogger("worker")
RETRY_AFTER = b"Retry-After: 5"
DRAIN_SECONDS = 5.0
HEARTBEAT_SECONDS = 1.0  # on the host's grid (cluster/cadence.py)
# For this long after its first datagram a worker does not shed requests that waited past
# queue_limit: what it gets first is the backlog of the outage it replaces (every phone's
# retransmissions at once), bounded, not overload.  A whole host restart under the fault
# matrix's load answered 2 of 200 new INVITEs 503 at 0.3 s after the workers joined.
WARM_UP = 3.0
DEFERRED_KEEP = 3600.0  # seconds a hang-up Redis could not take is kept for a retry
DEFERRED_MAX = 10_000
# Whole datagrams (up to 64 KB each), kept only while Redis is in trouble: 16 MB holds ~10,000
# typical BYEs and CANCELs (~1 KB), 250 of the largest.
DEFERRED_BYTES = 16 * 1024 * 1024
HELD_MAX = 10_000  # requests remembered as held back by Redis trouble
HELD_BYTES = 4 * 1024 * 1024  # their keys (Call-ID, branch, method): ~300 B each, typically
# Methods that belong to a call (in or out of a dialog) and go to the B2BUA.
CALL_METHODS = frozenset(ALLOWED) - {"REGISTER", "OPTIONS"}
# Out-of-dialog requests whose user names are counted against limits.scan_users.
SCANNED_METHODS = frozenset(("REGISTER", "INVITE", "OPTIONS", "MESSAGE", "SUBSCRIBE"))
SUPPORTED: tuple[str, ...] = ("timer", "outbound")  # outbound: RFC 5626 (registrar.py)


IDS = Ids(os.urandom)  # every tag, branch and token this process makes


def new_tag() -> str:
    return IDS.tag()


def coalescing(lane) -> Coalescing:
    """The worker's greenlets share round trips to Redis (cluster/leanclient.py)."""
    return Coalescing(lane, gevent.sleep, gevent.event.AsyncResult)


class Worker:
    """The composition root of a worker process (it builds the parts and hands each what
    it uses) and its admission control (what is taken, shed or absorbed as a copy).

    ``store`` and ``transport`` are made from the configuration unless given (a test
    gives its own; a given transport is not wired to ``on_datagram``)."""

    def __init__(self, config: Config, name: str, *, store=None, transport=None):
        self.config = config
        self.name = name
        self.host = host = config.sip.effective_host_id
        if store is None:
            store = Store(config.redis.url, timeout=config.workers.redis_timeout,
                          max_connections=2 * config.workers.max_inflight,
                          wrap_lane=coalescing)
            store.replica_wait = (config.redis.wait_replicas,
                                  int(config.redis.wait_timeout * 1000))
        self.store = store
        self.counters: Counter[str] = Counter()
        self.histograms = metrics.histograms()  # sent in the heartbeat beside the counters
        store.wait_counters = self.counters
        self.max_inflight = config.workers.max_inflight
        # Room beyond max_inflight for what must not be refused (responses, ACK, BYE...).
        self.pool = gevent.pool.Pool(2 * config.workers.max_inflight)
        self.queue_limit = config.workers.queue_limit
        self._warm_at: float | None = None  # when WARM_UP ends (set by the first datagram)
        self.tx_ttl = 64 * config.timers.t1
        self.auth = Authenticator(
            store, realm=config.realm, secret=config.auth.secret.encode(),
            algorithms=tuple(config.auth.algorithms),
            nonce_lifetime=config.auth.nonce_lifetime,
            max_failures=config.auth.max_failures, failure_window=config.auth.failure_window,
            user_max_failures=config.auth.user_max_failures,
            user_failure_window=config.auth.user_failure_window,
            user_lockout=config.auth.user_lockout,
            counters=self.counters)
        if transport is None:
            transport = Transport(
                config.dispatcher.control_path, name, host,
                config.dispatcher.heartbeat_interval, store, self.on_datagram,
                load=lambda: len(self.pool), counters=self.counters,
                handoff_key=clusterauth.handoff_key(config.auth.secret),
                egress_bind=config.dispatcher.inter_host_address)
        self.transport = transport
        transport.stream_ports = (config.sip.effective_address, config.sip.effective_port,
                                  config.streams.tls_port)
        transport.ws_ports = (config.streams.ws_port, config.streams.wss_port)
        transport.udp_max_request = config.streams.udp_max_request
        self.answers = Answers(transport, store, new_tag=new_tag,
                               server=config.sip.user_agent.encode(), tx_ttl=self.tx_ttl,
                               counters=self.counters)
        reg = config.registrar
        self.registrar = Registrar(store, self.auth, RegistrarSettings(
            realm=config.realm, min_expires=reg.min_expires, max_expires=reg.max_expires,
            default_expires=reg.default_expires, max_contacts=reg.max_contacts,
            nonce_lifetime=config.auth.nonce_lifetime, tx_ttl=self.tx_ttl), self.answers)
        self.scanners = ScanWatch(store, config.limits, by=f"{name}@{host}",
                                  counters=self.counters)
        transport.watch = self.scanners.note_answer
        if config.hep.address:
            transport.mirror = HepMirror(config, self.counters)
        self.started = time.time()
        self.b2bua = B2BUA(
            config, store=store, transport=transport, answers=self.answers, auth=self.auth,
            scanners=self.scanners, media=media_for(config, store, host), ids=IDS,
            host=host, name=name, counters=self.counters, histograms=self.histograms,
            spawn=self.pool.spawn)
        self.pinger = Pinger(
            store, transport, IDS, host=host, interval=config.registrar.ping_interval,
            address=config.sip.effective_address, port=config.sip.effective_port,
            user_agent=config.sip.user_agent.encode(),
            index=int(os.environ.get("SIPCLUSTER_WORKER_INDEX", "0")),
            count=config.workers.count)
        # New requests Redis could not take, left unanswered: mark -> when the first copy
        # failed (see _store_unavailable).
        self.outage_hold = config.workers.outage_hold
        self._held = BoundedCache(HELD_MAX, HELD_BYTES)
        # Hang-ups Redis could not take: mark -> (keep until, datagram, source, socket).
        self._deferred = BoundedCache(DEFERRED_MAX, DEFERRED_BYTES)
        self._deferred_waiting = gevent.event.Event()  # set: _deferred may hold hang-ups

    # ---------------------------------------------------------------- entry
    def run(self) -> None:
        greenlets = self.transport.start()
        greenlets.append(gevent.spawn(self._heartbeat_loop))
        greenlets.append(gevent.spawn(self.b2bua.timer_loop))
        greenlets.append(gevent.spawn(self.b2bua.traces.loop))
        consumer = f"{self.host}/{self.name}"  # one per worker of the cluster
        greenlets.append(gevent.spawn(hangup_loop, self.b2bua, self.store, consumer,
                                      self.pool.spawn, self.counters))
        greenlets.append(gevent.spawn(self.auth.follow_blocks))
        greenlets.append(gevent.spawn(self.pinger.loop))
        greenlets.append(gevent.spawn(self.scanners.loop))
        greenlets.append(gevent.spawn(self.scanners.follow_bans))
        greenlets.append(gevent.spawn(self.scanners.trust_loop))
        greenlets.append(gevent.spawn(self._retry_hangups))
        if self.config.media.mode == "relay":
            greenlets.append(gevent.spawn(follow_media_timeouts, self.b2bua, self.store,
                                          consumer))
            greenlets.append(gevent.spawn(follow_dead_hosts, self.b2bua, self.store,
                                          self.host))
        gevent.signal_handler(signal.SIGTERM, self.drain)
        gevent.signal_handler(signal.SIGINT, self.drain)
        gevent.joinall(greenlets, raise_error=True)

    def drain(self) -> None:
        """SIGTERM: leave the dispatcher, finish what is in flight, then exit.

        Nothing is lost by leaving: calls and their timers live in Redis and the other
        workers carry them on; this only avoids cutting a request in half.
        """
        log.info("draining: %d request(s) in flight", len(self.pool))
        self.transport.leave()
        self.b2bua.stop()
        gevent.spawn(self._exit_when_idle)

    def _exit_when_idle(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while len(self.pool) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.b2bua.traces.close()  # the last calls' messages
        log.info("drained; exiting")
        logging.shutdown()  # the lines held for a batched write (os._exit skips it)
        os._exit(0)

    def on_datagram(self, data: bytes, addr: tuple[str, int], sock_index: int) -> None:
        self.counters["received"] += 1
        if self._overloaded(data):
            self._shed(data, addr, sock_index)
            return
        mark = mark_of(data)
        if self.answers.absorb(mark, sock_index):
            return
        arrived = time.monotonic()
        if self._warm_at is None:
            self._warm_at = arrived + WARM_UP
        origin = (self.transport.origin(sock_index) if ADOPTED_BASE <= sock_index < STREAM_BASE
                  else self.host)
        self.pool.spawn(self._handle, data, Source(addr, origin, sock_index, arrived=arrived),
                        mark, arrived)

    def _overloaded(self, data: bytes) -> bool:
        """Admission control, cheapest first.  Work that finishes something already begun
        (responses, ACK, BYE, CANCEL, a request answering our challenge) is taken while
        there is room at all; a request that starts something new and carries no
        credentials is refused first, once half the room is used: under overload the
        cluster finishes registrations and calls it started rather than starting more
        than it can finish."""
        inflight = len(self.pool)
        if inflight >= self.pool.size:
            return True
        if inflight < self.max_inflight // 2 or not _sheddable(data):
            return False
        return inflight >= self.max_inflight or not _has_credentials(data)

    def _shed(self, data: bytes, addr: tuple[str, int], sock_index: int) -> None:
        self.counters["shed"] += 1
        self.answers.raw(data, addr, sock_index, SipError(503, "Service Unavailable"),
                         (RETRY_AFTER,))

    def _handle(self, data: bytes, source: Source, mark: bytes | None,
                arrived: float) -> None:
        if time.monotonic() - arrived > self.queue_limit and _sheddable(data) \
                and arrived >= self._warm_at:
            # It waited too long: its sender has retransmitted it by now (T1), so working
            # on it would only feed the backlog.  Refuse it cheaply (design: shed early).
            self.answers.done(mark)
            self._shed(data, source.addr, source.sock_index)
            return
        if self._deferred and mark is not None:
            deferred = self._deferred.pop(mark, None)  # this copy is carried out now
            if deferred is not None:  # (and should it fail too, deferred as long as the first)
                source.keep_until = deferred[0]
        try:
            self._process(data, source)
        except StoreUnavailable as exc:
            if self._store_unavailable(data, source, exc):
                self._answer_raw(data, source, SipError(503, "Service Unavailable"),
                                 (RETRY_AFTER,))
        except SipError as exc:
            self.counters["bad_requests"] += 1
            self._answer_raw(data, source, exc)
        except Exception:
            self.counters["internal_errors"] += 1
            call_log(log, scan.call_id(data) or b"-").exception(
                "internal error on a message from %s:%d", *source.addr)
            self._answer_raw(data, source, SipError(500, "Server Internal Error"))
        finally:
            self.answers.done(mark)

    def _answer_raw(self, data: bytes, source: Source, error: SipError,
                    extra: tuple[bytes, ...] = ()) -> None:
        self.answers.raw(data, source.addr, source.sock_index, error, extra)

    # ---------------------------------------------------------------- SIP
    def _process(self, data: bytes, source: Source) -> None:
        try:
            msg = parse(data)
            msg.validate()
        except SipError as exc:
            self.counters["parse_errors"] += 1
            if scan.is_response(data):
                return  # a broken response is dropped, never answered
            raise exc
        if isinstance(msg, Response):
            try:
                self.on_response(msg, source)
            except SipError as exc:
                # A response cannot be answered: what its handling refused (a relay that
                # would not take the callee's SDP, say) is said here, or the call just
                # stalls until its timers give up.
                self.counters["response_errors"] += 1
                call_log(log, msg.call_id or b"-").warning(
                    "%d %s from %s:%d not carried out: %d %s", msg.status,
                    escape_controls(msg.reason), *source.addr, exc.status,
                    escape_controls(exc.reason))
            return
        try:
            self.on_request(msg, source)
        except _BadExtension as exc:
            unsupported = ", ".join(exc.options).encode()
            self.answers.reply(msg, source, 420, headers=[(b"Unsupported", unsupported)])
        except SipError as exc:
            self.answers.reply(msg, source, exc.status, exc.reason)
        except StoreUnavailable as exc:
            if self._store_unavailable(data, source, exc):
                self.answers.reply(msg, source, 503, headers=[(b"Retry-After", b"5")])

    def _store_unavailable(self, data: bytes, source: Source, exc: StoreUnavailable) -> bool:
        """Redis failed a request: whether to answer it 503 (with Retry-After) now.

        A blip costs no call: a request whose first copy failed less than
        ``workers.outage_hold`` seconds ago is left unanswered, so its sender repeats it
        (Timer A/E: 0.5, 1.5, 3.5, 7.5 s...) and a copy that finds Redis back is carried
        out as if nothing happened.  Past the hold it is answered 503 with Retry-After, so
        phones and trunks try another server.  (RFC 3261 lets a server stay silent; the
        dropped copy is not remembered as answered, so a later one is not absorbed.)

        Never a hang-up (BYE, CANCEL): a phone takes a 503 to its BYE as the end of the
        call and never sends it again, which would leave the other leg up until the media
        timeout.  It stays unanswered whatever the outage's length and is kept to be
        carried out once Redis is back."""
        self.counters["store_unavailable"] += 1
        clog = call_log(log, scan.call_id(data) or b"-")
        if source.answered:
            clog.warning("store unavailable after the answer: %s", exc)
            return False
        if data[:4] in (b"BYE ", b"CANC"):
            self.counters["hangups_deferred"] += 1
            clog.warning("store unavailable: %s left unanswered until a retransmission "
                         "finds Redis back: %s", data[:data.find(b" ")].decode("latin-1"), exc)
            self._defer_hangup(data, source)
            return False
        mark = mark_of(data)
        if mark is not None and self._hold(mark):
            self.counters["held_for_retransmission"] += 1
            clog.warning("store unavailable: left unanswered for its retransmission: %s", exc)
            return False
        clog.warning("store unavailable: %s", exc)
        return True

    def _hold(self, mark: bytes) -> bool:
        """Whether the request ``mark`` may still wait for its retransmission (its first
        copy failed less than outage_hold ago)."""
        now = time.monotonic()
        held = self._held
        first = held.get(mark)
        if first is None:
            first = now
            held.put(mark, now, len(mark))
        while (oldest := held.oldest()) is not None and oldest[1] < now - self.tx_ttl:
            held.pop_oldest()
        return now - first < self.outage_hold

    def _defer_hangup(self, data: bytes, source: Source) -> None:
        """Keep a hang-up Redis could not take, to carry it out once Redis is back even if
        the phone gave up repeating it (an outage longer than its 32 s): the call record is
        still there, so the other leg gets its BYE.  A copy handled meanwhile replaces it;
        one handled twice is answered from the call's transaction, nothing more."""
        mark = mark_of(data)
        if mark is None:
            return
        self._deferred.put(mark, (source.keep_until or time.monotonic() + DEFERRED_KEEP, data,
                                  source.addr, source.sock_index), len(mark) + len(data))
        self._deferred_waiting.set()

    def _retry_hangups(self) -> None:
        """Carry out the deferred hang-ups once Redis answers again (own greenlet); with
        none deferred it sleeps until one is."""
        backoff = Backoff(log, "deferred hang-ups", first=1.0, limit=2.0)
        while True:
            self._deferred_waiting.wait()
            gevent.sleep(1.0)
            if not self._deferred:
                self._deferred_waiting.clear()
                continue
            try:
                self.store.ping()
                now = time.monotonic()
                for mark, (until, data, addr, sock_index) in list(self._deferred.items()):
                    if until < now or self.transport.leaving:
                        self._deferred.pop(mark, None)
                        continue
                    self.counters["hangups_retried"] += 1
                    self.on_datagram(data, addr, sock_index)
            except Exception as exc:  # whatever it is, they are tried again later
                backoff.failed(exc)
            else:
                backoff.ok()

    def on_request(self, req: Request, source: Source) -> None:
        self.counters[f"requests_{req.method}"] += 1
        req.replace_top_via(req.via.with_received(*source.addr))
        if req.method not in ("ACK", "CANCEL"):
            self._check_request(req)
        in_dialog = req.to.tag is not None
        if not in_dialog and req.method in SCANNED_METHODS:
            # The user a scanner would enumerate: the AOR of a REGISTER, else the target.
            target = req.to.uri if req.method == "REGISTER" else req.uri
            user = getattr(target, "user", None)  # a tel: URI has none
            if user:
                self.scanners.note_request(source.addr, user.decode("latin-1"))
        if req.method == "REGISTER":
            self._register(req, source)
        elif req.method == "OPTIONS" and not in_dialog:
            self._options(req, source)
        elif req.method in CALL_METHODS or in_dialog:
            self.b2bua.on_request(req, source)
        elif req.method in KNOWN_METHODS:
            self.answers.reply(req, source, 405, headers=[(b"Allow", ALLOW)])
        else:
            self.answers.reply(req, source, 501)

    def _check_request(self, req: Request) -> None:
        """The RFC 3261 8.2 checks a UAS does before looking at the method."""
        if req.uri.scheme not in ("sip", "sips", "tel"):
            raise SipError(416, "Unsupported URI Scheme")
        max_forwards = req.max_forwards
        if max_forwards == 0 and req.method != "OPTIONS":
            raise SipError(483, "Too Many Hops")
        required = [v.decode("latin-1") for v in req.header_values("require") if v]
        unsupported = [opt for opt in required if opt not in SUPPORTED]
        if unsupported and req.method not in ("ACK", "CANCEL"):
            self.counters["bad_extension"] += 1
            raise _BadExtension(unsupported)

    def _options(self, req: Request, source: Source) -> None:
        self.answers.reply(req, source, 200, headers=[
            (b"Allow", ALLOW), (b"Accept", b"application/sdp"),
            (b"Supported", ", ".join(SUPPORTED).encode())])

    def _register(self, req: Request, source: Source) -> None:
        answers = self.answers
        answer, tx, fresh = self.registrar.handle(req, source, server_key(req))
        data = answer if isinstance(answer, bytes) else answer.to_bytes()
        if data.startswith(b"SIP/2.0 200 "):  # its digest was accepted: a proven source
            self.scanners.note_trusted(source.addr[0])
        dest = response_dest(req, source.addr)
        self.transport.send(data, dest, sock_index=source.sock_index)
        if source.arrived:
            self.histograms["register_latency"].observe(time.monotonic() - source.arrived)
        answers.remember(req, data, dest)
        if tx is not None and fresh:
            answers.keep(tx, data)

    def on_response(self, resp: Response, source: Source) -> None:
        self.counters[f"received_{resp.status}"] += 1
        if is_ping(resp.call_id):
            self.pinger.on_response(resp)
        else:
            self.b2bua.on_response(resp, source)

    # ---------------------------------------------------------------- reporting
    def _heartbeat_loop(self) -> None:
        backoff = Backoff(log, "worker heartbeat", limit=1.0)
        while True:
            info = {"role": "worker", "host": self.host, "name": self.name, "pid": os.getpid(),
                    "started": self.started, "seen": time.time(), "inflight": len(self.pool),
                    **self.counters, **metrics.histogram_fields(self.histograms)}
            try:
                self.store.heartbeat("worker", self.host, self.name, info, ttl=5)
            except Exception as exc:  # whatever it is, the heartbeat goes on
                gevent.sleep(backoff.failed(exc))
                continue
            backoff.ok()
            gevent.sleep(until_next_tick(HEARTBEAT_SECONDS))


def _has_credentials(data: bytes) -> bool:
    """Whether a request answers a challenge (Authorization or Proxy-Authorization)."""
    return data.find(b"uthorization:") > 0 or data.find(b"UTHORIZATION:") > 0


def _sheddable(data: bytes) -> bool:
    """New work that may be refused with 503: requests that start something (not a
    response, an ACK, a CANCEL or a BYE, which end or carry on what exists)."""
    return data[:4] in (b"REGI", b"INVI", b"OPTI", b"MESS", b"SUBS", b"PUBL")


class _BadExtension(SipError):
    def __init__(self, options: list[str]):
        super().__init__(420, "Bad Extension")
        self.options = options
