"""A real softphone over TLS (a ``sip:`` URI with ``;transport=tls``, on one connection the
phone opens to the cluster's TLS port) calls a real softphone registered over UDP.

1100 is a headless baresip (tests/integration/baresip.py) registered with
``;transport=tls`` (account and outbound proxy) to the cluster's TLS port, whose certificate
is a self-signed one made with the openssl CLI and given to the phone as ``sip_cafile``; 1101
is a baresip registered over UDP. The cluster relays the media.

baresip 1.0 (libre 1.1) does not verify the server's certificate at all: with no
``sip_cafile``, or with an unrelated certificate as ``sip_cafile``, it completes the handshake
and sends its REGISTER all the same, and this version has no setting to make it check (later
ones have ``sip_verify_server``). So these tests show that the cluster's TLS carries a real
phone's signalling; the certificate itself is checked by the Python TLS client of
tests/integration/test_streams.py, which verifies it (chain and address) on every connection.

* 1100 calls 1101: each hears the other's tone, 1100 hangs up, one CDR; ``sipctl regs --json``
  says 1100's binding is TLS and 1101's UDP.
* The same call, and every worker killed with SIGKILL, one after the other, while it is up:
  the TLS connection lives in the dispatcher, so the call goes on: RTP keeps flowing (both
  tones are heard after the kills), a re-INVITE from each side is answered, the BYE (from
  the TLS phone, or from the UDP phone and then over the TLS connection) ends it on both
  sides, there is one CDR, and the phone's one TLS connection is the same from start to end.
"""

from __future__ import annotations

import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from baresip import Softphone, analyse_tone, make_tone, require_softphone_tools
from harness import Cluster, wait_for
from streamua import self_signed

from conftest import free_tcp_port
from workers.sip.b2bua import call_tag

DB = 1  # this module's Redis database on the session's redis-server
PASSWORD = "1234"
CALLER, CALLEE = "1100", "1101"  # over TLS, over UDP
TONE = {CALLER: 440.0, CALLEE: 1000.0}  # whole cycles in 50 ms blocks (see analyse_tone)
TONE_SECONDS = 30.0  # longer than any call here: aufile ends the source at its end
TALK = 3.0  # seconds of the plain call
RELAY_PORTS = (31000, 31499)  # the cluster's RTP range, apart from other modules' ranges
PHONE_PORTS = {CALLER: (31500, 31999), CALLEE: (32000, 32499)}
WORKERS = 2


@dataclass
class Bed:
    cluster: Cluster
    caller: Softphone  # over TLS
    callee: Softphone  # over UDP

    @property
    def phones(self) -> tuple[Softphone, Softphone]:
        return self.caller, self.callee


@pytest.fixture(scope="module")
def bed(tmp_path_factory, redis_server) -> Iterator[Bed]:
    require_softphone_tools()
    tmp = tmp_path_factory.mktemp("tls-softphones")
    cert, key = self_signed(tmp)
    redis_server.client(db=DB).flushdb()
    settings = {"media": {"mode": "relay", "rtp_port_min": RELAY_PORTS[0],
                          "rtp_port_max": RELAY_PORTS[1]},
                "streams": {"tls_port": free_tcp_port(), "tls_cert": cert, "tls_key": key}}
    cluster = Cluster(tmp / "cluster", f"redis://127.0.0.1:{redis_server.port}/{DB}",
                      workers=WORKERS, settings=settings)
    phones = []
    try:
        cluster.start()
        for user in (CALLER, CALLEE):
            cluster.add_user(user, PASSWORD)
        tls_address = (cluster.config.sip.bind, cluster.config.streams.tls_port)
        for user, proxy, transport in ((CALLEE, cluster.address, "udp"),
                                       (CALLER, tls_address, "tls")):
            tone = make_tone(tmp / f"tone-{user}.wav", TONE[user], TONE_SECONDS)
            phone = Softphone(user, PASSWORD, proxy, tmp / f"phone-{user}", tone=tone,
                              rtp_ports=PHONE_PORTS[user], transport=transport,
                              cafile=cert if transport == "tls" else "")
            phones.append(phone)
            phone.start()
        for phone in phones:
            assert wait_for(lambda p=phone: cluster.store.bindings(p.aor), 10), (
                f"{phone.aor} did not register:\n{phone.log_text()[-2000:]}")
        callee, caller = phones
        yield Bed(cluster, caller, callee)
    finally:
        for phone in phones:
            phone.stop()
        cluster.stop()


