"""Shared test helpers: free ports, a real redis-server, fixture paths.

Tests under tests/integration/ are marked ``integration`` automatically.  They
are skipped when redis-server is not installed, except in CI (env CI set),
where a missing redis-server must fail the run instead of hiding it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
INTEGRATION = TESTS / "integration"

REDIS_SERVER = shutil.which("redis-server")
IN_CI = bool(os.environ.get("CI"))
NO_REDIS_REASON = (
    "redis-server is not installed (apt-get install -y redis-server); "
    "in CI (env CI set) this is an error, not a skip"
)


# Ports for child processes (SIPp, redis-server, a cluster's SIP port) come from a range
# below the kernel's ephemeral ports (ip_local_port_range, 32768-60999 on Debian) and above
# the well-known ones, and none is handed out twice in one test run.  A port picked with
# bind(0) is an ephemeral one: between the pick and the child's own bind any socket that
# binds or connects without a port can be given it (a SIPp run lost its port that way:
# errno 98 in its errors.log), and so can a later bind(0) pick.  The relays' RTP ranges in
# the tests are 20000 and up.  Only even ports are handed out: the odd one above each stays
# for what takes port + 1 by itself (baresip's TLS listener, RTCP).  The start is random so
# that two runs on one machine rarely walk the same ports at once.
PICK_RANGE = (10000, 19998)
_picked: set[int] = set()
_next_pick = [PICK_RANGE[0] + 2 * random.randrange((PICK_RANGE[1] - PICK_RANGE[0]) // 2 + 1)]


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(*kinds: int) -> int:
    low, high = PICK_RANGE
    for _ in range((high - low) // 2 + 1):
        port = _next_pick[0]
        _next_pick[0] = low if port >= high else port + 2
        if port not in _picked and all(_bindable(port, kind) for kind in kinds):
            _picked.add(port)
            return port
    _picked.clear()  # every port handed out once: start over
    return _pick_port(*kinds)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that is free, that the kernel does not give out by itself,
    and that no other test of this run was given."""
    return _pick_port(socket.SOCK_DGRAM)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1, as ``free_udp_port`` picks it."""
    return _pick_port(socket.SOCK_STREAM)


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1, persisting nothing unless ``appendonly``
    (then an append-only file in ``directory``, as the managed Redis of `make run` keeps)."""

    directory: Path
    port: int = 0
    appendonly: bool = False
    appendfsync: str = "everysec"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start on ``port`` (a free one when 0) and wait until it answers PING."""
        if REDIS_SERVER is None:
            raise RuntimeError(NO_REDIS_REASON)
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # a "free" port can be taken between probe and bind
            port = self.port or free_tcp_port()
            persistence = ["--appendonly", "no"]
            if self.appendonly:
                persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync,
                               "--aof-use-rdb-preamble", "yes", "--aof-load-truncated", "yes"]
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 *persistence, "--dir", str(self.directory)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if _wait_for_ping(self.process, port, timeout):
                self.port = port
                return self
            self.stop()
        raise RuntimeError(f"redis-server did not start in {self.directory}")

    def stop(self) -> None:
        """Kill the server (tests of Redis outages call this, then start() again)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, down: float = 0.0, timeout: float = 10.0) -> RedisServer:
        """kill -9, ``down`` seconds without a server, then start again on the same port
        and folder: with ``appendonly`` it loads what it had written."""
        self.stop()
        time.sleep(down)
        return self.start(timeout)


def _wait_for_ping(process: subprocess.Popen, port: int, timeout: float) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5,
                         socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                return bool(client.ping())
            except redis.RedisError:
                time.sleep(0.05)
        return False
    finally:
        client.close()


def documented_metrics() -> set[str]:
    """The metric names in deploy/README.md's metrics table (`name` in its first column)."""
    text = (ROOT / "deploy" / "README.md").read_text()
    table = text[text.index("<!-- metrics -->"):text.index("<!-- /metrics -->")]
    return set(re.findall(r"^\| `((?:sipcluster|process)_[a-z_]+)", table, re.M))


def require_tool(found: str | None, reason: str) -> None:
    """Skip when a tool the test drives is missing on a developer machine; fail in CI."""
    if found is not None:
        return
    if IN_CI:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_redis_server() -> None:
    require_tool(REDIS_SERVER, NO_REDIS_REASON)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session, on a free port in a temporary folder."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis's URL, emptied (FLUSHALL) before the test."""
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=NO_REDIS_REASON)
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
        if REDIS_SERVER is None and not IN_CI and item.get_closest_marker("integration"):
            item.add_marker(skip)
