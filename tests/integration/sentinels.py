"""Redis Sentinel for tests: a primary, one replica and three sentinels on loopback.

Used by test_sentinel.py and by the fault matrix (tests/ha).  Skipped where
redis-sentinel is not installed, except in CI (env CI set), where that fails the run.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis
from harness import wait_for

from conftest import RedisServer, free_tcp_port, require_redis_server, require_tool

REDIS_SENTINEL = shutil.which("redis-sentinel")
NO_SENTINEL_REASON = ("redis-sentinel is not installed (apt-get install -y redis-sentinel); "
                      "in CI (env CI set) this is an error, not a skip")
SERVICE = "sipcluster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def require_sentinel() -> None:
    require_redis_server()
    require_tool(REDIS_SENTINEL, NO_SENTINEL_REASON)


@dataclass
class SentinelSet:
    """A primary, one replica and three sentinels, each a child process on 127.0.0.1."""

    directory: Path
    primary: RedisServer | None = None
    replica: RedisServer | None = None
    sentinel_ports: list[int] = field(default_factory=list)
    sentinels: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelSet:
        self.primary = RedisServer(self.directory / "a").start()
        self.replica = start_replica(self.directory / "b", self.primary.port)
        for index in range(3):
            self.sentinel_ports.append(self._start_sentinel(index))
        # Ready when every sentinel knows the replica and the two other sentinels: only
        # then can they agree on a failover.
        assert wait_for(self.all_see_everything, 20.0, step=0.2), "sentinels did not settle"
        return self

    def _start_sentinel(self, index: int) -> int:
        folder = self.directory / f"sentinel-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # a "free" port can be taken between probe and bind
            port = free_tcp_port()
            conf = folder / "sentinel.conf"  # Sentinel rewrites it: one per process
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            process = subprocess.Popen([REDIS_SENTINEL, str(conf)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                if wait_for(lambda c=client: _pings(c), 5.0) and process.poll() is None:
                    self.sentinels.append(process)
                    return port
            finally:
                client.close()
            process.kill()
            process.wait(timeout=10)
        raise RuntimeError("redis-sentinel did not start")

    def _ask_each(self, question) -> list:
        """``question(client)`` of every sentinel; None from one that does not answer."""
        answers = []
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                answers.append(question(client))
            except (redis.RedisError, TypeError):
                answers.append(None)
            finally:
                client.close()
        return answers

    def all_see_everything(self) -> bool:
        return all(self._ask_each(lambda c: len(c.sentinel_slaves(SERVICE)) >= 1
                                  and len(c.sentinel_sentinels(SERVICE)) >= 2))

    def _named_primaries(self) -> list[int | None]:
        return self._ask_each(lambda c: int(c.sentinel_get_master_addr_by_name(SERVICE)[1]))

    def all_name(self, port: int) -> bool:
        """Every sentinel names ``port`` as the primary (a failover has reached them all)."""
        return all(named == port for named in self._named_primaries())

    def other_than(self, port: int) -> RedisServer:
        """Of the two servers, the one not on ``port``."""
        return self.replica if port == self.primary.port else self.primary

    def settled_primary(self) -> int | None:
        """The primary's port once a failover or demotion is over: every sentinel names it,
        it says it is a primary, and the other server replicates it with its link up; else
        None (a test's own failover reconfigures the set for seconds after it)."""
        named = self._named_primaries()
        if None in named or len(set(named)) != 1:
            return None
        port = named[0]
        other = self.other_than(port).port
        try:
            with redis.Redis(port=port, socket_timeout=0.5) as head:
                if head.info("replication").get("role") != "master":
                    return None
        except redis.RedisError:
            return None
        with redis.Redis(port=other, socket_timeout=0.5) as follower:
            return port if replicating(follower, port) else None

    def wait_settled(self, timeout: float = 60.0) -> int:
        """The primary's port, waiting until the set has settled (settled_primary).

        The sentinels turn a demoted or returning primary into a replica by themselves,
        within seconds, unless one is in TILT mode (its timer stalled for 2 s on a loaded
        machine: no action for 30 s, seen once in CI).  Past ``nudge_after`` seconds the
        test does what an operator would and points the other server at the primary the
        sentinels name; the set is the fixture here, not what is under test."""
        nudge_after = 15.0
        port = wait_for(self.settled_primary, min(nudge_after, timeout), step=0.2)
        if not port:
            self._nudge()
            port = wait_for(self.settled_primary, max(timeout - nudge_after, 1.0), step=0.2)
        assert port, f"the sentinel set did not settle: {self._diagnosis()}"
        return port

    def _nudge(self) -> None:
        named = self._named_primaries()
        if None in named or len(set(named)) != 1:
            return
        port = named[0]
        other = self.other_than(port).port
        try:
            with redis.Redis(port=other, socket_timeout=1.0) as follower:
                follower.replicaof("127.0.0.1", port)
        except redis.RedisError:
            pass

    def tilt(self) -> list:
        """Each sentinel's TILT flag (1: its timer stalled, it takes no action for 30 s)."""
        return self._ask_each(lambda c: c.info().get("sentinel_tilt"))

    def _diagnosis(self) -> str:
        """What each sentinel names and whether it is in TILT, and each server's role."""
        tilt = self.tilt()
        servers = "; ".join(_replication(s.port) for s in (self.primary, self.replica))
        return f"named {self._named_primaries()}, tilt {tilt}, servers {servers}"

    def master_port(self) -> int | None:
        """The primary's port as a majority of the sentinels report it."""
        votes = Counter(p for p in self._named_primaries() if p is not None)
        best = max(votes.items(), key=lambda kv: kv[1], default=(None, 0))
        return best[0] if best[1] >= 2 else None

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for server in (self.primary, self.replica):
            if server is not None:
                server.stop()


def replicating(client: redis.Redis, primary_port: int | None = None) -> bool:
    """The server is a replica (of ``primary_port`` when given) with its link up.  A
    server turned into a replica drops its clients (seen once in CI, "Connection reset by
    peer"): an error is "not yet", the next look reconnects."""
    try:
        info = client.info("replication")
    except redis.RedisError:
        return False
    return (info.get("role") == "slave" and info.get("master_link_status") == "up"
            and primary_port in (None, info.get("master_port")))


def start_replica(directory: Path, primary_port: int, port: int = 0) -> RedisServer:
    """A redis-server replicating ``primary_port`` (or on ``port`` with no REPLICAOF when
    primary_port is 0: the old primary coming back, left to the sentinels to demote)."""
    server = RedisServer(directory, port=port).start()
    if primary_port:
        client = server.client()
        try:
            for _ in range(SYNC_TRIES):
                # Asked again after a while: a sentinel may have reconfigured it meanwhile,
                # and the primary's fork for the full sync waits for a rewrite of its own
                # on a loaded machine (10 s were not enough once in CI, under the matrix).
                client.replicaof("127.0.0.1", primary_port)
                if wait_for(lambda: replicating(client, primary_port), SYNC_WAIT, step=0.1):
                    break
            else:
                raise AssertionError(f"the replica did not sync: {_replication(server.port)}"
                                     f", its primary: {_replication(primary_port)}")
        finally:
            client.close()
    return server


SYNC_TRIES, SYNC_WAIT = 3, 10.0


def _replication(port: int) -> str:
    """A server's replication state, for a failure message."""
    try:
        with redis.Redis(port=port, socket_timeout=0.5) as client:
            info = client.info("replication")
    except redis.RedisError as exc:
        return f"{port}: {exc!r}"
    keys = ("role", "master_port", "master_link_status", "master_sync_in_progress",
            "connected_slaves", "slave0")
    return f"{port}: " + ", ".join(f"{k}={info[k]}" for k in keys if k in info)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
