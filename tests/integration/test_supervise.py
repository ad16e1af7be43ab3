"""supervisord as the cluster runs it (``python -m cluster.supervise``), on a real
supervisord with one program: a program killed with SIGKILL is started again at once,
and an idle supervisord sleeps instead of waking ten times a second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procstat import wakeups

ROOT = Path(__file__).resolve().parents[2]
# A restart within this of the kill: the SIGCHLD wakes the loop, the next pass spawns.
# Stock supervisord (and a wake-up-less loop) took 1.0 s here.
RESTART_WITHIN = 0.5
IDLE_SECONDS = 3.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def supervisord(tmp_path):
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"""
[supervisord]
pidfile = {tmp_path}/supervisord.pid
logfile = {tmp_path}/supervisord.log
nodaemon = true
[unix_http_server]
file = {tmp_path}/supervisor.sock
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[program:sleeper]
command = sleep 600
autorestart = unexpected
startsecs = 1
stdout_logfile = {tmp_path}/sleeper.log
redirect_stderr = true
""")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.supervise", "-c", str(conf)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)


def running(tmp_path: Path) -> bool:
    log = tmp_path / "supervisord.log"
    return log.exists() and "entered RUNNING state" in log.read_text()


def test_a_killed_program_is_started_again_at_once(supervisord, tmp_path):
    assert wait_for(lambda: running(tmp_path), 10.0), "sleeper never ran"
    (first,) = children(supervisord.pid)
    os.kill(first, signal.SIGKILL)
    killed = time.monotonic()
    fresh = wait_for(lambda: [p for p in children(supervisord.pid) if p != first], 5.0)
    took = time.monotonic() - killed
    assert fresh, (tmp_path / "supervisord.log").read_text()
    assert took < RESTART_WITHIN, f"restarted {took:.2f} s after the kill"


def test_an_idle_supervisord_sleeps(supervisord, tmp_path):
    assert wait_for(lambda: running(tmp_path), 10.0), "sleeper never ran"
    time.sleep(0.3)  # out of STARTING: the short sleeps are over
    before = wakeups(supervisord.pid)
    time.sleep(IDLE_SECONDS)
    woke = wakeups(supervisord.pid) - before
    # One pass a second (supervisord's own 1 s poll), not ten.
    assert woke <= IDLE_SECONDS + 2, f"{woke} wake-ups in {IDLE_SECONDS} s"


def test_programs_are_started_at_once(supervisord, tmp_path):
    """Stock supervisord's loop slept its 1 s before the first pass spawned anything."""
    assert wait_for(lambda: running(tmp_path), 10.0), "sleeper never ran"
    log = (tmp_path / "supervisord.log").read_text().splitlines()
    started = next(line for line in log if "supervisord started" in line)
    spawned = next(line for line in log if "spawned: 'sleeper'" in line)
    gap = stamp(spawned) - stamp(started)
    assert gap < RESTART_WITHIN, f"spawned {gap:.2f} s after supervisord started"


def stamp(line: str) -> float:
    """Seconds of a supervisord log line's time stamp ("2026-12-07 15:03:46,734 ...")."""
    clock = line.split()[1]
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds.replace(",", "."))
