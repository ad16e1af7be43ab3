"""Transactions (RFC 3261 section 17, RFC 6026): every row of the four state tables, the
seed trace's retransmissions, the timer sequences, stale timers, matching and records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from cluster.sip.message import Request, Response, build_request, build_response, parse
from cluster.sip.transaction import (
    TERMINATED,
    Action,
    CancelTimer,
    Deliver,
    InviteClientTransaction,
    InviteServerTransaction,
    NoAck,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    Send,
    SetTimer,
    Terminated,
    TimedOut,
    TimerConfig,
    Transaction,
    ack_for_final,
    cancel_target_key,
    client_key,
    client_transaction,
    key_part,
    response_dest,
    server_key,
    server_transaction,
    transaction_from_record,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONFIG = TimerConfig()
T1, T2, T4 = CONFIG.t1, CONFIG.t2, CONFIG.t4
ZOIPER = ("192.168.31.142", 55747)
MICROSIP = ("192.168.31.109", 60119)
FREESWITCH = ("192.168.31.109", 5060)


def wire(name: str) -> bytes:
    return (FIXTURES / "seed" / f"{name}.sip").read_bytes()


def seed(name: str) -> Request | Response:
    return parse(wire(name))


def roundtrip(tx: Transaction) -> Transaction:
    """The transaction as another worker gets it: through msgpack and back."""
    packed = msgpack.packb(tx.to_record(), use_bin_type=True)
    return transaction_from_record(msgpack.unpackb(packed, raw=False))


def describe(actions: list[Action]) -> str:
    """Actions in short words: "Send, SetTimer A, CancelTimer B, Deliver, ..."."""
    words = []
    for action in actions:
        name = type(action).__name__
        words.append(f"{name} {action.name}" if isinstance(action, SetTimer | CancelTimer)
                     else name)
    return ", ".join(words)


# --------------------------------------------------------------------------- a fake worker pool


class Run:
    """Drives one transaction with a fake clock, as workers and the timer store would.

    The timer store is a dict kept from SetTimer/CancelTimer actions; ``at(now, ...)``
    first fires every timer due by ``now`` in time order.  With ``restore`` every event
    goes to a copy rebuilt from the msgpack record, as when each lands on another worker.
    """

    def __init__(self, tx: Transaction, restore: bool = False):
        self.tx, self.restore, self.now = tx, restore, 0.0
        self.store: dict[str, float] = {}
        self.log: list[tuple[float, Action]] = []

    def feed(self, event: Callable[[Transaction], list[Action]]) -> list[Action]:
        if self.restore:
            self.tx = roundtrip(self.tx)
        actions = event(self.tx)
        for action in actions:
            if isinstance(action, SetTimer):
                self.store[action.name] = action.at
            elif isinstance(action, CancelTimer):
                self.store.pop(action.name, None)
        self.log += [(self.now, action) for action in actions]
        return actions

    def advance(self, until: float) -> None:
        while self.store:
            name, due = min(self.store.items(), key=lambda item: item[1])
            if due > until:
                break
            del self.store[name]
            self.now = due
            self.feed(lambda tx, name=name, due=due: tx.on_timer(name, due))
        self.now = max(self.now, until)

    def at(self, now: float, event: Callable[[Transaction], list[Action]]) -> list[Action]:
        self.advance(now)
        return self.feed(event)

    def sends(self) -> list[tuple[float, bytes]]:
        return [(t, a.data) for t, a in self.log if isinstance(a, Send)]

    def send_times(self) -> list[float]:
        return [t for t, _ in self.sends()]

    def delivered(self) -> list[Request | Response]:
        return [a.msg for _, a in self.log if isinstance(a, Deliver)]

    def count(self, kind: type) -> int:
        return sum(isinstance(a, kind) for _, a in self.log)


@pytest.fixture(params=[False, True], ids=["one-worker", "restored-every-event"])
def restore(request: pytest.FixtureRequest) -> bool:
    return request.param


def start(now: float) -> Callable:
    return lambda tx: tx.start(now)


def response(resp: Response, now: float) -> Callable:
    return lambda tx: tx.on_response(resp, now)


def request(req: Request, now: float) -> Callable:
    return lambda tx: tx.on_request(req, now)


def answer(resp: Response, now: float) -> Callable:
    return lambda tx: tx.send_response(resp, now)


# --------------------------------------------------------------------------- the state tables

INVITE_OUT = seed("06-invite")  # the B-leg INVITE: the cluster is the client
BYE_OUT = seed("18-bye")
INVITE_IN = seed("04-invite")  # the A-leg INVITE: the cluster is the server
BYE_IN = seed("16-bye")
RESPONSES = {
    "ict": {"1xx": seed("08-180"), "2xx": seed("10-200"),
            "3xx-6xx": build_response(INVITE_OUT, 486, to_tag="busy")},
    "nict": {"1xx": build_response(BYE_OUT, 100), "2xx": seed("20-200"),
             "3xx-6xx": build_response(BYE_OUT, 481)},
    "ist": {"send 1xx": build_response(INVITE_IN, 180, to_tag="4Z6N2Z34t5KXF"),
            "send 2xx": seed("12-200"),
            "send 3xx-6xx": build_response(INVITE_IN, 486, to_tag="4Z6N2Z34t5KXF")},
    "nist": {"send 1xx": build_response(BYE_IN, 100), "send 2xx": seed("17-200"),
             "send 3xx-6xx": build_response(BYE_IN, 481)},
}
NEW = {
    "ict": lambda: client_transaction(INVITE_OUT, MICROSIP),
    "nict": lambda: client_transaction(BYE_OUT, ZOIPER),
    "ist": lambda: server_transaction(INVITE_IN, ZOIPER),
    "nist": lambda: server_transaction(BYE_IN, MICROSIP),
}
EVENTS = {
    "ict": ["start", "1xx", "2xx", "3xx-6xx", "timer A", "timer B", "timer D", "timer M"],
    "nict": ["start", "1xx", "2xx", "3xx-6xx", "timer E", "timer F", "timer K"],
    "ist": ["request", "retransmission", "ACK", "ack_received", "send 1xx", "send 2xx",
            "send 3xx-6xx", "timer G", "timer H", "timer I", "timer L", "timer 2xx"],
    "nist": ["request", "retransmission", "send 1xx", "send 2xx", "send 3xx-6xx", "timer J"],
}


def fire(tx: Transaction, event: str, now: float) -> list[Action]:
    """Feed ``tx`` the event a table row names; a timer fires at its due time."""
    if event == "start":
        return tx.start(now)
    if event.startswith("timer "):
        name = event[len("timer "):]
        return tx.on_timer(name, tx.timers.get(name, now))
    if event in ("1xx", "2xx", "3xx-6xx"):
        return tx.on_response(RESPONSES[tx.KIND][event], now)
    if event.startswith("send "):
        return tx.send_response(RESPONSES[tx.KIND][event], now)
    if event in ("request", "retransmission"):
        assert tx.delivered == (event == "retransmission")
        return tx.on_request(INVITE_IN if tx.KIND == "ist" else BYE_IN, now)
    if event == "ACK":
        final = parse(tx.last_response) if tx.last_response else RESPONSES["ist"]["send 3xx-6xx"]
        return tx.on_request(ack_for_final(INVITE_IN, final), now)
    assert event == "ack_received"
    return tx.ack_received(now)


def walk(tx: Transaction, path: tuple[str, ...]) -> float:
    """Feed the events of ``path``; returns the clock after them."""
    now = 0.0
    for event in path:
        name = event[len("timer "):]
        now = tx.timers[name] if event.startswith("timer ") else now + 0.01
        fire(tx, event, now)
    return now


# Each machine's table as the tests expect it: path to the state, event, next state, actions.
ROWS = {
    "ict": [
        ((), "start", "Calling", "Send, SetTimer A, SetTimer B"),
        (("start",), "timer A", "Calling", "Send, SetTimer A"),
        (("start",), "timer B", TERMINATED, "TimedOut, CancelTimer A, Terminated"),
        (("start",), "1xx", "Proceeding", "CancelTimer A, CancelTimer B, Deliver"),
        (("start",), "2xx", "Accepted", "CancelTimer A, CancelTimer B, Deliver, SetTimer M"),
        (("start",), "3xx-6xx", "Completed",
         "CancelTimer A, CancelTimer B, Deliver, Send, SetTimer D"),
        (("start", "1xx"), "1xx", "Proceeding", "Deliver"),
        (("start", "1xx"), "2xx", "Accepted", "Deliver, SetTimer M"),
        (("start", "1xx"), "3xx-6xx", "Completed", "Deliver, Send, SetTimer D"),
        (("start", "3xx-6xx"), "3xx-6xx", "Completed", "Send"),
        (("start", "3xx-6xx"), "timer D", TERMINATED, "Terminated"),
        (("start", "2xx"), "2xx", "Accepted", "Deliver"),
        (("start", "2xx"), "timer M", TERMINATED, "Terminated"),
    ],
    "nict": [
        ((), "start", "Trying", "Send, SetTimer E, SetTimer F"),
        (("start",), "timer E", "Trying", "Send, SetTimer E"),
        (("start",), "timer F", TERMINATED, "TimedOut, CancelTimer E, Terminated"),
        (("start",), "1xx", "Proceeding", "Deliver"),
        (("start",), "2xx", "Completed", "CancelTimer E, CancelTimer F, Deliver, SetTimer K"),
        (("start",), "3xx-6xx", "Completed",
         "CancelTimer E, CancelTimer F, Deliver, SetTimer K"),
        (("start", "1xx"), "timer E", "Proceeding", "Send, SetTimer E"),
        (("start", "1xx"), "timer F", TERMINATED, "TimedOut, CancelTimer E, Terminated"),
        (("start", "1xx"), "1xx", "Proceeding", "Deliver"),
        (("start", "1xx"), "2xx", "Completed",
         "CancelTimer E, CancelTimer F, Deliver, SetTimer K"),
        (("start", "1xx"), "3xx-6xx", "Completed",
         "CancelTimer E, CancelTimer F, Deliver, SetTimer K"),
        (("start", "2xx"), "2xx", "Completed", ""),
        (("start", "2xx"), "3xx-6xx", "Completed", ""),
        (("start", "2xx"), "timer K", TERMINATED, "Terminated"),
    ],
    "ist": [
        ((), "request", "Proceeding", "Deliver"),
        (("request",), "retransmission", "Proceeding", ""),
        (("request", "send 1xx"), "retransmission", "Proceeding", "Send"),
        (("request",), "send 1xx", "Proceeding", "Send"),
        (("request",), "send 2xx", "Accepted", "Send, SetTimer 2xx, SetTimer L"),
        (("request",), "send 3xx-6xx", "Completed", "Send, SetTimer G, SetTimer H"),
        (("request", "send 3xx-6xx"), "retransmission", "Completed", "Send"),
        (("request", "send 3xx-6xx"), "ACK", "Confirmed",
         "CancelTimer G, CancelTimer H, SetTimer I"),
        (("request", "send 3xx-6xx"), "timer G", "Completed", "Send, SetTimer G"),
        (("request", "send 3xx-6xx"), "timer H", TERMINATED,
         "NoAck, CancelTimer G, Terminated"),
        (("request", "send 3xx-6xx", "ACK"), "retransmission", "Confirmed", ""),
        (("request", "send 3xx-6xx", "ACK"), "ACK", "Confirmed", ""),
        (("request", "send 3xx-6xx", "ACK"), "timer I", TERMINATED, "Terminated"),
        (("request", "send 2xx"), "retransmission", "Accepted", "Send"),
        (("request", "send 2xx"), "ACK", "Accepted", "CancelTimer 2xx, Deliver"),
        (("request", "send 2xx"), "ack_received", "Accepted", "CancelTimer 2xx"),
        (("request", "send 2xx"), "send 2xx", "Accepted", "Send"),
        (("request", "send 2xx"), "timer 2xx", "Accepted", "Send, SetTimer 2xx"),
        (("request", "send 2xx"), "timer L", TERMINATED, "NoAck, CancelTimer 2xx, Terminated"),
    ],
    "nist": [
        ((), "request", "Trying", "Deliver"),
        (("request",), "retransmission", "Trying", ""),
        (("request",), "send 1xx", "Proceeding", "Send"),
        (("request",), "send 2xx", "Completed", "Send, SetTimer J"),
        (("request",), "send 3xx-6xx", "Completed", "Send, SetTimer J"),
        (("request", "send 1xx"), "retransmission", "Proceeding", "Send"),
        (("request", "send 1xx"), "send 1xx", "Proceeding", "Send"),
        (("request", "send 1xx"), "send 2xx", "Completed", "Send, SetTimer J"),
        (("request", "send 1xx"), "send 3xx-6xx", "Completed", "Send, SetTimer J"),
        (("request", "send 2xx"), "retransmission", "Completed", "Send"),
        (("request", "send 2xx"), "timer J", TERMINATED, "Terminated"),
    ],
}
# One way into every state, Terminated included, for the tests that need them all.
STATE_PATHS = {
    "ict": {"Calling": ("start",), "Proceeding": ("start", "1xx"),
            "Completed": ("start", "3xx-6xx"), "Accepted": ("start", "2xx"),
            TERMINATED: ("start", "3xx-6xx", "timer D")},
    "nict": {"Trying": ("start",), "Proceeding": ("start", "1xx"),
             "Completed": ("start", "2xx"), TERMINATED: ("start", "2xx", "timer K")},
    "ist": {"Proceeding": ("request", "send 1xx"), "Completed": ("request", "send 3xx-6xx"),
            "Confirmed": ("request", "send 3xx-6xx", "ACK"),
            "Accepted": ("request", "send 2xx"),
            TERMINATED: ("request", "send 3xx-6xx", "ACK", "timer I")},
    "nist": {"Trying": ("request",), "Proceeding": ("request", "send 1xx"),
             "Completed": ("request", "send 2xx"),
             TERMINATED: ("request", "send 2xx", "timer J")},
}
ALL_ROWS = [(kind, *row) for kind, rows in ROWS.items() for row in ROWS[kind]]


@pytest.mark.parametrize(("kind", "path", "event", "next_state", "expected"), ALL_ROWS,
                         ids=[f"{k}-{'>'.join(p) or 'new'}-{e}" for k, p, e, _, _ in ALL_ROWS])
def test_state_table_row(kind, path, event, next_state, expected):
    tx = NEW[kind]()
    now = walk(tx, path)
    state = tx.state
    actions = fire(tx, event, now + 0.01)
    assert type(tx).TABLE[state, event][0] == next_state
    assert (tx.state, describe(actions)) == (next_state, expected)


@pytest.mark.parametrize("kind", ROWS)
def test_every_row_of_the_table_is_tested(kind):
    tested = set()
    for path, event, _, _ in ROWS[kind]:
        tx = NEW[kind]()
        walk(tx, path)
        tested.add((tx.state, event))
    assert tested == set(type(NEW[kind]()).TABLE)


IGNORED = [(kind, state, event) for kind, paths in STATE_PATHS.items() for state in paths
           for event in EVENTS[kind]
           if event != "request" and (state, event) not in type(NEW[kind]()).TABLE]


@pytest.mark.parametrize(("kind", "state", "event"), IGNORED,
                         ids=[f"{k}-{s}-{e}" for k, s, e in IGNORED])
def test_events_outside_the_table_do_nothing(kind, state, event):
    tx = NEW[kind]()
    now = walk(tx, STATE_PATHS[kind][state])
    before = tx.to_record()
    assert fire(tx, event, now + 0.01) == []
    assert tx.to_record() == before


# --------------------------------------------------------------------------- reliable transports

NEW_RELIABLE = {
    "ict": lambda: client_transaction(INVITE_OUT, MICROSIP, reliable=True),
    "nict": lambda: client_transaction(BYE_OUT, ZOIPER, reliable=True),
    "ist": lambda: server_transaction(INVITE_IN, ZOIPER, reliable=True),
    "nist": lambda: server_transaction(BYE_IN, MICROSIP, reliable=True),
}
# The same tables over TCP/TLS/WS/WSS (RFC 3261 17.1.1.2, 17.1.2.2, 17.2.1, 17.2.2): no
# Timer A, E or G is ever set (their rows find no pending timer and do nothing), and
# D, K, I and J are zero (RELIABLE_DELAYS).  The 2xx of an INVITE server is retransmitted
# as over UDP (13.3.1.4).
RELIABLE_ROWS = {
    "ict": [
        ((), "start", "Calling", "Send, SetTimer B"),
        (("start",), "timer A", "Calling", ""),
        (("start",), "timer B", TERMINATED, "TimedOut, Terminated"),
        (("start",), "1xx", "Proceeding", "CancelTimer B, Deliver"),
        (("start",), "2xx", "Accepted", "CancelTimer B, Deliver, SetTimer M"),
        (("start",), "3xx-6xx", "Completed", "CancelTimer B, Deliver, Send, SetTimer D"),
        (("start", "1xx"), "1xx", "Proceeding", "Deliver"),
        (("start", "1xx"), "2xx", "Accepted", "Deliver, SetTimer M"),
        (("start", "1xx"), "3xx-6xx", "Completed", "Deliver, Send, SetTimer D"),
        (("start", "3xx-6xx"), "3xx-6xx", "Completed", "Send"),
        (("start", "3xx-6xx"), "timer D", TERMINATED, "Terminated"),
        (("start", "2xx"), "2xx", "Accepted", "Deliver"),
        (("start", "2xx"), "timer M", TERMINATED, "Terminated"),
    ],
    "nict": [
        ((), "start", "Trying", "Send, SetTimer F"),
        (("start",), "timer E", "Trying", ""),
        (("start",), "timer F", TERMINATED, "TimedOut, Terminated"),
        (("start",), "1xx", "Proceeding", "Deliver"),
        (("start",), "2xx", "Completed", "CancelTimer F, Deliver, SetTimer K"),
        (("start",), "3xx-6xx", "Completed", "CancelTimer F, Deliver, SetTimer K"),
        (("start", "1xx"), "timer E", "Proceeding", ""),
        (("start", "1xx"), "timer F", TERMINATED, "TimedOut, Terminated"),
        (("start", "1xx"), "1xx", "Proceeding", "Deliver"),
        (("start", "1xx"), "2xx", "Completed", "CancelTimer F, Deliver, SetTimer K"),
        (("start", "1xx"), "3xx-6xx", "Completed", "CancelTimer F, Deliver, SetTimer K"),
        (("start", "2xx"), "2xx", "Completed", ""),
        (("start", "2xx"), "3xx-6xx", "Completed", ""),
        (("start", "2xx"), "timer K", TERMINATED, "Terminated"),
    ],
    "ist": [
        ((), "request", "Proceeding", "Deliver"),
        (("request",), "retransmission", "Proceeding", ""),
        (("request", "send 1xx"), "retransmission", "Proceeding", "Send"),
        (("request",), "send 1xx", "Proceeding", "Send"),
        (("request",), "send 2xx", "Accepted", "Send, SetTimer 2xx, SetTimer L"),
        (("request",), "send 3xx-6xx", "Completed", "Send, SetTimer H"),
        (("request", "send 3xx-6xx"), "retransmission", "Completed", "Send"),
        (("request", "send 3xx-6xx"), "ACK", "Confirmed", "CancelTimer H, SetTimer I"),
        (("request", "send 3xx-6xx"), "timer G", "Completed", ""),
        (("request", "send 3xx-6xx"), "timer H", TERMINATED, "NoAck, Terminated"),
        (("request", "send 3xx-6xx", "ACK"), "retransmission", "Confirmed", ""),
        (("request", "send 3xx-6xx", "ACK"), "ACK", "Confirmed", ""),
        (("request", "send 3xx-6xx", "ACK"), "timer I", TERMINATED, "Terminated"),
        (("request", "send 2xx"), "retransmission", "Accepted", "Send"),
        (("request", "send 2xx"), "ACK", "Accepted", "CancelTimer 2xx, Deliver"),
        (("request", "send 2xx"), "ack_received", "Accepted", "CancelTimer 2xx"),
        (("request", "send 2xx"), "send 2xx", "Accepted", "Send"),
        (("request", "send 2xx"), "timer 2xx", "Accepted", "Send, SetTimer 2xx"),
        (("request", "send 2xx"), "timer L", TERMINATED, "NoAck, CancelTimer 2xx, Terminated"),
    ],
    "nist": ROWS["nist"],  # the same actions; only Timer J's value differs (zero)
}
# Each timer's value over a reliable transport, from the event that sets it (the 2xx
# timer's first value is T1, then it doubles up to T2, as over UDP).
RELIABLE_DELAYS = {"B": 64 * T1, "D": 0.0, "M": 64 * T1, "F": 64 * T1, "K": 0.0,
                   "H": 64 * T1, "I": 0.0, "L": 64 * T1, "J": 0.0, "2xx": (T1, 2 * T1)}
ALL_RELIABLE_ROWS = [(kind, *row) for kind, rows in RELIABLE_ROWS.items() for row in rows]


@pytest.mark.parametrize(("kind", "path", "event", "next_state", "expected"),
                         ALL_RELIABLE_ROWS,
                         ids=[f"{k}-{'>'.join(p) or 'new'}-{e}"
                              for k, p, e, _, _ in ALL_RELIABLE_ROWS])
def test_state_table_row_over_a_reliable_transport(kind, path, event, next_state, expected):
    tx = NEW_RELIABLE[kind]()
    now = walk(tx, path)
    assert "A" not in tx.timers and "E" not in tx.timers and "G" not in tx.timers
    state = tx.state
    at = now + 0.01
    when = tx.timers.get(event[len("timer "):], at) if event.startswith("timer ") else at
    actions = fire(tx, event, at)
    assert type(tx).TABLE[state, event][0] == next_state
    assert (tx.state, describe(actions)) == (next_state, expected)
    for action in (a for a in actions if isinstance(a, SetTimer)):
        delays = RELIABLE_DELAYS[action.name]
        allowed = delays if isinstance(delays, tuple) else (delays,)
        assert any(action.at - when == pytest.approx(d, abs=1e-9) for d in allowed), action


@pytest.mark.parametrize("kind", RELIABLE_ROWS)
def test_every_row_of_the_table_is_tested_over_a_reliable_transport(kind):
    tested = set()
    for path, event, _, _ in RELIABLE_ROWS[kind]:
        tx = NEW_RELIABLE[kind]()
        walk(tx, path)
        tested.add((tx.state, event))
    assert tested == set(type(NEW_RELIABLE[kind]()).TABLE)


def test_over_a_reliable_transport_an_invite_goes_once_until_timer_b(restore):
    run = Run(client_transaction(INVITE_OUT, MICROSIP, reliable=True), restore)
    run.at(0.0, start(0.0))
    run.advance(100)
    assert run.send_times() == [0.0]  # over UDP: 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5
    assert [t for t, a in run.log if isinstance(a, TimedOut)] == [64 * T1]
    assert run.tx.state == TERMINATED and run.count(Terminated) == 1 and run.store == {}


def test_over_a_reliable_transport_a_non_2xx_is_acked_and_the_invite_ends_at_once(restore):
    run = Run(client_transaction(INVITE_OUT, MICROSIP, reliable=True), restore)
    run.at(0.0, start(0.0))
    run.at(2.0, response(RESPONSES["ict"]["3xx-6xx"], 2.0))
    run.advance(100)
    sends = run.sends()
    assert [t for t, _ in sends] == [0.0, 2.0] and parse(sends[1][1]).method == "ACK"
    assert [t for t, a in run.log if isinstance(a, Terminated)] == [2.0]  # Timer D = 0
    assert run.store == {}


def test_over_a_reliable_transport_a_bye_goes_once_until_its_answer(restore):
    run = Run(client_transaction(BYE_OUT, ZOIPER, reliable=True), restore)
    run.at(0.0, start(0.0))
    run.at(3.0, response(RESPONSES["nict"]["1xx"], 3.0))
    run.at(20.0, response(seed("20-200"), 20.0))
    run.advance(100)
    assert run.send_times() == [0.0]  # over UDP: 0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5
    assert [m.status for m in run.delivered()] == [100, 200]
    assert [t for t, a in run.log if isinstance(a, Terminated)] == [20.0]  # Timer K = 0


def test_over_a_reliable_transport_timer_f_still_times_out_a_bye(restore):
    run = Run(client_transaction(BYE_OUT, ZOIPER, reliable=True), restore)
    run.at(0.0, start(0.0))
    run.advance(100)
    assert run.send_times() == [0.0]
    assert [t for t, a in run.log if isinstance(a, TimedOut)] == [64 * T1]
    assert run.tx.state == TERMINATED and run.store == {}


def test_over_a_reliable_transport_a_non_2xx_final_goes_once_until_timer_h(restore):
    run = Run(server_transaction(INVITE_IN, ZOIPER, reliable=True), restore)
    run.at(0.0, request(INVITE_IN, 0.0))
    run.at(1.0, answer(RESPONSES["ist"]["send 3xx-6xx"], 1.0))
    run.advance(100)
    assert run.send_times() == [1.0]  # over UDP: 11 sends, Timer G
    assert [t for t, a in run.log if isinstance(a, NoAck)] == [1.0 + 64 * T1]
    assert run.tx.state == TERMINATED and run.store == {}


def test_over_a_reliable_transport_the_ack_of_a_non_2xx_ends_the_invite_at_once(restore):
    run = Run(server_transaction(INVITE_IN, ZOIPER, reliable=True), restore)
    final = RESPONSES["ist"]["send 3xx-6xx"]
    run.at(0.0, request(INVITE_IN, 0.0))
    run.at(1.0, answer(final, 1.0))
    run.at(1.2, request(ack_for_final(INVITE_IN, final), 1.2))
    run.advance(100)
    assert run.send_times() == [1.0]
    assert [t for t, a in run.log if isinstance(a, Terminated)] == [1.2]  # Timer I = 0
    assert run.count(NoAck) == 0 and run.store == {}


def test_over_a_reliable_transport_the_2xx_is_still_retransmitted_until_the_ack(restore):
    """RFC 3261 13.3.1.4: "This is independent of whatever transport protocols are used
    to send the response": there may be UDP hops between us and the UAC."""
    run = Run(server_transaction(INVITE_IN, ZOIPER, reliable=True), restore)
    run.at(0.0, request(INVITE_IN, 0.0))
    run.at(1.0, answer(seed("12-200"), 1.0))
    run.at(5.0, lambda tx: tx.ack_received(5.0))
    run.advance(100)
    assert run.send_times() == [1.0, 1.5, 2.5, 4.5]
    assert run.count(NoAck) == 0 and run.tx.state == TERMINATED


