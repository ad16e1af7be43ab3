"""A B2BUA call as a pure state machine, in parts that each fit on a few screens:

machine.py   the Call: its record, its transactions, the table driver, creation
state.py     call states, call-level events and the table (state, event) -> (handler, next)
inbound.py   messages and timers in: transactions, each leg's bookkeeping, then the table
handlers.py  what the table's rows run
outbound.py  what the call sends (ACK, CANCEL, BYE, answers, requests passed on) and its end
legs.py      a leg and its states
wire.py      settings, inputs (Ctx, Target), causes, header builders
actions.py   the actions the call returns to the shell (workers/sip/b2bua.py)
media.py     the media port the shell declares, and the pure views the call sees
"""

from .actions import ACTIONS, Action, Actions, Cdr, Out, Reply, check
from .legs import Leg, LegState
from .machine import Call
from .state import IGNORED, TABLE, CallState, Event
from .wire import (
    ADMIN_HANGUP,
    COMPLETED_ELSEWHERE,
    HOST_DOWN,
    MEDIA_TIMEOUT,
    NO_ANSWER,
    NORMAL_CLEARING,
    ORIGINATOR_CANCEL,
    RECOVERY_ON_TIMER_EXPIRE,
    RELAYED_HEADERS,
    RELAYED_METHODS,
    STATUS_CAUSES,
    WAIT_ONLY,
    Ctx,
    Ids,
    Settings,
    Target,
    best_final,
)

__all__ = [
    "ACTIONS", "ADMIN_HANGUP", "COMPLETED_ELSEWHERE", "HOST_DOWN", "IGNORED", "MEDIA_TIMEOUT",
    "NO_ANSWER",
    "NORMAL_CLEARING", "ORIGINATOR_CANCEL", "RECOVERY_ON_TIMER_EXPIRE", "RELAYED_HEADERS",
    "RELAYED_METHODS", "STATUS_CAUSES", "TABLE", "WAIT_ONLY", "Action", "Actions", "Call",
    "CallState", "Cdr", "Ctx", "Event", "Ids", "Leg", "LegState", "Out", "Reply", "Settings",
    "Target", "best_final", "check",
]
