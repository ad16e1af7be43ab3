"""What an idle cluster costs: the configuration `make run` ships (2 workers, 2 relays,
relay media, call traces, INFO logs), a few users, no traffic, for IDLE_SECONDS.

CPU is every cluster process's time on a CPU, redis-server and supervisord included, as
a share of one core.  It is read from each thread's /proc schedstat (nanoseconds): the
clock-tick figures of /proc stat are 10 ms steps, 0.05% of a core per process over 20 s,
as large as what is measured.  Beside it: the wake-ups each process takes (voluntary
context switches of all its threads), what an idle cluster's CPU goes to, and the Redis
commands per second that polling and heartbeats send (INFO commandstats, the
benchmark's own reads left out).  Issue target: under 1% of a core in all.
"""

from __future__ import annotations

import os
import time

# First: bench.cluster_run puts tests/integration on the path, where procstat is.
from bench.bench_scale import SHIPPED, BenchCluster, Meter

# isort: split
from procstat import cpu_and_wakeups

IDLE_SECONDS = 30.0
SHOWN_COMMANDS = 8


def main() -> dict:
    with BenchCluster(workers=2, settings=SHIPPED, appendonly=True) as bench:  # as `make run`
        bench.add_users(1000, 5)
        time.sleep(3.0)  # past start-up: relays and workers announced, first heartbeats
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
        pids = bench.pids()
        meter = Meter(bench)
        before = {name: cpu_and_wakeups(pid) for name, pid in pids.items()}
        meter.start()
        time.sleep(IDLE_SECONDS)
        after = {name: cpu_and_wakeups(pid) for name, pid in pids.items()}
        window = meter.stop()
    seconds = window.seconds
    per_process = {name: 100 * (after[name][0] - used) / seconds
                   for name, (used, _) in sorted(before.items())}
    wakeups = {name: (after[name][1] - woke) / seconds
               for name, (_, woke) in sorted(before.items())}
    commands = sum(window.commands.values()) / seconds
    top = ", ".join(f"{name} {count / seconds:.1f}"
                    for name, count in window.commands.most_common(SHOWN_COMMANDS))
    return {
        "idle CPU, all processes": (f"{sum(per_process.values()):.2f} % of a core over "
                                    f"{seconds:.0f} s (load {load})"),
        "idle CPU per process": ", ".join(f"{name} {pct:.3f} %"
                                          for name, pct in per_process.items()),
        "idle wake-ups per second": (f"{sum(wakeups.values()):.0f}: " + ", ".join(
            f"{name} {rate:.1f}" for name, rate in wakeups.items())),
        "idle Redis commands": f"{commands:.1f}/s: {top}",
    }


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
