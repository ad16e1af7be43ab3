"""Logging for every process: one line per event, role and process name first.

Lines about a call carry its Call-ID as ``call-id=<value>`` (see ``call_log``),
so ``grep call-id=<id> run/log/*.log`` follows a call across processes.

Whatever reaches a line came from somewhere, often from the wire (a Call-ID, a user
part, a User-Agent): the formatter passes the whole message through ``escape_controls``,
so no record spans two lines (a CR LF in a dialled number cannot forge a second record)
and no record carries terminal controls (ESC sequences that clear or retitle the
operator's terminal).  The rule is in cluster/escape.py; sipctl prints what it reads
from Redis through the same rule.
"""

from __future__ import annotations

import logging
import os
import sys

from .config import Config
from .escape import escape_controls


class EscapingFormatter(logging.Formatter):
    """The final message escaped (arguments included, whoever wrote the call); a
    traceback keeps its lines, each escaped and indented by ``  | `` so none of them
    can pass for a record of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  | " + escape_controls(line) for line in text.split("\n"))


class BatchedStream(logging.StreamHandler):
    """Lines below ``urgent`` are held up to ``delay`` seconds and written together.

    supervisord reads each program's output and writes it to the program's log: every
    write a program makes wakes it.  A loaded worker wrote two INFO lines a call, one write
    each, and supervisord spent 0.25-0.43 ms of CPU a call on them (bench_scale, 40-110
    calls/s).  So the first line held arms one flush ``delay`` later (``schedule(delay,
    fn)``, the process's own timer: given, so that this module stays free of any
    scheduler); a line at ``urgent`` or above, or ``limit`` lines held, write at once, the
    held ones first (a warning is never held, and the order is kept).  At exit
    ``logging.shutdown`` flushes what is held; a process killed outright loses at most
    ``delay`` seconds of lines below ``urgent``."""

    def __init__(self, stream, schedule, delay: float = 0.2, urgent: int = logging.WARNING,
                 limit: int = 256) -> None:
        super().__init__(stream)
        self._schedule = schedule
        self._delay = delay
        self._urgent = urgent
        self._limit = limit
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's rule: a bad record is reported, never raised
            self.handleError(record)
            return
        self._held.append(line)
        if record.levelno >= self._urgent or len(self._held) >= self._limit:
            self.flush()
        elif len(self._held) == 1:
            self._schedule(self._delay, self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            held, self._held = self._held, []
            if held:
                self.stream.write("\n".join(held) + "\n")
            super().flush()
        except Exception:  # noqa: BLE001 - a log that cannot be written must not stop work
            pass
        finally:
            self.release()


def setup_logging(config: Config, name: str, schedule=None) -> None:
    """The root logger writes escaped lines to stderr (supervisord's log of the program);
    with ``schedule`` (``schedule(delay, fn)``: the process's timer) lines below WARNING
    are written in batches (``BatchedStream``)."""
    handler = (logging.StreamHandler(sys.stderr) if schedule is None
               else BatchedStream(sys.stderr, schedule))
    handler.setFormatter(EscapingFormatter(
        f"%(asctime)s %(levelname)s {escape_controls(name)}[{os.getpid()}] %(name)s: "
        "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())
    # The format names no thread: under gevent, asking for the thread of each record made
    # a dummy thread per greenlet, 1.6% of a loaded worker's CPU (py-spy, bench_profile).
    logging.logThreads = False


class CallLog(logging.LoggerAdapter):
    """A logger that prefixes every line with the Call-ID it is about."""

    def process(self, msg, kwargs):
        return f"call-id={self.extra['call_id']} {msg}", kwargs

    def log(self, level, msg, *args, **kwargs):
        # The prefix joins the format string: a "%" in a Call-ID would be taken for a
        # conversion (a "%s" eating an argument, or a TypeError that loses the record)
        # when there are arguments to format, so it is doubled then (and only then:
        # without arguments logging leaves the string as it is).
        if self.isEnabledFor(level):
            call_id = self.extra["call_id"]
            if args:
                call_id = call_id.replace("%", "%%")
            self.logger.log(level, f"call-id={call_id} {msg}", *args, **kwargs)


def call_log(logger: logging.Logger, call_id: bytes | str) -> CallLog:
    # Escaped here too (the formatter would anyway), so the prefix reads the same under
    # any handler (tests' caplog) and is escaped once per call, not once per line.
    return CallLog(logger, {"call_id": escape_controls(call_id)})
