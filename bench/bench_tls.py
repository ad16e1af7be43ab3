"""SIP over TLS at scale: registrations per second over 1,000 open TLS connections, and
the memory an idle TCP or TLS connection costs.

Registrations: 1,000 TLS connections (bench/tlsload.py, one process: SIPp here has no
TLS), each registers its own user (401, then 200 with MD5 digest), then re-registers,
the connection that waited longest first, at rates stepping up until a step has a
failure; the highest passing rate is confirmed over 15 s.  Per step: the CPU of every
cluster process (dispatcher, workers, redis-server) per registration, p50/p99 (first
REGISTER to the 200, seen by the client), the client's own CPU (near the wall time: the
client, not the cluster, was the limit) and the machine's load average.

Memory: the resident size of every cluster process before and after 1,000 idle
connections are open (TLS: handshake done, nothing sent; TCP: nothing sent), in kB per
connection, beside Kamailio's published figures (4.5 kB per TCP connection, 61 kB more
per TLS connection).  Each transport gets a fresh cluster, so neither reuses memory the
other freed.

The load generator is one address (127.0.0.1), allow-listed as in the other benchmarks,
with streams.max_per_source raised past the connection count.  For comparison, the
highest passing rate is then run over UDP with SIPp (bench_register.py's scenario) on the
same cluster: on a shared machine, the CPU per registration varies with its load more than
with the transport.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_register import run_rate
from bench.cluster_run import BenchCluster, percentile, sustained_rate
from bench.tlsload import Load, raise_fd_limit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from procstat import fd_count, fd_limit, rss_kb  # noqa: E402
from streamua import self_signed  # noqa: E402

from conftest import free_tcp_port  # noqa: E402

CONNECTIONS = 1000
RATES = (100, 150, 200, 300, 400, 600, 800, 1000, 1500, 2000, 3000)
STEP_SECONDS = 8
CONFIRM_SECONDS = 15
FIRST_USER = 20000
KAMAILIO_TCP_KB, KAMAILIO_TLS_EXTRA_KB = 4.5, 61.0


def load_now() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def settings(folder: Path) -> tuple[dict, str]:
    cert, key = self_signed(folder)
    return {"streams": {"tls_port": free_tcp_port(), "tls_cert": cert, "tls_key": key,
                        "max_per_source": CONNECTIONS + 100}}, cert


def wait_fds(pid: int, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while fd_count(pid) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return fd_count(pid)


def memory_rows(label: str, before: dict, after: dict, count: int) -> dict[str, float]:
    per = {name: (after[name] - before[name]) / count for name in before}
    for name in before:
        print(f"  {label} {name:12} RSS {before[name]:>7} -> {after[name]:>7} kB: "
              f"{per[name]:6.2f} kB per connection   ({load_now()})", flush=True)
    return per


def tcp_idle_memory(work: Path) -> dict[str, float]:
    """kB per idle TCP connection, per cluster process, on a fresh cluster."""
    extra, _ = settings(work)
    with BenchCluster(workers=2, settings=extra) as bench:
        pids = bench.pids()
        dispatcher = pids["dispatcher"]
        print(f"  dispatcher descriptor limit {fd_limit(dispatcher)}", flush=True)
        time.sleep(1)
        base_fds = fd_count(dispatcher)
        before = {name: rss_kb(pid) for name, pid in pids.items()}
        socks = []
        try:
            for _ in range(CONNECTIONS):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                socks.append(sock)
                code = sock.connect_ex(bench.cluster.address)
                if code not in (0, errno.EINPROGRESS):
                    raise RuntimeError(f"TCP connect: {os.strerror(code)}")
            got = wait_fds(dispatcher, base_fds + CONNECTIONS, 30)
            if got < base_fds + CONNECTIONS:
                raise RuntimeError(f"the dispatcher holds {got - base_fds} of {CONNECTIONS}")
            time.sleep(2)  # the connections' records reach Redis
            after = {name: rss_kb(pid) for name, pid in pids.items()}
        finally:
            for sock in socks:
                sock.close()
        return memory_rows("TCP idle", before, after, CONNECTIONS)


def show(label: str, row: dict) -> None:
    print(f"  {label:8} rate {row['rate']:>5}/s  ok {row['ok']:>6}  failed {row['failed']:>5} "
          f"{row['outcomes'] or ''} (no free connection {row['missed']})  "
          f"achieved {row['achieved_per_s']:>5}/s  "
          f"cluster cpu {row['cpu_ms']:.3f} ms each [{row['cpu_split']}], "
          f"{row['net_cpu_ms']:.3f} net of idle  "
          f"client cpu {row['client_share']:.0%} of wall  p50 {row['p50_ms']} ms  "
          f"p99 {row['p99_ms']} ms  open {row['open']}  ({row['load']})", flush=True)


def run_step(bench: BenchCluster, load: Load, rate: int, seconds: int,
             idle_cpu: float) -> dict:
    before = bench.cpu()
    result = load.step(rate, seconds)
    after = bench.cpu()
    done = max(result["ok"], 1)
    split = {name: (after.get(name, 0.0) - value) / done * 1000 for name, value in before.items()}
    net = (sum(split.values()) / 1000 * done - idle_cpu * result["elapsed"]) / done * 1000
    times = result["times"]
    return {"rate": rate, "ok": result["ok"], "failed": result["failed"],
            "missed": result["missed"], "outcomes": result["outcomes"],
            "achieved_per_s": round(result["ok"] / max(result["elapsed"], 1e-9)),
            "cpu_ms": round(sum(split.values()), 3), "net_cpu_ms": round(net, 3),
            "cpu_split": ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(split.items())),
            "client_share": result["client_cpu"] / max(result["elapsed"], 1e-9),
            "p50_ms": round(percentile(times, 0.50) * 1000, 2),
            "p99_ms": round(percentile(times, 0.99) * 1000, 2),
            "open": result["open"], "load": load_now()}


def udp_reference(bench: BenchCluster, rate: int, work: Path) -> dict:
    """bench_register's UDP registrations (SIPp) at ``rate`` on the same cluster and
    machine, other users: what TLS adds, with the machine's state the same."""
    users = bench.add_users(FIRST_USER + CONNECTIONS, CONNECTIONS)
    return run_rate(bench, users, rate, CONFIRM_SECONDS, work / "udp")


