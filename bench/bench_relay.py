"""RTP relay throughput and control-plane speed.

1. Control: offer + answer + delete cycles per second with 8 in flight (threads
   sharing one RelayClient), and the latency of one command.
2. Media: N concurrent G.711 calls (172-byte packets, 50 packets/s per direction,
   phases spread like independent phones) through one relay for 20 s each, N
   increasing until packets are lost.  The load comes from bench/rtpgen.c
   (compiled here with cc), which time-stamps every packet, so the added jitter
   is |transit - previous transit| per stream, against the real send spacing.
   The relay's CPU comes from /proc/<pid>/stat, the generator's from getrusage.

Environment: BENCH_RELAY_CALLS="200,400,600,800,1000" and BENCH_RELAY_SECONDS=20
change the steps.  Other processes on the machine distort the figures: the
load average is printed before and after by `python -m bench`, and when run
as root the relay and the generator get a higher priority (nice -10), as they
would have on a machine of their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from cluster.relayctl import RelayClient, StreamSpec, control_key
from cluster.store import Store

ROOT = Path(__file__).resolve().parent.parent
GENERATOR_SOURCE = ROOT / "bench" / "rtpgen.c"
# Below Linux's ephemeral range (32768-60999), so the generator's free ports never collide.
PORT_MIN, PORT_MAX = 28000, 32699
SECRET = "bench-relay-secret"  # the relay and the client derive the control key from it
PACKET_BYTES, PPS = 172, 50
GENERATOR_SOCKETS = 16
CONTROL_SECONDS = 3.0
CONTROL_IN_FLIGHT = int(os.environ.get("BENCH_RELAY_IN_FLIGHT", "8"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PRIORITY = -10


def raise_priority() -> None:
    """In the child: a higher scheduling priority when allowed (root), else unchanged."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
    except OSError:
        pass


def main() -> dict:
    steps = [int(n) for n in os.environ.get("BENCH_RELAY_CALLS", "200,400,600,800,1000").split(",")]
    seconds = float(os.environ.get("BENCH_RELAY_SECONDS", "20"))
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        generator = compile_generator(Path(tmp))
        redis_proc, url = start_redis(Path(tmp))
        relay = None
        try:
            relay = start_relay(url)
            store = Store(url, timeout=1.0)
            client = RelayClient(store, key=control_key(SECRET))
            wait_for_relay(client)
            figures = control_bench(client)
            best = None
            for calls in steps:
                result = media_run(client, generator, relay.pid, calls, seconds)
                print_media(result)
                if result["lost"] == 0 and result["send_errors"] == 0:
                    best = result
                else:
                    break
            figures["largest zero-loss N"] = best["calls"] if best else 0
            if best:
                figures["at that N: packets/s forwarded"] = round(best["pps"])
                figures["at that N: relay CPU per packet (us)"] = round(best["relay_us"], 2)
                figures["at that N: relay CPU (% of a core)"] = round(best["relay_core"] * 100, 1)
                figures["at that N: generator CPU (% of a core)"] = round(best["gen_core"] * 100,
                                                                          1)
                figures["at that N: added jitter p50/p99 (ms)"] = (
                    f"{best['jitter_p50_ms']}/{best['jitter_p99_ms']}")
            return figures
        finally:
            if relay is not None:
                relay.terminate()
                relay.wait(timeout=10)
            redis_proc.kill()
            redis_proc.wait()


# --------------------------------------------------------------------------- set-up


def compile_generator(folder: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc): apt-get install -y gcc")
    target = folder / "rtpgen"
    subprocess.run([compiler, "-O2", "-o", str(target), str(GENERATOR_SOURCE)], check=True)
    return target


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_relay(url: str) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": url, "SIPCLUSTER_RELAY_INDEX": "0",
           "SIPCLUSTER_MEDIA_RELAYS": "1", "SIPCLUSTER_MEDIA_RTP_PORT_MIN": str(PORT_MIN),
           "SIPCLUSTER_MEDIA_RTP_PORT_MAX": str(PORT_MAX), "SIPCLUSTER_MEDIA_BIND": "127.0.0.1",
           "SIPCLUSTER_SIP_HOST_ID": "bench", "SIPCLUSTER_AUTH_SECRET": SECRET,
           "SIPCLUSTER_LOG_LEVEL": os.environ.get("RELAY_LOG", "WARNING")}
    profile = os.environ.get("RELAY_PROFILE")  # a cProfile output file, to study the relay
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    return subprocess.Popen([sys.executable, *prefix, "-m", "workers.relay"], env=env, cwd=ROOT,
                            preexec_fn=raise_priority)