@pytest.fixture(autouse=True)
def phones_at_rest(request) -> None:
    """A test that failed half-way must not leave a call, or its events, to the next one."""
    if "bed" in request.fixturenames:
        for phone in request.getfixturevalue("bed").phones:
            phone.reset()


def sipctl_regs(cluster: Cluster) -> dict[str, dict]:
    """``sipctl regs --json``, by AOR (one binding each here)."""
    rows = cluster.sipctl_json("regs")
    assert len({row["aor"] for row in rows}) == len(rows), rows
    return {row["aor"]: row for row in rows}


def cdrs_of(cluster: Cluster, a_call_id: str, timeout: float = 5.0) -> list[dict]:
    def found():
        return [c for c in cluster.store.cdrs_after() if c["a_call_id"] == a_call_id]
    wait_for(found, timeout)
    time.sleep(0.5)  # a second CDR (a call ended twice) would come right after the first
    return found()


def live_calls(cluster: Cluster) -> list[tuple[str, dict]]:
    return [(tag, call) for tag, call in cluster.store.call_records() if call["state"] != "ended"]


def trace_firsts(cluster: Cluster, tag: str) -> list[str]:
    """The call's messages as the cluster traced them: "dir leg first-line"."""
    return [f"{e['dir']} {e['leg']} {e['first']}" for e in cluster.store.trace(tag)]


def assert_each_hears_the_other(bed: Bed, at_least: float) -> None:
    """Each phone's newest recording holds the other's tone for ``at_least`` seconds, and
    nothing of its own."""
    for listener, speaker in ((bed.caller, bed.callee), (bed.callee, bed.caller)):
        recording = listener.recording()
        other = analyse_tone(recording, TONE[speaker.user])
        own = analyse_tone(recording, TONE[listener.user])
        assert other.tone >= at_least, (listener.user, other)
        assert abs(other.dominant - TONE[speaker.user]) <= 0.03 * TONE[speaker.user], (
            listener.user, other)
        assert own.tone == 0.0, (listener.user, own)


def rtp_from_relay(phone: Softphone) -> None:
    source = phone.rtp_sources().get("audio")
    assert source is not None and source[0] == "127.0.0.1", (phone.user, source)
    assert RELAY_PORTS[0] <= source[1] <= RELAY_PORTS[1], (phone.user, source)


# ------------------------------------------------------------------ registration and a call


