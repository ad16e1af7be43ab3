"""An idle cluster sleeps: on the configuration `make run` ships (worker heartbeats every
0.5 s, relay media) a worker's periodic work (its heartbeats, timer claim and stream
reads) runs on the host's grid of the monotonic clock (cluster/cadence.py), so it wakes
about twice a second, and supervisord wakes once a second.  Before the grid a worker woke
~10 times a second and supervisord 10 (bench_idle); every wake-up costs CPU whatever it
then does.  The counts are the voluntary context switches of all of a process's threads
(/proc), over IDLE_SECONDS, after start-up."""

from __future__ import annotations

import time

import pytest
from harness import running_cluster
from procstat import wakeups

from conftest import RedisServer

IDLE_SECONDS = 6.0
WORKER_MAX = 4.0  # wake-ups a second: the 0.5 s grid and the replies read on it
SUPERVISORD_MAX = 3.0  # its 1 s poll


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idle")
    server = RedisServer(tmp / "redis").start()
    try:
        with running_cluster(tmp, server.url, workers=2, settings={
                "dispatcher": {"heartbeat_interval": 0.5, "dead_after": 1.5},
                "media": {"mode": "relay", "relays": 2, "rtp_port_min": 24000,
                          "rtp_port_max": 24999}}) as running:
            yield running
    finally:
        server.stop()


def test_an_idle_cluster_wakes_a_few_times_a_second(cluster):
    time.sleep(2.0)  # past start-up: the first heartbeats and claims
    pids = {name: pid for name, (state, pid) in cluster.processes().items()
            if state == "RUNNING"}
    pids["supervisord"] = int((cluster.run_dir / "supervisord.pid").read_text())
    before = {name: wakeups(pid) for name, pid in pids.items()}
    time.sleep(IDLE_SECONDS)
    rates = {name: (wakeups(pid) - before[name]) / IDLE_SECONDS for name, pid in pids.items()}
    workers = {name: rate for name, rate in rates.items() if name.startswith("worker")}
    assert len(workers) == 2, rates
    assert all(rate <= WORKER_MAX for rate in workers.values()), rates
    assert rates["supervisord"] <= SUPERVISORD_MAX, rates