def test_over_a_reliable_transport_a_non_invite_server_ends_with_its_final(restore):
    run = Run(server_transaction(BYE_IN, MICROSIP, reliable=True), restore)
    run.at(0.0, request(BYE_IN, 0.0))
    run.at(0.01, answer(RESPONSES["nist"]["send 2xx"], 0.01))
    run.advance(100)
    assert run.send_times() == [0.01]
    assert [t for t, a in run.log if isinstance(a, Terminated)] == [0.01]  # Timer J = 0


def test_a_udp_record_has_no_reliable_field_and_a_record_without_it_is_udp():
    """Records written before the field existed (or by a worker of that release) are UDP;
    a UDP record stays the same bytes as then, so that release reads what this one writes."""
    udp = client_transaction(BYE_OUT, ZOIPER)
    udp.start(0.0)
    record = udp.to_record()
    assert "reliable" not in record
    assert transaction_from_record(record).reliable is False
    assert describe(transaction_from_record(record).on_timer("E", 0.5)) == "Send, SetTimer E"
    tcp = client_transaction(BYE_OUT, ZOIPER, reliable=True)
    tcp.start(0.0)
    assert tcp.to_record()["reliable"] is True
    copy = roundtrip(tcp)
    assert copy.reliable is True and copy == tcp and copy.timers == {"F": 64 * T1}


