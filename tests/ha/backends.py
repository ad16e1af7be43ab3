"""The Redis a fault-matrix cell runs on, with the faults that can be done to it.

``AofRedis`` is one redis-server that persists like the one ``make run`` manages (AOF,
fsync every second) and can be killed with SIGKILL, paused with SIGSTOP, made to refuse
writes (maxmemory) and started again on the same port and folder.  ``SentinelRedis`` is a
primary, a replica and three sentinels (tests/integration/sentinels.py); its fault is the
primary's death and the replica's promotion.  ``ClusterRedis`` is a 6-node Redis Cluster
(tests/integration/rediscluster.py); its faults are a live resharding, a primary's
replica taking over (CLUSTER FAILOVER) and a primary killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from harness import wait_for
from rediscluster import RedisClusterSet
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
        self.all_named_after: float | None = None  # seconds, of the last fail_over
        self.tilt: list | None = None  # each sentinel's TILT flag once all named the new one

    @property
    def url(self) -> str:
        return self.set.url

    def start(self) -> SentinelRedis:
        self.set.start()
        return self

    def fail_over(self, timeout: float = 20.0) -> float:
        """Kill the primary; seconds until the sentinels name the replica instead.  The old
        primary comes back on its port as a replica of the new one, once every sentinel
        names the new one.  (This test Redis keeps no data across a restart: came back as
        an empty primary while a sentinel still named it, it took writes that its demotion
        then discarded; seen once in CI as 481s and no CDR.  A real one returns with its
        append-only file and is demoted by the sentinels.)"""
        old = self.set.primary
        old_port = old.port
        old.stop()
        killed = time.monotonic()
        if not wait_for(lambda: self.set.master_port() not in (None, old_port), timeout,
                        step=0.05):
            raise RuntimeError("no replica was promoted")
        promoted = time.monotonic() - killed
        new_port = self.set.replica.port
        if not wait_for(lambda: self.set.all_name(new_port), timeout, step=0.05):
            raise RuntimeError("the sentinels did not all learn of the failover")
        self.all_named_after = time.monotonic() - killed
        self.tilt = self.set.tilt()
        self.set.primary, self.set.replica = self.set.replica, start_replica(
            old.directory, new_port, port=old_port)
        return promoted

    def stop(self) -> None:
        self.set.stop()


class ClusterRedis:
    """The fault matrix's view of a 6-node Redis Cluster (3 primaries, 3 replicas)."""

    def __init__(self, directory: Path):
        self.set = RedisClusterSet(directory)

    @property
    def url(self) -> str:
        return self.set.url

    def start(self) -> ClusterRedis:
        self.set.start()
        return self

    def reshard(self, slots: int) -> tuple[str, str, float]:
        """Move ``slots`` slots (and their keys, with MIGRATE: clients meet ASK and MOVED
        meanwhile) from the primary serving slot 0 to another primary; (from, to, seconds)."""
        primaries = self.set.primaries()
        source = next(n for n in primaries if self._serves(n, 0))
        target = next(n for n in primaries if n is not source)
        started = time.monotonic()
        self.set.cli("--cluster", "reshard", f"127.0.0.1:{source.port}",
                     "--cluster-from", self._id(source), "--cluster-to", self._id(target),
                     "--cluster-slots", str(slots), "--cluster-yes")
        took = time.monotonic() - started
        if not wait_for(self.set.settled, 20.0, step=0.2):
            raise RuntimeError("the cluster did not settle after the resharding")
        return f"127.0.0.1:{source.port}", f"127.0.0.1:{target.port}", took

    def fail_over(self, timeout: float = 20.0) -> tuple[str, float]:
        """CLUSTER FAILOVER on the replica of the primary serving slot 0: it takes over the
        primary's slots (the old primary becomes its replica).  (new primary, seconds)."""
        primary = next(n for n in self.set.primaries() if self._serves(n, 0))
        primary_id = self._id(primary)
        replica = next(n for n in self.set.nodes
                       if n is not primary and self._primary_of(n) == primary_id)
        started = time.monotonic()
        client = replica.client()
        try:
            client.execute_command("CLUSTER FAILOVER")
        finally:
            client.close()
        if not wait_for(lambda: self.set.role(replica) == "master" and self.set.settled(),
                        timeout, step=0.05):
            raise RuntimeError("the replica did not take over")
        return f"127.0.0.1:{replica.port}", time.monotonic() - started

    def kill_primary(self, timeout: float = 30.0) -> tuple[str, float]:
        """SIGKILL of the primary serving slot 0: its replica is elected once the others
        have not heard from it for the node timeout.  The killed node is started again
        (empty: it rejoins as a replica).  (new primary, seconds until it served)."""
        primary = next(n for n in self.set.primaries() if self._serves(n, 0))
        primary_id = self._id(primary)
        replica = next(n for n in self.set.nodes
                       if n is not primary and self._primary_of(n) == primary_id)
        primary.stop()
        killed = time.monotonic()
        if not wait_for(lambda: self.set.role(replica) == "master" and self._serves(replica, 0),
                        timeout, step=0.05):
            raise RuntimeError("no replica took over")
        took = time.monotonic() - killed
        primary.start()
        if not wait_for(self.set.settled, timeout, step=0.2):
            raise RuntimeError("the cluster did not settle with the old primary back")
        return f"127.0.0.1:{replica.port}", took

    @staticmethod
    def _id(node) -> str:
        client = node.client()
        try:
            value = client.execute_command("CLUSTER MYID")
            return value.decode() if isinstance(value, bytes) else str(value)
        finally:
            client.close()

    @staticmethod
    def _serves(node, slot: int) -> bool:
        client = node.client()
        try:
            return int(client.execute_command("CLUSTER COUNTKEYSINSLOT", slot)) >= 0 and any(
                start <= slot <= end and int(primary[1]) == node.port
                for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"))
        finally:
            client.close()

    def _primary_of(self, node) -> str | None:
        client = node.client()
        try:
            info = client.info("replication")
            if info.get("role") != "slave":
                return None
            port = int(info["master_port"])
        finally:
            client.close()
        return next((self._id(n) for n in self.set.nodes if n.port == port), None)

    def stop(self) -> None:
        self.set.stop()
