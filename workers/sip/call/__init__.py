"""A B2BUA call as a pure state machine (machine.py) and the actions it returns
(actions.py); the shell that runs it is workers/sip/b2bua.py."""

from .actions import ACTIONS, Action, Actions, Cdr, Out, Reply, check
from .machine import (
    ADMIN_HANGUP,
    COMPLETED_ELSEWHERE,
    MEDIA_TIMEOUT,
    NO_ANSWER,
    NORMAL_CLEARING,
    ORIGINATOR_CANCEL,
    RECOVERY_ON_TIMER_EXPIRE,
    RELAYED_HEADERS,
    RELAYED_METHODS,
    STATUS_CAUSES,
    WAIT_ONLY,
    Call,
    Ctx,
    Ids,
    Leg,
    Settings,
    Target,
    best_final,
)

__all__ = [
    "ACTIONS", "ADMIN_HANGUP", "COMPLETED_ELSEWHERE", "MEDIA_TIMEOUT", "NO_ANSWER",
    "NORMAL_CLEARING", "ORIGINATOR_CANCEL", "RECOVERY_ON_TIMER_EXPIRE", "RELAYED_HEADERS",
    "RELAYED_METHODS", "STATUS_CAUSES", "WAIT_ONLY", "Action", "Actions", "Call", "Cdr", "Ctx",
    "Ids", "Leg", "Out", "Reply", "Settings", "Target", "best_final", "check",
]