# --------------------------------------------------------------------------- server retransmissions


def test_retransmitted_invite_is_answered_from_the_transaction(restore):
    """Seed 01-03: the INVITE, retransmitted, reaches the core once; 407 repeated; ACK ends it."""
    invite, challenge, ack = seed("01-invite"), seed("02-407"), seed("03-ack")
    run = Run(server_transaction(invite, response_dest(invite, ZOIPER)), restore)
    trying = build_response(invite, 100)
    run.at(0.0, request(invite, 0.0))
    run.at(0.01, answer(trying, 0.01))
    run.at(0.30, request(parse(wire("01-invite")), 0.30))
    run.at(0.40, answer(challenge, 0.40))
    run.at(0.45, request(parse(wire("01-invite")), 0.45))
    assert run.tx.matches(ack) and server_key(ack) == run.tx.key
    run.at(1.0, request(ack, 1.0))  # Timer G fired at 0.9 first
    run.at(1.1, request(parse(wire("01-invite")), 1.1))
    run.advance(100)
    assert run.delivered() == [invite]
    assert [data for _, data in run.sends()] == [trying.to_bytes()] * 2 + [wire("02-407")] * 3
    assert run.send_times() == [0.01, 0.30, 0.40, 0.45, 0.9]
    assert {a.dest for _, a in run.log if isinstance(a, Send)} == {ZOIPER}
    assert run.tx.state == TERMINATED and run.count(Terminated) == 1 and run.store == {}


