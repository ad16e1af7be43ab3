"""Registrations and calls are counted from the counting indexes the registrar's and the
B2BUA's scripts keep, so a scrape (and ``sipctl stats``) costs the same at 50,000
registrations as at none.  50,000 AORs' bindings are written through the registrar's own
script (pipelined), some about to expire; the counts must be exact before and after they
expire, and a scrape must cost the dispatcher under 20 ms of CPU."""

from __future__ import annotations

import os
import time
import urllib.request

from harness import running_cluster, wait_for

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
        written = st.provision_bindings(store, (
            (f"u{n}@127.0.0.1", _binding(n, now + (4.0 if n < SHORT else 3600.0)))
            for n in range(AORS)))
        provisioned = time.monotonic() - started
        assert written == AORS
        # A second binding for one AOR: contacts count it, AORs do not.
        st.provision_bindings(store, [("u100@127.0.0.1", Binding(
            key="sip:other@192.0.2.2", contact=b"sip:other@192.0.2.2", expires_at=now + 3600,
            call_id="reg-other", cseq=1, source=("192.0.2.2", 5060), host="test-host"))])
        counts = st.live_counts(store)
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

        # The short bindings expire by TTL alone (no REGISTER, no process watching): the
        # counts follow at once, since the indexes are scored by expiry.
        assert wait_for(lambda: st.live_counts(store)["aors"] == AORS - SHORT, 8.0, 0.2)
        assert st.live_counts(store)["contacts"] == AORS + 1 - SHORT
        assert wait_for(lambda: _value(_scrape(port), "sipcluster_registered_aors")
                        == AORS - SHORT, 3.0, 0.2)
        print(f"provisioned {AORS} AORs in {provisioned:.1f} s; "
              f"{per_scrape * 1000:.2f} ms of dispatcher CPU per scrape")
