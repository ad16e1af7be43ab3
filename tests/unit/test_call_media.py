"""Media I/O stays outside the call machine: in relay mode the shell's media step
(workers/sip/mediastep.py) asks the relay around the event, and the call only ever sees
the answers.  A relay port here refuses to be called from inside workers/sip/call/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from callkit import (
    A_HOST,
    A_SOCK,
    ADDRESS,
    ANSWER_SDP,
    CALLER_ADDR,
    SLOT,
    START,
    TAG,
    Callee,
    Caller,
    CountingIds,
    seed_invite,
    targets,
)

from cluster.sip.message import parse
from workers.sip.call import Call, Ctx, Settings, check
from workers.sip.mediastep import decide

MACHINE = Path(__file__).resolve().parents[2] / "workers" / "sip" / "call"
RELAY_IP = b"203.0.113.7"


class GuardedRelay:
    """A relay port that records what it is asked and rewrites c= to the relay; it
    raises when any frame on the stack runs code of the call machine."""

    mode = "relay"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, bool, str]] = []

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        frame = sys._getframe(1)
        while frame is not None:
            if Path(frame.f_code.co_filename).resolve().is_relative_to(MACHINE):
                raise AssertionError(f"media I/O from inside the call machine: {frame}")
            frame = frame.f_back
        self.asked.append((tag, leg, offer, peer_ip))
        lines = [b"c=IN IP4 " + RELAY_IP if line.startswith(b"c=") else line
                 for line in body.split(b"\r\n")]
        return b"\r\n".join(lines)

    def end(self, tag: str) -> dict | None:
        return None


class Shell:
    """The shell's steps for one call, without Redis: decide (with the media step),
    keep the record."""

    def __init__(self, port) -> None:
        self.port, self.ids, self.now = port, CountingIds(), START
        self.cfg = Settings(address=ADDRESS, port=5060)
        self.record: dict | None = None

    def ctx(self, media, source=None) -> Ctx:
        return Ctx(self.now, self.ids, self.cfg, source, media)

    def start(self):
        call, actions = decide(lambda media: Call.start(
            tag=TAG, slot=SLOT, invite=seed_invite(), source=CALLER_ADDR, host=A_HOST,
            sock_index=A_SOCK, caller="1002", callee="1009", targets=targets(1),
            ctx=self.ctx(media, CALLER_ADDR)), self.port)
        self.record = call.to_record()
        return check(actions)

    def event(self, fn):
        def run(media):
            call = Call.from_record(self.record)
            return call, fn(call, self.ctx(media))
        call, actions = decide(run, self.port)
        self.record = call.to_record()
        return check(actions)


def sent(actions, dest):
    return [parse(a.data) for a in actions if getattr(a, "dest", None) == dest]


def test_a_relayed_call_asks_the_relay_only_from_the_shell():
    port = GuardedRelay()
    shell = Shell(port)
    started = shell.start()
    callee_addr = targets(1)[0].peer
    [invite] = sent(started, callee_addr)
    assert b"c=IN IP4 " + RELAY_IP in invite.body  # the B-leg got the relay's offer
    assert port.asked == [(TAG, "a", True, CALLER_ADDR[0])]  # asked once, not per run

    callee = Callee(invite, callee_addr, "calleetag0")
    ringing = shell.event(lambda call, ctx: call.on_response(callee.respond(180), callee_addr,
                                                            ctx))
    assert [m.status for m in sent(ringing, CALLER_ADDR)] == [180]
    assert len(port.asked) == 1  # no SDP, no relay

    answered = shell.event(lambda call, ctx: call.on_response(
        callee.respond(200, body=ANSWER_SDP), callee_addr, ctx))
    [ok] = sent(answered, CALLER_ADDR)
    assert ok.status == 200 and b"c=IN IP4 " + RELAY_IP in ok.body
    assert b"c=IN IP4 192.168.31.50" not in ok.body
    assert port.asked[1:] == [(TAG, "b0", False, callee_addr[0])]
    assert Call.from_record(shell.record).state == "answered"


def test_the_guard_catches_a_call_that_does_its_own_media_io():
    # The guard is real: a relay handed straight to the call (as it once was) trips it.
    port = GuardedRelay()
    with pytest.raises(AssertionError, match="inside the call machine"):
        Call.start(tag=TAG, slot=SLOT, invite=seed_invite(), source=CALLER_ADDR, host=A_HOST,
                   sock_index=A_SOCK, caller="1002", callee="1009", targets=targets(1),
                   ctx=Ctx(START, CountingIds(), Settings(address=ADDRESS, port=5060),
                           CALLER_ADDR, port))


def test_bypass_runs_the_event_once_and_never_asks():
    class Bypass:
        mode = "bypass"

        def rewrite(self, *args, **kwargs):
            raise AssertionError("bypass media asked for a rewrite")

    runs = []
    result = decide(lambda media: runs.append(media) or "decision", Bypass())
    assert result == "decision" and len(runs) == 1


def test_relay_mode_runs_once_when_no_sdp_crosses():
    runs = []
    assert decide(lambda media: runs.append(media) or 7, GuardedRelay()) == 7
    assert len(runs) == 1


def test_a_relay_error_surfaces_from_the_shell_step():
    class Failing(GuardedRelay):
        def rewrite(self, *args, **kwargs):
            raise RuntimeError("relay unavailable")

    with pytest.raises(RuntimeError, match="relay unavailable"):
        Shell(Failing()).start()


class VanishingRelay(GuardedRelay):
    """A relay whose session is gone once ``gone`` is set (the call ended)."""

    gone = False

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        if self.gone:
            raise RuntimeError(f"no relay session for call {tag}")
        return super().rewrite(tag, leg, body, offer=offer, peer_ip=peer_ip)


def test_a_2xx_to_a_reinvite_after_the_call_ended_is_acked_without_the_relay():
    """The caller sent a re-INVITE, then BYE before the callee answered it (a host restart
    seen in the fault matrix): the re-INVITE gets 487; the callee's 200 still gets its ACK,
    with no SDP and without asking the relay, whose session went with the call; the
    caller gets nothing more."""
    port = VanishingRelay()
    shell = Shell(port)
    callee_addr = targets(1)[0].peer
    [invite] = sent(shell.start(), callee_addr)
    callee, caller = Callee(invite, callee_addr, "calleetag0"), Caller()
    [ok] = sent(shell.event(lambda call, ctx: call.on_response(
        callee.respond(200, body=ANSWER_SDP), callee_addr, ctx)), CALLER_ADDR)
    caller.learn(ok)
    shell.event(lambda call, ctx: call.on_request(caller.ack(), CALLER_ADDR, ctx))
    reinvite = caller.request("INVITE", body=seed_invite().body)
    [relayed] = [m for m in sent(shell.event(lambda call, ctx: call.on_request(
        reinvite, CALLER_ADDR, ctx)), callee_addr) if m.method == "INVITE"]
    bye = caller.request("BYE")
    ended = shell.event(lambda call, ctx: call.on_request(bye, CALLER_ADDR, ctx))
    # RFC 3261 15.1.2: the re-INVITE still pending gets 487.
    assert sorted((m.status, m.cseq.method) for m in sent(ended, CALLER_ADDR)) == [
        (200, "BYE"), (487, "INVITE")]
    assert Call.from_record(shell.record).state == "ended"
    port.gone = True

    late = shell.event(lambda call, ctx: call.on_response(
        callee.answer(relayed, body=ANSWER_SDP), callee_addr, ctx))
    [ack] = sent(late, callee_addr)
    assert ack.method == "ACK" and (ack.cseq.number, ack.cseq.method) == (
        relayed.cseq.number, "ACK")
    assert ack.body == b""
    assert sent(late, CALLER_ADDR) == []
