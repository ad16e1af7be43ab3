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
import subprocess
import time
from pathlib import Path

import redis
from harness import wait_for
from sentinels import SentinelSet, start_replica

from conftest import REDIS_SERVER, free_tcp_port


def _wait_ping(port: int, timeout: float = 10.0) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5,
                         socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis on port {port} did not answer within {timeout} s")
    finally:
        client.close()


class AofRedis:
    """A redis-server on 127.0.0.1 that keeps its data in an append-only file."""

    def __init__(self, directory: Path, port: int = 0, extra: tuple[str, ...] = ()):
        self.directory = directory
        self.port = port or free_tcp_port()
        self.extra = extra
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self) -> AofRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ping(self.port)
        return self

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server must die too
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    stop = kill9

    def pause(self, seconds: float) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def refuse_writes(self, seconds: float) -> None:
        """maxmemory far below what is used, with noeviction: every write gets OOM."""
        client = self.client()
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