def test_tls_phone_calls_a_udp_phone_and_each_hears_the_other(bed):
    cluster, caller, callee = bed.cluster, bed.caller, bed.callee
    regs = sipctl_regs(cluster)
    assert regs[caller.aor]["transport"] == "tls", regs
    assert regs[caller.aor]["user_agent"].startswith("baresip"), regs
    assert ";transport=tls" in regs[caller.aor]["contact"], regs
    assert regs[callee.aor]["transport"] == "udp", regs
    (binding,) = cluster.store.bindings(caller.aor)
    assert binding.conn and cluster.store.stream_open("test-host", binding.conn)

    caller.dial(callee.user)
    up = caller.wait_for("CALL_ESTABLISHED", 10)
    callee.wait_for("CALL_ESTABLISHED", 10)
    time.sleep(TALK)
    caller.hangup()
    caller.wait_for("CALL_CLOSED", 10)
    callee.wait_for("CALL_CLOSED", 10)
    (cdr,) = cdrs_of(cluster, up["id"])
    assert (cdr["caller"], cdr["callee"]) == (CALLER, CALLEE), cdr
    assert (cdr["hangup_cause"], cdr["hangup_side"], cdr["sip_status"]) == (
        "NORMAL_CLEARING", "caller", "200"), cdr
    assert float(cdr["billsec"]) >= TALK - 0.1, cdr
    assert_each_hears_the_other(bed, TALK - 0.8)
    for phone in bed.phones:
        rtp_from_relay(phone)
    assert wait_for(lambda: not live_calls(cluster), 3), live_calls(cluster)
    # The A leg came and went over TLS, to the TLS port; the B leg over UDP.
    entries = cluster.store.trace(call_tag(cdr["b_call_id"].encode()))
    a_invite = next(e["data"] for e in entries if e["dir"] == "in" and e["leg"] == "a"
                    and e["first"].startswith("INVITE"))
    assert b"Via: SIP/2.0/TLS " in a_invite, a_invite[:600]
    b_invite = next(e["data"] for e in entries if e["dir"] == "out" and e["leg"] == "b0"
                    and e["first"].startswith("INVITE"))
    assert b"Via: SIP/2.0/UDP " in b_invite, b_invite[:600]
    # The caller's ACK and BYE came over its TLS connection too (the trace holds what the
    # workers got and sent; the dispatcher stamps the Contact towards a stream, see
    # cluster/sip/framing.py stamp).
    for method in ("ACK", "BYE"):
        request = next(e["data"] for e in entries if e["dir"] == "in" and e["leg"] == "a"
                       and e["first"].startswith(method))
        assert b"Via: SIP/2.0/TLS " in request, request[:600]


# ------------------------------------------------------------------ workers killed mid-call


def tls_connections_opened(cluster: Cluster) -> int:
    """TLS connections the dispatcher has opened or accepted, from its heartbeat."""
    (dispatcher,) = cluster.store.processes("dispatcher")
    return dispatcher["streams_opened_tls"]


def wait_running(cluster: Cluster, name: str, old_pid: int, timeout: float = 15.0) -> None:
    """Until supervisord runs ``name`` again (a new process) and the dispatcher routes to
    every worker."""
    def back():
        state, pid = cluster.processes().get(f"worker:{name}", ("", 0))
        return state == "RUNNING" and pid != old_pid and cluster.joined_workers() == WORKERS
    assert wait_for(back, timeout, step=0.1), cluster.log_tail()


def answered_record(cluster: Cluster) -> tuple[str, dict] | None:
    """The tag and record of the caller's answered call (there is one at a time here)."""
    for tag, record in cluster.store.call_records():
        if record.get("state") == "answered" and record.get("caller") == CALLER:
            return tag, record
    return None


def tail_report(path: Path, seconds: float, frequency: float):
    """analyse_tone over the last ``seconds`` of the recording at ``path``."""
    with wave.open(str(path), "rb") as wav:
        params = wav.getparams()
        frames = int(seconds * params.framerate)
        wav.setpos(max(0, params.nframes - frames))
        data = wav.readframes(frames)
    tail = path.with_name(path.stem + "-tail.wav")
    with wave.open(str(tail), "wb") as out:
        out.setparams(params)
        out.writeframes(data)
    return analyse_tone(tail, frequency)