def test_retransmitted_bye_is_answered_twice_and_processed_once(restore):
    """Seed 18-21: a BYE and its retransmission, each answered, the core seeing one BYE."""
    bye = seed("18-bye")
    run = Run(server_transaction(bye, response_dest(bye, FREESWITCH)), restore)
    run.at(0.0, request(bye, 0.0))
    run.at(0.01, answer(seed("20-200"), 0.01))
    run.at(0.5, request(seed("19-bye"), 0.5))
    assert run.delivered() == [bye]
    assert [data for _, data in run.sends()] == [wire("20-200"), wire("21-200")]
    run.advance(0.01 + 64 * T1 - 0.001)
    assert run.tx.state == "Completed"
    run.advance(100)
    assert run.tx.state == TERMINATED and run.store == {}


def test_invite_server_retransmits_a_non_2xx_until_timer_h(restore):
    run = Run(server_transaction(INVITE_IN, ZOIPER), restore)
    run.at(0.0, request(INVITE_IN, 0.0))
    run.at(1.0, answer(RESPONSES["ist"]["send 3xx-6xx"], 1.0))
    run.advance(100)
    expected = [1.0, 1.5, 2.5, 4.5, 8.5] + [8.5 + 4 * i for i in range(1, 7)]
    assert run.send_times() == expected  # G: T1, 2T1, 4T1, then T2, until H at 1 + 64*T1
    assert [t for t, a in run.log if isinstance(a, NoAck)] == [1.0 + 64 * T1]
    assert run.tx.state == TERMINATED and run.store == {}


