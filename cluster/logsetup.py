"""Logging for every process: one line per event, role and process name first.

Lines about a call carry its Call-ID as ``call-id=<value>`` (see ``call_log``),
so ``grep call-id=<id> run/log/*.log`` follows a call across processes.
"""

from __future__ import annotations

import logging
import os
import sys

from .config import Config


def setup_logging(config: Config, name: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {name}[{os.getpid()}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())


class CallLog(logging.LoggerAdapter):
    """A logger that prefixes every line with the Call-ID it is about."""

    def process(self, msg, kwargs):
        return f"call-id={self.extra['call_id']} {msg}", kwargs


def call_log(logger: logging.Logger, call_id: bytes | str) -> CallLog:
    if isinstance(call_id, bytes):
        call_id = call_id.decode("latin-1")
    return CallLog(logger, {"call_id": call_id})
