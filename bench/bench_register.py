"""Authenticated REGISTER (401 then 200, MD5) with SIPp at increasing rates.

On the configuration `make run` ships (bench_scale.SHIPPED: INFO logs; an append-only
Redis).  Reports the highest rate with zero failed registrations over 30 s, the CPU
seconds per 1,000 registrations of all cluster processes together (supervisord,
dispatcher, workers, relays, redis-server) and per program, p50/p99 registration time
(first REGISTER to the 200, challenge included), then an overload run at twice that
rate: what share of the passing rate still completes, and whether full service is back
within 5 s.
Targets (issue): >= 5,000/s, <= 0.3 ms CPU per registration, p99 < 20 ms,
>= 80 % under overload, recovery within 5 s.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench.bench_scale import SHIPPED, load_now
from bench.cluster_run import (
    SCENARIOS,
    BenchCluster,
    Sipp,
    cpu_by_program,
    overload_and_recovery,
    rtt_values,
    step_figures,
    sustained_rate,
)

STEP_SECONDS = 10
CONFIRM_SECONDS = 30
RATES = (500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000)
USERS = 2000


def run_rate(bench: BenchCluster, users, rate: int, seconds: int, workdir: Path) -> dict:
    calls = rate * seconds
    sipp = Sipp(str(SCENARIOS / "register_bench.xml"), bench.cluster.address, workdir, calls,
                rate=rate, users=users, timeout=seconds + 30,
                extra=("-trace_rtt", "-rtt_freq", "1", "-l", str(max(rate, 100))))
    before = bench.cpu()
    started = time.monotonic()
    result = sipp.run()
    elapsed = time.monotonic() - started
    cpu = cpu_by_program(before, bench.cpu())
    rtts = rtt_values(workdir)
    return step_figures(rate, calls, result, elapsed, cpu, rtts)


def show(label: str, row: dict) -> None:
    print(f"  {label:10} rate {row['rate']:>5}/s  ok {row['ok']:>7}  failed {row['failed']:>5}  "
          f"achieved {row['achieved_per_s']:>5}/s  cpu {row['cpu_ms']:.3f} ms each  "
          f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  retrans {row['retransmissions']}  "
          f"load {load_now()}", flush=True)
    print("             cpu ms each by process: " + ", ".join(
        f"{kind} {ms:.3f}" for kind, ms in row["cpu_ms_by"].items()), flush=True)


def main() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-register-"))
    with BenchCluster(workers=2, settings=SHIPPED, appendonly=True) as bench:
        users = bench.add_users(10000, USERS)

        def run(rate: int, seconds: int, label: str) -> dict:
            return run_rate(bench, users, rate, seconds, work / label)

        best, confirmed = sustained_rate(run, RATES, STEP_SECONDS, CONFIRM_SECONDS, show)
        if best is None:
            print("  no rate passed without failures")
            return {}
        overload, after, share = overload_and_recovery(run, best, CONFIRM_SECONDS, show)
    print(f"  highest passing rate {best}/s (30 s: {confirmed['failed']} failed); "
          f"CPU {confirmed['cpu_ms']:.3f} s per 1,000 registrations "
          f"({confirmed['cpu_ms']:.3f} ms each); p50 {confirmed['p50_ms']} ms, "
          f"p99 {confirmed['p99_ms']} ms")
    print(f"  overload at {2 * best}/s: completed {overload['ok']} = {share:.0%} of the passing "
          f"rate's {best * CONFIRM_SECONDS}; 5 s later: {after['failed']} failed")
    return {"register_best_rate": best, "register_cpu_ms": confirmed["cpu_ms"],
            "register_p99_ms": confirmed["p99_ms"], "overload_share": round(share, 2),
            "recovery_failed": after["failed"]}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
