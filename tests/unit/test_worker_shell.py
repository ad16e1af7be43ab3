"""The worker shell end to end on datagrams (workers/sip/worker.py with its registrar,
B2BUA and answers.py), over the memory store (tests/memstore.py, held to the Redis
store's contract by tests/integration/test_store_contract.py) and a transport that
records what leaves: admission control, the retransmission absorber, stateless answers,
the challenge of an INVITE, the compare-and-set of a call record another worker wrote and
Redis trouble.
The users are the seed's 1002 (the caller, password 1234) and 1009 (the callee, 5678)."""

from __future__ import annotations

import dataclasses
import time
from itertools import count

import gevent
import gevent.event
import pytest
from callkit import ANSWER_SDP, Callee, Caller, seed_sdp, text
from memstore import MemoryStore

from cluster.config import AuthConfig, CallsConfig, Config, MediaConfig, SipConfig, WorkersConfig
from cluster.sip import digest
from cluster.sip.ids import call_tag
from cluster.sip.message import Request, Response, parse
from cluster.store import StoreUnavailable, aor_of
from workers.sip.b2bua import TIMER_IDLE_TICK, TIMER_TICK, UNSURE_EVERY
from workers.sip.worker import WARM_UP, Worker

REALM = ADDRESS = "192.168.31.109"
CALLER = ("192.168.31.142", 55747)
CALLEE = ("192.168.31.50", 60119)
MAX_INFLIGHT = 4


class RecordingTransport:
    """What the worker sends, in order: (data, dest, keyword arguments)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int], dict]] = []
        self.history: list[tuple[bytes, tuple[str, int], dict]] = []  # never taken
        self.watch = self.mirror = None
        self.leaving = False

    def send(self, data: bytes, dest: tuple[str, int], **kwargs) -> None:
        self.sent.append((data, dest, kwargs))
        self.history.append((data, dest, kwargs))

    def take(self) -> list[tuple[Request | Response, tuple[str, int]]]:
        """What was sent since the last look, parsed, with where it went."""
        taken, self.sent = self.sent, []
        return [(parse(data), dest) for data, dest, _ in taken]


def config() -> Config:
    base = Config()
    return dataclasses.replace(
        base, sip=SipConfig(advertised_address=ADDRESS, host_id="h1"),
        auth=AuthConfig(secret="k" * 32), media=MediaConfig(mode="bypass"),
        calls=dataclasses.replace(CallsConfig(), trace=False),
        workers=dataclasses.replace(WorkersConfig(), max_inflight=MAX_INFLIGHT))


@pytest.fixture
def store():
    store = MemoryStore()  # the real clock: nonces and bindings read time.time()
    store.put_user("1002", REALM, {"MD5": digest.ha1("1002", REALM, "1234")})
    store.put_user("1009", REALM, {"MD5": digest.ha1("1009", REALM, "5678")})
    return store


def make_worker(store) -> Worker:
    return Worker(config(), "w0", store=store, transport=RecordingTransport())


@pytest.fixture
def worker(store):
    return make_worker(store)


def deliver(worker: Worker, data: bytes, addr: tuple[str, int], *, settle: bool = True,
            sock_index: int = 0):
    """One datagram in (or a message from stream connection ``sock_index``); with
    ``settle``, once the worker has handled it (and written its batched answers), what it
    sent."""
    worker.on_datagram(data, addr, sock_index)
    if not settle:
        return []
    worker.pool.join()
    gevent.sleep(0.01)  # the answers' batch write (answers.ANSWER_BATCH_SECONDS)
    return worker.transport.take()


_branches = count()


def branch() -> str:
    return f"z9hG4bK-shell{next(_branches)}"


def register(user: str, addr: tuple[str, int], *, authorization: bytes | None = None,
             cseq: int = 1, via_branch: str | None = None) -> bytes:
    hs = [(b"Via", f"SIP/2.0/UDP {addr[0]}:{addr[1]};rport;branch={via_branch or branch()}"
           .encode()), (b"Max-Forwards", b"70"),
          (b"From", f"<sip:{user}@{REALM}>;tag=rt{user}".encode()),
          (b"To", f"<sip:{user}@{REALM}>".encode()), (b"Call-ID", f"reg-{user}".encode()),
          (b"CSeq", b"%d REGISTER" % cseq),
          (b"Contact", f"<sip:{user}@{addr[0]}:{addr[1]}>".encode()), (b"Expires", b"3600")]
    if authorization is not None:
        hs.append((b"Authorization", authorization))
    return text(f"REGISTER sip:{REALM} SIP/2.0".encode(), hs)


INVITE_URI = f"sip:1009@{REALM}:5060"


def invite(*, call_id: str = "call-1", cseq: int = 1, via_branch: str | None = None,
           proxy_authorization: bytes | None = None) -> bytes:
    hs = [(b"Via", f"SIP/2.0/UDP {CALLER[0]}:{CALLER[1]};branch={via_branch or branch()};rport"
           .encode()), (b"Max-Forwards", b"70"),
          (b"Contact", f"<sip:1002@{CALLER[0]}:{CALLER[1]}>".encode()),
          (b"To", f"<{INVITE_URI}>".encode()),
          (b"From", f'"1002"<sip:1002@{REALM}:5060>;tag=callertag'.encode()),
          (b"Call-ID", call_id.encode()), (b"CSeq", b"%d INVITE" % cseq),
          (b"Content-Type", b"application/sdp")]
    if proxy_authorization is not None:
        hs.append((b"Proxy-Authorization", proxy_authorization))
    return text(f"INVITE {INVITE_URI} SIP/2.0".encode(), hs, seed_sdp())


def ack_of(inv: bytes, final: Response) -> bytes:
    """The ACK of a non-2xx final answer to ``inv``: its branch, the answer's To."""
    req = parse(inv)
    hs = [(b"Via", req.header("via")), (b"Max-Forwards", b"70"), (b"To", final.header("to")),
          (b"From", req.header("from")), (b"Call-ID", req.call_id),
          (b"CSeq", b"%d ACK" % req.cseq.number)]
    return text(b"ACK " + req.uri_raw + b" SIP/2.0", hs)


