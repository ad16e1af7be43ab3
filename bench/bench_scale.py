"""Scale: CPU per call with 1, 2 and 4 workers, Redis work per call, a hand-off's cost.

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
before each window, the bench's own INFO and CONFIG left out; it also counts the
commands a script run by EVALSHA calls, so it is the work Redis does, not the requests
sent); ``reads`` per call is INFO stats ``total_reads_processed``: the read events
redis-server handled, one per request or pipeline that arrives in one piece, so it
counts round trips (a pipeline larger than one socket read would count more than once,
so it is an upper bound).

Then, on the same cluster, a coarse step-down search for the highest passing rate
(STEP_RATES, highest first, STEP_SECONDS each, the first whose only failed calls, if
any, are ones SIPp aborted because the 200 OK overtook the 180); on
2 cores SIPp shares the machine with the cluster, so it is a floor, not the cluster's
ceiling.  bench_calls.py confirms its best rate (lean, 2 workers) over 30 s.

Two hosts (root and `ip netns` only; a printed reason otherwise): the topology of
tests/integration/test_multihost.py (tests/integration/netns.py: two clusters of 2
workers in network namespaces, one Redis on their LAN, shipped configuration), the
UAS registered through h1; RATE calls/s sent to h1 (no hand-off), then to h2 (every
call handed off to h1, which sends the INVITE to the UAS).  The difference of CPU per
call, both hosts and Redis summed, is what a hand-off costs; the UDP datagrams each
host took in per call show the calls did cross.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.__main__ import machine_line
from bench.cluster_run import (
    SCENARIOS,
    UA,
    BenchCluster,
    Sipp,
    cpu_seconds,
    free_udp_port,
    ha1_hashes,
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
ROLES = ("dispatcher", "worker", "relay", "redis", "supervisord")  # all in the CPU sum
# SIPp's error for a call whose 200 OK arrived before its 180: with several workers the
# two responses can be forwarded by different processes and cross on the way.
OVERTAKEN = "while expecting '180' (index 6), received 'SIP/2.0 200 OK"


@dataclass
class SippFrom(Sipp):
    """SIPp sending from ``source`` (an address on the LAN of the two-host topology)."""

    source: str = "127.0.0.1"

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("-i") + 1] = self.source
        return command


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
        # TwoHosts opens its own client (password, LAN address); BenchCluster has a RedisServer
        self.client = bench.client() if isinstance(bench, TwoHosts) else bench.redis.client()

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


def calls_window(bench, callers, workdir: Path, rate: int = RATE, seconds: int = SECONDS,
                 *, register_at=None, call_at=None,
                 source: str = "127.0.0.1") -> tuple[Window, int, int, int]:
    """``rate`` calls/s for ``seconds`` s: (window, successful calls, failed calls, of
    those the ones SIPp aborted because the 200 OK overtook the 180).  The UAS registers
    through ``register_at``, the calls go to ``call_at`` (both the cluster's address by
    default); SIPp and the test phone send from ``source``."""
    register_at = register_at or bench.cluster.address
    call_at = call_at or bench.cluster.address
    calls = rate * seconds
    uas_port = free_udp_port()
    with UA(register_at, user="1009", bind=source) as ua:
        ua.register("1234", contacts=["*"], expires=0)  # not the previous window's UAS
        ua.register("1234", contacts=[f"<sip:1009@{source}:{uas_port}>"])
    uas = SippFrom(str(SCENARIOS / "call_uas.xml"), register_at, workdir / "uas", calls,
                   rate=rate, timeout=seconds + 40, port=uas_port, source=source).start()
    time.sleep(0.3)
    # A call that meets overload fails within 4 s instead of waiting out its timers.
    uac = SippFrom(str(SCENARIOS / "call_uac.xml"), call_at, workdir / "uac", calls,
                   rate=rate, users=callers, timeout=seconds + 30, source=source,
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
    return net_figures(idle, busy, ok) | {
        "workers": workers, "ok": ok, "failed": failed, "overtaken": overtaken,
        "load": load, "best": best, "load_after": load_now()}


def net_figures(idle: Window, busy: Window, ok: int) -> dict:
    """Per successful call, with the idle background (scaled to the busy window) taken off."""
    done = max(ok, 1)
    scale = busy.seconds / idle.seconds
    net = {r: busy.cpu.get(r, 0.0) - idle.cpu.get(r, 0.0) * scale for r in ROLES}
    idle_commands = sum(idle.commands.values()) * scale
    per_command = Counter({c: (n - idle.commands.get(c, 0) * scale) / done
                           for c, n in busy.commands.items()})
    return {
        "cpu_ms": sum(net.values()) / done * 1000,
        "role_ms": {r: v / done * 1000 for r, v in net.items()},
        "idle_cpu_pct": idle.total_cpu / idle.seconds * 100,
        "commands": (sum(busy.commands.values()) - idle_commands) / done,
        "reads": (busy.reads - idle.reads * scale) / done,
        "per_command": per_command,
    }


HEADER = (f"  {'config':8} {'wrk':>3} {'ok':>4} {'fail':>4} {'180>':>4} {'CPU ms/call':>11} "
          f"{'disp':>5} {'worker':>6} {'relay':>5} {'redis':>5} {'sup':>4} {'idle%':>5} "
          f"{'cmd/call':>8} "
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
          f"{role['supervisord']:>4.2f} "
          f"{row['idle_cpu_pct']:>5.1f} {row['commands']:>8.1f} {row['reads']:>7.1f} "
          f"{best:>6}  {row['load']} / {row['load_after']}", flush=True)


# ------------------------------------------------------------------ two hosts
HANDOFF_PORT = 5070
TWO_HOST_REDIS_PORT = 6391
TWO_HOST_REDIS_PASSWORD = "bench-scale-redis-password"


def netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no ip command"
    probe = f"scprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return made.stderr.strip() or "ip netns add failed"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def udp_in(namespace: str) -> int:
    """UDP datagrams the namespace has received so far (its /proc/net/snmp)."""
    snmp = subprocess.run(["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout
    header, values = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")][:2]
    return int(values[header.index("InDatagrams")])


@dataclass
class TwoHosts:
    """Two clusters (h1, h2) in network namespaces, one Redis on the LAN: what Meter reads."""

    clusters: list
    redis: object  # the redis-server Popen
    url: str

    def cpu(self) -> dict[str, float]:
        cpu = {"redis": cpu_seconds(self.redis.pid)}
        for index, cluster in enumerate(self.clusters, 1):
            for program, (state, pid) in cluster.processes().items():
                if state == "RUNNING" and pid:
                    cpu[f"{program}@h{index}"] = cpu_seconds(pid)
        return cpu

    def client(self):
        return redis.Redis.from_url(self.url)


def two_host_settings(index: int, address: str, lan: str) -> dict:
    return {**SHIPPED,
            "sip": {"bind": address, "port": 5060, "host_id": f"h{index}"},
            "dispatcher": {**SHIPPED["dispatcher"], "inter_host_port": HANDOFF_PORT,
                           "inter_host_address": address},
            "media": {**SHIPPED["media"], "bind": address},
            "limits": {"allow": [lan]}}


def two_hosts(work: Path) -> dict | None:
    """CPU per call of calls that stay on h1 and of calls that cross from h2 to a callee
    registered through h1 (a hand-off), at RATE calls/s, summed over both hosts + Redis."""
    problem = netns_problem()
    if problem:
        print(f"  two hosts: not measured ({problem}; needs root and `ip netns`)")
        return None
    from hostbed import host_bed
    from netns import LAN_ADDRESS, Topology
    work.mkdir(parents=True, exist_ok=True)

    def settings_of(index: int) -> dict:
        return two_host_settings(index, Topology.host_address(index), LAN_ADDRESS)

    with host_bed(Topology().up(), work, settings_of, redis_port=TWO_HOST_REDIS_PORT,
                  redis_password=TWO_HOST_REDIS_PASSWORD, appendonly=True) as bed:
        clusters = bed.clusters
        hosts = TwoHosts(clusters, bed.redis, bed.url)
        realm = clusters[0].config.realm
        users = [(str(n), "1234") for n in range(20000, 20000 + CALLERS)] + [("1009", "1234")]
        clusters[0].store.put_users((u, realm, ha1_hashes(u, realm, p)) for u, p in users)
        callers = users[:-1]
        deadline = time.monotonic() + 20
        while set(clusters[0].store.hosts()) < {"h1", "h2"}:
            if time.monotonic() > deadline:
                raise RuntimeError("the two hosts did not see each other")
            time.sleep(0.2)
        time.sleep(2.0)  # each dispatcher reads the hosts it takes hand-offs from every 1 s
        h1 = (Topology.host_address(1), 5060)
        h2 = (Topology.host_address(2), 5060)
        idle = idle_window(hosts, SECONDS + 1)
        load = load_now()
        rows = {}
        for label, call_at in (("same", h1), ("crossing", h2)):
            before = [udp_in(bed.topology.host_ns(i)) for i in (1, 2)]
            busy, ok, failed, overtaken = calls_window(
                hosts, callers, work / label, register_at=h1, call_at=call_at,
                source=LAN_ADDRESS)
            after = [udp_in(bed.topology.host_ns(i)) for i in (1, 2)]
            rows[label] = net_figures(idle, busy, ok) | {
                "ok": ok, "failed": failed, "overtaken": overtaken, "workers": 2,
                "load": load, "load_after": load_now(),
                # UDP datagrams each host took in per call: h1 takes some in the
                # crossing run only if h2 hands the calls off to it.
                "udp_in": [(a - b) / max(ok, 1) for a, b in zip(after, before, strict=True)]}
            load = load_now()
            time.sleep(1.0)
        return rows


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
    pair = two_hosts(work / "two-hosts")
    if pair:
        for label, row in pair.items():
            show(f"2h-{label}"[:8], row)
            print(f"           UDP datagrams taken in per call: h1 {row['udp_in'][0]:.1f}, "
                  f"h2 {row['udp_in'][1]:.1f}")
        extra = pair["crossing"]["cpu_ms"] - pair["same"]["cpu_ms"]
        print(f"  two hosts, shipped configuration, 2 workers each: a call handed off from h2 "
              f"to h1 costs {extra:.2f} ms more CPU than one staying on h1 "
              f"({pair['crossing']['cpu_ms']:.2f} vs {pair['same']['cpu_ms']:.2f} ms, both "
              f"hosts and Redis summed)")
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
    if pair:
        figures["scale_handoff_extra_cpu_ms"] = round(
            pair["crossing"]["cpu_ms"] - pair["same"]["cpu_ms"], 2)
    figures["scale_failed_calls"] = failed
    figures["scale_failed_200_before_180"] = overtaken
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
