"""What the SIPp-driven benchmarks share: a real cluster, CPU accounting, percentiles.

The cluster is the one the integration tests run (supervisord, dispatcher, workers)
against a redis-server of its own, on free ports, so a benchmark never touches a
cluster started with ``make run``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

from flooder import IN_FLIGHT, Flooder, flood_during_calls  # noqa: E402, F401  (a hostile source)
from harness import Cluster  # noqa: E402
from sipp import Sipp  # noqa: E402, F401  (the SIPp runner, for the benchmarks)
from sipua import UA  # noqa: E402, F401

from cluster.cli import ha1_hashes  # noqa: E402
from conftest import RedisServer, free_udp_port  # noqa: E402, F401

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# SIPp, the load generator, is one source at 127.0.0.1 sending far past the per-source
# limits: allow-listed, as a trunk would be.  bench_flood.py measures the limits themselves.
LOAD_SOURCE = {"limits": {"allow": ["127.0.0.1"]}}


@dataclass
class BenchCluster:
    workers: int = 2
    settings: dict = field(default_factory=dict)
    appendonly: bool = False  # True: an append-only file (everysec), as the managed Redis keeps

    def __enter__(self) -> BenchCluster:
        self.tmp = Path(tempfile.mkdtemp(prefix="sipcluster-bench-"))
        self.redis = RedisServer(self.tmp / "redis", appendonly=self.appendonly).start()
        self.cluster = Cluster(self.tmp, self.redis.url, workers=self.workers,
                               settings={"log": {"level": "WARNING"}, **LOAD_SOURCE,
                                         **self.settings})
        self.cluster.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.stop()
        self.redis.stop()

    def pids(self) -> dict[str, int]:
        """The processes whose CPU counts: supervisord, dispatcher, workers, relays and
        redis-server."""
        pids = {"redis": self.redis.process.pid}
        try:
            pids["supervisord"] = int((self.cluster.run_dir / "supervisord.pid").read_text())
        except (OSError, ValueError):
            pass  # not up yet, or gone: its CPU is not counted
        for line in self.cluster.ctl("status").splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "RUNNING" and parts[2] == "pid":
                pids[parts[0]] = int(parts[3].rstrip(","))
        return pids

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    def add_users(self, first: int, count: int, password: str = "1234") -> list[tuple[str, str]]:
        realm = self.cluster.config.realm
        users = [(str(n), password) for n in range(first, first + count)]
        self.cluster.store.put_users((u, realm, ha1_hashes(u, realm, p)) for u, p in users)
        return users


def cpu_by_program(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per program kind ("worker" for worker:worker-0 and worker:worker-1)."""
    kinds: dict[str, float] = {}
    for name, value in before.items():
        kind = name.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0.0) + after.get(name, value) - value
    return kinds


def rtt_values(workdir: Path) -> list[float]:
    """Response times (ms) SIPp wrote with -trace_rtt (every rtd, every call)."""
    values = []
    for path in workdir.glob("*_rtt.csv"):
        for line in path.read_text(errors="replace").splitlines()[1:]:
            parts = line.split(";")
            if len(parts) >= 2:
                try:
                    values.append(float(parts[1]))
                except ValueError:
                    pass
    return values


def wait_quiet(seconds: float = 1.0) -> None:
    time.sleep(seconds)


def step_figures(rate: int, calls: int, result, elapsed: float, cpu: dict[str, float],
                 rtts: list[float]) -> dict:
    """One rate step of a SIPp run: what passed, what it cost, how fast it was answered.
    ``cpu``: CPU seconds per program kind (``cpu_by_program``); ``cpu_ms``: CPU
    milliseconds of all cluster processes per successful SIPp call, ``cpu_ms_by``: the
    same per program kind."""
    done = max(result.successful, 1)
    return {"rate": rate, "seconds": round(elapsed, 1), "ok": result.successful,
            "failed": calls - result.successful,
            "achieved_per_s": round(result.successful / max(elapsed, 1e-9)),
            "cpu_ms": round(sum(cpu.values()) / done * 1000, 3),
            "cpu_ms_by": {kind: round(seconds / done * 1000, 3)
                          for kind, seconds in sorted(cpu.items())},
            "p50_ms": round(percentile(rtts, 0.50), 2), "p99_ms": round(percentile(rtts, 0.99), 2),
            "retransmissions": result.retransmissions}


def overload_and_recovery(run, best: int, seconds: int, show) -> tuple[dict, dict, float]:
    """Twice the passing rate for ``seconds`` s, then, 5 s after, half of it for 5 s:
    (overload row, recovery row, the overload's completions as a share of what the
    passing rate completes in ``seconds``).  Targets (issue): at least 80%, and no failure
    in the recovery run."""
    overload = run(2 * best, seconds, "overload")
    show("overload", overload)
    time.sleep(5)
    after = run(best // 2 or 1, 5, "recovery")
    show("after +5 s", after)
    return overload, after, overload["ok"] / (best * seconds)


def sustained_rate(run, rates, step_seconds: int, confirm_seconds: int, show):
    """Ramp ``run(rate, seconds, label)`` through ``rates`` until a step fails, then confirm
    the passing rates, highest first, over ``confirm_seconds``: (rate, figures) of the
    first with zero failures, or (None, None)."""
    passed = []
    for rate in rates:
        row = run(rate, step_seconds, f"step-{rate}")
        show("step", row)
        if row["failed"]:
            break
        passed.append(rate)
    for rate in reversed(passed):
        row = run(rate, confirm_seconds, f"confirm-{rate}")
        show(f"{confirm_seconds} s", row)
        if not row["failed"]:
            return rate, row
    return None, None
