"""The operators' acceptance of per-source limits, at full length: a 20,000 datagrams/s
flood of new INVITE/REGISTER/OPTIONS from 127.0.0.77 for 30 s while SIPp on 127.0.0.1
places 20 calls/s with digest (600 calls).  At least 99 % of the calls succeed, the
flooder is banned within 2 s and gets no answer once its ban is in force (answers to
what it sent before the ban, within flooder.IN_FLIGHT of it, aside).  The 10 s version runs in
`make test` (tests/integration/test_flood.py)."""

from __future__ import annotations

from flooder import assert_flood_contained, flood_during_calls
from harness import running_cluster

SECONDS = 30.0


def test_a_30_s_flood_is_banned_and_costs_callers_nothing(redis_url, tmp_path):
    with running_cluster(tmp_path, redis_url) as cluster:
        figures = flood_during_calls(cluster, tmp_path, SECONDS)
        assert_flood_contained(figures, SECONDS, cluster.config.limits)
