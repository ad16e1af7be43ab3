"""Where a call's CPU goes: py-spy samples of a worker, the dispatcher and a relay while
the shipped configuration (bench_scale.SHIPPED: relay media, call traces, INFO logs, 2
workers) carries RATE calls/s with digest for SECONDS s, the same SIPp scenarios as
bench_scale.py.

For each process: the share of its samples whose innermost frame is in each function
(own time), the TOP functions; and the share that passes through each of the project's
own functions (inclusive), the TOP of those, so the flame graph's widest entries are in
the benchmark's output.  Samples are taken at RATE_HZ of the thread holding the GIL
(py-spy --gil: a thread waiting in select or on a socket is not sampled), so the shares
are of the Python CPU the process used.  Needs root
(ptrace), as CI and `make bench` on the box run; otherwise the reason is printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.bench_scale import CALLERS, RATE, SHIPPED, BenchCluster, calls_window, load_now

SECONDS = 15
RATE_HZ = 250
TOP = 8
PROFILED = ("worker-0", "dispatcher", "relay-0")
OWN_CODE = ("cluster/", "workers/")


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


def frame_name(frame: str) -> str:
    """``function (path/file.py:line)`` as py-spy prints it, without the line."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in OWN_CODE:
        if marker in path and "site-packages" not in path:
            path = path[path.rindex(marker):]
            break
    else:
        path = "/".join(path.rsplit("/", 2)[-2:])  # a library's folder and file
    return f"{name} ({path})"


def shares(raw: Path) -> tuple[int, Counter, Counter]:
    """(samples, own-time counter, inclusive counter of the project's own functions)."""
    own, inclusive, total = Counter(), Counter(), 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += n
        for name in set(frames):
            if any(f"({marker}" in name for marker in OWN_CODE):
                inclusive[name] += n
    return total, own, inclusive


def top(counter: Counter, total: int) -> str:
    return "; ".join(f"{100 * n / total:.1f}% {name}" for name, n in counter.most_common(TOP))


def main() -> dict:
    spy = py_spy()
    if spy is None:
        return {"skipped": "py-spy is not installed (requirements-dev.txt)"}
    if os.geteuid() != 0:
        return {"skipped": "py-spy needs root (ptrace) to sample the cluster's processes"}
    workdir = Path(tempfile.mkdtemp(prefix="sipcluster-bench-profile-"))
    figures: dict = {}
    with BenchCluster(workers=2, settings=SHIPPED) as bench:
        callers = bench.add_users(20000, CALLERS)
        bench.add_users(1009, 1)
        pids = bench.pids()
        load = load_now()
        # supervisord's names: "worker:worker-0", "relay:relay-0", "dispatcher"
        chosen = {name: pid for name, pid in pids.items()
                  if name.rpartition(":")[2] in PROFILED}
        spies = {name: subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(SECONDS + 2), "--gil",
             "--rate", str(RATE_HZ), "--format", "raw", "--output", str(workdir / name)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in chosen.items()}
        _, ok, failed, _ = calls_window(bench, callers, workdir / "calls", RATE, SECONDS)
        for process in spies.values():
            process.wait(timeout=60)
    figures["calls"] = f"{ok} ok, {failed} failed at {RATE}/s for {SECONDS} s (load {load})"
    for name in spies:
        raw = workdir / name
        if not raw.exists():
            figures[name] = "no samples (py-spy failed)"
            continue
        total, own, inclusive = shares(raw)
        if not total:
            figures[name] = "no samples"
            continue
        figures[f"{name} own time ({total} samples)"] = top(own, total)
        figures[f"{name} through (inclusive)"] = top(inclusive, total)
    return figures


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