def in_dialog(method: str, call_id: str) -> bytes:
    hs = [(b"Via", f"SIP/2.0/UDP {CALLER[0]}:{CALLER[1]};branch={branch()};rport".encode()),
          (b"Max-Forwards", b"70"), (b"To", f"<{INVITE_URI}>;tag=gone".encode()),
          (b"From", f"<sip:1002@{REALM}>;tag=callertag".encode()),
          (b"Call-ID", call_id.encode()), (b"CSeq", b"7 " + method.encode())]
    return text(f"{method} {INVITE_URI} SIP/2.0".encode(), hs)


def answer_to(req: Request, status: int, to_tag: str | None = None) -> bytes:
    """A phone's response to a request we sent it."""
    to = req.header("to") + (b";tag=" + to_tag.encode() if to_tag else b"")
    hs = [(b"Via", v) for v in req.header_lines("via")]
    hs += [(b"From", req.header("from")), (b"To", to), (b"Call-ID", req.call_id),
           (b"CSeq", req.header("cseq"))]
    return text(b"SIP/2.0 %d Whatever" % status, hs)


def only(sent, dest=None):
    msgs = [msg for msg, where in sent if dest is None or where == dest]
    assert len(msgs) == 1, f"expected one message to {dest}, got {sent}"
    return msgs[0]


def answer_challenge(challenge: Response, *, method: str, uri: str, user: str,
                     password: str) -> bytes:
    value = challenge.header("proxy-authenticate") or challenge.header("www-authenticate")
    return digest.authorization(value, method=method, uri=uri, username=user,
                                password=password, cnonce="c0ffee01", nc=1)


def registered_callee(worker: Worker) -> None:
    """1009 registers from CALLEE through the worker: challenged, then accepted."""
    challenge = only(deliver(worker, register("1009", CALLEE), CALLEE))
    assert challenge.status == 401
    creds = answer_challenge(challenge, method="REGISTER", uri=f"sip:{REALM}", user="1009",
                             password="5678")
    ok = only(deliver(worker, register("1009", CALLEE, authorization=creds, cseq=2), CALLEE))
    assert ok.status == 200