@pytest.mark.parametrize("hangs_up", ["caller", "callee"])
def test_every_worker_killed_during_a_tls_call_and_the_call_goes_on(bed, hangs_up):
    """kill -9 of the worker holding the call, then of the other one (each back before the
    next kill): the TLS connection is the dispatcher's, so nothing of the call is lost. The
    BYE comes from the TLS phone over its connection, or from the UDP phone, and then goes
    to the TLS phone over its connection."""
    cluster, caller, callee = bed.cluster, bed.caller, bed.callee
    (binding,) = cluster.store.bindings(caller.aor)
    tls_opened = tls_connections_opened(cluster)
    assert tls_opened >= 1  # the one the phone registered over
    caller.dial(callee.user)
    up = caller.wait_for("CALL_ESTABLISHED", 10)
    callee.wait_for("CALL_ESTABLISHED", 10)
    established = time.monotonic()
    found = wait_for(lambda: answered_record(cluster), 5)
    assert found, "no answered call record"
    tag, record = found
    holder = record["worker"]
    others = sorted({f"worker-{i}" for i in range(WORKERS)} - {holder})
    assert len(others) == WORKERS - 1, (holder, others)
    for name in (holder, *others):
        wait_running(cluster, name, cluster.kill9(f"worker:{name}"))
    # The phone's TLS connection is the one it registered over, still open.
    assert cluster.store.stream_open("test-host", binding.conn)
    assert caller.active_calls() == 1 and callee.active_calls() == 1

    # A re-INVITE from each side, handled by the new workers, passed to the other side and
    # answered 200 (the caller's over its TLS connection).
    for phone, leg in ((caller, "a"), (callee, "b0")):
        before = invites_answered(cluster, tag, leg)
        phone.command("reinvite")
        assert wait_for(lambda leg=leg, n=before + 1: invites_answered(cluster, tag, leg) == n,
                        5), trace_firsts(cluster, tag)
    a_invites = [e["data"] for e in cluster.store.trace(tag)
                 if e["dir"] == "in" and e["leg"] == "a" and e["first"].startswith("INVITE")]
    # The challenged INVITE, the one with credentials, and the re-INVITE.
    assert len(a_invites) == 3 and b"Via: SIP/2.0/TLS " in a_invites[-1], a_invites
    time.sleep(TALK)
    assert caller.active_calls() == 1 and callee.active_calls() == 1

    (caller if hangs_up == "caller" else callee).hangup()
    caller.wait_for("CALL_CLOSED", 10)
    callee.wait_for("CALL_CLOSED", 10)
    talked = time.monotonic() - established
    (cdr,) = cdrs_of(cluster, up["id"])
    assert (cdr["hangup_cause"], cdr["hangup_side"], cdr["sip_status"]) == (
        "NORMAL_CLEARING", hangs_up, "200"), cdr
    assert wait_for(lambda: not live_calls(cluster), 3), live_calls(cluster)
    # RTP kept flowing through the relay. baresip records what it decodes as packets come,
    # so a gap would make the recording shorter than the call (here 7.1 s of a 7.18 s call
    # when nothing is lost) or, if filled, not the tone: the whole recording is the other
    # side's tone, and so are its last seconds, after both kills and both re-INVITEs.
    for listener, speaker in ((caller, callee), (callee, caller)):
        whole = analyse_tone(listener.recording(), TONE[speaker.user])
        assert whole.seconds >= talked - 0.5 and whole.tone >= whole.seconds - 0.8, (
            listener.user, whole, talked)
        last = tail_report(listener.recording(), TALK, TONE[speaker.user])
        assert last.tone >= TALK - 0.8, (listener.user, last)
    for phone in bed.phones:
        rtp_from_relay(phone)
    assert call_tag(cdr["b_call_id"].encode()) == tag
    # One connection all along: the phone never had to connect again, the cluster never
    # opened one to it.
    time.sleep(0.5)  # past a dispatcher heartbeat (0.2 s)
    assert tls_connections_opened(cluster) == tls_opened
    assert cluster.store.stream_open("test-host", binding.conn)
    lines = trace_firsts(cluster, tag)
    bye = ["in a BYE", "out b0 BYE"] if hangs_up == "caller" else ["in b0 BYE", "out a BYE"]
    assert all(any(line.startswith(b) for line in lines) for b in bye), lines
    answered_by = "b0" if hangs_up == "caller" else "a"  # the other phone's 200 to the BYE
    assert wait_for(lambda: any(
        e["dir"] == "in" and e["leg"] == answered_by and e["first"].startswith("SIP/2.0 200")
        and cseq_method(e["data"]) == b"BYE" for e in cluster.store.trace(tag)), 2), lines


def invites_answered(cluster: Cluster, tag: str, leg: str) -> int:
    """INVITEs (first or re-INVITEs) the cluster answered 200 on ``leg``."""
    entries = cluster.store.trace(tag)
    return sum(1 for e in entries if e["dir"] == "out" and e["leg"] == leg
               and e["first"].startswith("SIP/2.0 200") and cseq_method(e["data"]) == b"INVITE")


def cseq_method(data: bytes) -> bytes:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"cseq":
            return value.split()[-1]
    return b""
