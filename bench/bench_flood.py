"""Per-source limits: what a banned datagram costs the dispatcher, and what a flood
costs legitimate callers.

1. Drop cost: a source is banned, then sends DROP_COUNT datagrams as fast as the
   dispatcher reads them; the dispatcher's CPU time over the datagrams it dropped
   (its ``banned_dropped`` counter), less its idle CPU over the same wall time, is the
   cost of one drop.  The same for datagrams it forwards (an allow-listed source), for
   comparison.
2. The flood: 20,000 new INVITE/REGISTER/OPTIONS a second from 127.0.0.77 for
   FLOOD_SECONDS while SIPp on 127.0.0.1 places 20 calls/s with digest: the share of
   calls that succeed, how long the ban took, and what the flooder got.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.cluster_run import IN_FLIGHT, BenchCluster, Flooder, cpu_seconds, flood_during_calls

DROP_COUNT = 200_000
DROP_RATE = 50_000  # datagrams per second: below what the dispatcher reads, so none is lost
FORWARD_COUNT = 20_000
FORWARD_RATE = 4_000
FLOOD_SECONDS = 10.0
BANNED, TRUNK = "127.0.0.66", "127.0.0.99"


def dispatcher_counters(bench: BenchCluster) -> dict:
    procs = bench.cluster.store.processes("dispatcher")
    return procs[0] if procs else {}


def settled_counter(bench: BenchCluster, name: str) -> int:
    """The counter once the dispatcher's heartbeat (every second) has caught up."""
    last = -1
    while True:
        time.sleep(1.2)
        value = int(dispatcher_counters(bench).get(name, 0))
        if value == last:
            return value
        last = value


def cpu_per_datagram(bench: BenchCluster, source: str, count: int, rate: float,
                     counter: str, methods: tuple[str, ...]) -> tuple[float, int]:
    pid = bench.pids()["dispatcher"]
    # idle CPU over the same wall time (its threads poll and heartbeat)
    idle_before = cpu_seconds(pid)
    time.sleep(count / rate)
    idle = cpu_seconds(pid) - idle_before
    before_count = settled_counter(bench, counter)
    before = cpu_seconds(pid)
    Flooder(bench.cluster.address, source, rate, count / rate, methods=methods).start().wait(
        linger=0.5)
    used = cpu_seconds(pid) - before
    handled = settled_counter(bench, counter) - before_count
    extra_wall = 0.5 + 2 * 1.2  # the linger and the settling reads: idle time too
    idle_rate = idle / (count / rate)
    busy = used - idle_rate * (count / rate + extra_wall)
    return 1e6 * busy / max(handled, 1), handled


def main() -> dict:
    figures: dict = {}
    settings = {"limits": {"allow": [TRUNK, "127.0.0.1"]}}
    with BenchCluster(workers=2, settings=settings) as bench:
        bench.cluster.store.ban(BANNED, 600, "bench", "bench")
        time.sleep(0.5)  # the dispatcher learns it over pub/sub
        drop_us, dropped = cpu_per_datagram(bench, BANNED, DROP_COUNT, DROP_RATE,
                                            "banned_dropped", ("INVITE",))
        figures["banned datagram drop, dispatcher CPU"] = (
            f"{drop_us:.2f} us/datagram ({dropped} of {DROP_COUNT} sent at {DROP_RATE}/s)")
        forward_us, forwarded = cpu_per_datagram(bench, TRUNK, FORWARD_COUNT, FORWARD_RATE,
                                                 "forwarded", ("OPTIONS",))
        figures["forwarded datagram, dispatcher CPU (allow-listed source)"] = (
            f"{forward_us:.2f} us/datagram ({forwarded} forwarded)")
    # The same calls without a flood, then with it, with the shipped limits (the callers'
    # address is not allow-listed here): a busy machine fails calls without any flood.
    for label, rate in (("without a flood", 0), ("during the flood", 20_000)):
        with BenchCluster(workers=2, settings={"limits": {}}) as bench:
            tmp = Path(tempfile.mkdtemp(prefix="sipcluster-bench-flood-"))
            flood = flood_during_calls(bench.cluster, tmp, FLOOD_SECONDS, rate=rate)
        ok = flood["successful"] / max(flood["calls"], 1)
        figures[f"legitimate calls {label}"] = (
            f"{flood['successful']}/{flood['calls']} succeeded ({100 * ok:.1f} %), "
            f"{flood['failed']} failed, 20 calls/s for {FLOOD_SECONDS:g} s")
    ban = flood.get("ban")
    figures["flood"] = (
        f"{flood['flood_sent']} sent at 20,000/s; ban "
        + (f"{ban['reason']} after {flood['ban_latency'] * 1000:.0f} ms; "
           f"answers {flood['flood_answers']} ({flood['answers_after_ban']} after the ban, "
           f"last {flood['last_answer_after_ban'] * 1000:.0f} ms after it, "
           f"{flood['answers_after_grace']} later than {IN_FLIGHT:g} s)" if ban else "NEVER")
        + f"; dispatcher dropped {flood['banned_dropped']}")
    for key, value in figures.items():
        print(f"  {key}: {value}", flush=True)
    return {}