def placed_call(worker: Worker) -> tuple[Request, bytes]:
    """The caller's INVITE challenged (407, ACKed), then sent again with credentials: our
    INVITE to the callee and the authenticated INVITE."""
    first = invite()
    challenge = only(deliver(worker, first, CALLER), CALLER)
    assert challenge.status == 407
    assert deliver(worker, ack_of(first, challenge), CALLER) == []
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="1234")
    second = invite(cseq=2, proxy_authorization=creds)
    sent = deliver(worker, second, CALLER)
    assert only(sent, CALLER).status == 100
    return only(sent, CALLEE), second


# --------------------------------------------------------------------------- challenge


def test_an_invite_is_challenged_then_accepted_and_rung(worker, store):
    registered_callee(worker)
    ours, _ = placed_call(worker)
    assert ours.method == "INVITE" and ours.uri_raw == b"sip:1009@192.168.31.50:60119"
    assert ours.body == seed_sdp()  # bypass: the caller's offer goes through
    _, record = store.load_call(call_tag(b"call-1"))
    assert record["state"] == "trying" and record["worker"] == "w0"
    assert worker.counters["calls"] == 1 and worker.counters["requests_INVITE"] == 2


def test_an_invite_with_the_wrong_password_is_forbidden(worker, store):
    registered_callee(worker)
    first = invite()
    challenge = only(deliver(worker, first, CALLER), CALLER)
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="wrong")
    refused = only(deliver(worker, invite(cseq=2, proxy_authorization=creds), CALLER))
    assert refused.status == 403 and store.load_call(call_tag(b"call-1")) is None
    assert store.auth_failures(CALLER[0]) == 1


def test_a_call_to_a_user_not_registered_fails_statelessly_and_keeps_its_answer(worker, store):
    first = invite()
    challenge = only(deliver(worker, first, CALLER), CALLER)
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="1234")
    second = invite(cseq=2, proxy_authorization=creds, via_branch="z9hG4bK-unreg")
    failed = only(deliver(worker, second, CALLER), CALLER)
    assert failed.status == 480 and failed.to.tag and failed.header("server") == b"sipcluster"
    [cdr] = store.cdrs_after()
    assert (cdr["callee"], cdr["sip_status"], cdr["hangup_cause"]) == (
        "1009", "480", "SUBSCRIBER_ABSENT")
    # Kept in Redis under its transaction: a copy that reaches another worker gets it.
    other = make_worker(store)
    again = only(deliver(other, second, CALLER), CALLER)
    assert again.to_bytes() == failed.to_bytes() and len(store.cdrs_after()) == 1


# --------------------------------------------------------------------------- streams
CONN = (9 << 32) | (4 << 1)  # a TCP connection of host h1's dispatcher (cluster/envelope.py)


def callee_registered_over_a_connection(worker: Worker) -> None:
    challenge = only(deliver(worker, register("1009", CALLEE), CALLEE, sock_index=CONN))
    creds = answer_challenge(challenge, method="REGISTER", uri=f"sip:{REALM}", user="1009",
                             password="5678")
    ok = only(deliver(worker, register("1009", CALLEE, authorization=creds, cseq=2), CALLEE,
                      sock_index=CONN))
    assert ok.status == 200
    assert worker.transport.history[-1][2]["sock_index"] == CONN  # back over it


def test_a_call_to_a_phone_on_an_open_connection_goes_over_it(worker, store):
    store.stream_opened("h1", CONN, {"transport": "TCP"})
    callee_registered_over_a_connection(worker)
    [binding] = store.bindings(aor_of("1009", REALM))
    assert (binding.conn, binding.transport) == (CONN, "udp")  # the Via said UDP here
    ours, _ = placed_call(worker)
    assert ours.method == "INVITE"
    [how] = [how for data, dest, how in worker.transport.history
             if dest == CALLEE and data.startswith(b"INVITE ")]
    assert how["sock_index"] == CONN and how["host"] == "h1"