def test_invite_server_retransmits_its_2xx_until_the_ack(restore):
    """RFC 3261 13.3.1.4 in RFC 6026's Accepted: the 2xx goes again until the TU saw the ACK."""
    ok = seed("12-200")
    run = Run(server_transaction(INVITE_IN, ZOIPER), restore)
    run.at(0.0, request(INVITE_IN, 0.0))
    run.at(1.0, answer(ok, 1.0))
    run.at(3.0, request(parse(wire("04-invite")), 3.0))  # a late INVITE copy: 2xx again
    run.at(5.0, lambda tx: tx.ack_received(5.0))
    run.advance(100)
    assert run.send_times() == [1.0, 1.5, 2.5, 3.0, 4.5]
    assert {data for _, data in run.sends()} == {wire("12-200")}
    assert run.delivered() == [INVITE_IN] and run.count(NoAck) == 0
    assert run.tx.state == TERMINATED and run.store == {}


def test_unacknowledged_2xx_gives_up_at_64_t1_and_says_so(restore):
    run = Run(server_transaction(INVITE_IN, ZOIPER), restore)
    run.at(0.0, request(INVITE_IN, 0.0))
    run.at(0.0, answer(seed("12-200"), 0.0))
    run.advance(100)
    assert run.send_times() == [0.0, 0.5, 1.5, 3.5, 7.5] + [7.5 + 4 * i for i in range(1, 7)]
    assert [t for t, a in run.log if isinstance(a, NoAck)] == [64 * T1]
    assert run.tx.state == TERMINATED and run.store == {}


