"""Two real softphones (headless baresip) call each other through the cluster.

1000 says a 440 Hz tone, 1001 a 1000 Hz tone. 1000 calls 1001, which answers by itself; they
talk for TALK seconds and 1000 hangs up. Then: both phones registered with their own user
agent, the CDR shows an answered call of about TALK seconds ended NORMAL_CLEARING by the
caller, nothing is left live, each side recorded the other side's tone (and never its own),
and each side's RTP came from where the media mode says (the other phone in bypass, a relay
port in relay mode).

The same call runs against a cluster in each media mode. In relay mode the call and the tones
must work as well; only the RTP source check is an expected failure (not strict) until the
workers put the relays in the SDP, so it runs and shows where the media really went.

More calls on the bypass cluster: the callee hangs up; the caller hangs up while the callee is
frozen (the BYE must be retransmitted); nobody answers (the no-answer timer); nothing is sent
twice after a clean call; the call record keeps the ACK and the answer to the BYE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from baresip import Softphone, ToneReport, analyse_tone, make_tone, require_softphone_tools
from harness import Cluster, wait_for

from workers.sip.b2bua import call_tag

DB = {"bypass": 12, "relay": 13}  # this module's Redis databases, one per cluster
PASSWORD = "1234"
CALLER, CALLEE = "1000", "1001"
TONE = {CALLER: 440.0, CALLEE: 1000.0}  # whole cycles in 50 ms blocks (see analyse_tone)
TONE_SECONDS = 12.0  # longer than any call here: aufile ends the source at its end
TALK = 3.0  # seconds between both phones seeing the call up and the caller's BYE
NO_ANSWER = 3  # calls.no_answer_timeout of the bypass cluster
RELAY_PORTS = (36000, 36999)  # the relay cluster's RTP range
PHONE_PORTS = {  # per bed and phone, apart from each other and from the relays
    "bypass": {CALLER: (37000, 37499), CALLEE: (37500, 37999)},
    "relay": {CALLER: (38000, 38499), CALLEE: (38500, 38999)},
}


@dataclass
class CallRun:
    """What one 1000 -> 1001 call left behind."""

    cdr: dict
    talked: float  # seconds from both phones up to both phones closed
    caller_closed: dict  # the CALL_CLOSED events
    callee_closed: dict
    # What each phone recorded of each tone, read at once: baresip names its recordings by
    # the second, so a call in the same second as a later one would lose its files.
    caller_heard: dict[float, ToneReport]
    callee_heard: dict[float, ToneReport]
    caller_rtp_from: tuple[str, int] | None  # where each phone's audio RTP came from
    callee_rtp_from: tuple[str, int] | None
    live_after: list[tuple[str, dict]]  # call records still there after the CDR


@dataclass
class Bed:
    """A cluster in one media mode with two registered softphones."""

    mode: str
    cluster: Cluster
    caller: Softphone
    callee: Softphone
    call: CallRun | None = None

    @property
    def phones(self) -> tuple[Softphone, Softphone]:
        return self.caller, self.callee



def cdr_of(cluster: Cluster, a_call_id: str, timeout: float = 5.0) -> dict:
    found = wait_for(lambda: [c for c in cluster.store.cdrs_after() if c["a_call_id"] == a_call_id],
                       timeout)
    assert found, f"no CDR for Call-ID {a_call_id}; CDRs {cluster.store.cdrs_after()}"
    return found[-1]


def trace_lines(cluster: Cluster, cdr: dict, until: Callable | None = None,
                timeout: float = 2.0) -> list[str]:
    """The call's messages as the cluster traced them: "dir leg first-line". With ``until``,
    wait (up to ``timeout``) for the lines to satisfy it: the trace is written just after the
    message is handled, so it can lag behind what the phones already saw."""
    def read() -> list[str]:
        entries = cluster.store.trace(call_tag(cdr["b_call_id"].encode()))
        return [f"{e['dir']} {e['leg']} {e['first']}" for e in entries]
    if until is not None:
        wait_for(lambda: until(read()), timeout)
    return read()


def bye_answered(lines: list[str]) -> bool:
    """The callee's 200 OK to the cluster's BYE is in the trace (its 2xx to the INVITE
    says "Answering")."""
    return "in b0 SIP/2.0 200 OK" in lines


def still_live(cluster: Cluster) -> list[tuple[str, dict]]:
    return [(tag, call) for tag, call in cluster.store.call_records() if call["state"] != "ended"]


# ------------------------------------------------------------------ the beds


def open_bed(mode: str, tmp: Path, redis_server) -> Iterator[Bed]:
    """Start the cluster, then the callee and the caller; stop all of it afterwards."""
    require_softphone_tools()
    redis_server.client(db=DB[mode]).flushdb()
    settings = {"calls": {"no_answer_timeout": NO_ANSWER}, "media": {"mode": mode}}
    if mode == "relay":
        settings["media"].update(rtp_port_min=RELAY_PORTS[0], rtp_port_max=RELAY_PORTS[1])
    cluster = Cluster(tmp / "cluster", f"redis://127.0.0.1:{redis_server.port}/{DB[mode]}",
                      workers=2, settings=settings)
    phones = []
    try:
        cluster.start()
        for user in (CALLER, CALLEE):
            cluster.add_user(user, PASSWORD)
        for user in (CALLEE, CALLER):
            tone = make_tone(tmp / f"tone-{user}.wav", TONE[user], TONE_SECONDS)
            phone = Softphone(user, PASSWORD, cluster.address, tmp / f"phone-{user}", tone=tone,
                              rtp_ports=PHONE_PORTS[mode][user])
            phones.append(phone)
            phone.start()
        callee, caller = phones
        for phone in phones:
            assert wait_for(lambda p=phone: cluster.store.bindings(p.aor), 10), (
                f"{phone.aor} did not register:\n{phone.log_text()[-2000:]}")
        bed = Bed(mode, cluster, caller, callee)
        OPEN_BEDS.append(bed)
        yield bed
    finally:
        OPEN_BEDS[:] = [b for b in OPEN_BEDS if b.cluster is not cluster]
        for phone in phones:
            phone.stop()
        cluster.stop()


OPEN_BEDS: list[Bed] = []


@pytest.fixture(autouse=True)
def phones_at_rest() -> None:
    """A test that failed half-way must not leave a call, or its events, to the next one."""
    for bed in OPEN_BEDS:
        for phone in bed.phones:
            phone.reset()


@pytest.fixture(scope="module")
def bypass_bed(tmp_path_factory, redis_server) -> Iterator[Bed]:
    yield from open_bed("bypass", tmp_path_factory.mktemp("softphones-bypass"), redis_server)


@pytest.fixture(scope="module")
def relay_bed(tmp_path_factory, redis_server) -> Iterator[Bed]:
    yield from open_bed("relay", tmp_path_factory.mktemp("softphones-relay"), redis_server)


@pytest.fixture(scope="module", params=["bypass", "relay"])
def called(request) -> Bed:
    """A bed whose phones have had the 1000 -> 1001 call (made once per bed)."""
    bed = request.getfixturevalue(f"{request.param}_bed")
    if bed.call is None:
        bed.call = talk(bed)
    return bed


def talk(bed: Bed) -> CallRun:
    """1000 calls 1001, they talk for TALK seconds, 1000 hangs up."""
    caller, callee = bed.phones
    caller.dial(callee.user)
    up = caller.wait_for("CALL_ESTABLISHED", 10)
    callee.wait_for("CALL_ESTABLISHED", 10)
    started = time.monotonic()
    time.sleep(TALK)
    caller.hangup()
    caller_closed = caller.wait_for("CALL_CLOSED", 10)
    callee_closed = callee.wait_for("CALL_CLOSED", 10)
    talked = time.monotonic() - started
    cdr = cdr_of(bed.cluster, up["id"])
    wait_for(lambda: not still_live(bed.cluster), 3)
    return CallRun(
        cdr=cdr, talked=talked, caller_closed=caller_closed, callee_closed=callee_closed,
        caller_heard={f: analyse_tone(caller.recording(), f) for f in TONE.values()},
        callee_heard={f: analyse_tone(callee.recording(), f) for f in TONE.values()},
        caller_rtp_from=caller.rtp_sources().get("audio"),
        callee_rtp_from=callee.rtp_sources().get("audio"),
        live_after=still_live(bed.cluster))


def short_call(bed: Bed, seconds: float = 0.5) -> dict:
    """1000 calls 1001 and hangs up after ``seconds``; the CDR."""
    caller, callee = bed.phones
    caller.dial(callee.user)
    up = caller.wait_for("CALL_ESTABLISHED", 10)
    callee.wait_for("CALL_ESTABLISHED", 10)
    time.sleep(seconds)
    caller.hangup()
    caller.wait_for("CALL_CLOSED", 10)
    callee.wait_for("CALL_CLOSED", 10)
    return cdr_of(bed.cluster, up["id"])


# ------------------------------------------------------------------ registration


def test_both_phones_register_with_their_user_agent(bypass_bed):
    for phone in bypass_bed.phones:
        bindings = bypass_bed.cluster.store.bindings(phone.aor)
        assert len(bindings) == 1, bindings
        binding = bindings[0]
        assert binding.user_agent.startswith("baresip"), binding.user_agent
        assert binding.source == ("127.0.0.1", phone.sip_port)
        assert f"@127.0.0.1:{phone.sip_port}".encode() in binding.contact
        assert binding.destination == ("127.0.0.1", phone.sip_port)
        assert 0 < binding.expires_at - time.time() <= phone.register_interval + 1


# ------------------------------------------------------------------ the call


def test_call_connects_talks_and_hangs_up_cleanly(called):
    call = called.call
    cdr = call.cdr
    assert (cdr["caller"], cdr["callee"]) == (CALLER, CALLEE)
    assert cdr["answer"], f"not answered: {cdr}"
    assert (cdr["hangup_cause"], cdr["q850"], cdr["hangup_side"], cdr["sip_status"]) == (
        "NORMAL_CLEARING", "16", "caller", "200"), cdr
    assert TALK - 0.1 <= float(cdr["billsec"]) <= call.talked + 0.5, (cdr, call.talked)
    assert float(cdr["answer"]) - float(cdr["start"]) < 1.0, cdr  # auto-answer
    assert call.live_after == [], call.live_after
    # The callee was hung up by the cluster's BYE, which says why.
    lines = trace_lines(called.cluster, cdr, until=bye_answered)
    assert "in a BYE" in " | ".join(lines) and "out b0 BYE" in " | ".join(lines), lines
    bye = next(e["data"] for e in called.cluster.store.trace(call_tag(cdr["b_call_id"].encode()))
               if e["dir"] == "out" and e["first"].startswith("BYE"))
    assert b'Reason: Q.850;cause=16;text="NORMAL_CLEARING"' in bye
    assert call.callee_closed["id"] == cdr["b_call_id"]
    assert call.caller_closed["id"] == cdr["a_call_id"]


def test_each_side_hears_the_other_sides_tone(called):
    call = called.call
    for heard, speaker, listener in ((call.caller_heard, CALLEE, CALLER),
                                     (call.callee_heard, CALLER, CALLEE)):
        other, own = heard[TONE[speaker]], heard[TONE[listener]]
        assert other.tone >= TALK - 0.8, (listener, other)
        assert abs(other.dominant - TONE[speaker]) <= 0.03 * TONE[speaker], (listener, other)
        assert own.tone == 0.0, (listener, own)  # nothing of its own tone came back


def test_rtp_comes_from_where_the_media_mode_says(called):
    call = called.call
    if called.mode == "relay":
        expected = {CALLER: RELAY_PORTS, CALLEE: RELAY_PORTS}
    else:  # each phone hears the other phone's own RTP port
        expected = {CALLER: PHONE_PORTS["bypass"][CALLEE], CALLEE: PHONE_PORTS["bypass"][CALLER]}
    for user, source in ((CALLER, call.caller_rtp_from), (CALLEE, call.callee_rtp_from)):
        assert source is not None, f"{user} logged no RTP source"
        low, high = expected[user]
        assert source[0] == "127.0.0.1" and low <= source[1] <= high, (
            f"{user} received RTP from {source}, expected a port in {low}-{high}; the SDP "
            f"the cluster sent: {sent_media_lines(called.cluster, call.cdr)}")
    if called.mode == "relay":  # each leg has a relay port of its own
        assert call.caller_rtp_from != call.callee_rtp_from


def sent_media_lines(cluster: Cluster, cdr: dict) -> list[str]:
    """The c= and m= lines of the SDP the cluster sent to each leg (first line, leg)."""
    found = []
    for entry in cluster.store.trace(call_tag(cdr["b_call_id"].encode())):
        if entry["dir"] == "out" and b"\r\n\r\nv=0" in entry["data"]:
            body = entry["data"].split(b"\r\n\r\n", 1)[1].decode("latin-1")
            lines = [line for line in body.split("\r\n") if line[:2] in ("c=", "m=")]
            found.append(f"{entry['leg']} {entry['first'].split(' ')[0]}: {' '.join(lines)}")
    return found


# ------------------------------------------------------------------ more calls on the bypass bed


def test_callee_hangs_up(bypass_bed):
    caller, callee = bypass_bed.phones
    caller.dial(callee.user)
    up = caller.wait_for("CALL_ESTABLISHED", 10)
    callee.wait_for("CALL_ESTABLISHED", 10)
    time.sleep(0.5)
    callee.hangup()
    callee.wait_for("CALL_CLOSED", 10)
    caller.wait_for("CALL_CLOSED", 10)
    cdr = cdr_of(bypass_bed.cluster, up["id"])
    assert (cdr["hangup_cause"], cdr["hangup_side"]) == ("NORMAL_CLEARING", "callee"), cdr
    assert wait_for(lambda: not still_live(bypass_bed.cluster), 3)


def test_bye_is_retransmitted_to_a_callee_that_does_not_answer(bypass_bed):
    """RFC 3261 17.1.2.2: the B-leg BYE is a client transaction, resent on Timer E until the
    callee answers (a phone busy for a moment, a datagram lost on the way)."""
    caller, callee = bypass_bed.phones
    caller.dial(callee.user)
    up = caller.wait_for("CALL_ESTABLISHED", 10)
    callee.wait_for("CALL_ESTABLISHED", 10)
    with callee.frozen():  # the BYE waits in its socket; Timer E fires at +0.5 s and +1.5 s
        caller.hangup()
        caller.wait_for("CALL_CLOSED", 10)
        time.sleep(2.0)
    callee.wait_for("CALL_CLOSED", 10)
    cdr = cdr_of(bypass_bed.cluster, up["id"])
    lines = trace_lines(bypass_bed.cluster, cdr, until=bye_answered)
    byes = [line for line in lines if line.startswith("out b0 BYE")]
    assert len(byes) >= 2, lines


def test_no_answer_timer_ends_an_unanswered_call(bypass_bed):
    """calls.no_answer_timeout ends a call nobody picks up: both phones stop ringing, and the
    CDR says NO_ANSWER."""
    caller, callee = bypass_bed.phones
    callee.set_answer_mode("manual")
    ended_by_cluster = False
    try:
        caller.dial(callee.user)
        ringing = caller.wait_for("CALL_RINGING", 10)
        callee.wait_for("CALL_INCOMING", 10)
        caller.wait_for("CALL_CLOSED", NO_ANSWER + 2.0)
        ended_by_cluster = True
    finally:  # whatever the cluster did, nothing may ring into the next test
        if not ended_by_cluster:
            caller.hangup()
            caller.wait_for("CALL_CLOSED", 10)
        callee.wait_for("CALL_CLOSED", 10)
        callee.set_answer_mode("auto")
    cdr = cdr_of(bypass_bed.cluster, ringing["id"])
    assert (cdr["hangup_cause"], cdr["answer"]) == ("NO_ANSWER", ""), cdr


def test_nothing_is_sent_again_after_a_clean_call(bypass_bed):
    """Each phone gets the 2xx, the ACK and the BYE once: all were answered at once."""
    cdr = short_call(bypass_bed)
    time.sleep(2.0)  # Timer G/E retransmissions would come at +0.5 s and +1.5 s
    lines = trace_lines(bypass_bed.cluster, cdr)
    sent = [line.split(" ", 2)[1:] for line in lines if line.startswith("out ")]
    for leg, first in (("a", "SIP/2.0 200 Answering"), ("b0", "ACK"), ("b0", "BYE"),
                       ("a", "SIP/2.0 200 OK")):
        assert sum(1 for s in sent if s[0] == leg and s[1].startswith(first)) == 1, lines


def test_call_record_keeps_the_ack_and_the_bye_answer(bypass_bed):
    """Events that change only a transaction (the caller's ACK of the 2xx, the callee's 200 OK
    to the BYE) are written too: otherwise, once timers run, the 2xx and the BYE would be
    retransmitted to phones that already answered them."""
    cdr = short_call(bypass_bed)
    lines = trace_lines(bypass_bed.cluster, cdr, until=bye_answered)
    ack_of_2xx = f"in a ACK sip:{CALLEE}@127.0.0.1:{bypass_bed.cluster.sip_port} "
    assert any(line.startswith(ack_of_2xx) for line in lines), lines
    assert "in b0 SIP/2.0 200 OK" in lines, lines
    tag = call_tag(cdr["b_call_id"].encode())

    def unanswered() -> tuple[dict | None, list[dict]]:
        """The A-leg INVITE if still waiting for its ACK, the B-leg BYEs still 'Trying'."""
        _version, record = bypass_bed.cluster.store.load_call(tag)
        a_invite = record["txs"].get(record["a"]["invite_key"])  # gone once terminated
        waiting = a_invite["tx"] if a_invite and not a_invite["tx"]["acked"] else None
        return waiting, [entry["tx"] for entry in record["txs"].values()
                         if entry["role"] == "bye" and entry["tx"]["state"] == "Trying"]
    wait_for(lambda: unanswered() == (None, []), 2.0)  # the last write may still be on its way
    assert unanswered() == (None, []), unanswered()
