"""The Redis a fault-matrix cell runs on, with the faults that can be done to it.

``AofRedis`` is one redis-server that persists like the one ``make run`` manages (AOF,
fsync every second) and can be killed with SIGKILL, paused with SIGSTOP, made to refuse
writes (maxmemory) and started again on the same port and folder.  ``SentinelRedis`` is a
primary, a replica and three sentinels; its fault is the primary's death and the
replica's promotion.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from conftest import REDIS_SERVER, free_tcp_port

REDIS_SENTINEL = shutil.which("redis-sentinel")
MASTER_NAME = "sipcluster"


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
    """A primary, one replica and three sentinels (quorum 2) on loopback."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.servers = [AofRedis(directory / "primary"), AofRedis(
            directory / "replica")]
        self.sentinel_ports = [free_tcp_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> SentinelRedis:
        primary, replica = self.servers
        primary.start()
        replica.extra = ("--replicaof", "127.0.0.1", str(primary.port))
        replica.start()
        for index, port in enumerate(self.sentinel_ports):
            folder = self.directory / f"sentinel-{index}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n")
            self.sentinels.append(subprocess.Popen(
                [REDIS_SENTINEL, str(conf)], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        for port in self.sentinel_ports:
            _wait_ping(port)
        self._wait_replica_synced()
        return self

    def _wait_replica_synced(self, timeout: float = 10.0) -> None:
        client = self.servers[1].client()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if client.info("replication").get("master_link_status") == "up":
                    return
                time.sleep(0.1)
            raise RuntimeError("the replica did not sync with the primary")
        finally:
            client.close()

    def primary_port(self) -> int:
        client = redis.Redis(host="127.0.0.1", port=self.sentinel_ports[0], socket_timeout=1.0)
        try:
            return int(client.execute_command(
                "SENTINEL", "get-master-addr-by-name", MASTER_NAME)[1])
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.primary_port(), socket_timeout=2.0)

    def fail_over(self, timeout: float = 15.0) -> float:
        """Kill the primary; seconds until the sentinels name the replica instead.  The old
        primary comes back afterwards (as a replica of the new one)."""
        old = next(s for s in self.servers if s.port == self.primary_port())
        old.kill9()
        killed = time.monotonic()
        deadline = killed + timeout
        while time.monotonic() < deadline:
            try:
                if self.primary_port() != old.port:
                    break
            except redis.RedisError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("no replica was promoted")
        promoted = time.monotonic() - killed
        old.start()  # the sentinels turn it into a replica of the new primary
        return promoted

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for server in self.servers:
            server.kill9()
