"""The B2BUA shell: loads a call from Redis, feeds it one event, writes it back, acts.

Every event follows the same steps (design invariant 4): load the call record
and its version; let the pure state machine (call/) decide, with the relay's SDP
rewrites fetched around it (mediastep.py); arm the timers it
asked for (harmless if the write then loses: a timer checks the record when it
fires); write the record compare-and-set; only then send what it decided.  A
writer that loses the race re-reads and decides again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

import gevent
import gevent.event
import gevent.lock

from cluster.backoff import Backoff
from cluster.bounded import BoundedCache
from cluster.cadence import until_next_tick
from cluster.envelope import DIAL_TCP, affinity_key, is_stream
from cluster.logsetup import call_log
from cluster.sip import scan, sdp
from cluster.sip.errors import SipError
from cluster.sip.ids import call_tag
from cluster.sip.ids import leg_name as _leg_name
from cluster.sip.message import Request, Response
from cluster.sip.transaction import TimerConfig, response_dest, server_key
from cluster.sip.uri import SipURI, hostport, parse_uri
from cluster.store import TIMER_LEASE, NonceAsk, StoreUnavailable, aor_of, pack, tx_key

from .auth import AuthResult, Verdict
from .call import MEDIA_TIMEOUT, STATUS_CAUSES, Call, Cdr, Ctx, Out, Reply, Settings, Target
from .mediastep import decide
from .registrar import Source
from .tracebuf import TraceBuffer
from .unsure import UnsureWrites

log = logging.getLogger("b2bua")
LIVE_TTL = 6 * 3600.0  # a live call's record; refreshed at every change
ENDED_TTL = 120.0  # kept a while after the end for retransmissions and the operator
CAS_ATTEMPTS = 8
TIMER_TICK = 0.05  # timers fire within this of their due time (T1 is 500 ms)
# With no timer due sooner, a worker claims timers this often: the timers another worker
# armed after this one's last claim, should that worker die before firing them, fire at
# most this late (one T1).  Polling every TIMER_TICK kept an idle cluster's workers at 3%
# of a core each, 155 timer scripts a second in all (2 workers, 4 shards).
TIMER_IDLE_TICK = 0.5
RECORD_CACHE = 20_000  # call records remembered per worker
# ... and the memory they may take.  A two-fork call's record is ~5 KB packed and ~12 KB as
# Python objects (measured: RECORD_OBJECT_FACTOR 2.4 x its msgpack size), so 20,000 records
# could take ~240 MB, more with large SDP; 64 MB keeps ~5,000 typical ones.  A record is the
# fast path for a call's next event on this worker (affinity); a miss costs one HMGET.
# Sizing it costs a pack per remembered record (~11 us for 5 KB, measured).
RECORD_CACHE_BYTES = 64 * 1024 * 1024
RECORD_OBJECT_FACTOR = 2.4
# Timer removals wait this long for a call write to ride on (``_take_disarm``), else go
# in a batch of their own.  A removal that waits is harmless: a timer still armed when
# it comes due fires, finds its call no longer waiting for it, and is gone.  At 5 ms most
# removals took a round trip of their own (call writes are ~10 ms apart on a worker at
# 20 calls/s).
DISARM_BATCH_SECONDS = 0.05
UNSURE_EVERY = 0.5  # seconds between two looks at the writes whose reply was lost


# Kept out of the Warning's quoted text and the log: a proto is the offer's, any bytes.
_UNSAFE = re.compile(rb"[^A-Za-z0-9/._+, -]")

class B2BUA:
    """``config``: the calls, routes, realm and SIP settings; ``answers``: stateless
    answers (answers.py); ``media``: where SDP goes (media.py); ``spawn``: runs a fired
    timer in the worker's pool; ``name`` and ``host``: this worker, written in the call
    records it handles."""

    def __init__(self, config, *, store, transport, answers, auth, scanners, media, ids,
                 host: str, name: str, counters, histograms, spawn):
        self.config = config
        self.store = store
        self.transport = transport
        self.answers = answers
        self.auth = auth
        self.scanners = scanners
        self.media = media
        self.ids = ids
        self.host = host
        self.name = name
        self.counters = counters
        self.histograms = histograms
        self.spawn = spawn
        self.running = True
        self._locks: dict[str, list] = {}
        # call tag -> (version, record)
        self._records = BoundedCache(RECORD_CACHE, RECORD_CACHE_BYTES)
        self._disarm: dict[tuple[str, str, float], None] = {}  # ordered, no repeats
        self._disarm_pending = False
        self._next_claim = 0.0  # when the timer loop claims next (time.time())
        self._claim_now = gevent.event.Event()  # set: a timer armed here is due sooner
        self._unsure = UnsureWrites()  # writes that raised yet may have landed
        self.traces = TraceBuffer(store, config.calls.trace_max, counters)
        cfg = config
        self.settings = Settings(
            address=cfg.sip.effective_address, port=cfg.sip.effective_port,
            user_agent=cfg.sip.user_agent.encode(), xcid_header=cfg.calls.xcid_header.encode(),
            timers=TimerConfig(t1=cfg.timers.t1, t2=cfg.timers.t2, t4=cfg.timers.t4),
            no_answer_timeout=cfg.calls.no_answer_timeout,
            max_duration=cfg.calls.max_duration,
            gateway_credentials={i: (r.username, r.password) for i, r in enumerate(cfg.routes)
                                 if r.username},
            reliable=is_stream)
        self.routes = [(re.compile(r.match), r) for r in cfg.routes]
        self.trusted = {r.trusted_source for r in cfg.routes if r.trusted_source}

    def ctx(self, source: tuple[str, int] | None, media, now: float, arrival=None) -> Ctx:
        """``arrival``: the Source a request came in through (its host and SIP socket): the
        answers to it leave from there."""
        if arrival is None:
            return Ctx(now, self.ids, self.settings, source, media)
        return Ctx(now, self.ids, self.settings, source, media,
                   host=arrival.host, sock_index=arrival.sock_index)

    # ---------------------------------------------------------------- requests
    def on_request(self, req: Request, source) -> None:
        tag = call_tag(req.call_id)
        event = lambda call, ctx: call.on_request(req, source.addr, ctx)  # noqa: E731
        if req.method in ("INVITE", "MESSAGE") and req.to.tag is None:
            # A request that may start a call: unless this worker holds the call, its
            # record and the answer kept for it (a copy answered by another worker) come
            # in one round trip.
            stored_key = tx_key(tag, server_key(req))
            loaded = stored = session = None
            if tag not in self._records and source.addr[0] not in self.trusted and \
                    not self.auth.carries_credentials(req, proxy=True):
                # It is challenged, whatever Redis holds: no call starts without
                # credentials (but a trusted gateway's), so none has this request's
                # Call-ID but a merged copy's (482 once it comes with credentials), and
                # answers are kept only past the authentication.  Nothing to read.
                self._new_call(tag, req, source, stored_key, None)
                return
            passed = counted = None
            if tag not in self._records:
                # ... and the caller's record, when its credentials will need it; or,
                # when they pass on what this worker holds, the nonce count and callee
                # that come after (one round trip less for a caller seen lately).
                gateway = source.addr[0] in self.trusted
                user = None if gateway else self.auth.user_to_read(req, proxy=True)
                passed = None if gateway or user is not None else self.auth.precheck(
                    req, source.addr, proxy=True)
                ask = None if passed is None or not passed.credentials.nc else \
                    self._nonce_ask(req, aor_of(passed.username, self.config.realm),
                                    passed.credentials)
                arrival = self.store.load_call_and_answer(
                    tag, stored_key, self.media.mode == "relay",
                    None if user is None else (user, self.config.realm), ask)
                loaded, stored, session = arrival.call, arrival.answer, arrival.session
                if user is not None:
                    self.auth.read_user(user, arrival.user)
                counted = None if ask is None else (ask, arrival.nonce)
            if (tag in self._records or loaded is not None) and self._with_call(
                    tag, event, req, source, inbound=req, loaded=loaded):
                return
            with self.media.session_read(tag, session):
                self._new_call(tag, req, source, stored_key, stored, passed, counted)
            return
        if req.method == "ACK" and self.answers.acks_stateless(req):
            # The ACK of a final answer given outside any call (a challenge): nothing to load.
            self.trace(tag, [self._entry("in", req, _leg_name(req.call_id), source.addr)],
                       brief=True)
            return
        if self._with_call(tag, event, req, source, inbound=req):
            return
        if req.method == "ACK":  # the ACK of a challenge or failure answered statelessly
            self.trace(tag, [self._entry("in", req, _leg_name(req.call_id), source.addr)],
                       brief=True)
        else:
            self.answers.reply(req, source, 481)

    def on_response(self, resp: Response, source) -> None:
        tag = call_tag(resp.call_id)
        if not self._with_call(tag, lambda call, ctx: call.on_response(resp, source.addr, ctx),
                               None, source, inbound=resp):
            self.counters["stray_responses"] += 1

    def media_timeout(self, tag: str) -> None:
        """No RTP either way for media.media_timeout (a relay said so): hang up both legs."""
        self._call_log(tag).info("media timeout: hanging up call %s", tag)
        self.hangup(tag, MEDIA_TIMEOUT)

    def host_down(self, tag: str, relay: str) -> bool:
        """The host of the call's relay died: no media can flow, hang up both legs."""
        from .call import HOST_DOWN
        self._call_log(tag).info("relay %s is on a dead host: hanging up call %s", relay, tag)
        return self.hangup(tag, HOST_DOWN)

    def on_timer(self, tag: str, name: str, due: float) -> None:
        self._with_call(tag, lambda call, ctx: call.on_timer(name, due, ctx), None, None)

    def hangup(self, tag: str, cause=None, side: str = "system") -> bool:
        from .call import ADMIN_HANGUP
        return self._with_call(tag, lambda call, ctx: call.hangup_now(
            cause or ADMIN_HANGUP, side, ctx), None, None)

    # ---------------------------------------------------------------- a new call
    def _new_call(self, tag: str, req: Request, source, stored_key: str,
                  stored: bytes | None, passed: AuthResult | None = None,
                  counted: tuple[NonceAsk, tuple] | None = None) -> None:
        """``stored``: the answer kept under ``stored_key`` (read with the call's record).
        ``passed``: the caller's credentials already found good (``Authenticator.precheck``);
        ``counted``: the nonce count asked with the first reads, and its answer."""
        clog = call_log(log, req.call_id)
        if stored:
            self.transport.send(stored, source.addr, sock_index=source.sock_index)
            return
        # Traced with the first answer, in one write; kept briefly until the call exists,
        # so unauthenticated INVITEs cost little memory.
        arrived = [self._entry("in", req, "a", source.addr)]
        gateway = source.addr[0] in self.trusted
        known: dict = {}  # what the authentication read of the callee on its way
        caller = _user_of(req.from_.uri) if gateway else self._authenticate(
            req, source, arrived, known, passed, counted)
        if caller is None:
            return
        self.trace(tag, arrived)
        callee = _callee_of(req)
        warning = self._unrelayable_media(req)
        if warning is not None:
            clog.info("call from %s to %s: 488, %s", caller, callee, warning.decode())
            self._fail_statelessly(req, source, 488, stored_key, headers=[(b"Warning", warning)])
            if req.method == "INVITE":
                self._unrouted_cdr(req, source, caller, callee, 488)
            return
        targets, failure = self._targets(callee, local_only=gateway, known=known.get(callee))
        if failure is not None:
            clog.info("call from %s to %s: %d", caller, callee, failure)
            self._fail_statelessly(req, source, failure, stored_key)
            if req.method == "INVITE":  # an attempt that never rang still gets its CDR
                self._unrouted_cdr(req, source, caller, callee, failure)
            return
        now = time.time()
        call, actions = decide(lambda media: Call.start(
            tag=tag, slot=affinity_key(req.call_id), invite=req, source=source.addr,
            host=source.host, sock_index=source.sock_index, caller=caller, callee=callee,
            targets=targets, ctx=self.ctx(source.addr, media, now)), self.media)
        # Its 100 Trying leaves only once the call is written: after a 100 the caller stops
        # repeating the INVITE, so a worker dying before the write must not have sent it.
        call.worker = self.name
        with self._serialized(tag):
            if self._commit(tag, 0, call, actions, req, source):
                self.counters["calls"] += 1
                clog.info("call %s: %s -> %s, %d contact(s)", tag, caller, callee, len(targets))
            else:  # another worker created it meanwhile: this INVITE is a retransmission there
                self._with_call_locked(tag, lambda c, ctx: c.on_request(req, source.addr, ctx),
                                       req, source, None)

    def _targets(self, callee: str | None, local_only: bool,
                 known: tuple[dict | None, list] | None = None
                 ) -> tuple[list[Target], int | None]:
        """Where to ring ``callee``: every registered contact of a local user (404 when
        unknown, 480 when not registered), else the first matching route (not for calls
        from a gateway: no open relay).  ``known``: the user's record and bindings, when
        already read."""
        if callee is None:
            return [], 404
        user, bindings = known or self.store.user_and_bindings(callee, self.config.realm)
        if user is not None:
            reachable = [(b, t) for b in bindings if (t := self._target_of(b)) is not None]
            # RFC 5626 5.3: one flow per instance, the newest of those still open.
            newest: dict[str, float] = {}
            for b, _ in reachable:
                if b.instance and b.reg_id is not None:
                    newest[b.instance] = max(newest.get(b.instance, -1.0), b.registered_at)
            targets, rung = [], set()
            for b, target in reachable:
                if b.instance and b.reg_id is not None:
                    if b.instance in rung or b.registered_at < newest[b.instance]:
                        continue
                    rung.add(b.instance)
                targets.append(target)
            return targets, None if targets else 480
        if local_only:
            return [], 404
        for index, (pattern, route) in enumerate(self.routes):
            m = pattern.match(callee)
            if m is None:
                continue
            uri = route.uri.format(m.group(0), *m.groups(), user=callee).encode()
            parsed = parse_uri(uri)
            if not isinstance(parsed, SipURI):
                continue
            peer = (parsed.param("maddr") or parsed.host_bare, parsed.port or 5060)
            return [Target(uri, peer, self.host, _dial_index(parsed), route=index)], None
        return [], 404

    def _unrelayable_media(self, req: Request) -> bytes | None:
        """The Warning of a 488 when the offer has media the relay cannot carry (a
        browser's DTLS-SRTP): refused before anything rings, not a call without sound.
        None when it can (or there is no relay, or no offer: a malformed one is answered
        400 on the way through the relay)."""
        if self.media.mode != "relay" or not req.body or (
                req.content_type or b"").split(b";")[0].strip().lower() != b"application/sdp":
            return None
        try:
            protos = sdp.unrelayable_protos(sdp.parse(req.body))
        except SipError:
            return None
        if not protos:
            return None
        # RFC 3261 20.43: 302 "Incompatible transport protocol".
        return b'302 %s "Incompatible transport protocol: %s (the media relay carries ' \
               b'RTP/AVP(F) and RTP/SAVP(F) over UDP only)"' % (
                   self.settings.address.encode(),
                   _UNSAFE.sub(b"?", ", ".join(protos).encode("utf-8", "replace")))

    def _target_of(self, binding) -> Target | None:
        """Where a binding is rung: over its own connection while it is open; over one the
        cluster opens when its Contact says ;transport=tcp and nothing else reaches it (a
        phone that registered over UDP, or whose connection closed: RFC 3261 18.1.1);
        never through a flow of RFC 5626 outbound once that flow is gone (the phone makes
        a new one), nor to a Contact behind a NAT (only the closed flow got through)."""
        if binding.destination is None:
            return None
        if not binding.conn:  # registered over UDP: its flow or its NAT's mapping is UDP
            flow = binding.reg_id is not None or binding.nat
            return Target(binding.contact, binding.destination, binding.host,
                          0 if flow else _dial_index(parse_uri(binding.contact)))
        if self._reachable(binding):
            return Target(binding.contact, binding.destination, binding.host, binding.conn)
        uri = parse_uri(binding.contact)
        if binding.reg_id is not None or binding.nat or not _dial_index(uri):
            return None
        self.counters["bindings_redialed"] += 1
        return Target(binding.contact, binding.destination, self.host, DIAL_TCP)

    def _reachable(self, binding) -> bool:
        """Whether a binding can be sent to: one made over a TCP/TLS connection only while
        that connection is open (the phone reconnects and registers again)."""
        if not binding.conn or self.store.stream_open(binding.host, binding.conn):
            return True
        self.counters["bindings_connection_closed"] += 1
        return False

    def _authenticate(self, req: Request, source, arrived: list[dict], known: dict,
                      passed: AuthResult | None = None,
                      counted: tuple[NonceAsk, tuple] | None = None) -> str | None:
        """The caller's user name, or None when the request was answered (407/403).
        The nonce-count check reads the callee's record and bindings in its round trip,
        into ``known`` (callee -> (record, bindings))."""
        auth = self.auth
        result = passed if passed is not None else auth.check(req, source.addr, proxy=True)
        if result.verdict in (Verdict.CHALLENGE, Verdict.STALE):
            self._reply(req, source, 407, headers=auth.challenge_headers(
                proxy=True, stale=result.verdict is Verdict.STALE), prior=arrived, brief=True)
            return None
        if result.verdict is not Verdict.OK:
            self._reply(req, source, 403, prior=arrived, brief=True)
            return None
        creds = result.credentials
        aor = aor_of(result.username, self.config.realm)
        if creds.nc and not self._accept_nonce_count(req, aor, creds, known, counted):
            auth.refused(req, source.addr, result.username, "replayed-nonce-count")
            self._reply(req, source, 407, headers=auth.challenge_headers(proxy=True),
                        prior=arrived, brief=True)
            return None
        from_user = _user_of(req.from_.uri)
        if from_user != result.username and not self.config.calls.allow_from_mismatch:
            auth.refused(req, source.addr, result.username, "user-mismatch")
            self._reply(req, source, 403, "From does not match the authenticated user",
                        prior=arrived, brief=True)
            return None
        self.scanners.note_trusted(source.addr[0])  # a proven source (cluster/limits.py)
        return result.username

    def _accept_nonce_count(self, req: Request, aor: str, creds, known: dict,
                            counted: tuple[NonceAsk, tuple] | None = None) -> bool:
        ask = self._nonce_ask(req, aor, creds)
        if ask is None:
            return self.store.accept_nonce_count(aor, creds.nonce, creds.nonce_count,
                                                 self.config.auth.nonce_lifetime,
                                                 server_key(req))
        if counted is not None and counted[0] == ask:  # asked with the first reads
            accepted, user, bindings = counted[1]
        else:
            accepted, user, bindings = self.store.nonce_count_and_user(*ask)
        known[ask.user] = (user, bindings)
        return accepted

    def _nonce_ask(self, req: Request, aor: str, creds) -> NonceAsk | None:
        """The nonce count of ``creds`` to check with the callee's record and bindings;
        None when there is no callee to read (it is then checked alone)."""
        try:
            callee = _callee_of(req)
        except SipError:
            return None  # answered 400 once the caller is known, as before
        if callee is None:
            return None
        return NonceAsk(aor, creds.nonce, creds.nonce_count, self.config.auth.nonce_lifetime,
                        server_key(req), callee, self.config.realm)

    def _fail_statelessly(self, req: Request, source, status: int, stored_key: str,
                          headers=()) -> None:
        data = self.answers.build(req, status, headers=headers).to_bytes()
        self.transport.send(data, source.addr, sock_index=source.sock_index)
        self.trace(call_tag(req.call_id), [_raw_entry("out", data, "a", source.addr)])
        self.answers.keep(stored_key, data)

    def _unrouted_cdr(self, req: Request, source: Source, caller: str, callee: str | None,
                      status: int) -> None:
        # Not registered is "subscriber absent" (Q.850 20), not "no answer" as after ringing.
        cause, q850 = (("SUBSCRIBER_ABSENT", 20) if status == 480
                       else STATUS_CAUSES.get(status, ("CALL_REJECTED", 21)))
        now = round(time.time(), 3)
        self.store.add_cdr({
            "caller": caller, "callee": callee or "", "a_call_id": req.call_id.decode("latin-1"),
            "b_call_id": "", "start": now, "answer": "", "end": now, "duration": 0, "billsec": 0,
            "caller_source": hostport(*source.addr[:2]), "hangup_cause": cause, "q850": q850,
            "hangup_side": "system", "sip_status": status})

    # ---------------------------------------------------------------- the loop
    @contextlib.contextmanager
    def _serialized(self, tag: str):
        """One event of a call at a time in this worker, in arrival order.

        Between the write and the send a greenlet may yield; without this a 180 handled
        just before a 200 could leave after it.  Other workers are kept in line by the
        compare-and-set; affinity makes them rare.
        """
        entry = self._locks.get(tag)
        if entry is None:
            entry = self._locks[tag] = [gevent.lock.Semaphore(), 0]
        entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[tag]

    def _with_call(self, tag: str, event, req: Request | None, source,
                   inbound: Request | Response | None = None,
                   loaded: tuple[int, dict] | None = None) -> bool:
        """Run ``event(call, ctx)`` on call ``tag`` until its write wins; False when there is
        no call.  ``loaded``: the record just read from Redis, if the caller read it."""
        with self._serialized(tag):
            return self._with_call_locked(tag, event, req, source, inbound, loaded)

    def _with_call_locked(self, tag: str, event, req: Request | None, source,
                          inbound: Request | Response | None,
                          loaded: tuple[int, dict] | None = None) -> bool:
        for attempt in range(CAS_ATTEMPTS):
            cached = self._records.get(tag) if attempt == 0 else None
            if cached is None and attempt == 0 and loaded is not None:
                self._remember(tag, *loaded)
                cached, fresh = loaded, True
            elif cached is None:
                loaded = self.store.load_call(tag)
                if loaded is None:
                    self._records.pop(tag, None)
                    return False
                cached = loaded
                self._remember(tag, *loaded)
                fresh = True
            else:
                fresh = False
            version, record = cached
            if inbound is not None and attempt == 0 and self.config.calls.trace:
                self.trace(tag, [self._entry("in", inbound, _leg_of(record, inbound.call_id),
                                             source.addr)])
            now = time.time()
            where = source.addr if source is not None else None
            arrival = source if req is not None else None  # a request: answered from there

            def run(media, record=record, now=now, where=where, arrival=arrival):
                call = Call.from_record(record)  # afresh each run: nothing of one is kept
                timers = call.timer_entries()
                call.prune(now)
                return call, timers, event(call, self.ctx(where, media, now, arrival))

            call, timers, actions = decide(run, self.media)
            call.worker = self.name
            after = call.to_record()
            if after == record:
                if fresh or self.store.call_version(tag) == version:
                    self._perform(tag, actions, req, source)
                    return True
                continue  # the remembered record is out of date: load it and decide again
            if self._commit(tag, version, call, actions, req, source, after, timers):
                self._observe_progress(record, after)
                return True
            self.counters["cas_conflicts"] += 1
            gevent.sleep(0.001)
        raise StoreUnavailable(f"call {tag}: too many concurrent writers")

    def _commit(self, tag: str, version: int, call: Call, actions: list, req, source,
                record: dict | None = None, timers_before: dict | None = None) -> bool:
        """Write the call (compare-and-set) with the timers it now waits for armed first:
        a timer armed for a write that then loses fires, finds nothing to do, and is gone.
        Timers it no longer waits for are disarmed after the write, in batches."""
        record = record or call.to_record()
        timers = call.timer_entries()
        before = timers_before or {}
        arm = [(tag, name, due) for name, due in timers.items() if before.get(name) != due]
        ttl = LIVE_TTL if call.live else ENDED_TTL
        packed = pack(record)  # once: the write and the cache's size of it
        try:
            version = self.store.save_call(tag, version, record, ttl, arm=arm,
                                           disarm=self._take_disarm(), packed=packed)
        except StoreUnavailable:
            self._unsure.note(tag, version, record, actions, call.ended, time.monotonic())
            raise
        if version is None:
            self._records.pop(tag, None)
            return False
        self._remember(tag, version, record, len(packed))
        if arm:
            self._claim_by(min(due for _, _, due in arm))
        self._disarm_soon([(tag, name, due) for name, due in before.items()
                           if timers.get(name) != due])
        self._perform(tag, actions, req, source)
        return True

    def _observe_progress(self, before: dict, after: dict) -> None:
        """Feed the call-setup histograms once per call: the write that moved the call on
        wins its compare-and-set once, on whichever worker."""
        if after.get("method", "INVITE") != "INVITE" or not after.get("created"):
            return
        elapsed = time.time() - after["created"]
        hists = self.histograms
        if not _callee_answered(before) and _callee_answered(after):
            hists["invite_first_response"].observe(elapsed)
        if before.get("state") == "trying" and after.get("state") in ("ringing", "early"):
            hists["post_dial_delay"].observe(elapsed)

    def _settle_unsure(self) -> None:
        """Carry out the writes that raised yet reached Redis (see unsure.py): a look at
        the version of each such call, and at its record once that moved."""
        now = time.monotonic()
        for tag in self._unsure.tags():
            version = self.store.call_version(tag)
            if self._unsure.waiting(tag, version, now):
                continue
            loaded = self.store.load_call(tag) if version else None
            version, record = loaded if loaded is not None else (0, None)
            outcome = self._unsure.look(tag, version, record, now)
            if outcome.rearm:
                # Its timer entries went in the same pipeline as the record, and may have
                # been refused while the record was taken (memory refused for a moment,
                # a cluster node gone): the record written again, with every timer it
                # waits for armed (none taken as armed before).
                self._commit(tag, version, Call.from_record(record), [], None, None, record,
                             timers_before={})
            if outcome.actions:
                self._call_log(tag).info("call %s: a write whose reply was lost reached "
                                         "Redis: carried out now", tag)
                self._perform(tag, outcome.actions, None, None)
            self._unsure.keep(tag, outcome.left)

    def _remember(self, tag: str, version: int, record: dict, size: int | None = None) -> None:
        """Keep the call's last record: with affinity the next event of the call comes here
        too, and the compare-and-set of its write proves the record still current.
        ``size``: its packed size, when known (else it is packed to learn it)."""
        size = len(pack(record)) if size is None else size
        self._records.put(tag, (version, record), int(size * RECORD_OBJECT_FACTOR))

    def _disarm_soon(self, entries: list[tuple[str, str, float]]) -> None:
        """Remove these timer entries in the next batch (a fired timer may be in it twice:
        once from its call's write, once from its firing)."""
        self._disarm.update(dict.fromkeys(entries))
        if self._disarm and not self._disarm_pending:
            self._disarm_pending = True
            gevent.spawn_later(DISARM_BATCH_SECONDS, self._write_disarm)

    def _take_disarm(self) -> list[tuple[str, str, float]]:
        """The removals waiting for their batch, to send with a call's write instead (lost
        with it if that write fails, as a failed batch is: see ``_write_disarm``)."""
        entries, self._disarm = list(self._disarm), {}
        return entries

    def _write_disarm(self) -> None:
        entries = self._take_disarm()
        self._disarm_pending = False
        try:
            self.store.remove_timers(entries)
        except StoreUnavailable:
            pass  # a timer left armed fires, finds nothing to do, and is gone

    def _perform(self, tag: str, actions: list, req: Request | None, source) -> None:
        """Do what the call decided; every kind of action it can return (call/actions.py)
        has its branch here, and anything else is logged and counted, never dropped
        silently (the unit rig fails a test on it before it gets here)."""
        sent = []
        for action in actions:
            kind = type(action)
            if kind is Out:
                self.transport.send(action.data, action.dest, host=action.host,
                                      sock_index=action.sock_index)
                sent.append(action)
            elif kind is Reply:
                if req is not None:  # only an inbound request is answered statelessly
                    self._reply(req, source, action.status, action.reason)
            elif kind is Cdr:
                self._write_cdr(tag, action)
            else:
                self.counters["unhandled_actions"] += 1
                self._call_log(tag).error("call %s: no way to perform %r", tag, action)
        if sent and self.config.calls.trace:
            self.trace(tag, [self._sent_entry(tag, out) for out in sent])

    def _write_cdr(self, tag: str, action: Cdr) -> None:
        self._complete_cdr(tag, action.record)
        self.counters["calls_ended"] += 1
        call_log(log, action.record["a_call_id"]).info(
            "call %s ended: %s (%s side), %ss", tag, action.record["hangup_cause"],
            action.record["hangup_side"], action.record["duration"])
        self.store.add_cdr(action.record)

    def _complete_cdr(self, tag: str, record: dict) -> None:
        """What the call record does not hold: the relay's figures per leg, as flat fields
        (``media_<leg>_<x>``) a billing import takes as columns.  (The codec comes with the
        record: the call notes it as the answer passes.  Read back from the call's trace
        it cost a flush and a read, one round trip and ~6% of a worker's CPU a call.)"""
        figures = self.media.end(tag)
        for leg, values in _media_summary(figures or {}).items():
            for name, value in values.items():
                record[f"media_{leg}_{name}"] = value

    # ---------------------------------------------------------------- message trace
    def trace(self, tag: str, entries: list[dict], brief: bool = False) -> None:
        """Keep the call's messages for ``sipctl call`` (bounded, expiring); ``brief``
        entries of an attempt that is no call yet live only as long as a transaction."""
        calls = self.config.calls
        if calls.trace:  # written with the next batch (tracebuf.py)
            self.traces.add(tag, entries, self.answers.tx_ttl if brief else calls.trace_ttl)

    def _reply(self, req: Request, source, status: int, reason: str | None = None, *,
               headers=(), prior: list[dict] = (), brief: bool = False) -> None:
        """Answer ``req`` outside any transaction, and trace the answer (after ``prior``)."""
        data = self.answers.reply(req, source, status, reason, headers=headers)
        sent = _raw_entry("out", data, _leg_name(req.call_id), response_dest(req, source.addr))
        self.trace(call_tag(req.call_id), [*prior, sent], brief=brief)

    @staticmethod
    def _entry(direction: str, msg: Request | Response, leg: str, peer) -> dict:
        return _raw_entry(direction, msg.to_bytes(), leg, peer)

    @staticmethod
    def _sent_entry(tag: str, out: Out) -> dict:
        return _raw_entry("out", out.data, _leg_name(scan.call_id(out.data) or b""), out.dest)

    def stop(self) -> None:
        """Claim no more timers (draining): the other workers fire them."""
        self.running = False
        self._claim_now.set()

    def timer_loop(self) -> None:
        """Fire due timers, whichever worker armed them (design invariant 10).  Between
        claims it sleeps until the earliest timer any worker armed (the claim tells), at
        most TIMER_IDLE_TICK, at least TIMER_TICK; a timer this worker arms for sooner
        wakes it (``_claim_by``)."""
        backoff, settling = Backoff(log, "timers"), Backoff(log, "unsure call ends")
        next_settle = 0.0
        while self.running:
            self._wait_for_claim()
            now = time.time()
            self._next_claim = now + until_next_tick(TIMER_IDLE_TICK)
            try:
                claim = self.store.claim_due_timers(now)
            except Exception as exc:  # whatever it is, timers go on firing
                self._next_claim = now + TIMER_TICK
                gevent.sleep(backoff.failed(exc))
                continue
            backoff.ok()
            if claim.next_due is not None:
                self._next_claim = min(self._next_claim, claim.next_due)
            for tag, name, at in claim.due:
                self.spawn(self._fire, tag, name, at)
            if self._unsure:
                self._next_claim = min(self._next_claim, now + UNSURE_EVERY)
                if time.monotonic() >= next_settle:
                    next_settle = time.monotonic() + UNSURE_EVERY
                    try:
                        self._settle_unsure()
                    except Exception as exc:  # what is left is settled next time
                        settling.failed(exc)
                    else:
                        settling.ok()

    def _wait_for_claim(self) -> None:
        # Claims at least TIMER_TICK apart: due timers come in batches.  One wait, not a
        # sleep of TIMER_TICK and then another: an idle worker woke twice per claim.
        earliest = time.time() + TIMER_TICK
        while self.running:
            self._claim_now.clear()  # before reading _next_claim: no wake-up is missed
            left = max(self._next_claim, earliest) - time.time()
            if left <= 0:
                return
            self._claim_now.wait(left)

    def _claim_by(self, due: float) -> None:
        """A timer this worker armed is due at ``due``: claim by then."""
        if due < self._next_claim:
            self._next_claim = due
            self._claim_now.set()

    def _fire(self, tag: str, name: str, at: float) -> None:
        """Fire a claimed timer; its entry goes once the call has seen it (the call's write
        usually disarms it already), and stays, to come due again, when Redis failed."""
        try:
            self.on_timer(tag, name, at)
        except StoreUnavailable as exc:
            self._call_log(tag).warning("timer %s of call %s: Redis trouble (%s); it fires "
                                        "again in %.0f s", name, tag, exc, TIMER_LEASE)
            return
        except Exception:
            self._call_log(tag).exception("timer %s of call %s failed", name, tag)
        self._disarm_soon([(tag, name, at)])

    def _call_log(self, tag: str):
        """A logger for call ``tag`` with its A-leg Call-ID, when Redis can still tell it."""
        try:
            loaded = self.store.load_call(tag)
        except StoreUnavailable:
            loaded = None
        return call_log(log, loaded[1]["a"]["call_id"] if loaded else "unknown")


