"""The Redis a fault-matrix cell runs on, with the faults that can be done to it.

``AofRedis`` is one redis-server that persists like the one ``make run`` manages (AOF,
fsync every second) and can be killed with SIGKILL, paused with SIGSTOP, made to refuse
writes (maxmemory) and started again on the same port and folder.  ``SentinelRedis`` is a
primary, a replica and three sentinels (tests/integration/sentinels.py); its fault is the
primary's death and the replica's promotion.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from harness import wait_for
from sentinels import SentinelSet, start_replica

from conftest import RedisServer


@dataclass
class AofRedis(RedisServer):
    """A redis-server on 127.0.0.1 that keeps its data in an append-only file."""

    appendonly: bool = True

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server must die too
        self.stop()

    def pause(self, seconds: float) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def refuse_writes(self, seconds: float) -> None:
        """maxmemory far below what is used (the policy is noeviction): every write gets
        OOM, reads still work."""
        client = self.client(socket_timeout=2.0)
        try:
            client.config_set("maxmemory", "1")
            time.sleep(seconds)
        finally:
            client.config_set("maxmemory", "0")
            client.close()


class SentinelRedis:
    """The fault matrix's view of a SentinelSet: its fault is the primary's death."""

    def __init__(self, directory: Path):
        self.set = SentinelSet(directory)

    @property
    def url(self) -> str:
        return self.set.url

    def start(self) -> SentinelRedis:
        self.set.start()
        return self

    def fail_over(self, timeout: float = 20.0) -> float:
        """Kill the primary; seconds until the sentinels name the replica instead.  The old
        primary is started again on its port (the sentinels make it a replica)."""
        old = self.set.primary
        old_port = old.port
        old.stop()
        killed = time.monotonic()
        if not wait_for(lambda: self.set.master_port() not in (None, old_port), timeout,
                        step=0.05):
            raise RuntimeError("no replica was promoted")
        promoted = time.monotonic() - killed
        self.set.primary, self.set.replica = self.set.replica, start_replica(
            old.directory, 0, port=old_port)
        return promoted

    def stop(self) -> None:
        self.set.stop()
