"""Scanner counting in the workers (workers/sip/scanners.py) over a store kept in memory:
user names sent once per source and window, 403/404 counted, bans at the thresholds,
allow-listed sources never counted, nothing sent to a banned source."""

import logging
from collections import Counter

from cluster.config import LimitsConfig
from workers.sip.scanners import ScanWatch

LIMITS = LimitsConfig(scan_users=5, scan_errors=3, allow=("192.0.2.200",))


class MemoryStore:
    """note_scan and ban with Redis's semantics (a set and a counter per source)."""

    def __init__(self):
        self.users: dict[str, set[str]] = {}
        self.errors: Counter = Counter()
        self.sent_names = 0
        self.banned: dict[str, str] = {}
        self.trust_writes: list[tuple[list[str], float]] = []

    def note_scan(self, users, errors, window):
        for ip, names in users.items():
            self.sent_names += len(names)
            self.users.setdefault(ip, set()).update(names)
        for ip, count in errors.items():
            self.errors[ip] += count
        return ({ip: len(self.users[ip]) for ip in users},
                {ip: self.errors[ip] for ip in errors})

    def ban(self, ip, seconds, reason, by):
        if ip in self.banned:
            return False
        self.banned[ip] = reason
        return True


    def trust(self, ips, seconds, by):
        self.trust_writes.append((list(ips), seconds))


def flush(watch: ScanWatch) -> None:
    users, errors, ports = watch._users, watch._errors, watch._ports
    watch._users, watch._errors, watch._ports = {}, Counter(), {}
    watch.flush(users, errors, ports)


def test_distinct_names_ban_once_and_repeats_cost_nothing(caplog):
    store = MemoryStore()
    watch = ScanWatch(store, LIMITS, by="w")
    for _ in range(50):  # a phone registering as itself, again and again
        watch.note_request(("192.0.2.1", 5060), "1002")
    flush(watch)
    assert store.sent_names == 1 and not store.banned
    for n in range(4):
        watch.note_request(("192.0.2.9", 5070), f"u{n}")
    flush(watch)
    assert not store.banned
    with caplog.at_level(logging.WARNING, logger="ban"):
        watch.note_request(("192.0.2.9", 5070), "u4")
        flush(watch)
        watch.note_request(("192.0.2.9", 5070), "u5")
        flush(watch)  # already banned: neither a second ban nor a second line
    assert store.banned == {"192.0.2.9": "scan-users"}
    assert watch.counters["bans_scan_users"] == 1
    assert [r.getMessage() for r in caplog.records] == [
        "source banned: source=192.0.2.9:5070 reason=scan-users seconds=300"]


def test_forbidden_and_not_found_answers_ban():
    store = MemoryStore()
    watch = ScanWatch(store, LIMITS, by="w")
    for status in (b"401 Unauthorized", b"200 OK", b"403 Forbidden", b"404 Not Found"):
        assert watch.note_answer(b"SIP/2.0 " + status + b"\r\n\r\n", ("192.0.2.7", 5060))
    assert watch.note_answer(b"INVITE sip:403 SIP/2.0\r\n\r\n", ("192.0.2.7", 5060))
    flush(watch)
    assert store.errors["192.0.2.7"] == 2 and not store.banned
    watch.note_answer(b"SIP/2.0 403 Forbidden\r\n\r\n", ("192.0.2.7", 5060))
    flush(watch)
    assert store.banned == {"192.0.2.7": "scan-errors"}


def test_allow_listed_sources_are_not_counted():
    store = MemoryStore()
    watch = ScanWatch(store, LIMITS, by="w")
    for n in range(20):
        watch.note_request(("192.0.2.200", 5060), f"u{n}")
        watch.note_answer(b"SIP/2.0 404 Not Found\r\n\r\n", ("192.0.2.200", 5060))
    flush(watch)
    assert store.sent_names == 0 and not store.errors and not store.banned


def test_no_answer_leaves_for_a_banned_source_but_requests_do():
    watch = ScanWatch(MemoryStore(), LIMITS, by="w")
    watch.bans.add("192.0.2.5", 60)
    assert not watch.note_answer(b"SIP/2.0 200 OK\r\n\r\n", ("192.0.2.5", 5060))
    assert watch.note_answer(b"SIP/2.0 200 OK\r\n\r\n", ("192.0.2.6", 5060))
    assert watch.note_answer(b"OPTIONS sip:x SIP/2.0\r\n\r\n", ("192.0.2.5", 5060))
    assert watch.counters["banned_unanswered"] == 1


def test_a_trusted_source_is_not_counted_as_a_scanner():
    store = MemoryStore()
    watch = ScanWatch(store, LIMITS, by="w")
    watch.note_trusted("192.0.2.30")  # its digest was accepted here
    watch._heard_trust("192.0.2.31", 600)  # another worker's, heard on the channel
    for ip in ("192.0.2.30", "192.0.2.31"):
        for n in range(20):  # a registration benchmark: many users, and 404s
            watch.note_request((ip, 5060), f"u{n}")
            watch.note_answer(b"SIP/2.0 404 Not Found\r\n\r\n", (ip, 5060))
    # an untrusted source still is
    for n in range(6):
        watch.note_request(("192.0.2.32", 5060), f"u{n}")
    flush(watch)
    assert store.banned == {"192.0.2.32": "scan-users"}
    assert set(store.users) == {"192.0.2.32"} and not store.errors