def _leg_of(record: dict, call_id: bytes) -> str:
    """The name of the leg of ``record`` with this Call-ID, "?" for none."""
    if record["a"]["call_id"] == call_id:
        return "a"
    return next((leg["name"] for leg in record["forks"] if leg["call_id"] == call_id), "?")


def _raw_entry(direction: str, data: bytes, leg: str, peer) -> dict:
    """One message of a call's trace (see cluster/store/schema.py, trace:{tag})."""
    return {"t": time.time(), "dir": direction, "leg": leg, "peer": list(peer),
            "first": data.split(b"\r\n", 1)[0].decode("utf-8", "replace"), "data": data}


def _media_summary(figures: dict) -> dict:
    """Per leg, what the relay received from that leg's phone: for the CDR."""
    summary = {}
    for leg in figures.get("legs", []):
        streams = leg.get("streams", [])
        summary[leg.get("name", "?")] = {
            "packets": sum(s.get("packets", 0) for s in streams),
            "bytes": sum(s.get("bytes", 0) for s in streams),
            "lost": sum(s.get("lost", 0) for s in streams),
            "jitter_ms": max((s.get("jitter_ms", 0.0) for s in streams), default=0.0)}
    return summary


def _dial_index(uri) -> int:
    """The socket number for a target whose URI asks for TCP (;transport=tcp): a connection
    the dispatcher opens (cluster/dialer.py); 0 for UDP."""
    if isinstance(uri, SipURI) and (uri.param("transport") or "").lower() == "tcp":
        return DIAL_TCP
    return 0


def _user_of(uri) -> str | None:
    if isinstance(uri, SipURI):
        return uri.user_name  # 400 (SipError) when it decodes to a control
    return None


def _callee_of(req: Request) -> str | None:
    return _user_of(req.uri)


def _callee_answered(record: dict) -> bool:
    """Whether any fork of the call has had a response (100 Trying included)."""
    return any(leg.get("provisional") or leg.get("final") for leg in record.get("forks", ()))