def tls_registrations(work: Path) -> dict:
    """kB per idle TLS connection, then the registration rate over them."""
    extra, cert = settings(work)
    figures: dict = {}
    with BenchCluster(workers=2, settings=extra) as bench:
        users = bench.add_users(FIRST_USER, CONNECTIONS)
        pids = bench.pids()
        dispatcher = pids["dispatcher"]
        time.sleep(1)
        before = {name: rss_kb(pid) for name, pid in pids.items()}
        cpu_before = bench.cpu()
        server = ("127.0.0.1", bench.cluster.config.streams.tls_port)
        load = Load(server, cert, users, bench.cluster.config.realm)
        try:
            took = load.connect(time.monotonic() + 120)
            handshake_cpu = sum(bench.cpu()[n] - v for n, v in cpu_before.items())
            print(f"  {CONNECTIONS} TLS connections open in {took:.1f} s: "
                  f"{CONNECTIONS / took:.0f} handshakes/s, cluster CPU "
                  f"{handshake_cpu / CONNECTIONS * 1000:.2f} ms per handshake   ({load_now()})",
                  flush=True)
            time.sleep(2)  # the connections' records reach Redis
            after = {name: rss_kb(pid) for name, pid in pids.items()}
            tls = memory_rows("TLS idle", before, after, CONNECTIONS)
            figures["tls_idle_kb_dispatcher"] = round(tls["dispatcher"], 1)
            figures["tls_idle_kb_redis"] = round(tls["redis"], 1)
            print(f"  dispatcher descriptors {fd_count(dispatcher)} "
                  f"(limit {fd_limit(dispatcher)})", flush=True)
            ok, failed, how = load.register_all(time.monotonic() + 120)
            print(f"  first registration of every user: {ok} ok, {failed} failed {how}   "
                  f"({load_now()})", flush=True)
            # What the cluster spends with nothing to do (heartbeats, timers, the idle
            # connections' clock): at low rates it is much of the CPU per registration.
            quiet = bench.cpu()
            time.sleep(5)
            idle_cpu = sum(bench.cpu()[n] - v for n, v in quiet.items()) / 5
            print(f"  idle cluster with {CONNECTIONS} TLS connections: "
                  f"{idle_cpu * 1000:.0f} ms of CPU a second   ({load_now()})", flush=True)
            best, confirmed = sustained_rate(
                lambda rate, seconds, label: run_step(bench, load, rate, seconds, idle_cpu),
                RATES, STEP_SECONDS, CONFIRM_SECONDS, show)
        finally:
            load.close()
        if best is not None:
            udp = udp_reference(bench, best, work)
    if best is None:
        print("  no rate passed without failures")
        return figures
    print(f"  over {CONNECTIONS} TLS connections: highest passing rate {best}/s "
          f"({CONFIRM_SECONDS} s: {confirmed['failed']} failed); cluster CPU "
          f"{confirmed['cpu_ms']:.3f} ms per registration [{confirmed['cpu_split']}], "
          f"{confirmed['net_cpu_ms']:.3f} ms net of idle; "
          f"p50 {confirmed['p50_ms']} ms, p99 {confirmed['p99_ms']} ms   ({confirmed['load']})")
    print(f"  the same over UDP (SIPp, same cluster, just after, {best}/s for "
          f"{CONFIRM_SECONDS} s): {udp['failed']} failed; cluster CPU {udp['cpu_ms']:.3f} ms "
          f"per registration; p50 {udp['p50_ms']} ms, p99 {udp['p99_ms']} ms   ({load_now()})")
    figures.update({"udp_same_rate_cpu_ms": udp["cpu_ms"], "tls_register_best_rate": best,
                    "tls_register_cpu_ms": confirmed["cpu_ms"],
                    "tls_register_net_cpu_ms": confirmed["net_cpu_ms"],
                    "tls_register_p50_ms": confirmed["p50_ms"],
                    "tls_register_p99_ms": confirmed["p99_ms"]})
    return figures


def main() -> dict:
    raise_fd_limit(4 * CONNECTIONS)
    work = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    figures = tls_registrations(work)
    tcp = tcp_idle_memory(work)
    figures["tcp_idle_kb_dispatcher"] = round(tcp["dispatcher"], 1)
    print(f"  idle connection, dispatcher: TCP {tcp['dispatcher']:.1f} kB, TLS "
          f"{figures.get('tls_idle_kb_dispatcher', float('nan')):.1f} kB; Kamailio's published: "
          f"TCP {KAMAILIO_TCP_KB} kB, TLS {KAMAILIO_TCP_KB + KAMAILIO_TLS_EXTRA_KB} kB "
          f"({KAMAILIO_TLS_EXTRA_KB} kB more than TCP)   ({load_now()})")
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
