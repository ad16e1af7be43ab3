"""Hostile traffic from one address costs legitimate callers nothing.

A flooder on 127.0.0.77 sends 20,000 new INVITE/REGISTER/OPTIONS a second while SIPp
on 127.0.0.1 places 20 calls a second with digest: the flooder is banned within 2 s
and gets no answer once its ban is in force, and at least 99 % of the calls succeed.
A scanner asking for 600 user names is banned (scan-users), `sipctl bans` shows the
ban and `sipctl bans unban` lifts it everywhere; an allow-listed source is never
banned however fast it sends.  Every load is bounded in count and time.  (The 30 s
version of the flood is tests/ha/test_flood_long.py.)
"""

from __future__ import annotations

import json
import time

from flooder import FLOODER, IN_FLIGHT, Flooder, assert_flood_contained, flood_during_calls
from harness import running_cluster, wait_for
from sipua import UA

SCANNER = "127.0.0.88"
TRUNK = "127.0.0.99"
GUESSER = "127.0.0.89"
SCAN_ERRORS = 30  # limits.scan_errors of the scanner test's cluster


def test_a_flood_from_one_address_is_banned_and_costs_callers_nothing(redis_url, tmp_path):
    seconds = 10.0
    with running_cluster(tmp_path, redis_url) as cluster:
        figures = flood_during_calls(cluster, tmp_path, seconds)
        assert_flood_contained(figures, seconds, cluster.config.limits)
        # the ban is the operator's to see and lift
        listed = json.loads(cluster.sipctl("bans", "--json", check=False).stdout)
        assert [b["source"] for b in listed] == [FLOODER]
        assert listed[0]["reason"] == figures["ban"]["reason"]
        assert 250 < listed[0]["left"] <= 300
        assert f"source banned: source={FLOODER}:" in cluster.read_log("dispatcher")


def test_a_scanner_is_banned_and_the_operator_can_lift_it(redis_url, tmp_path):
    users = [f"s{n}" for n in range(600)]
    settings = {"limits": {"allow": [TRUNK], "scan_errors": SCAN_ERRORS}}
    with running_cluster(tmp_path, redis_url, settings=settings) as cluster:
        # 150 requests/s, OPTIONS and REGISTER in turn: under both buckets' rate (100/s each)
        scanner = Flooder(cluster.address, SCANNER, 150, 4.0, methods=("OPTIONS", "REGISTER"),
                          users=users).start().wait(linger=1.0)
        bans = {b["ip"]: b for b in cluster.store.bans()}
        ban = bans.get(SCANNER)
        answered = len(scanner.answers)
        print(f"scanner: sent={scanner.sent} answered={answered} ban={ban}")
        assert scanner.sent == 600
        assert ban is not None and ban["reason"] == "scan-users", (ban, cluster.log_tail())
        # banned once 500 names were counted: what came after was dropped unanswered
        # (the names of the last flush, 0.2 s at 150/s, may be answered before the ban)
        assert 500 <= answered <= 500 + 60, answered
        assert not scanner.answers_after(ban["at"] + IN_FLIGHT)
        assert "reason=scan-users" in (cluster.read_log("worker-0") + cluster.read_log("worker-1"))

        # a password guesser collects 403s (wrong password, then its source throttled):
        # banned once SCAN_ERRORS were sent to it, and answered nothing more
        statuses = []
        with UA(cluster.address, user="1002", bind=GUESSER) as ua:
            for n in range(SCAN_ERRORS + 40):  # 50 a second: the workers count every 0.2 s
                reply = ua.register(f"guess-{n}", expires=60)
                statuses.append(None if reply is None else reply.status)
                if reply is None:
                    break
                time.sleep(0.02)
        forbidden = statuses.count(403)
        ban = {b["ip"]: b for b in cluster.store.bans()}.get(GUESSER)
        print(f"guesser: {forbidden} x 403, then {statuses[forbidden:]}; ban={ban}")
        assert ban is not None and ban["reason"] == "scan-errors", statuses
        assert set(statuses[:forbidden]) == {403} and statuses[-1] is None, statuses
        # what was answered in the 0.2 s before a worker wrote its count may come on top
        assert SCAN_ERRORS <= forbidden <= SCAN_ERRORS + 15, statuses

        # an allow-listed trunk sends far past every bucket and is still answered
        trunk = Flooder(cluster.address, TRUNK, 1_000, 1.0, methods=("OPTIONS",)).start()
        trunk.wait(linger=1.0)
        assert TRUNK not in {b["ip"] for b in cluster.store.bans()}
        assert len(trunk.answers) >= 0.5 * trunk.sent, (trunk.sent, len(trunk.answers))
        assert trunk.answers_after(trunk.ended - 0.2)  # answered to the end

        # the operator lets the scanner in again, on every dispatcher at once
        out = cluster.sipctl("bans", check=False)
        assert SCANNER in out.stdout and "scan-users" in out.stdout, out
        assert cluster.sipctl("bans", "unban", SCANNER, check=False).returncode == 0
        assert cluster.sipctl("bans", "unban", SCANNER, check=False).returncode == 1  # nothing left
        with UA(cluster.address, bind=SCANNER) as ua:
            reply = wait_for(lambda: ua.options(timeout=0.3), 3.0)
        assert reply is not None and reply.status == 200
        assert SCANNER not in {b["ip"] for b in cluster.store.bans()}
        time.sleep(0.5)  # its scanner counters were reset too: one more name bans nobody
        assert [b["ip"] for b in cluster.store.bans()] == [GUESSER]
