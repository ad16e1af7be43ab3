"""Asynchronous replication: what WAIT costs per write, and what a primary's death loses.

A primary and one replica (redis-server, loopback, no persistence) are started in a
temporary folder.

1. Cost: the call writes of the B2BUA (Store.save_call: a compare-and-set script, and
   Store.add_cdr: XADD), sequentially, without and with redis.wait_replicas = 1 (a
   ``WAIT 1 <ms>`` in the same pipeline); the median and 99th percentile latency of
   each and the difference per write.
2. Loss: a writer INCRs one counter as fast as one connection goes (optionally with
   ``WAIT 1 <ms>`` after each INCR) while the primary is killed with SIGKILL; the
   acknowledged writes the replica does not hold are the writes a failover would lose.
   Repeated ROUNDS times, the replica re-synced each time.

Environment: BENCH_REPL_WRITES (default 3000), BENCH_REPL_ROUNDS (default 5).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from cluster.store import Store

WRITES = int(os.environ.get("BENCH_REPL_WRITES", "3000"))
ROUNDS = int(os.environ.get("BENCH_REPL_ROUNDS", "5"))
WAIT_MS = 100
RECORD = {"state": "answered", "legs": [{"name": "a", "dialog": {"cseq": 1}}] * 2,
          "padding": "x" * 1500}  # about the size of a two-leg call record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, replica_of: int = 0) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [shutil.which("redis-server") or "redis-server", "--port", str(port),
               "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder),
               "--repl-diskless-sync-delay", "0"]
    if replica_of:
        command += ["--replicaof", "127.0.0.1", str(replica_of)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            info = client.info("replication")
            if not replica_of or info.get("master_link_status") == "up":
                client.close()
                return process, port
        except redis.RedisError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start or sync")


def latencies(run, count: int) -> list[float]:
    found = []
    for index in range(count):
        started = time.perf_counter()
        run(index)
        found.append((time.perf_counter() - started) * 1000)
    return found


def figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(len(ordered) * 0.99)]
    return f"median {statistics.median(ordered):.3f} ms, p99 {p99:.3f} ms"


def cost(port: int) -> dict[str, str]:
    """Store.save_call and Store.add_cdr as the workers run them, without and with
    redis.wait_replicas = 1."""
    store = Store(f"redis://127.0.0.1:{port}/0", timeout=1.0)
    versions: dict[str, int] = {}

    def save(index: int) -> None:
        tag = f"bench{index % 200}"
        versions[tag] = store.save_call(tag, versions.get(tag, 0), RECORD, 60.0)

    def cdr(index: int) -> None:
        store.add_cdr({"caller": "1000", "callee": "1001", "duration": index})

    out = {}
    for name, write in (("call write", save), ("cdr", cdr)):
        store.replica_wait = (0, 0)
        plain = latencies(write, WRITES)
        store.replica_wait = (1, WAIT_MS)
        waited = latencies(write, WRITES)
        out[name] = figures(plain)
        out[f"{name} + WAIT 1 {WAIT_MS}"] = figures(waited)
        out[f"{name}: WAIT adds (median)"] = (
            f"{statistics.median(waited) - statistics.median(plain):.3f} ms")
    store.redis.close()
    return out


def loss_round(folder: Path, wait: bool) -> tuple[int, int, float]:
    """(acknowledged writes, of those lost, writes per second) for one primary death."""
    primary, primary_port = start_server(folder / "primary")
    replica, replica_port = start_server(folder / "replica", replica_of=primary_port)
    writer = redis.Redis(port=primary_port, socket_timeout=0.5, retry=None)  # fail at once
    acked = [0]
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            try:
                pipe = writer.pipeline(transaction=False)
                pipe.incr("acked")
                if wait:
                    pipe.execute_command("WAIT", 1, WAIT_MS)
                value, *waited = pipe.execute()
                if not wait or waited[0] >= 1:  # WAIT: acknowledged by the replica too
                    acked[0] = value
            except redis.RedisError:
                return

    thread = threading.Thread(target=write, daemon=True)
    started = time.monotonic()
    thread.start()
    time.sleep(1.0)
    primary.kill()
    primary.wait()
    elapsed = time.monotonic() - started
    thread.join(timeout=5)
    stop.set()
    reader = redis.Redis(port=replica_port, socket_timeout=1)
    held = int(reader.get("acked") or 0)
    reader.close()
    writer.close()
    replica.kill()
    replica.wait()
    return acked[0], max(0, acked[0] - held), acked[0] / elapsed


def loss(folder: Path) -> dict[str, str]:
    out = {}
    for wait in (False, True):
        rounds = [loss_round(folder / f"{wait}-{n}", wait) for n in range(ROUNDS)]
        lost = [r[1] for r in rounds]
        rate = statistics.median(r[2] for r in rounds)
        label = f"INCR{' + WAIT 1 ' + str(WAIT_MS) if wait else ''}"
        out[f"loss, {label}"] = (f"acknowledged writes lost per primary death {lost} "
                                 f"at {rate:.0f} writes/s (max {max(lost) / rate * 1000:.1f} ms)")
    return out


def main() -> dict:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-repl-") as tmp:
        folder = Path(tmp)
        primary, primary_port = start_server(folder / "cost-primary")
        replica, _ = start_server(folder / "cost-replica", replica_of=primary_port)
        try:
            results = cost(primary_port)
        finally:
            for process in (primary, replica):
                process.kill()
                process.wait()
        results.update(loss(folder))
    return results


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