def test_a_binding_whose_connection_closed_gets_480(worker, store):
    store.stream_opened("h1", CONN, {"transport": "TCP"})
    callee_registered_over_a_connection(worker)
    store.stream_closed("h1", CONN)
    first = invite()
    challenge = only(deliver(worker, first, CALLER), CALLER)
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="1234")
    failed = only(deliver(worker, invite(cseq=2, proxy_authorization=creds), CALLER), CALLER)
    assert failed.status == 480
    assert worker.counters["bindings_connection_closed"] == 1


# --------------------------------------------------------------------------- CAS


def test_a_call_record_another_worker_wrote_meanwhile_is_read_again(worker, store):
    registered_callee(worker)
    ours, _ = placed_call(worker)
    tag = call_tag(b"call-1")
    version, record = store.load_call(tag)
    # Another worker writes the call between this worker's last write and its next event:
    # the record this worker remembers is out of date, and its compare-and-set loses.
    assert store.save_call(tag, version, record, 60) is not None
    sent = deliver(worker, answer_to(ours, 180, "calleetag"), CALLEE)
    ringing = only(sent, CALLER)
    assert ringing.status == 180 and ringing.cseq.number == 2
    assert worker.counters["cas_conflicts"] == 1
    assert store.load_call(tag)[1]["state"] in ("ringing", "early")


class Reads:
    """Counts the store's read methods a worker calls (each one Redis round trip)."""

    NAMES = ("load_call", "load_call_and_answer", "stored_answer", "get_user", "bindings",
             "user_and_bindings", "accept_nonce_count", "nonce_count_and_user",
             "call_version")

    def __init__(self, store, monkeypatch):
        self.calls: list[str] = []
        self.depth = 0  # MemoryStore's combined reads call its single ones: not counted
        for name in self.NAMES:
            monkeypatch.setattr(store, name, self._counting(name, getattr(store, name)))

    def _counting(self, name, method):
        def counted(*args, **kwargs):
            if not self.depth:
                self.calls.append(name)
            self.depth += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.depth -= 1
        return counted


def test_a_call_is_placed_with_one_read_per_step(worker, store, monkeypatch):
    registered_callee(worker)
    reads = Reads(store, monkeypatch)
    first = invite()
    challenge = only(deliver(worker, first, CALLER), CALLER)
    assert challenge.status == 407 and reads.calls == []  # no credentials: nothing to read
    assert deliver(worker, ack_of(first, challenge), CALLER) == []
    assert reads.calls == []  # nor for the challenge's ACK
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="1234")
    sent = deliver(worker, invite(cseq=2, proxy_authorization=creds), CALLER)
    assert only(sent, CALLER).status == 100 and only(sent, CALLEE).method == "INVITE"
    # The call, its kept answer and the caller's HA1 in one round trip, then the nonce
    # count with the callee's record and bindings in another.
    assert reads.calls == ["load_call_and_answer", "nonce_count_and_user"]


def test_a_caller_seen_lately_places_a_call_with_one_read(worker, store, monkeypatch):
    """Its HA1 is in the worker's cache, so its credentials are checked before any read:
    the nonce count and the callee come with the call's record, in one round trip."""
    registered_callee(worker)
    placed_call(worker)  # reads 1002's HA1
    reads = Reads(store, monkeypatch)
    first = invite(call_id="call-2")
    challenge = only(deliver(worker, first, CALLER), CALLER)
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="1234")
    sent = deliver(worker, invite(call_id="call-2", cseq=2, proxy_authorization=creds), CALLER)
    assert only(sent, CALLER).status == 100 and only(sent, CALLEE).method == "INVITE"
    assert reads.calls == ["load_call_and_answer"]
    # The same count again, from another transaction (a replay): refused, 407, as before.
    replayed = invite(call_id="call-3", cseq=2, proxy_authorization=creds)
    assert only(deliver(worker, replayed, CALLER), CALLER).status == 407
    assert reads.calls == ["load_call_and_answer"] * 2


