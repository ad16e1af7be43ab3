"""The checkout against a reference revision, on this machine, in this invocation.

CPU figures move with the machine's load, and a figure printed last week compares with
nothing: so `make bench` also measures the call of bench_scale.py (shipped
configuration, 2 workers, RATE calls/s for SECONDS s, digest on every call, relay mode)
on the reference revision and on this checkout, alternately (ref, this, ref, this...:
load drift hits both alike), and prints the ratio this / reference of CPU per call and of
Redis round trips per call.  Round trips per call are a count, not a timing: their ratio
is exact on any machine; the CPU ratio is only as steady as the load printed beside it.

BENCH_REF: the revision to compare with; default the merge-base of HEAD and ``main`` (what
this branch started from), or HEAD~1 on main itself.  BENCH_REF=none skips it.
BENCH_REF_ROUNDS: runs of each (default 2).  The reference is exported with `git archive`
into a temporary folder and run with PYTHONPATH pointing at it, so the cluster processes
it starts run its code; a reference without bench/bench_scale.py, or no git, is skipped
with the reason printed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUNDS = 2
RESULT_MARK = "BENCH-REFERENCE-RESULT "
# Run inside the tree measured (PYTHONPATH and cwd), so ``bench`` is that tree's own.
DRIVER = f"""
import json, sys, tempfile
from pathlib import Path
from bench import bench_scale as s
row = s.measure(2, s.SHIPPED, True, Path(tempfile.mkdtemp(prefix="bench-ref-")), search=False)
keep = ("cpu_ms", "reads", "commands", "ok", "failed", "load", "load_after", "role_ms")
print({RESULT_MARK!r} + json.dumps({{k: row[k] for k in keep}}), flush=True)
"""
RUN_TIMEOUT = 240  # seconds for one run (start, idle window, calls, stop: ~30 s)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def default_ref() -> str:
    """The merge-base with main (where this branch left it), HEAD~1 when HEAD is main's."""
    head = git("rev-parse", "HEAD")
    try:
        base = git("merge-base", "HEAD", "main")
    except subprocess.CalledProcessError:
        base = ""
    return base if base and base != head else "HEAD~1"


def export(ref: str, into: Path) -> str:
    """The tree of ``ref`` in ``into``; its full commit id."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def run_one(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", DRIVER], cwd=tree, env=env, text=True,
                          capture_output=True, timeout=RUN_TIMEOUT)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"no result (exit {done.returncode}): {done.stderr.strip()[-600:]}")


def show(label: str, row: dict) -> None:
    print(f"  {label:10} cpu {row['cpu_ms']:6.2f} ms/call  rt {row['reads']:5.1f}/call  "
          f"cmd {row['commands']:5.1f}/call  ok {row['ok']} failed {row['failed']}  "
          f"load {row['load']} / {row['load_after']}", flush=True)


def main() -> dict | None:
    ref = os.environ.get("BENCH_REF", "")
    if ref.lower() == "none":
        print("  reference comparison skipped (BENCH_REF=none)")
        return None
    if shutil.which("git") is None or shutil.which("tar") is None:
        print("  reference comparison skipped: no git or tar on PATH")
        return None
    rounds = max(1, int(os.environ.get("BENCH_REF_ROUNDS", DEFAULT_ROUNDS)))
    work = Path(tempfile.mkdtemp(prefix="bench-reference-"))
    try:
        try:
            ref = ref or default_ref()
            commit = export(ref, work)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"  reference comparison skipped: revision {ref!r} unavailable ({exc})")
            return None
        if not (work / "bench" / "bench_scale.py").exists():
            print(f"  reference comparison skipped: {ref} ({commit[:10]}) has no "
                  f"bench/bench_scale.py")
            return None
        print(f"  reference {ref} ({commit[:10]}) vs this checkout ({ROOT}): shipped "
              f"configuration, 2 workers, {rounds} alternate run(s) each", flush=True)
        runs: dict[str, list[dict]] = {"reference": [], "this": []}
        for _ in range(rounds):
            for label, tree in (("reference", work), ("this", ROOT)):
                row = run_one(tree)
                runs[label].append(row)
                show(label, row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # A run with failed calls (overload on a busy machine: 503s, timeouts) spent work on
    # calls it does not count: its figures per call are inflated.  Left out of the medians
    # when each side has a run without.
    clean = {label: [r for r in rows if not r["failed"]] for label, rows in runs.items()}
    if all(clean.values()):
        runs = clean
    else:
        print("  (every run of one side had failed calls: its figures per call are inflated)")
    med = {label: {key: statistics.median(r[key] for r in rows)
                   for key in ("cpu_ms", "reads", "commands")} for label, rows in runs.items()}
    ratio = {key: med["this"][key] / med["reference"][key] if med["reference"][key] else
             float("nan") for key in ("cpu_ms", "reads", "commands")}
    print(f"  this / reference (medians of {len(runs['this'])} and {len(runs['reference'])} "
          f"runs): CPU per call {ratio['cpu_ms']:.2f} "
          f"({med['this']['cpu_ms']:.2f} / {med['reference']['cpu_ms']:.2f} ms), "
          f"round trips per call {ratio['reads']:.2f} ({med['this']['reads']:.1f} / "
          f"{med['reference']['reads']:.1f}), commands per call {ratio['commands']:.2f}",
          flush=True)
    return {"reference": commit[:12], "ratio_cpu_per_call": round(ratio["cpu_ms"], 3),
            "ratio_round_trips_per_call": round(ratio["reads"], 3),
            "ratio_commands_per_call": round(ratio["commands"], 3)}