def test_ack_on_the_invite_branch_in_accepted_reaches_the_tu(restore):
    ok = seed("12-200")
    ack = ack_for_final(INVITE_IN, ok)  # same branch as the INVITE, as old UAs do
    run = Run(server_transaction(INVITE_IN, ZOIPER), restore)
    run.at(0.0, request(INVITE_IN, 0.0))
    run.at(0.0, answer(ok, 0.0))
    run.at(0.7, request(ack, 0.7))
    run.advance(100)
    assert run.delivered() == [INVITE_IN, ack]
    assert run.send_times() == [0.0, 0.5] and run.count(NoAck) == 0


# --------------------------------------------------------------------------- client retransmissions


def test_client_bye_retransmitted_on_timer_e_until_the_200(restore):
    """Seed 18-21: FreeSWITCH's BYE went twice with the same bytes; here until the 200."""
    run = Run(client_transaction(seed("18-bye"), ZOIPER), restore)
    run.at(0.0, start(0.0))
    run.at(20.0, response(seed("20-200"), 20.0))
    run.at(20.1, response(seed("21-200"), 20.1))
    run.advance(100)
    assert run.send_times() == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5]  # T1, 2T1, 4T1, T2...
    assert {data for _, data in run.sends()} == {wire("19-bye")} == {wire("18-bye")}
    assert [(m.status, m.to_bytes()) for m in run.delivered()] == [(200, wire("20-200"))]
    assert [t for t, a in run.log if isinstance(a, Terminated)] == [20.0 + T4]
    assert run.store == {}


def test_timer_f_times_out_a_non_invite_at_64_t1(restore):
    run = Run(client_transaction(BYE_OUT, ZOIPER), restore)
    run.at(0.0, start(0.0))
    run.advance(100)
    assert run.send_times() == [0.0, 0.5, 1.5, 3.5] + [3.5 + 4 * i for i in range(1, 8)]
    assert [t for t, a in run.log if isinstance(a, TimedOut)] == [64 * T1]
    assert run.tx.state == TERMINATED and run.count(Terminated) == 1 and run.store == {}


def test_provisional_makes_a_non_invite_retransmit_every_t2(restore):
    run = Run(client_transaction(BYE_OUT, ZOIPER), restore)
    run.at(0.0, start(0.0))
    run.at(0.2, response(RESPONSES["nict"]["1xx"], 0.2))
    run.advance(100)
    assert run.send_times() == [0.0, 0.5] + [0.5 + 4 * i for i in range(1, 8)]
    assert [t for t, a in run.log if isinstance(a, TimedOut)] == [64 * T1]


def test_timer_b_times_out_an_invite_at_64_t1(restore):
    run = Run(client_transaction(INVITE_OUT, MICROSIP), restore)
    run.at(0.0, start(0.0))
    run.advance(100)
    assert run.send_times() == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # doubling, no T2 cap
    assert {data for _, data in run.sends()} == {wire("06-invite")}
    assert [t for t, a in run.log if isinstance(a, TimedOut)] == [64 * T1]
    assert run.store == {}


def test_provisional_stops_invite_retransmissions_and_timer_b(restore):
    run = Run(client_transaction(INVITE_OUT, MICROSIP), restore)
    run.at(0.0, start(0.0))
    run.at(0.6, response(seed("08-180"), 0.6))
    run.advance(1000)
    assert run.send_times() == [0.0, 0.5]
    assert run.tx.state == "Proceeding" and run.count(TimedOut) == 0 and run.store == {}


def test_non_2xx_final_is_acked_by_the_client_transaction(restore):
    """Seed 01-03 from Zoiper's side: the 407 gets the ACK Zoiper sent, byte for byte."""
    invite = seed("01-invite")
    run = Run(client_transaction(invite, FREESWITCH), restore)
    run.at(0.0, start(0.0))
    run.at(0.7, response(seed("02-407"), 0.7))
    run.at(1.2, response(seed("02-407"), 1.2))
    run.advance(100)
    sends = run.sends()
    assert [t for t, _ in sends] == [0.0, 0.5, 0.7, 1.2]
    assert sends[2][1] == sends[3][1] == wire("03-ack")
    ack = parse(sends[2][1])
    ack.validate()
    assert (ack.method, ack.uri_raw) == ("ACK", invite.uri_raw)
    assert ack.vias == [invite.via] and ack.via.branch == invite.via.branch
    assert ack.to.tag == "3pDX04j1XvXam" and ack.from_ == invite.from_
    assert (ack.call_id, ack.cseq.number, ack.cseq.method) == (invite.call_id, 1, "ACK")
    assert [m.status for m in run.delivered()] == [407]  # the copy is not delivered again
    assert [t for t, a in run.log if isinstance(a, Terminated)] == [0.7 + CONFIG.d]


