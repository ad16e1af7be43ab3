"""A real Redis Cluster for tests: 6 nodes (3 primaries, 3 replicas) on loopback.

Each node is a ``redis-server --cluster-enabled yes`` child with its own folder, data port
and cluster bus port (``cluster-port``, so neither is port+10000 by chance); the cluster is
made with ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``.  Skipped
where redis-cli is missing, except in CI (env CI set), where that fails the run.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from harness import wait_for

from conftest import REDIS_SERVER, _wait_for_ping, free_tcp_port, require_redis_server, require_tool

REDIS_CLI = shutil.which("redis-cli")
NO_CLI_REASON = ("redis-cli is not installed (apt-get install -y redis-tools); "
                 "in CI (env CI set) this is an error, not a skip")
NODE_TIMEOUT_MS = 2000  # how long a primary may be silent before its replica takes over


def require_redis_cli() -> None:
    require_redis_server()
    require_tool(REDIS_CLI, NO_CLI_REASON)


@dataclass
class ClusterNode:
    directory: Path
    port: int = 0
    bus_port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> ClusterNode:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # a "free" port can be taken between probe and bind
            port, bus = self.port or free_tcp_port(), self.bus_port or free_tcp_port()
            if port == bus:
                continue
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-port", str(bus), "--cluster-node-timeout", str(NODE_TIMEOUT_MS)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if _wait_for_ping(self.process, port, timeout):
                self.port, self.bus_port = port, bus
                return self
            self.stop()
        raise RuntimeError(f"redis-server (cluster mode) did not start in {self.directory}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0,
                           socket_connect_timeout=2.0)


@dataclass
class RedisClusterSet:
    """Six nodes made one cluster: three primaries, each with one replica."""

    directory: Path
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:3])
        return f"redis+cluster://{hosts}/"

    def start(self) -> RedisClusterSet:
        for index in range(6):
            self.nodes.append(ClusterNode(self.directory / f"node-{index}").start())
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        self.cli("--cluster", "create", *addresses, "--cluster-replicas", "1",
                 "--cluster-yes")
        assert wait_for(self.settled, 30.0, step=0.2), "the cluster did not settle"
        return self

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run([REDIS_CLI, *args], capture_output=True, text=True,
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def settled(self) -> bool:
        """Every node says the cluster is ok and sees the other five; every replica has
        its primary's data (a WAIT would count it)."""
        for node in self.nodes:
            client = node.client()
            try:
                info = client.execute_command("CLUSTER INFO")  # parsed into a dict
                if (info.get("cluster_state") != "ok"
                        or str(info.get("cluster_known_nodes")) != str(len(self.nodes))):
                    return False
                replication = client.info("replication")
                if (replication.get("role") == "slave"
                        and replication.get("master_link_status") != "up"):
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def primaries(self) -> list[ClusterNode]:
        return [node for node in self.nodes if self.role(node) == "master"]

    def role(self, node: ClusterNode) -> str | None:
        client = node.client()
        try:
            return client.info("replication").get("role")
        except redis.RedisError:
            return None
        finally:
            client.close()

    def flushall(self) -> None:
        for node in self.primaries():
            client = node.client()
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    require_redis_cli()
    cluster = RedisClusterSet(tmp_path_factory.mktemp("rcluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
