"""The B2BUA's call tests (test_calls.py) run again on a 6-node Redis Cluster: the seed
flow, both hang-up sides, retransmissions absorbed and sent, busy/declined/404/480, no
answer, CANCEL, forking, a late second 2xx, re-INVITEs in the dialog, 481.  The cluster
fixture differs only by its ``redis.url``; the test with a fast T1 (its own cluster in
test_calls.py) is left to the single-Redis run, as two test clusters on one Redis Cluster
would share their registrations."""

from __future__ import annotations

import pytest
from calls_helpers import provision
from harness import running_cluster
from rediscluster import redis_cluster  # noqa: F401 (a fixture)
from test_calls import *  # noqa: F403 (the tests, and their helpers)
from test_calls import NO_ANSWER, USERS

del test_unreachable_callee_times_out  # noqa: F821 (needs the fast-T1 cluster)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_cluster):  # noqa: F811
    redis_cluster.flushall()
    settings = {"calls": {"no_answer_timeout": NO_ANSWER}}
    with running_cluster(tmp_path_factory.mktemp("calls-on-rcluster"), redis_cluster.url,
                         workers=2, settings=settings) as running:
        provision(running, USERS)
        yield running
