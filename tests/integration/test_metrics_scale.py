"""Registrations and calls are counted from the counting indexes the registrar's and the
B2BUA's scripts keep, so a scrape (and ``sipctl stats``) costs the same at 50,000
registrations as at none.  50,000 AORs' bindings are written through the registrar's own
script (pipelined), some about to expire; the counts must be exact before and after they
expire, and a scrape must cost the dispatcher under 20 ms of CPU."""

from __future__ import annotations

import os
import time
import urllib.request
import uuid

from harness import running_cluster, wait_for

from cluster import cli
from cluster import store as st
from cluster.store import Binding

AORS = 50_000
SHORT = 7  # AORs whose one binding expires a few seconds into the test
SCRAPES = 20
CPU_BUDGET = 0.020  # seconds of dispatcher CPU per scrape


def _binding(n: int, expires_at: float) -> Binding:
    return Binding(key=f"sip:u{n}@192.0.2.1:5060", contact=f"sip:u{n}@192.0.2.1:5060".encode(),
                   expires_at=expires_at, call_id=f"reg-{n}", cseq=1,
                   source=("192.0.2.1", 5060), host="test-host", registered_at=time.time())


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def _value(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(name + " "))


def test_counts_are_exact_and_a_scrape_is_cheap_at_50k_registrations(tmp_path, redis_url):
    with running_cluster(tmp_path, redis_url, workers=1) as cluster:
        store, now = cluster.store, time.time()
        started = time.monotonic()
        written = store.provision_bindings(
            (f"u{n}@127.0.0.1", _binding(n, now + 3600.0)) for n in range(SHORT, AORS))
        provisioned = time.monotonic() - started
        soon = time.time() + 5.0  # long enough for the checks below on a loaded machine
        written += store.provision_bindings(
            (f"u{n}@127.0.0.1", _binding(n, soon)) for n in range(SHORT))
        assert written == AORS
        # A second binding for one AOR: contacts count it, AORs do not.
        store.provision_bindings([("u100@127.0.0.1", Binding(
            key="sip:other@192.0.2.2", contact=b"sip:other@192.0.2.2", expires_at=now + 3600,
            call_id="reg-other", cseq=1, source=("192.0.2.2", 5060), host="test-host"))])
        counts = store.live_counts()
        assert (counts["aors"], counts["contacts"]) == (AORS, AORS + 1), counts

        port = cluster.config.metrics.port
        text = _scrape(port)
        assert _value(text, "sipcluster_registered_aors") == AORS
        assert _value(text, "sipcluster_registered_contacts") == AORS + 1
        pid = cluster.pid_of("dispatcher")
        cpu = _cpu_seconds(pid)
        for _ in range(SCRAPES):
            _scrape(port)
        per_scrape = (_cpu_seconds(pid) - cpu) / SCRAPES
        assert per_scrape < CPU_BUDGET, f"{per_scrape * 1000:.1f} ms of CPU per scrape"
        # sipctl stats reads the same indexes (it took 4.6 s with a SCAN).
        cpu = time.process_time()
        stats = cli.gather_stats(store)
        stats_cpu = time.process_time() - cpu
        assert stats["registrations"] == {"aors": AORS, "contacts": AORS + 1}
        assert stats_cpu < CPU_BUDGET, f"{stats_cpu * 1000:.1f} ms of CPU for sipctl stats"

        # The short bindings expire by TTL alone (no REGISTER, no process watching): the
        # counts follow at once, since the indexes are scored by expiry.
        assert wait_for(lambda: store.live_counts()["aors"] == AORS - SHORT, 8.0, 0.2)
        assert store.live_counts()["contacts"] == AORS + 1 - SHORT
        assert wait_for(lambda: _value(_scrape(port), "sipcluster_registered_aors")
                        == AORS - SHORT, 3.0, 0.2)
        print(f"provisioned {AORS} AORs in {provisioned:.1f} s; "
              f"{per_scrape * 1000:.2f} ms of dispatcher CPU per scrape")


def _register(store, aor: str, bindings: list[Binding], *, now: float, cseq: int,
              remove: list[str] = (), star: bool = False, call_id: str = "r1"):
    return store.register(aor, st.tx_key(aor, uuid.uuid4().hex), now=now, nonce=None,
                          nc=None, nonce_ttl=30, tx_ttl=30, max_contacts=10, call_id=call_id,
                          cseq=cseq, set_bindings=bindings, remove_keys=list(remove),
                          star=star)


