"""What a call asks the shell to do: the one vocabulary the call returns and the shell
(workers/sip/b2bua.py) performs.  Nothing else leaves the call: its timers are in its
record (``Call.timer_entries``), and what its transactions report is consumed inside.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Out:
    """Send ``data`` to ``dest`` from host ``host``'s SIP socket ``sock_index``."""

    data: bytes
    dest: tuple[str, int]
    host: str
    sock_index: int = 0


@dataclass(frozen=True)
class Reply:
    """An answer the shell sends statelessly to the request at hand (no transaction)."""

    status: int
    reason: str | None = None


@dataclass(frozen=True)
class Cdr:
    """The call ended: write this CDR (the shell adds the relay's media figures)."""

    record: dict


Action = Out | Reply | Cdr
ACTIONS: tuple[type, ...] = (Out, Reply, Cdr)
Actions = list[Action]


def check(actions: list) -> list:
    """``actions``, or TypeError for anything outside the vocabulary (tests run every
    event through this, so an action the shell would not perform fails a test)."""
    for action in actions:
        if type(action) not in ACTIONS:
            raise TypeError(f"a call returned {action!r}, which the shell does not perform")
    return actions