def test_ack_for_a_non_2xx_keeps_the_route_headers_and_only_the_top_via():
    invite = parse(wire("06-invite"))
    invite.add_header(b"Via", b"SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bKlower")
    invite.add_header(b"Route", b"<sip:p1.example.com;lr>")
    invite.add_header(b"Route", b"<sip:p2.example.com;lr>")
    final = build_response(invite, 486, to_tag="busy")
    ack = parse(ack_for_final(parse(invite.to_bytes()), final).to_bytes())
    assert [bytes(r) for r in ack.routes] == [b"<sip:p1.example.com;lr>",
                                              b"<sip:p2.example.com;lr>"]
    assert len(ack.vias) == 1 and ack.via.branch == "z9hG4bKmSymF8rmr1cvm"
    assert ack.to.tag == "busy" and ack.max_forwards == 70 and ack.body == b""


def test_2xx_retransmissions_in_accepted_reach_the_tu(restore):
    """Seed 06, 08, 10: the 200 and its copies go to the TU, which ACKs from the dialog."""
    run = Run(client_transaction(INVITE_OUT, MICROSIP), restore)
    run.at(0.0, start(0.0))
    run.at(0.1, response(seed("08-180"), 0.1))
    run.at(2.0, response(seed("10-200"), 2.0))
    run.at(2.5, response(seed("10-200"), 2.5))
    run.at(3.0, response(RESPONSES["ict"]["3xx-6xx"], 3.0))  # nothing but 2xx counts now
    run.advance(100)
    assert [m.status for m in run.delivered()] == [180, 200, 200]
    assert run.send_times() == [0.0]  # no ACK from the transaction for a 2xx
    assert [t for t, a in run.log if isinstance(a, Terminated)] == [2.0 + 64 * T1]


# --------------------------------------------------------------------------- stale timers


def test_a_timer_that_is_not_pending_does_nothing():
    tx = client_transaction(BYE_OUT, ZOIPER)
    tx.start(0.0)
    tx.on_response(seed("20-200"), 0.2)
    assert tx.on_timer("E", 100.0) == [] and tx.on_timer("F", 100.0) == []
    assert tx.on_timer("nonsense", 100.0) == []


def test_a_timer_firing_twice_acts_once():
    tx = client_transaction(BYE_OUT, ZOIPER)
    tx.start(0.0)
    assert describe(tx.on_timer("E", 0.5)) == "Send, SetTimer E"
    assert tx.on_timer("E", 0.6) == []  # the same entry again: E is now due at 1.5
    assert tx.on_timer("E", 1.5, due=0.5) == []  # an old entry, given with its due time
    assert describe(tx.on_timer("E", 1.5, due=1.5)) == "Send, SetTimer E"


def test_a_worker_that_lost_the_race_does_nothing():
    tx = client_transaction(BYE_OUT, ZOIPER)
    tx.start(0.0)
    winner = roundtrip(tx)
    winner.on_timer("E", 0.5, due=0.5)
    reread = roundtrip(winner)  # the loser re-reads the record the winner wrote
    assert reread.on_timer("E", 0.51, due=0.5) == []
    assert reread == winner


def test_a_late_timer_acts_once_and_reschedules_from_now():
    tx = client_transaction(BYE_OUT, ZOIPER)
    tx.start(0.0)
    assert tx.on_timer("E", 3.0) == [Send(wire("18-bye"), ZOIPER), SetTimer("E", 4.0)]
    assert tx.on_timer("E", 3.1, due=0.5) == []


def test_a_transaction_restored_mid_way_continues_as_the_original():
    original = client_transaction(BYE_OUT, ZOIPER)
    original.start(0.0)
    original.on_timer("E", 0.5)
    copy = roundtrip(original)
    assert copy == original and type(copy) is NonInviteClientTransaction
    assert copy.on_timer("E", 1.5) == original.on_timer("E", 1.5) == [
        Send(wire("18-bye"), ZOIPER), SetTimer("E", 3.5)]
    assert copy == original


# --------------------------------------------------------------------------- matching


def test_client_key_matches_the_seed_bye_responses():
    tx = client_transaction(seed("18-bye"), ZOIPER)
    assert client_key(seed("20-200")) == client_key(seed("21-200")) == tx.key
    assert client_key(seed("19-bye")) == tx.key
    assert client_key(seed("17-200")) != tx.key  # another branch
    assert client_key(seed("10-200")) == client_transaction(seed("06-invite"), MICROSIP).key


def test_client_key_tells_the_cancel_from_the_invite():
    invite = seed("06-invite")
    cancel = cancel_for(invite)
    assert client_key(cancel) != client_key(invite)
    assert client_key(build_response(cancel, 200)) == client_key(cancel)
    assert client_key(build_response(invite, 487, to_tag="x")) == client_key(invite)


def test_server_key_matches_ack_to_invite_by_branch():
    tx = server_transaction(seed("01-invite"), ZOIPER)
    assert server_key(seed("03-ack")) == server_key(seed("01-invite")) == tx.key
    assert server_key(seed("04-invite")) != tx.key  # a new transaction: new branch
    # The ACK for the 2xx has its own branch: it finds no transaction and goes to the dialog.
    assert server_key(seed("13-ack")) != server_key(seed("04-invite"))
    assert tx.matches(seed("03-ack"))


def test_server_key_includes_the_sent_by():
    invite = parse(wire("04-invite"))
    other = parse(wire("04-invite").replace(b"192.168.31.142:55747;branch",
                                            b"192.168.31.142:55748;branch"))
    assert server_key(invite) != server_key(other)


def cancel_for(invite: Request) -> Request:
    """RFC 3261 9.1: a CANCEL for ``invite``."""
    return build_request("CANCEL", invite.uri_raw, [
        (b"Via", bytes(invite.via)), (b"Max-Forwards", b"70"),
        (b"From", invite.header("from")), (b"To", invite.header("to")),
        (b"Call-ID", invite.call_id), (b"CSeq", b"%d CANCEL" % invite.cseq.number)])


def test_cancel_has_its_own_transaction_and_finds_the_invite():
    invite = seed("04-invite")
    cancel = cancel_for(invite)
    assert server_key(cancel) != server_key(invite)
    assert cancel_target_key(cancel) == server_key(invite)
    assert cancel_target_key(cancel_for(seed("01-invite"))) != server_key(invite)


RFC2543_INVITE = (FIXTURES / "rfc4475" / "inv2543.dat").read_bytes()