def test_trust_is_written_at_once_when_new_and_refreshed_sparingly(monkeypatch):
    import workers.sip.scanners as scanners

    clock = [1000.0]
    monkeypatch.setattr(scanners.time, "monotonic", lambda: clock[0])
    store = MemoryStore()
    watch = ScanWatch(store, LimitsConfig(trust_seconds=600), by="w")
    watch.note_trusted("192.0.2.40")
    assert watch._trust_now.is_set() and watch._trust == {"192.0.2.40"}  # new: at once
    watch._trust_now.clear()
    watch._trust.clear()
    for _ in range(100):  # every call of a benchmark: nothing more to write
        watch.note_trusted("192.0.2.40")
    assert not watch._trust
    clock[0] += 61  # past a tenth of trust_seconds: refreshed at the next flush, not at once
    watch.note_trusted("192.0.2.40")
    assert watch._trust == {"192.0.2.40"} and not watch._trust_now.is_set()
    clock[0] += 600  # lapsed: new again
    watch._trust.clear()
    watch.note_trusted("192.0.2.40")
    assert watch._trust_now.is_set()
    assert watch.is_trusted("192.0.2.40") and not watch.is_trusted("192.0.2.41")


def test_no_trust_when_trust_seconds_is_zero():
    watch = ScanWatch(MemoryStore(), LimitsConfig(trust_seconds=0), by="w")
    watch.note_trusted("192.0.2.50")
    assert not watch._trust and not watch.is_trusted("192.0.2.50")


def test_the_trusted_sources_kept_are_bounded(monkeypatch):
    import workers.sip.scanners as scanners

    monkeypatch.setattr(scanners, "TRUSTED_MAX", 3)
    watch = ScanWatch(MemoryStore(), LimitsConfig(trust_seconds=600), by="w")
    for n in range(3):
        watch.note_trusted(f"192.0.2.{n}")
    watch._heard_trust("192.0.2.10", 600)  # full of live trust: not kept
    watch.note_trusted("192.0.2.11")
    assert sorted(watch.trusted) == ["192.0.2.0", "192.0.2.1", "192.0.2.2"]
    watch.trusted["192.0.2.0"] = 0.0  # lapsed: its place is taken
    watch.note_trusted("192.0.2.11")
    assert sorted(watch.trusted) == ["192.0.2.1", "192.0.2.11", "192.0.2.2"]


def test_a_name_is_sent_again_in_the_next_window(monkeypatch):
    import workers.sip.scanners as scanners

    clock = [1000.0]
    monkeypatch.setattr(scanners.time, "monotonic", lambda: clock[0])
    store = MemoryStore()
    watch = ScanWatch(store, LimitsConfig(scan_users=5, scan_window=60), by="w")
    watch.note_request(("192.0.2.1", 5060), "1002")
    flush(watch)
    clock[0] += 30
    watch.note_request(("192.0.2.1", 5060), "1002")  # the same window: nothing to send
    assert not watch._users
    clock[0] += 31  # the window is over: counted again (its set in Redis expired)
    watch.note_request(("192.0.2.1", 5060), "1002")
    assert watch._users == {"192.0.2.1": {"1002"}}


def test_the_loops_sleep_until_something_is_noted_then_flush_it():
    import gevent
    import greenlet

    class Counting(MemoryStore):
        calls = 0

        def note_scan(self, users, errors, window):
            Counting.calls += 1
            return super().note_scan(users, errors, window)

        def trust(self, ips, seconds, by):
            Counting.calls += 1
            super().trust(ips, seconds, by)

    store = Counting()
    watch = ScanWatch(store, LIMITS, by="w")
    loops = [gevent.spawn(watch.loop), gevent.spawn(watch.trust_loop)]
    woken = []
    gevent.sleep(0.01)  # both loops started and waiting
    previous = greenlet.settrace(
        lambda event, args: woken.append(1) if event == "switch" and args[1] in loops else None)
    try:
        gevent.sleep(0.5)  # past two flush periods: nothing noted
        assert not woken and Counting.calls == 0
        watch.note_request(("192.0.2.9", 5070), "u1")
        watch.note_answer(b"SIP/2.0 404 Not Found\r\n\r\n", ("192.0.2.9", 5070))
        watch.note_trusted("192.0.2.40")
        gevent.sleep(0.35)
        assert store.users == {"192.0.2.9": {"u1"}} and store.errors["192.0.2.9"] == 1
        assert store.trust_writes == [(["192.0.2.40"], LIMITS.trust_seconds)]
        assert Counting.calls == 2
    finally:
        greenlet.settrace(previous)
        gevent.killall(loops)