def test_wrong_credentials_of_a_caller_seen_lately_are_still_refused(worker, store):
    registered_callee(worker)
    placed_call(worker)
    first = invite(call_id="call-2")
    challenge = only(deliver(worker, first, CALLER), CALLER)
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="wrong")
    refused = only(deliver(worker, invite(call_id="call-2", cseq=2, proxy_authorization=creds),
                           CALLER), CALLER)
    assert refused.status == 403


def test_an_initial_invite_without_credentials_of_a_call_held_here_reaches_it(worker):
    """A merged copy (same Call-ID, another branch, no To tag) of a call this worker holds
    gets the call's answer (482), not a challenge."""
    registered_callee(worker)
    placed_call(worker)
    merged = only(deliver(worker, invite(via_branch="z9hG4bK-merged"), CALLER), CALLER)
    assert merged.status == 482


def test_the_ack_of_a_challenge_another_worker_gave_is_looked_up(worker, store, monkeypatch):
    first = invite()
    challenge = only(deliver(worker, first, CALLER), CALLER)
    other = make_worker(store)
    reads = Reads(store, monkeypatch)
    assert deliver(other, ack_of(first, challenge), CALLER) == []
    assert reads.calls == ["load_call"]  # not its challenge: there could be a call


# --------------------------------------------------------------------------- absorber


def test_a_copy_of_a_request_in_hand_is_dropped(worker):
    data = register("1002", CALLER)
    deliver(worker, data, CALLER, settle=False)
    assert deliver(worker, data, CALLER) != []  # the first copy's answer only
    assert worker.counters["retransmissions_absorbed"] == 1
    assert worker.counters["requests_REGISTER"] == 1


def test_a_copy_of_an_answered_request_gets_the_same_answer_again(worker, store):
    data = register("1002", CALLER)
    [(first, dest)] = deliver(worker, data, CALLER)
    assert first.status == 401
    [(again, dest_again)] = deliver(worker, data, CALLER)
    assert again.to_bytes() == first.to_bytes() and dest_again == dest  # not a new nonce
    assert worker.counters["retransmissions_answered"] == 1
    assert worker.counters["requests_REGISTER"] == 1


def test_a_copy_of_a_challenged_invite_gets_the_same_challenge(worker):
    data = invite()
    first = only(deliver(worker, data, CALLER))
    assert only(deliver(worker, data, CALLER)).to_bytes() == first.to_bytes()
    assert worker.counters["retransmissions_answered"] == 1


def test_a_registration_answer_is_kept_for_copies_that_reach_another_worker(worker, store):
    challenge = only(deliver(worker, register("1009", CALLEE), CALLEE))
    creds = answer_challenge(challenge, method="REGISTER", uri=f"sip:{REALM}", user="1009",
                             password="5678")
    data = register("1009", CALLEE, authorization=creds, cseq=2)
    ok = only(deliver(worker, data, CALLEE))
    other = make_worker(store)
    assert only(deliver(other, data, CALLEE)).to_bytes() == ok.to_bytes()
    assert len(store.bindings(aor_of("1009", REALM))) == 1


# --------------------------------------------------------------------------- stateless


def test_an_in_dialog_request_of_no_call_is_answered_481(worker):
    data = in_dialog("BYE", "no-such-call")
    gone = only(deliver(worker, data, CALLER), CALLER)
    assert (gone.status, gone.cseq.method) == (481, "BYE") and gone.to.tag == "gone"
    assert only(deliver(worker, data, CALLER)).to_bytes() == gone.to_bytes()  # remembered


def test_a_stray_response_is_counted_and_not_answered(worker):
    req = parse(in_dialog("INFO", "no-such-call"))
    assert deliver(worker, answer_to(req, 200), CALLEE) == []
    assert worker.counters["stray_responses"] == 1 and worker.counters["received_200"] == 1


