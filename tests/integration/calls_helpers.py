"""Helpers for the call tests: SIPp callers and callees around a test cluster.

A call test starts one or more SIPp callees (scenarios/call_uas*.xml), registers
their ports as the contacts of the callee user, runs a SIPp caller
(scenarios/call_uac*.xml) with digest credentials from an injection file, and
then reads both sides' message files (``-trace_msg``) and the call's state in
Redis (call records, CDRs).
"""

from __future__ import annotations

import errno
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from harness import Cluster, wait_for
from sipp import Sipp, SippResult
from sipua import UA

NORMAL_CLEARING = 'Q.850;cause=16;text="NORMAL_CLEARING"'  # a BYE's Reason
PASSWORD = "1234"
MESSAGE_FILE = "messages.log"
# A -trace_msg entry starts with a line of dashes and a timestamp, then says which way it went.
_ENTRY = re.compile(
    r"^-{20,} ([0-9-]+ [0-9:.]+)\n((?:UDP|TCP) message (sent|received)[^\n]*)\n\n", re.M)


def provision(cluster: Cluster, users, password: str = PASSWORD) -> None:
    for user in users:
        cluster.add_user(str(user), password)



# ------------------------------------------------------------------ SIPp message files
@dataclass
class SipMessage:
    direction: str  # "sent" or "received", seen from the SIPp instance
    text: str
    at: float = 0.0  # when SIPp sent or received it (epoch seconds)

    @property
    def first_line(self) -> str:
        return self.text.split("\r\n", 1)[0].split("\n", 1)[0].strip()

    @property
    def head(self) -> str:
        return re.split(r"\r?\n\r?\n", self.text, maxsplit=1)[0]

    @property
    def body(self) -> str:
        parts = re.split(r"\r?\n\r?\n", self.text, maxsplit=1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def is_response(self) -> bool:
        return self.first_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        """The request's method, or the method of the request a response answers."""
        if self.is_response:
            return (self.header("CSeq") or " ").split()[-1]
        return self.first_line.split(" ", 1)[0]

    @property
    def status(self) -> int:
        return int(self.first_line.split()[1]) if self.is_response else 0

    def headers(self, name: str) -> list[str]:
        found = []
        for line in self.head.splitlines()[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                found.append(value.strip())
        return found

    def header(self, name: str) -> str | None:
        values = self.headers(name)
        return values[0] if values else None

    @property
    def branch(self) -> str | None:
        via = self.header("Via") or ""
        match = re.search(r";branch=([^;,\s]+)", via)
        return match.group(1) if match else None

    @property
    def tag(self) -> str | None:
        """The To tag."""
        match = re.search(r";tag=([^;,\s]+)", self.header("To") or "")
        return match.group(1) if match else None

    @property
    def short(self) -> str:
        """'> INVITE' for a sent request, '< 180 INVITE' for a received response..."""
        arrow = ">" if self.direction == "sent" else "<"
        if self.is_response:
            return f"{arrow} {self.status} {self.method}"
        return f"{arrow} {self.method}"


def read_messages(path: Path) -> list[SipMessage]:
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    matches = list(_ENTRY.finditer(text))
    messages = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.end():end].rstrip("\r\n") + "\r\n"
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        messages.append(SipMessage(match.group(3), body, at))
    return messages


def flow(messages: list[SipMessage]) -> list[str]:
    """The messages in order, short form, retransmissions (identical copies) left out."""
    seen: set[str] = set()
    out = []
    for msg in messages:
        key = msg.direction + msg.text
        if key not in seen:
            seen.add(key)
            out.append(msg.short)
    return out


def received(messages: list[SipMessage], method: str, status: int = 0, *,
             final: bool = False, copies: bool = False) -> list[SipMessage]:
    """Received requests of ``method`` (status 0), or received responses ``status`` to it;
    with ``final``, every final response to it.  Retransmissions (identical copies) are
    left out unless ``copies``."""
    found = [m for m in messages if m.direction == "received" and m.method == method
             and (m.status >= 200 if final else m.status == status)]
    return found if copies else list({m.text: m for m in found}.values())


# ------------------------------------------------------------------ SIPp parties
@dataclass
class Party:
    """One SIPp instance of a call test and, once it ended, its result and messages."""

    sipp: Sipp
    result: SippResult | None = None

    @property
    def port(self) -> int:
        return self.sipp.port

    @property
    def message_file(self) -> Path:
        return self.sipp.workdir / MESSAGE_FILE

    @property
    def messages(self) -> list[SipMessage]:
        return read_messages(self.message_file)

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.returncode == 0

    def report(self) -> str:
        summary = self.result.summary() if self.result else "(not finished)"
        return f"{self.sipp.scenario} on port {self.port}: {summary}"


def caller(cluster: Cluster, workdir: Path, user: str, callee: str, *,
           scenario: str = "call_uac.xml", calls: int = 1, rate: float = 10.0,
           hold_ms: int = 0, users: list[str] | None = None, timeout: float = 30.0,
           extra: tuple[str, ...] = ()) -> Party:
    """A SIPp caller: ``user`` (or each of ``users`` in turn) calls ``callee``; ``hold_ms``
    is the scenario's <pause/> (the call's hold time in call_uac.xml)."""
    users = users or [user]
    return Party(Sipp(scenario, cluster.address, workdir, calls, rate=rate,
                      users=[(u, PASSWORD) for u in users], timeout=timeout,
                      extra=("-s", callee, "-d", str(hold_ms), *_message_trace(workdir),
                             *extra)))


def callee(cluster: Cluster, workdir: Path, *, scenario: str = "call_uas.xml", calls: int = 1,
           delay_ms: int = 0, timeout: float = 30.0, extra: tuple[str, ...] = ()) -> Party:
    """A SIPp callee; ``delay_ms`` is the scenario's <pause/>."""
    return Party(Sipp(scenario, cluster.address, workdir, calls, timeout=timeout,
                      extra=("-d", str(delay_ms), *_message_trace(workdir), *extra)))


def _message_trace(workdir: Path) -> tuple[str, ...]:
    return ("-trace_msg", "-message_file", str(workdir / MESSAGE_FILE))


def start_listening(party: Party, timeout: float = 5.0) -> Party:
    """Start a SIPp callee and wait until its UDP port is bound."""
    party.sipp.start()
    if not wait_for(lambda: port_in_use(party.port), timeout, step=0.02):
        raise RuntimeError(f"SIPp did not bind port {party.port}:\n"
                           + party.sipp.output_file.read_text(errors="replace"))
    return party


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def register(cluster: Cluster, user: str, ports: list[int]) -> None:
    """Register ``ports`` on 127.0.0.1 as the contacts of ``user`` (from our own UA: the
    registrar sends to the Contact, as the REGISTER's source matches its Via)."""
    with UA(cluster.address, user=user) as ua:
        reply = ua.register(PASSWORD, contacts=[f"<sip:{user}@127.0.0.1:{p}>" for p in ports])
    assert reply is not None and reply.status == 200, f"REGISTER of {user}: {reply}"


@dataclass
class CallRun:
    """The outcome of one call test: the caller and every callee, finished."""

    uac: Party
    uas: list[Party] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(p.report() for p in [self.uac, *self.uas])


def run_call(cluster: Cluster, workdir: Path, user: str, callee_user: str, *,
             uac: dict | None = None, uas: list[dict] | None = None,
             register_callees: bool = True) -> CallRun:
    """Start the callees (keyword sets for ``callee()``), register them as ``callee_user``'s
    contacts, run the caller (keywords for ``caller()``), and wait for everybody."""
    callees = [callee(cluster, workdir / f"uas{i}", **kwargs)
               for i, kwargs in enumerate(uas if uas is not None else [{}])]
    run = CallRun(caller(cluster, workdir / "uac", user, callee_user, **(uac or {})), callees)
    try:
        for party in callees:
            start_listening(party)
        if register_callees and callees:
            register(cluster, callee_user, [p.port for p in callees])
        run.uac.result = run.uac.sipp.run()
        for party in callees:
            party.result = party.sipp.wait()
    finally:
        for party in [run.uac, *callees]:
            party.sipp.stop()
    return run


# ------------------------------------------------------------------ the call in Redis
def calls_of(cluster: Cluster, user: str) -> list[tuple[str, dict]]:
    """(tag, record) of every call record placed by ``user``."""
    return [(tag, rec) for tag, rec in cluster.store.call_records() if rec.get("caller") == user]


def cdrs_of(cluster: Cluster, user: str) -> list[dict]:
    return [cdr for cdr in cluster.store.cdrs_after() if cdr.get("caller") == user]


def wait_cdrs(cluster: Cluster, user: str, count: int = 1, timeout: float = 5.0) -> list[dict]:
    return wait_for(lambda: len(cdrs_of(cluster, user)) >= count and cdrs_of(cluster, user),
                    timeout) or cdrs_of(cluster, user)


def all_ended(cluster: Cluster, user: str, timeout: float = 5.0) -> list[tuple[str, dict]]:
    """Wait until every call record of ``user`` is in state "ended"; those still live."""
    def live():
        return [(tag, rec["state"]) for tag, rec in calls_of(cluster, user)
                if rec["state"] != "ended"]
    wait_for(lambda: not live(), timeout)
    return live()


def trace_lines(cluster: Cluster, tag: str) -> str:
    """A call's message trace from Redis, one line per message (for failure reports)."""
    return "\n".join(f"{e['dir']:>3} {e['leg']:>2} {e['first']}" for e in cluster.store.trace(tag))


def call_in_state(cluster: Cluster, user: str, states: tuple[str, ...],
                  timeout: float = 5.0) -> tuple[str, dict]:
    """(tag, record) of ``user``'s call once it reaches one of ``states``."""
    def found():
        return next(((tag, rec) for tag, rec in calls_of(cluster, user)
                     if rec["state"] in states), None)
    hit = wait_for(found, timeout, step=0.02)
    assert hit is not None, (user, calls_of(cluster, user), cluster.log_tail())
    return hit


def start_call(cluster: Cluster, workdir: Path, user: str, callee_user: str, *,
               hold_ms: int = 0, answer_after_ms: int = 0, uac: str = "call_uac.xml",
               uas: str = "call_uas.xml") -> CallRun:
    """A SIPp callee registered as ``callee_user`` and a SIPp caller calling it, started."""
    uas_party = start_listening(callee(cluster, workdir / "uas", scenario=uas,
                                       delay_ms=answer_after_ms))
    register(cluster, callee_user, [uas_party.port])
    run = CallRun(caller(cluster, workdir / "uac", user, callee_user, scenario=uac,
                         hold_ms=hold_ms), [uas_party])
    run.uac.sipp.start()
    return run


def finish(*runs: CallRun) -> None:
    """Wait for every party of ``runs`` and keep its result."""
    parties = [party for run in runs for party in [run.uac, *run.uas]]
    try:
        for party in parties:
            party.result = party.sipp.wait()
    finally:
        for party in parties:
            party.sipp.stop()


def assert_both_legs_ended(cluster: Cluster, run: CallRun, user: str, tag: str) -> dict:
    """Both sides succeeded, the callee got the caller's BYE with the Reason of a normal
    clearing, one CDR, nothing live: the CDR."""
    assert run.uac.ok and run.uas[0].ok, run.report() + "\n" + trace_lines(cluster, tag)
    (bye,) = received(run.uas[0].messages, "BYE")
    assert bye.header("Reason") == NORMAL_CLEARING
    cdrs = wait_cdrs(cluster, user)
    assert len(cdrs) == 1, cdrs
    assert cdrs[0]["hangup_cause"] == "NORMAL_CLEARING" and cdrs[0]["hangup_side"] == "caller"
    assert all_ended(cluster, user) == []
    return cdrs[0]


def answers_to(ua: UA, cseq: int, timeout: float):
    """The next response to our INVITE ``cseq`` (others are skipped), or None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        reply = ua.receive(timeout=left)
        if reply is not None and reply.header("CSeq") == f"{cseq} INVITE":
            return reply
    return None

