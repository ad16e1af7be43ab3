"""Run every bench/bench_*.py module's main() in name order, then show the machine's load.

`python -m bench` runs them all, then the comparison with a reference revision
(reference.py: the ratio of CPU and of Redis round trips per call, this checkout over
the reference, measured alternately in this invocation); `python -m bench NAME ...` only
those named (with or without the bench_ prefix; ``reference`` for the comparison).
A main() prints its own figures; if it also returns a mapping of figures, they are
printed here as well.  The load average and CPU model are printed because figures from
a busy or different machine do not compare.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


REFERENCE = "reference"


def bench_modules(names: list[str]) -> list[str]:
    found = sorted(path.stem for path in BENCH_DIR.glob("bench_*.py"))
    if not names:
        return [*found, REFERENCE]
    if REFERENCE in names:  # last, whatever the order given
        others = [n for n in names if n != REFERENCE]
        return [*(bench_modules(others) if others else []), REFERENCE]
    wanted = [name if name.startswith("bench_") else f"bench_{name}" for name in names]
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(found)}")
    return wanted


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_line() -> str:
    load1, load5, load15 = os.getloadavg()
    return (f"load average {load1:.2f} {load5:.2f} {load15:.2f}; "
            f"nproc {len(os.sched_getaffinity(0))}; cpu {cpu_model()}")


def run(name: str) -> bool:
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    try:
        figures = importlib.import_module(f"bench.{name}").main()  # reference.py too
    except Exception as e:  # one broken benchmark must not hide the others' figures
        print(f"!! {name} failed: {type(e).__name__}: {e}", flush=True)
        return False
    if isinstance(figures, Mapping):
        for key, value in figures.items():
            print(f"   {key}: {value}")
    print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    return True


def main(argv: list[str]) -> int:
    names = bench_modules(argv)
    print(f"machine: {machine_line()}", flush=True)
    if not names:
        print("no bench/bench_*.py modules")
        return 0
    results = [run(name) for name in names]
    print(f"machine after: {machine_line()}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
