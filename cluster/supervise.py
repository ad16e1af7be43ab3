"""supervisord as the cluster runs it: a program that dies is started again at once, and
an idle supervisord sleeps.

supervisord's main loop sleeps in ``poll(1.0)``; a SIGCHLD does not cut that sleep
short (the call is resumed after the handler, PEP 475), and the restart of a reaped
program happens one loop later.  So a dispatcher or relay killed with SIGKILL waited
0 to 2 s before its new process was even forked: measured here 1.0 s between
"exited: relay-1" and "spawned: 'relay-1'" in supervisord's own log, most of the 1.29 s
of lost media.

Capping every sleep at 0.1 s fixed that, at 10 wake-ups a second for ever: 0.2% of a
core with six idle programs (bench_idle), a tenth of an idle cluster's CPU.  Instead the
loop is paced (``Pace``):
- a SIGCHLD wakes the sleeping ``poll`` at once: the signal's byte lands on a pipe that
  the poll watches (``signal.set_wakeup_fd``), so the child is reaped in that pass;
- the pass after a reap or any change of a program's state does not sleep, so an
  unexpected exit is restarted right away and the programs are started at once;
- while a program is starting, backing off or stopping, sleeps are at most
  ``BUSY_POLL_SECONDS`` (the startsecs, backoff and stopwaitsecs clocks stay sharp);
- otherwise the loop sleeps as long as supervisord asks (1 s).

Run as ``python -m cluster.supervise -c run/supervisord.conf``: the same arguments as
``supervisord``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable

from supervisor import options, poller, supervisord
from supervisor.states import ProcessStates

BUSY_POLL_SECONDS = 0.1
BUSY_STATES = frozenset({ProcessStates.STARTING, ProcessStates.BACKOFF,
                         ProcessStates.STOPPING})


class Pace:
    """How long supervisord's next poll may sleep, from what its programs are doing."""

    def __init__(self) -> None:
        self.reaped = False  # a child was reaped since the last poll
        # the programs' states, once supervisord runs
        self.states: Callable[[], Iterable[int]] = tuple
        self._last: tuple[int, ...] | None = None  # the states at the last poll

    def timeout(self, asked: float) -> float:
        states = tuple(self.states())
        changed, self._last = states != self._last, states
        if self.reaped or changed:
            # The pass that follows a change acts on it at once: the first one starts
            # the programs (stock supervisord slept 1 s before it spawned anything), the
            # one after a reap restarts what died.
            self.reaped = False
            return 0.0
        if any(state in BUSY_STATES for state in states):
            return min(asked, BUSY_POLL_SECONDS)
        return asked


def process_states(supervisor) -> Iterable[int]:
    for group in supervisor.process_groups.values():
        for process in group.processes.values():
            yield process.state


def install(pace: Pace) -> None:
    """Pace supervisord's loop (before ``supervisord.main``)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    run_forever = supervisord.Supervisor.runforever

    def paced_runforever(self):
        pace.states = lambda: process_states(self)
        # Signals with a Python handler (supervisord sets SIGCHLD's) write a byte here.
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        return run_forever(self)

    waitpid = options.ServerOptions.waitpid

    def noting_waitpid(self):
        pid, sts = waitpid(self)
        if pid:
            pace.reaped = True
        return pid, sts

    # The poller supervisord picked for this platform (poll on Linux, kqueue, select): the
    # pipe is registered through its own API, so every one of them wakes for a signal.
    poll = poller.Poller.poll

    def paced_poll(self, timeout):
        if not getattr(self, "_wake_watched", False):
            self.register_readable(wake_r)
            self._wake_watched = True
        readables, writables = poll(self, pace.timeout(timeout))
        if wake_r in readables:
            # Not supervisord's: it would unregister a readable fd it does not know.
            readables.remove(wake_r)
            _drain(wake_r)
        return readables, writables

    supervisord.Supervisor.runforever = paced_runforever
    options.ServerOptions.waitpid = noting_waitpid
    poller.Poller.poll = paced_poll


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main(argv: list[str] | None = None) -> None:
    install(Pace())
    supervisord.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