def test_unparsable_and_unknown_requests_are_refused(worker):
    worker.on_datagram(register("1002", CALLER).replace(b"CSeq: 1", b"CSeq: x"), CALLER, 0)
    worker.pool.join()
    [(broken, dest, _)] = worker.transport.sent  # answered from its raw headers
    worker.transport.sent = []
    assert broken.startswith(b"SIP/2.0 400 ") and dest == CALLER
    assert worker.counters["parse_errors"] == 1
    unknown = in_dialog("FROB", "c").replace(b";tag=gone", b"")
    assert only(deliver(worker, unknown, CALLER)).status == 501
    options = only(deliver(worker, in_dialog("OPTIONS", "c").replace(b";tag=gone", b""),
                           CALLER))
    assert options.status == 200 and options.header("allow")


# --------------------------------------------------------------------------- admission


@pytest.fixture
def busy(worker):
    """``busy(n)``: n requests in flight in the worker until the test ends."""
    release = gevent.event.Event()

    def occupy(n: int) -> None:
        for _ in range(n):
            worker.pool.spawn(release.wait)
        gevent.sleep(0)

    yield occupy
    release.set()
    worker.pool.join()


def shed(sent) -> list[Response]:
    return [msg for msg, _ in sent if msg.status == 503]


def test_new_work_without_credentials_is_shed_first(worker, busy):
    busy(MAX_INFLIGHT // 2)
    worker.on_datagram(register("1002", CALLER), CALLER, 0)
    [refused] = shed(worker.transport.take())
    assert refused.header("retry-after") == b"5" and worker.counters["shed"] == 1
    # A request answering a challenge, and what carries on a call, are still taken.
    worker.on_datagram(register("1002", CALLER, authorization=b'Digest username="1002"'),
                       CALLER, 0)
    worker.on_datagram(in_dialog("BYE", "c"), CALLER, 0)
    assert worker.transport.take() == [] and worker.counters["shed"] == 1
    assert len(worker.pool) == MAX_INFLIGHT // 2 + 2


def test_past_the_limit_credentials_are_shed_too_but_not_hang_ups(worker, busy):
    busy(MAX_INFLIGHT)
    worker.on_datagram(register("1002", CALLER, authorization=b'Digest username="1002"'),
                       CALLER, 0)
    worker.on_datagram(invite(), CALLER, 0)
    assert len(shed(worker.transport.take())) == 2 and worker.counters["shed"] == 2
    worker.on_datagram(in_dialog("BYE", "c"), CALLER, 0)
    assert worker.transport.take() == [] and len(worker.pool) == MAX_INFLIGHT + 1


def test_a_full_pool_sheds_everything(worker, busy):
    busy(2 * MAX_INFLIGHT)
    worker.on_datagram(in_dialog("BYE", "c"), CALLER, 0)
    [refused] = shed(worker.transport.take())
    assert refused.cseq.method == "BYE" and worker.counters["shed"] == 1


def test_below_half_the_limit_nothing_is_shed(worker, busy):
    busy(MAX_INFLIGHT // 2 - 1)
    worker.on_datagram(register("1002", CALLER), CALLER, 0)
    gevent.sleep(0.01)  # handled beside the requests that stay in flight
    assert only(worker.transport.take()).status == 401
    assert worker.counters["shed"] == 0


def test_a_request_that_waited_past_the_queue_limit_is_shed(worker, monkeypatch):
    worker.on_datagram(register("1001", CALLER), CALLER, 0)  # the first: warm-up begins
    worker.pool.join()
    worker.transport.take()
    arrived = time.monotonic() + WARM_UP
    monkeypatch.setattr(time, "monotonic", lambda: arrived)
    worker.on_datagram(register("1002", CALLER), CALLER, 0)  # queued, not yet handled
    late = arrived + worker.queue_limit + 0.1
    monkeypatch.setattr(time, "monotonic", lambda: late)
    worker.pool.join()
    [refused] = shed(worker.transport.take())
    assert refused.header("retry-after") == b"5" and worker.counters["shed"] == 1
    assert worker.counters["requests_REGISTER"] == 1 and worker.answers.working == set()


def test_in_the_warm_up_a_request_that_waited_is_still_worked_on(worker, monkeypatch):
    """What a worker gets first is the backlog of an outage (every phone's retransmissions
    at once): a request of it that waited past the queue limit is answered, not shed."""
    worker.on_datagram(register("1002", CALLER), CALLER, 0)
    late = time.monotonic() + worker.queue_limit + 0.1
    monkeypatch.setattr(time, "monotonic", lambda: late)
    worker.pool.join()
    assert only(worker.transport.take()).status == 401
    assert worker.counters["shed"] == 0


# --------------------------------------------------------------------------- Redis trouble


def unavailable(*args, **kwargs):
    raise StoreUnavailable("timeout")


def test_redis_trouble_holds_a_request_for_its_copy_then_answers_503(store, monkeypatch):
    monkeypatch.setattr(store, "load_call", unavailable)
    worker = make_worker(store)
    data = in_dialog("INFO", "some-call")
    assert deliver(worker, data, CALLER) == []  # its sender repeats it (Timer E)
    assert worker.counters["held_for_retransmission"] == 1
    worker.outage_hold = 0.0  # the outage outlasted the hold
    refused = only(deliver(worker, data, CALLER))
    assert (refused.status, refused.header("retry-after")) == (503, b"5")


def test_redis_trouble_never_answers_a_hang_up_and_keeps_it(store, monkeypatch):
    monkeypatch.setattr(store, "load_call", unavailable)
    worker = make_worker(store)
    worker.outage_hold = 0.0
    data = in_dialog("BYE", "some-call")
    assert deliver(worker, data, CALLER) == []
    assert worker.counters["hangups_deferred"] == 1 and len(worker._deferred) == 1


# --------------------------------------------------------------------------- timer loop


class CountedClaims:
    """The store's timer claims, counted, and the timers they gave out."""

    def __init__(self, store: MemoryStore) -> None:
        self.claim, self.times, self.fired = store.claim_due_timers, [], []
        store.claim_due_timers = self

    def __call__(self, now: float, *args, **kwargs):
        claim = self.claim(now, *args, **kwargs)
        self.times.append(now)
        self.fired += [(name, now) for _, name, _ in claim.due]
        return claim


def test_an_idle_worker_claims_timers_once_per_idle_tick(store):
    claims = CountedClaims(store)
    worker = make_worker(store)
    loop = gevent.spawn(worker.b2bua.timer_loop)
    gevent.sleep(1.2)
    worker.b2bua.stop()
    loop.join(timeout=1.0)
    assert loop.dead
    # At 0.05 s (the first claim), then at each point of the TIMER_IDLE_TICK grid
    # (cluster/cadence.py: at most 1 + 1.2 / TIMER_IDLE_TICK of them in 1.2 s, the first
    # perhaps TIMER_TICK after the first claim), and the one the stop wakes: not every
    # TIMER_TICK (24).
    assert 2 <= len(claims.times) <= 1 + (1 + int(1.2 / TIMER_IDLE_TICK)) + 1, claims.times


def test_a_timer_armed_here_wakes_the_loop_and_one_armed_elsewhere_is_claimed_when_due(store):
    claims = CountedClaims(store)
    worker = make_worker(store)
    loop = gevent.spawn(worker.b2bua.timer_loop)
    gevent.sleep(0.1)  # the first claim is made: the loop sleeps for TIMER_IDLE_TICK
    due = time.time() + 0.1
    store.save_call("other", 0, {"state": "ended"}, 60, arm=[("other", "X", due)])
    worker.b2bua._claim_by(due)  # as a write of this worker arming it does
    gevent.sleep(0.3)
    assert [name for name, _ in claims.fired] == ["X"]
    fired_at = claims.fired[0][1]
    assert due <= fired_at < due + TIMER_TICK + 0.03
    # another worker's timer, armed after this one's last claim: the next claim is due at
    # the lease end of X at the latest, or TIMER_IDLE_TICK later, and finds it
    store.remove_timers([("other", "X", due)])
    other_due = time.time() + 0.05
    store.save_call("third", 0, {"state": "ended"}, 60, arm=[("third", "Y", other_due)])
    gevent.sleep(TIMER_IDLE_TICK + 0.1)
    worker.b2bua.stop()
    loop.join(timeout=1.0)
    assert [name for name, _ in claims.fired] == ["X", "Y"]
    assert claims.fired[1][1] <= other_due + TIMER_IDLE_TICK + 0.03


# --------------------------------------------------------------------------- unsure ends


def answered_call(worker: Worker) -> tuple[Caller, Callee]:
    """A call placed through the worker, answered by the callee and ACKed by the caller."""
    registered_callee(worker)
    ours, second = placed_call(worker)
    caller, callee = Caller(parse(second)), Callee(ours, CALLEE, "calleetag")
    sent = deliver(worker, callee.respond(200, body=ANSWER_SDP).to_bytes(), CALLEE)
    caller.learn(only(sent, CALLER))
    deliver(worker, caller.ack().to_bytes(), CALLER)
    return caller, callee


def lands_then_fails(store, monkeypatch, *, timers: bool = True):
    """The next call write reaches the store, yet its reply is lost (a read timeout); with
    ``timers`` False its timer entries were refused and only the record was taken (the
    pipeline's ZADDs refused for memory, the compare-and-set after them taken)."""
    real = store.save_call

    def save_call(tag, version, record, ttl, arm=(), disarm=(), packed=None):
        monkeypatch.setattr(store, "save_call", real)
        real(tag, version, record, ttl, arm=arm if timers else (), disarm=disarm,
             packed=packed)
        raise StoreUnavailable("Timeout reading from socket")
    monkeypatch.setattr(store, "save_call", save_call)


def run_timers(worker: Worker, seconds: float) -> list[tuple[Request | Response, tuple]]:
    """The worker's timer loop for ``seconds``; what it sent meanwhile."""
    loop = gevent.spawn(worker.b2bua.timer_loop)
    gevent.sleep(seconds)
    worker.b2bua.stop()
    loop.join(timeout=1.0)
    assert loop.dead
    return worker.transport.take()


def requests_to(sent, dest, method: str) -> list[Request]:
    return [msg for msg, where in sent
            if where == dest and isinstance(msg, Request) and msg.method == method]


@pytest.mark.parametrize("timers", [True, False], ids=["timers armed", "timers refused"])
def test_an_end_whose_write_landed_unseen_reaches_the_callee_with_one_cdr(store, monkeypatch,
                                                                          timers):
    worker = make_worker(store)
    caller, _ = answered_call(worker)
    lands_then_fails(store, monkeypatch, timers=timers)
    assert deliver(worker, caller.request("BYE").to_bytes(), CALLER) == []
    sent = run_timers(worker, TIMER_IDLE_TICK + 0.3)
    byes = requests_to(sent, CALLEE, "BYE")
    assert byes and len({bye.via.branch for bye in byes}) == 1, sent
    assert len(store.cdrs_after()) == 1
    # and its retransmission timer is armed: the BYE is repeated until it is answered
    assert any(name.endswith("|E") for _, name, _ in store.claim_due_timers(
        time.time() + 1.0).due)


def test_an_invite_whose_write_landed_unseen_without_its_timers_still_rings(store,
                                                                           monkeypatch):
    worker = make_worker(store)
    registered_callee(worker)
    first = invite(call_id="call-unseen")
    challenge = only(deliver(worker, first, CALLER), CALLER)
    deliver(worker, ack_of(first, challenge), CALLER)
    creds = answer_challenge(challenge, method="INVITE", uri=INVITE_URI, user="1002",
                             password="1234")
    lands_then_fails(store, monkeypatch, timers=False)
    assert deliver(worker, invite(call_id="call-unseen", cseq=2, proxy_authorization=creds),
                   CALLER) == []
    sent = run_timers(worker, UNSURE_EVERY + 0.2)
    invites = requests_to(sent, CALLEE, "INVITE")  # then repeated: its Timer A is past due
    assert invites and len({msg.via.branch for msg in invites}) == 1, sent
    assert [msg.status for msg, where in sent if where == CALLER] == [100]
