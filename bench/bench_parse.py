"""How fast the SIP message layer is on one core, and where parse+validate spends its time.

Measures, on the seed INVITE with SDP (tests/fixtures/seed/04-invite.sip):
  (a) parse()                       (b) parse() + validate()
  (c) scan.call_id()                (d) scan.top_branch()
  (e) build_response(200) + to_bytes()
Each figure is the best of 3 runs of about a second each, so a busy neighbour costs a run,
not the figure.  Then a cProfile of (b) lists its top 10 functions by own time.

Run with `python -m bench.bench_parse` or through `python -m bench parse`.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path

from cluster.sip import scan
from cluster.sip.message import build_response, parse

SEED_INVITE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "seed" / "04-invite.sip"
RUN_SECONDS = 1.0
RUNS = 3
PROFILE_CALLS = 20_000
# Targets from the issue, per core: ">= 50,000 full parses/s" is shown against parse() alone
# and against parse()+validate(), since only the second parses every structured header.
TARGETS = {"parse": 50_000, "parse+validate": 50_000, "scan.call_id": 500_000}


def calls_per_second(fn: Callable[[], object], seconds: float = RUN_SECONDS,
                     runs: int = RUNS) -> float:
    """Best of ``runs`` timings, each of as many calls as fit in about ``seconds``."""
    batch = 1
    while True:  # grow a batch until it takes a measurable slice of a run
        started = time.perf_counter()
        for _ in range(batch):
            fn()
        elapsed = time.perf_counter() - started
        if elapsed > seconds / 20:
            break
        batch *= 2
    batch = max(1, int(batch * (seconds / 20) / elapsed))
    best = 0.0
    for _ in range(runs):
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(batch):
                fn()
            count += batch
        best = max(best, count / elapsed)
    return best


def workloads(data: bytes) -> dict[str, Callable[[], object]]:
    request = parse(data)

    def parse_and_validate():
        parse(data).validate()

    return {
        "parse": lambda: parse(data),
        "parse+validate": parse_and_validate,
        "scan.call_id": lambda: scan.call_id(data),
        "scan.top_branch": lambda: scan.top_branch(data),
        "build_response+to_bytes": lambda: build_response(request, 200, to_tag="b2bua1")
        .to_bytes(),
    }


def check(data: bytes) -> None:
    """The figures mean nothing if the work is not what it claims to be."""
    msg = parse(data)
    msg.validate()
    assert msg.body and msg.content_type == b"application/sdp"
    assert scan.call_id(data) == msg.call_id
    assert scan.top_branch(data) == msg.via.branch.encode()
    response = parse(build_response(msg, 200, to_tag="b2bua1").to_bytes())
    assert response.to.tag == "b2bua1" and response.call_id == msg.call_id


def profile(fn: Callable[[], object], calls: int = PROFILE_CALLS) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(10)
    return out.getvalue()


def pin_to_one_core() -> set[int] | None:
    """Run on one CPU so the figures are per core; returns the old set to restore."""
    try:
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {max(allowed)})
        return allowed
    except (AttributeError, OSError):
        return None


def main() -> None:
    data = SEED_INVITE.read_bytes()
    check(data)
    previous = pin_to_one_core()
    try:
        print(f"message: {SEED_INVITE.name}, {len(data)} bytes; best of {RUNS} runs of "
              f"~{RUN_SECONDS:.0f} s, one core")
        for name, fn in workloads(data).items():
            rate = calls_per_second(fn)
            target = TARGETS.get(name)
            verdict = ""
            if target:
                verdict = f"   target >= {target:,}/s: {'met' if rate >= target else 'MISSED'}"
            print(f"  {name:<24} {rate:>12,.0f} /s {1e6 / rate:>9.2f} µs each{verdict}",
                  flush=True)
        print(f"cProfile of parse+validate, {PROFILE_CALLS:,} calls, top 10 by own time:")
        print(profile(workloads(data)["parse+validate"]))
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


if __name__ == "__main__":
    main()