def rfc2543_ack(invite: Request, to_tag: str) -> Request:
    return ack_for_final(invite, build_response(invite, 486, to_tag=to_tag))


def test_rfc2543_invite_matches_by_the_fallback_rules():
    invite = parse(RFC2543_INVITE)
    tx = server_transaction(invite, response_dest(invite, ("192.0.2.5", 5060)))
    assert tx.key.startswith("s|2543|") and " " not in tx.key
    assert server_key(parse(RFC2543_INVITE)) == tx.key and tx.matches(parse(RFC2543_INVITE))
    tx.on_request(invite, 0.0)
    tx.send_response(build_response(invite, 486, to_tag="t1"), 0.1)
    ack = rfc2543_ack(invite, "t1")
    assert server_key(ack) == tx.key and tx.matches(ack)
    assert describe(tx.on_request(ack, 0.2)) == "CancelTimer G, CancelTimer H, SetTimer I"
    stray = rfc2543_ack(invite, "someone-else")
    assert server_key(stray) == tx.key and not tx.matches(stray)


def test_rfc2543_fallback_keys_tell_transactions_apart():
    invite = parse(RFC2543_INVITE)
    later = parse(RFC2543_INVITE.replace(b"CSeq: 56 INVITE", b"CSeq: 57 INVITE"))
    assert server_key(later) != server_key(invite)
    tagged = parse(RFC2543_INVITE.replace(b"user=phone\r\nCall-ID", b"user=phone;tag=x\r\nCall-ID"))
    assert tagged.to.tag == "x" and not server_transaction(invite, ZOIPER).matches(tagged)
    assert cancel_target_key(cancel_for(invite)) == server_key(invite)
    assert server_key(cancel_for(invite)) != server_key(invite)


def test_rfc2543_non_invite_key_includes_the_to_tag():
    bye = parse(RFC2543_INVITE.replace(b"INVITE", b"BYE").replace(
        b"user=phone\r\nCall-ID", b"user=phone;tag=a\r\nCall-ID"))
    other = parse(RFC2543_INVITE.replace(b"INVITE", b"BYE").replace(
        b"user=phone\r\nCall-ID", b"user=phone;tag=b\r\nCall-ID"))
    assert bye.method == "BYE" and server_key(bye) != server_key(other)


def test_an_ack_before_any_final_matches_no_rfc2543_transaction():
    invite = parse(RFC2543_INVITE)
    tx = server_transaction(invite, ZOIPER)
    tx.on_request(invite, 0.0)
    assert not tx.matches(rfc2543_ack(invite, "t1"))


@pytest.mark.parametrize(("value", "kept"), [
    ("z9hG4bK-524287-1---78626c9dcaefb665", True), ("[2001:db8::1]", True),
    ("a b", False), ("{hash}", False), ("x|y", False), ("é", False), ("x" * 129, False),
    (b"\xff\x00", False), ("", True),
])
def test_key_parts_are_plain_or_hashed(value, kept):
    part = key_part(value)
    assert (part == (value.decode("latin-1") if isinstance(value, bytes) else value)) == kept
    assert not any(c in part for c in " |{}\r\n\x00") and part.isascii()
    assert key_part(value) == part  # the same on every worker


def test_keys_with_odd_branches_stay_usable():
    odd = parse(wire("18-bye").replace(b"branch=z9hG4bKpBH6jytUjKS1B",
                                       b"branch=z9hG4bK" + b"%7B" * 60))
    key = client_key(odd)
    assert key.startswith("c|#") and key.endswith("|BYE") and len(key) < 60


def test_response_dest_follows_rport():
    assert response_dest(seed("01-invite"), ("203.0.113.7", 40000)) == ("203.0.113.7", 40000)
    no_rport = parse(RFC2543_INVITE)
    assert response_dest(no_rport, ("203.0.113.7", 40000)) == ("203.0.113.7", 5060)
    with_port = parse(RFC2543_INVITE.replace(b"iftgw.example.com", b"iftgw.example.com:5070"))
    assert response_dest(with_port, ("203.0.113.7", 40000)) == ("203.0.113.7", 5070)


def test_acks_make_no_transactions():
    with pytest.raises(ValueError):
        client_transaction(seed("11-ack"), MICROSIP)
    with pytest.raises(ValueError):
        server_transaction(seed("03-ack"), ZOIPER)


# --------------------------------------------------------------------------- records

MSGPACK_TYPES = (str, bytes, int, float, bool, type(None))


def plain(value: object) -> bool:
    """Whether ``value`` is made of msgpack-friendly values only."""
    if isinstance(value, list):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return isinstance(value, MSGPACK_TYPES)


EVERY_STATE = [(kind, state, path) for kind, paths in STATE_PATHS.items()
               for state, path in {"new": (), **paths}.items()]


@pytest.mark.parametrize(("kind", "state", "path"), EVERY_STATE,
                         ids=[f"{k}-{s}" for k, s, _ in EVERY_STATE])
@pytest.mark.parametrize("reliable", [False, True], ids=["udp", "reliable"])
def test_record_round_trip_in_every_state(kind, state, path, reliable):
    tx = (NEW_RELIABLE if reliable else NEW)[kind]()
    walk(tx, path)
    record = tx.to_record()
    assert plain(record) and record["kind"] == kind
    assert transaction_from_record(record) == tx
    copy = roundtrip(tx)
    assert copy == tx and type(copy) is type(tx) and copy.to_record() == record
    assert copy.request_msg.to_bytes() == tx.request  # parsed again on demand


def test_records_of_each_kind_restore_their_own_class():
    classes = {kind: type(NEW[kind]()) for kind in NEW}
    assert classes == {"ict": InviteClientTransaction, "nict": NonInviteClientTransaction,
                       "ist": InviteServerTransaction, "nist": NonInviteServerTransaction}
    with pytest.raises(ValueError):
        transaction_from_record({"kind": "nonsense"})


def test_the_timer_config_travels_with_the_record():
    fast = TimerConfig(t1=0.05, t2=0.4, t4=0.5, d=1.0)
    tx = client_transaction(INVITE_OUT, MICROSIP, fast)
    assert describe(tx.start(0.0)) == "Send, SetTimer A, SetTimer B"
    assert tx.timers == {"A": 0.05, "B": 64 * 0.05}
    assert roundtrip(tx).config == fast
