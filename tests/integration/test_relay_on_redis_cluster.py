"""The RTP relay's tests (test_relay.py), run again with the relays' state on a 6-node Redis
Cluster: session records and the owned index in their own slots, heartbeats in relay:nodes,
media events on their stream and consumer group, a relay killed and restarted resuming its
sessions from the cluster.  Only the ``redis_url`` fixture differs."""

from __future__ import annotations

import pytest
from rediscluster import redis_cluster  # noqa: F401 (a fixture)
from test_relay import *  # noqa: F403 (the tests, and their fixtures)


@pytest.fixture
def redis_url(redis_cluster):  # noqa: F811
    redis_cluster.flushall()
    return redis_cluster.url
