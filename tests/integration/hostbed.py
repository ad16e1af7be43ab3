"""Hosts on one LAN sharing one Redis: the bed of the multi-host tests and of the bench.

``host_bed`` starts, inside a ``Topology`` already up (tests/integration/netns.py), a
redis-server on the LAN's bridge address (protected by a password: it is reached from
other hosts, invariant 14) and one cluster per host namespace, and tears everything down
on exit, after a failure too: every cluster stopped, Redis killed, the namespaces deleted.
The calling thread stays in the LAN namespace meanwhile, so the phones and Redis clients it
opens are on the LAN.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from harness import Cluster, wait_for
from netns import LAN_ADDRESS, Topology

from conftest import REDIS_SERVER


@dataclass
class HostBed:
    topology: Topology
    url: str
    redis: subprocess.Popen
    clusters: list[Cluster]


@contextmanager
def host_bed(topology: Topology, directory: Path, settings_of: Callable[[int], dict], *,
             redis_port: int, redis_password: str, workers: int = 2,
             appendonly: bool = False,
             prepare: Callable[[Topology], None] | None = None) -> Iterator[HostBed]:
    """``settings_of(index)``: the settings of host ``index`` (1-based); ``prepare``: run
    on the topology before anything starts (addresses of its own, say); ``appendonly``:
    Redis as ``make run`` ships it (AOF, fsync every second) rather than memory only."""
    clusters: list[Cluster] = []
    redis_proc = None
    try:
        if prepare is not None:
            prepare(topology)
        with topology.enter(topology.lan):
            persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly
                           else ["--appendonly", "no"])
            redis_proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(redis_port), "--bind", LAN_ADDRESS, "--save", "",
                 *persistence, "--dir", str(directory), "--requirepass", redis_password],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"redis://:{redis_password}@{LAN_ADDRESS}:{redis_port}/0"
            client = redis.Redis.from_url(url, socket_timeout=2.0)
            assert wait_for(lambda: _pings(client), 10.0), "redis-server did not start"
            client.close()
            for index in range(1, topology.hosts + 1):
                clusters.append(Cluster(directory / f"h{index}", url, workers=workers,
                                        settings=settings_of(index),
                                        netns=topology.host_ns(index),
                                        client_bind=LAN_ADDRESS))
            for cluster in clusters:
                cluster.start(30.0)
            yield HostBed(topology, url, redis_proc, clusters)
    finally:
        for cluster in clusters:
            cluster.stop()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(timeout=10)
        topology.down()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
