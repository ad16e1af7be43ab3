"""Scale on one host: CPU per call with 1, 2 and 4 workers, and Redis commands per call.

The main figures are for the configuration `make run` ships: media through the RTP
relays (2 relays), a call trace kept in Redis for every call, INFO logs, and a
redis-server with its append-only file (everysec), as the managed one runs.  A leaner
configuration (media bypass, no traces, WARNING logs, no append-only file: what
bench_calls.py measures) is printed beside it for 2 workers.

Every run: SIPp callers with digest on every call (bench/scenarios/call_uac.xml,
zero hold time) to a registered SIPp UAS, at one fixed rate (RATE calls/s for
SECONDS s; zero failures expected).  CPU is user + system time from /proc of every
cluster process (dispatcher, workers, relays, redis-server), per role; the idle
background (heartbeats, timer polling) is measured over the same duration without
calls just before, and subtracted.

Redis: ``commands`` per call from INFO commandstats (reset with CONFIG RESETSTAT
before each window, the bench's own INFO and CONFIG left out); ``reads`` per call is
INFO stats ``total_reads_processed``: the read events redis-server handled, one per
request or pipeline that arrives in one piece, so it counts round trips (a pipeline
larger than one socket read would count more than once, so it is an upper bound).

Then, on the same cluster, a coarse step-down search for the highest passing rate
(STEP_RATES, highest first, STEP_SECONDS each, the first with zero failed calls); on
2 cores SIPp shares the machine with the cluster, so it is a floor, not the cluster's
ceiling.  bench_calls.py confirms its best rate (lean, 2 workers) over 30 s.

Not measured: the extra CPU per call of a call handed off between two hosts (it needs
SIPp inside network namespaces; tests/integration/test_multihost.py checks that such
calls work, not their cost).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.__main__ import machine_line
from bench.cluster_run import (
    SCENARIOS,
    UA,
    BenchCluster,
    Sipp,
    free_udp_port,
)

RATE = 40
SECONDS = 10
CALLERS = 200
# The step-down search for the highest passing rate: short steps, coarse rates, so the
# module stays within a few minutes; bench_calls.py confirms its best rate over 30 s.
STEP_RATES = (120, 90, 60)
STEP_SECONDS = 5
WORKER_COUNTS = (1, 2, 4)
# RTP ports of the benchmark's relays: away from the shipped 20000-29999, which a
# cluster started with `make run` on this machine may hold.
RTP_MIN, RTP_MAX = 46000, 46999

SHIPPED = {"log": {"level": "INFO"}, "calls": {"trace": True},
           "dispatcher": {"heartbeat_interval": 0.5, "dead_after": 1.5},
           "media": {"mode": "relay", "relays": 2, "rtp_port_min": RTP_MIN,
                     "rtp_port_max": RTP_MAX}}
LEAN = {"log": {"level": "WARNING"}, "calls": {"trace": False}, "media": {"mode": "bypass"}}
OWN_COMMANDS = ("info", "config")  # what the benchmark itself sends to redis-server
ROLES = ("dispatcher", "worker", "relay", "redis")
# SIPp's error for a call whose 200 OK arrived before its 180: with several workers the
# two responses can be forwarded by different processes and cross on the way.
OVERTAKEN = "while expecting '180' (index 6), received 'SIP/2.0 200 OK"


@dataclass
class Window:
    """What the cluster spent over one stretch of time."""

    seconds: float
    cpu: dict[str, float]  # role -> CPU seconds
    commands: Counter = field(default_factory=Counter)  # Redis command -> calls
    reads: int = 0

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu.values())


def role(program: str) -> str:
    name = program.split(":", 1)[0]
    return next((r for r in ROLES if name.startswith(r)), name)


def by_role(cpu: dict[str, float]) -> dict[str, float]:
    roles: dict[str, float] = {}
    for program, seconds in cpu.items():
        roles[role(program)] = roles.get(role(program), 0.0) + seconds
    return roles


def redis_counters(client) -> tuple[Counter, int]:
    commands = Counter()
    for name, stats in client.info("commandstats").items():
        command = name.removeprefix("cmdstat_")
        if command.split("|")[0] not in OWN_COMMANDS:
            commands[command] = int(stats["calls"])
    reads = int(client.info("stats").get("total_reads_processed", 0))
    return commands, reads


class Meter:
    """CPU per role and Redis counters between start() and stop()."""

    def __init__(self, bench: BenchCluster):
        self.bench = bench
        self.client = bench.redis.client()

    def start(self) -> None:
        self.client.config_resetstat()
        self.before = self.bench.cpu()
        self.started = time.monotonic()

    def stop(self) -> Window:
        after = self.bench.cpu()
        seconds = time.monotonic() - self.started
        commands, reads = redis_counters(self.client)
        # The INFO commandstats that reads the counters is a read of its own; INFO stats
        # and the CONFIG RESETSTAT came after / were reset with them.
        reads = max(reads - 1, 0)
        cpu = {name: after.get(name, 0.0) - value for name, value in self.before.items()}
        return Window(seconds, by_role(cpu), commands, reads)


def calls_window(bench: BenchCluster, callers, workdir: Path, rate: int = RATE,
                 seconds: int = SECONDS) -> tuple[Window, int, int, int]:
    """``rate`` calls/s for ``seconds`` s: (window, successful calls, failed calls, of
    those the ones SIPp aborted because the 200 OK overtook the 180)."""
    calls = rate * seconds
    uas_port = free_udp_port()
    with UA(bench.cluster.address, user="1009") as ua:
        ua.register("1234", contacts=["*"], expires=0)  # not the previous window's UAS
        ua.register("1234", contacts=[f"<sip:1009@127.0.0.1:{uas_port}>"])
    uas = Sipp(str(SCENARIOS / "call_uas.xml"), bench.cluster.address, workdir / "uas", calls,
               rate=rate, timeout=seconds + 40, port=uas_port).start()
    time.sleep(0.3)
    # A call that meets overload fails within 4 s instead of waiting out its timers.
    uac = Sipp(str(SCENARIOS / "call_uac.xml"), bench.cluster.address, workdir / "uac", calls,
               rate=rate, users=callers, timeout=seconds + 30,
               extra=("-recv_timeout", "4000", "-l", str(max(4 * rate, 100))))
    meter = Meter(bench)
    meter.start()
    try:
        result = uac.run()
        window = meter.stop()
    finally:
        uas.stop()
    return (window, result.successful, calls - result.successful,
            result.errors.count(OVERTAKEN))


def highest_passing(bench: BenchCluster, callers, workdir: Path) -> int | None:
    """The first of STEP_RATES (highest first) with zero failed calls over STEP_SECONDS,
    but for calls whose 200 OK overtook the 180 (a phone takes the 200; SIPp's scenario
    aborts)."""
    for rate in STEP_RATES:
        time.sleep(1.0)  # the previous step's calls ended on every process
        _, ok, failed, overtaken = calls_window(bench, callers, workdir / f"step-{rate}",
                                                rate, STEP_SECONDS)
        if ok and failed == overtaken:
            return rate
    return None


def idle_window(bench: BenchCluster, seconds: float) -> Window:
    meter = Meter(bench)
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def measure(workers: int, settings: dict, appendonly: bool, workdir: Path,
            search: bool = True) -> dict:
    with BenchCluster(workers=workers, settings=settings, appendonly=appendonly) as bench:
        callers = bench.add_users(20000, CALLERS)
        bench.add_users(1009, 1)
        time.sleep(1.0)  # past start-up: relays and workers announced, first heartbeats sent
        idle = idle_window(bench, SECONDS + 1)
        load = load_now()
        busy, ok, failed, overtaken = calls_window(bench, callers, workdir)
        best = highest_passing(bench, callers, workdir) if search else None
    done = max(ok, 1)
    scale = busy.seconds / idle.seconds
    net = {r: busy.cpu.get(r, 0.0) - idle.cpu.get(r, 0.0) * scale for r in ROLES}
    idle_commands = sum(idle.commands.values()) * scale
    per_command = Counter({c: (n - idle.commands.get(c, 0) * scale) / done
                           for c, n in busy.commands.items()})
    return {
        "workers": workers, "ok": ok, "failed": failed, "overtaken": overtaken,
        "seconds": busy.seconds,
        "cpu_ms": sum(net.values()) / done * 1000,
        "role_ms": {r: v / done * 1000 for r, v in net.items()},
        "gross_cpu_ms": busy.total_cpu / done * 1000,
        "idle_cpu_pct": idle.total_cpu / idle.seconds * 100,
        "commands": (sum(busy.commands.values()) - idle_commands) / done,
        "reads": (busy.reads - idle.reads * scale) / done,
        "idle_commands_per_s": sum(idle.commands.values()) / idle.seconds,
        "idle_reads_per_s": idle.reads / idle.seconds,
        "per_command": per_command,
        "load": load, "best": best, "load_after": load_now(),
    }


HEADER = (f"  {'config':8} {'wrk':>3} {'ok':>4} {'fail':>4} {'180>':>4} {'CPU ms/call':>11} "
          f"{'disp':>5} {'worker':>6} {'relay':>5} {'redis':>5} {'idle%':>5} {'cmd/call':>8} "
          f"{'rt/call':>7} {'best/s':>6}  load 1/5/15 min")


def load_now() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def show(label: str, row: dict) -> None:
    best = "-" if not row.get("searched") else (
        str(row["best"]) if row["best"] else f"<{STEP_RATES[-1]}")
    role = row["role_ms"]
    print(f"  {label:8} {row['workers']:>3} {row['ok']:>4} {row['failed']:>4} "
          f"{row['overtaken']:>4} {row['cpu_ms']:>11.2f} {role['dispatcher']:>5.2f} "
          f"{role['worker']:>6.2f} {role['relay']:>5.2f} {role['redis']:>5.2f} "
          f"{row['idle_cpu_pct']:>5.1f} {row['commands']:>8.1f} {row['reads']:>7.1f} "
          f"{best:>6}  {row['load']} / {row['load_after']}", flush=True)


def main() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"  {RATE} calls/s for {SECONDS} s each; CPU in ms per successful call, idle "
          f"background subtracted; idle% of one core; Redis commands (cmd) and read events "
          f"(rt, round trips) per call; best/s: highest of {'/'.join(map(str, STEP_RATES))} "
          f"calls/s passing over {STEP_SECONDS} s; 180>: calls SIPp aborted as the 200 OK "
          f"overtook the 180; load before / after; {machine_line()}")
    print(HEADER, flush=True)
    rows = []
    for workers in WORKER_COUNTS:
        row = measure(workers, SHIPPED, True, work / f"shipped-{workers}")
        row["searched"] = True
        show("shipped", row)
        rows.append(row)
    lean = measure(2, LEAN, False, work / "lean-2", search=False)
    show("lean", lean)
    shipped2 = next(r for r in rows if r["workers"] == 2)
    top = sorted(shipped2["per_command"].items(), key=lambda item: -item[1])[:12]
    print("  Redis commands per call, shipped, 2 workers: "
          + ", ".join(f"{c} {n:.2f}" for c, n in top if n >= 0.05))
    print("  two hosts (hand-off) extra CPU per call: not measured (SIPp would have to run "
          "inside network namespaces; not built)")
    failed = sum(r["failed"] for r in (*rows, lean))
    overtaken = sum(r["overtaken"] for r in (*rows, lean))
    if failed:
        print(f"  {failed} calls failed at {RATE}/s ({overtaken} of them: 200 OK before the "
              f"180); the CPU figures above are per successful call")
    figures = {f"scale_cpu_ms_{r['workers']}w": round(r["cpu_ms"], 2) for r in rows}
    figures.update({f"scale_best_rate_{r['workers']}w": r["best"] for r in rows})
    figures["scale_cpu_ms_lean_2w"] = round(lean["cpu_ms"], 2)
    figures["scale_redis_commands_per_call"] = round(shipped2["commands"], 1)
    figures["scale_redis_reads_per_call"] = round(shipped2["reads"], 1)
    figures["scale_failed_calls"] = failed
    figures["scale_failed_200_before_180"] = overtaken
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
