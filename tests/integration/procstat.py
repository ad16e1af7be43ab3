"""What /proc says about a process: resident memory, open descriptors, their limit."""

from __future__ import annotations

import os
from pathlib import Path


def rss_kb(pid: int) -> int:
    """Resident set size in kB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    """Open file descriptors (0 when the process is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_limit(pid: int) -> str:
    """The soft limit on open files, as /proc/<pid>/limits gives it."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    except OSError:
        pass
    return "?"


def cpu_and_wakeups(pid: int) -> tuple[float, int]:
    """(seconds on a CPU, voluntary context switches) summed over every thread of ``pid``.

    CPU comes from schedstat in nanoseconds: the clock-tick figures of /proc/<pid>/stat
    move in 10 ms steps, as large as an idle process's CPU over 20 s.  A voluntary
    context switch is a wake-up from a sleep (a poll, a select, a lock)."""
    seconds, switches = 0.0, 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0, 0
    for task in tasks:
        try:
            seconds += int((task / "schedstat").read_text().split()[0]) / 1e9
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return seconds, switches


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` so far."""
    return cpu_and_wakeups(pid)[1]