def wait_for_relay(client: RelayClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client._nodes_read = -1e9  # re-read relay:nodes now
        if client.relays():
            return
        time.sleep(0.1)
    raise RuntimeError("the relay did not announce itself")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


# --------------------------------------------------------------------------- control plane


def control_bench(client: RelayClient) -> dict:
    latencies: list[float] = []
    cycles = [0] * CONTROL_IN_FLIGHT
    stop = time.monotonic() + CONTROL_SECONDS

    def worker(index: int) -> None:
        relay = client.relays()[0].id
        spec_a = [StreamSpec("audio", "127.0.0.1", 7000 + 2 * index)]
        spec_b = [StreamSpec("audio", "127.0.0.1", 8000 + 2 * index)]
        n = 0
        while time.monotonic() < stop:
            call_id = f"bench-{index}-{n}"
            started = time.perf_counter()
            client.offer(call_id, "a", spec_a, relay=relay)
            latencies.append(time.perf_counter() - started)
            client.answer(call_id, "b", spec_b, relay=relay)
            client.delete(call_id, relay=relay)
            n += 1
        cycles[index] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONTROL_IN_FLIGHT)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    rate = sum(cycles) / elapsed
    print(f"   control: {rate:.0f} offer+answer+delete cycles/s with {CONTROL_IN_FLIGHT} in "
          f"flight; offer round trip p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms", flush=True)
    return {"control cycles/s (8 in flight)": round(rate)}


# --------------------------------------------------------------------------- media


def media_run(client: RelayClient, generator: Path, relay_pid: int, calls: int,
              seconds: float) -> dict:
    ports = [free_port(socket.SOCK_DGRAM) for _ in range(GENERATOR_SOCKETS)]
    half = GENERATOR_SOCKETS // 2
    relay = client.relays()[0].id
    call_args = []
    for c in range(calls):
        a_sock, b_sock = c % half, half + c % half
        call_id = f"media-{calls}-{c}"
        to_b = client.offer(call_id, "a", [StreamSpec("audio", "127.0.0.1", ports[a_sock])],
                            relay=relay)
        to_a = client.answer(call_id, "b", [StreamSpec("audio", "127.0.0.1", ports[b_sock])],
                             relay=relay)
        # leg a's party sends to the port the relay gave for a's SDP (to_a), b likewise
        call_args.append(f"{a_sock}:{to_a.streams[0].port}:{b_sock}:{to_b.streams[0].port}")
    command = [str(generator), str(seconds), str(PACKET_BYTES), str(PPS),
               *map(str, ports), "--", *call_args]
    before = cpu_ticks(relay_pid)
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, preexec_fn=raise_priority)
    if run.returncode != 0:
        raise RuntimeError(f"rtpgen failed ({run.returncode}): {run.stderr.strip()[:500]}")
    output = run.stdout
    wall = time.monotonic() - started
    relay_seconds = (cpu_ticks(relay_pid) - before) / CLK_TCK
    for c in range(calls):
        client.delete(f"media-{calls}-{c}", relay=relay)
    result = {k: float(v) for k, v in (line.split() for line in output.splitlines())}
    received = result["received"]
    return {"calls": calls, **result, "pps": received / seconds,
            "relay_us": relay_seconds / max(received, 1) * 1e6,
            "relay_core": relay_seconds / wall, "gen_core": result["cpu_seconds"] / seconds}


def print_media(r: dict) -> None:
    print(f"   {r['calls']:5d} calls: sent {r['sent']:.0f} received {r['received']:.0f} lost "
          f"{r['lost']:.0f} ({r['pps']:.0f} pkt/s); relay {r['relay_us']:.2f} us/pkt "
          f"({r['relay_core'] * 100:.0f}% core); generator {r['gen_core'] * 100:.0f}% core; "
          f"added jitter p50 {r['jitter_p50_ms']:.3f} p99 {r['jitter_p99_ms']:.3f} "
          f"p99.9 {r['jitter_p999_ms']:.3f} ms; transit p99 {r['transit_p99_ms']:.3f} ms",
          flush=True)