def test_every_path_that_changes_a_binding_or_a_call_keeps_the_counts(redis_url):
    store = st.Store(redis_url, timeout=2.0)
    now = time.time()

    def counts():
        found = store.live_counts()
        return found["aors"], found["contacts"]

    def ours(n: int, expires_at: float, cseq: int = 1, call_id: str = "r1") -> Binding:
        return Binding(**{**vars(_binding(n, expires_at)), "call_id": call_id, "cseq": cseq})

    one, two = ours(1, now + 600), ours(2, now + 600)
    assert _register(store, "u1@r", [one, two], now=now, cseq=1).outcome == "ok"
    assert _register(store, "u2@r", [_binding(3, now + 600)], now=now, cseq=1).outcome == "ok"
    assert counts() == (2, 3)
    # A refresh changes nothing; a stale CSeq is refused and changes nothing either.
    one = ours(1, now + 600, cseq=2)
    assert _register(store, "u1@r", [one], now=now, cseq=2).outcome == "ok"
    assert _register(store, "u1@r", [], now=now, cseq=1, remove=[one.key]).outcome \
        == "stale-cseq"
    assert counts() == (2, 3)
    # Expires: 0 of one contact, then "*" for the rest.
    assert _register(store, "u1@r", [], now=now, cseq=3, remove=[one.key]).outcome == "ok"
    assert counts() == (2, 2)
    assert _register(store, "u1@r", [], now=now, cseq=4, star=True).outcome == "ok"
    assert counts() == (1, 1)
    # The pinger drops a dead contact; the operator deletes a user with its bindings.
    raw = store.raw_bindings("u2@r")
    [(key, packed)] = raw.items()
    assert store.drop_binding("u2@r", key, packed)
    assert counts() == (0, 0)
    assert _register(store, "u3@r", [_binding(4, now + 600)], now=now, cseq=1).outcome == "ok"
    store.put_user("u3", "r", {"MD5": "x"})
    assert counts() == (1, 1)
    assert store.delete_user("u3", "r")
    assert counts() == (0, 0)
    assert store.registered_aors() == []
    # A binding that expires while another of its AOR lives on: the AOR still counts.
    short = ours(5, now + 1.0, call_id="r9")
    assert _register(store, "u5@r", [short, ours(6, now + 600, call_id="r9")], now=now,
                     cseq=1, call_id="r9").outcome == "ok"
    assert counts() == (1, 2)
    assert wait_for(lambda: counts() == (1, 1), 4.0, 0.1)
    assert store.indexed_aors() == ["u5@r"]

    # Calls: created, then moved between states by the compare-and-set write; ended ones
    # leave the live counts; a relayed MESSAGE is no call.
    def calls():
        found = store.live_counts()
        return found["calls"], found["calls_last_minute"]

    version = store.save_call("t1", 0, {"state": "trying"}, ttl=60)
    store.save_call("t2", 0, {"state": "trying"}, ttl=60)
    store.save_call("m1", 0, {"state": "trying", "method": "MESSAGE"}, ttl=60)
    assert calls() == ({"trying": 2, "ringing": 0, "early": 0, "answered": 0}, 2)
    version = store.save_call("t1", version, {"state": "ringing"}, ttl=60)
    assert store.save_call("t1", 1, {"state": "answered"}, ttl=60) is None  # lost the race
    assert calls()[0] == {"trying": 1, "ringing": 1, "early": 0, "answered": 0}
    version = store.save_call("t1", version, {"state": "answered"}, ttl=60)
    assert calls()[0] == {"trying": 1, "ringing": 0, "early": 0, "answered": 1}
    assert sorted(tag for tag, _ in store.live_call_records()) == ["t1", "t2"]
    store.save_call("t1", version, {"state": "ended"}, ttl=120)
    assert calls() == ({"trying": 1, "ringing": 0, "early": 0, "answered": 0}, 2)
    assert store.live_call_records() == [("t2", {"state": "trying"})]  # what sipctl calls lists
    # A call record that expires unended (its TTL) leaves the count at its expiry.
    store.save_call("t3", 0, {"state": "early"}, ttl=1.0)
    assert calls()[0]["early"] == 1
    assert wait_for(lambda: calls()[0]["early"] == 0, 4.0, 0.1)


def test_the_scripts_count_nothing_when_given_no_index_keys(redis_url, monkeypatch):
    """Where the index keys cannot share a script with the AOR's or call's keys (Redis
    Cluster), the key functions return none and the scripts still do their own work."""
    store = st.Store(redis_url, timeout=2.0)
    now = time.time()
    monkeypatch.setattr(store, "registration_index_keys", lambda: [])
    monkeypatch.setattr(store, "call_index_keys", lambda: [])
    assert _register(store, "u1@r", [_binding(1, now + 600)], now=now, cseq=1).outcome == "ok"
    assert [b.key for b in store.bindings("u1@r")] == [_binding(1, now).key]
    key, packed = next(iter(store.raw_bindings("u1@r").items()))
    assert store.drop_binding("u1@r", key, packed) and store.bindings("u1@r") == []
    version = store.save_call("t1", 0, {"state": "trying"}, ttl=60)
    assert store.save_call("t1", version, {"state": "ended"}, ttl=60) is not None
    counts = store.live_counts()
    assert (counts["aors"], counts["contacts"], counts["calls_last_minute"]) == (0, 0, 0)
