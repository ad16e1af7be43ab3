"""The relay control codec, command checking and session records (no sockets, no Redis)."""

from __future__ import annotations

import time

import pytest

from cluster.relayctl import (
    RelayClient,
    RelayInfo,
    StreamSpec,
    address_family,
    decode,
    encode,
    new_request_id,
)
from cluster.sip.rtp import StreamStats
from cluster.store import pack
from workers.relay.relay import RelaySettings
from workers.relay.session import (
    CommandError,
    Leg,
    Session,
    Side,
    StreamRequest,
    socket_address,
)


def test_codec_round_trip_keeps_bytes_and_text_apart():
    request_id = new_request_id()
    message = {"id": request_id, "cmd": "offer", "call_id": "abc@host", "leg": "a",
               "streams": [StreamSpec("audio", "10.0.0.1", 4000).to_message()]}
    decoded = decode(encode(message))
    assert decoded == message
    assert isinstance(decoded["id"], bytes) and len(decoded["id"]) == 8
    assert decoded["streams"][0] == {"media": "audio", "addr": "10.0.0.1", "port": 4000,
                                     "rtcp_mux": False}


def test_request_ids_are_unique():
    assert len({new_request_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize("data", [
    b"\xc1",  # never valid msgpack
    pack([1, 2]),  # not a map
    pack({"cmd": "offer"}),  # no id
    pack({"id": True, "cmd": "ping"}),
    pack({"id": b"x" * 65, "cmd": "ping"}),
    pack({"id": b"1", "cmd": "reboot"}),
])
def test_decode_rejects_what_is_not_a_control_message(data):
    with pytest.raises(ValueError):
        decode(data)


def test_oversized_message_is_refused():
    with pytest.raises(ValueError):
        encode({"id": b"1", "cmd": "ping", "pad": b"x" * 70_000})


def test_stream_request_defaults():
    request = StreamRequest.parse({"media": "audio", "addr": "192.0.2.1", "port": 4000})
    assert (request.family, request.rtcp_port, request.rtcp_mux) == (4, 4001, False)
    assert request.clock_rate == 8000 and request.latch_ip == "192.0.2.1"
    assert not request.null
    video = StreamRequest.parse({"media": "video", "addr": "2001:DB8::0:1", "port": 5000,
                                 "rtcp_mux": True})
    assert (video.family, video.ip, video.clock_rate) == (6, "2001:db8::1", 90000)


def test_stream_request_hold_forms():
    assert StreamRequest.parse({"addr": "0.0.0.0", "port": 4000}).null
    assert StreamRequest.parse({"addr": "::", "port": 4000}).null
    assert StreamRequest.parse({"addr": "192.0.2.1", "port": 0}).null


@pytest.mark.parametrize("raw, reason", [
    ({"addr": "example.com", "port": 4000}, "not an IP"),
    ({"addr": "192.0.2.1", "port": 70000}, "bad port"),
    ({"addr": "192.0.2.1", "port": "4000"}, "bad port"),
    ({"addr": "192.0.2.1", "port": 4000, "family": 6}, "family"),
    ({"addr": "192.0.2.1", "port": 4000, "latch_ip": "::1"}, "families"),
    ({"addr": "192.0.2.1", "port": 4000, "clock_rate": -1}, "clock_rate"),
    ("192.0.2.1:4000", "map"),
])
def test_stream_request_rejects(raw, reason):
    with pytest.raises(CommandError, match=reason):
        StreamRequest.parse(raw)


def test_address_helpers():
    assert address_family("::1") == 6 and address_family("127.0.0.1") == 4
    assert socket_address("::1", 5) == ("::1", 5, 0, 0)
    assert socket_address("127.0.0.1", 5) == ("127.0.0.1", 5)


def test_session_record_round_trip_keeps_latching_and_figures():
    stats = StreamStats(8000)
    stats.packets, stats.bytes, stats.next_seq = 10, 1720, 11
    side = Side("audio", 4, 30002, sdp=("192.0.2.1", 4000), sdp_rtcp=("192.0.2.1", 4001),
                latch_ip="192.0.2.1", stats=stats, call_id="c1")
    other = Side("audio", 6, 30004, sdp=("2001:db8::1", 5000, 0, 0),
                 sdp_rtcp=("2001:db8::1", 5001, 0, 0), latch_ip="2001:db8::1", call_id="c1")
    session = Session("c1", [Leg("a", [side]), Leg("b", [other], hold=True)], created=1.0,
                      answered_at=100.0)
    record = session.to_record("h/relay-0", ("127.0.0.1", 30000))
    record["legs"][0]["sides"][0]["latched"] = ["192.0.2.1", 40000]
    restored = Session.from_record(record)
    first, second = restored.legs[0].sides[0], restored.legs[1].sides[0]
    assert restored.call_id == "c1" and restored.hold
    assert first.restored_latch == ("192.0.2.1", 40000)
    assert first.stats.packets == 10 and first.stats.bytes == 1720
    assert second.sdp == ("2001:db8::1", 5000, 0, 0) and second.family == 6
    assert restored.answered_at == pytest.approx(100.0, abs=0.01)
    assert restored.legs[1].name == "b" and first.call_id == "c1"


def test_legs_are_named_by_the_first_commands():
    session = Session("c", [Leg("a"), Leg(None)], created=0.0)
    assert session.leg_named("a", create=False)[0].name == "a"
    with pytest.raises(CommandError):
        session.leg_named("b", create=False)
    leg, other = session.leg_named("b", create=True)
    assert (leg.name, other.name) == ("b", "a")
    with pytest.raises(CommandError):
        session.leg_named("c", create=True)


def test_bind_and_advertised_addresses_per_family():
    settings = RelaySettings("h/relay-0", "h", "relay-0", bind="127.0.0.1", advertised="",
                             port_lo=30000, port_hi=30099)
    assert settings.bind_for(4) == "127.0.0.1" and settings.bind_for(6) == "::1"
    assert settings.advertised_for(6) == "::1"
    public = RelaySettings("h/relay-0", "h", "relay-0", bind="0.0.0.0",
                           advertised="203.0.113.5", port_lo=30000, port_hi=30099)
    assert public.advertised_for(4) == "203.0.113.5"
    with pytest.raises(CommandError):
        public.advertised_for(6)  # bound to :: but nothing to advertise
    assert public.control == ("127.0.0.1", 30000)


def test_relays_silent_for_a_while_are_tried_last():
    """After a Redis outage the relays' heartbeats are late: tried after the live ones,
    never those silent for long or on another host."""
    now = time.time()

    def info(name: str, age: float, host: str = "h1") -> RelayInfo:
        return RelayInfo(f"{host}/{name}", host, ("127.0.0.1", 1), 0, 0.0, now - age)

    client = RelayClient(store=None, host="h1")
    client._nodes = {r.id: r for r in (info("live", 0.5), info("late", 5.0),
                                       info("later", 20.0), info("gone", 300.0),
                                       info("elsewhere", 5.0, host="h2"))}
    client._nodes_read = time.monotonic()  # nothing to read from Redis
    assert [r.id for r in client.candidates()] == ["h1/live", "h1/late", "h1/later"]


class SessionsAt:
    """Relays (by control port) holding sessions, and the session records in "Redis"; an
    exchange with a relay runs its command on what it holds."""

    def __init__(self, client: RelayClient, relays: list[str]):
        now = time.time()
        self.ports = {relay: 7000 + i for i, relay in enumerate(relays)}  # r0 least loaded
        self.held: dict[str, set[str]] = {relay: set() for relay in relays}
        self.records: dict[str, str] = {}  # call -> owner
        self.reads: list[str] = []
        self.sent: list[tuple[str, str]] = []  # (relay, command)
        client._nodes = {r: RelayInfo(r, "h1", ("127.0.0.1", p), p - 7000, 0.0, now)
                         for r, p in self.ports.items()}
        client._nodes_read = time.monotonic() + 3600  # nothing to read from Redis
        client._owner = self.owner
        client._exchange = self.exchange

    def owner(self, call_id: str) -> str | None:
        self.reads.append(call_id)
        return self.records.get(call_id)

    def exchange(self, control, message, timeouts) -> dict:
        relay = next(r for r, p in self.ports.items() if p == control[1])
        command, call_id = message["cmd"], message["call_id"]
        self.sent.append((relay, command))
        held = call_id in self.held[relay]
        if command == "delete":
            self.held[relay].discard(call_id)
            return {"ok": True, "found": held}
        if command == "answer" and not held:
            return {"ok": False, "error": f"no session for call {call_id}"}
        self.held[relay].add(call_id)
        self.records.setdefault(call_id, relay)
        stream = {"media": "audio", "address": "192.0.2.9", "port": 30000, "rtcp_port": 30001,
                  "rtcp_mux": False, "family": 4}
        return {"ok": True, "relay": relay, "streams": [stream]}


SPEC = [StreamSpec("audio", "192.0.2.1", 4000)]


def test_the_relay_of_a_session_made_here_is_asked_without_reading_its_record():
    client = RelayClient(store=None, host="h1")
    relays = SessionsAt(client, ["h1/r0"])
    client.read_owner("c1", None)  # read with the call: no session yet
    client.offer("c1", "a", SPEC)
    client.forget_read("c1")
    client.answer("c1", "b", SPEC)
    assert client.delete("c1") is not None
    assert relays.reads == [] and relays.sent == [
        ("h1/r0", "offer"), ("h1/r0", "answer"), ("h1/r0", "delete")]


def test_a_session_that_moved_is_found_through_its_record():
    client = RelayClient(store=None, host="h1")
    relays = SessionsAt(client, ["h1/r0", "h1/r1"])
    client.offer("c1", "a", SPEC)  # no record read with the call: read here
    assert relays.reads == ["c1"] and relays.held["h1/r0"] == {"c1"}
    # Another relay took the session over (its record names it now).
    relays.held["h1/r0"].clear()
    relays.held["h1/r1"].add("c1")
    relays.records["c1"] = "h1/r1"
    client.answer("c1", "b", SPEC)
    assert relays.sent[-2:] == [("h1/r0", "answer"), ("h1/r1", "answer")]
    assert client.delete("c1") is not None  # remembered anew: straight there
    assert relays.sent[-1] == ("h1/r1", "delete") and relays.reads == ["c1", "c1"]


def test_a_delete_the_remembered_relay_does_not_know_goes_to_the_record():
    client = RelayClient(store=None, host="h1")
    relays = SessionsAt(client, ["h1/r0", "h1/r1"])
    client.offer("c1", "a", SPEC)
    relays.held["h1/r0"].clear()
    relays.held["h1/r1"].add("c1")
    relays.records["c1"] = "h1/r1"
    assert client.delete("c1") is not None and relays.held["h1/r1"] == set()
    assert relays.sent[-2:] == [("h1/r0", "delete"), ("h1/r1", "delete")]
    relays.records.pop("c1")
    assert client.delete("c1") is None  # gone everywhere
