"""What an idle cluster costs: the configuration `make run` ships (2 workers, 2 relays,
relay media, call traces, INFO logs), a few users, no traffic, for IDLE_SECONDS.

CPU is user + system time from /proc of every cluster process, redis-server included,
as a share of one core; beside it the Redis commands per second that the polling and
heartbeats send (INFO commandstats, the benchmark's own reads left out).  Issue
target: under 1% of a core in all.
"""

from __future__ import annotations

import os
import time

from bench.bench_scale import SHIPPED, BenchCluster, Meter

IDLE_SECONDS = 20.0
SHOWN_COMMANDS = 8


def main() -> dict:
    with BenchCluster(workers=2, settings=SHIPPED) as bench:
        bench.add_users(1000, 5)
        time.sleep(3.0)  # past start-up: relays and workers announced, first heartbeats
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
        meter = Meter(bench)
        before = bench.cpu()
        meter.start()
        time.sleep(IDLE_SECONDS)
        after = bench.cpu()
        window = meter.stop()
    seconds = window.seconds
    per_process = {name: 100 * (after.get(name, 0.0) - used) / seconds
                   for name, used in sorted(before.items())}
    commands = sum(window.commands.values()) / seconds
    top = ", ".join(f"{name} {count / seconds:.1f}"
                    for name, count in window.commands.most_common(SHOWN_COMMANDS))
    return {
        "idle CPU, all processes": (f"{sum(per_process.values()):.2f} % of a core over "
                                    f"{seconds:.0f} s (load {load})"),
        "idle CPU per process": ", ".join(f"{name} {pct:.2f} %"
                                          for name, pct in per_process.items()),
        "idle Redis commands": f"{commands:.1f}/s: {top}",
    }


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
