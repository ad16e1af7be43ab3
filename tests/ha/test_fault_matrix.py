"""The fault matrix: every kind of failure, under SIPp call and registration load.

Each test is one fault (a row of the matrix) on a fresh cluster in the configuration
``make run`` ships (relay media, call traces, INFO logs), on a Redis that persists like
the managed one.  Load: SIPp callers at RATE calls/s with digest on every call
(ha_uac.xml: a 300 ms pause between the 407 and the authenticated INVITE, 1 s of
ringing, a re-INVITE answered after 400 ms, HOLD_MS of talk, a BYE answered after
200 ms), a SIPp registration load (ha_register.xml: 300 ms between the 401 and the
authenticated REGISTER) and one call between two RTP test phones whose media goes
through a relay.  The fault lands FAULT_AT seconds in, when calls are in every phase;
the phases (the matrix's columns) are counted from the SIPp message traces at the
instant of the fault, and every column must hold at least one call or registration.

Every cell expects: 0 failed calls on both SIPp sides, every call's BYE reached the
callee, exactly one CDR per call (normal clearing), 0 failed registrations, no call
left live, every program RUNNING at the end; the media probe's longest gap is reported
(and bounded for the relay fault).  Each test prints its row of the matrix.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from backends import AofRedis, ClusterRedis, SentinelRedis
from calls_helpers import (
    PASSWORD,
    SipMessage,
    callee,
    caller,
    read_messages,
    register,
    start_listening,
)
from harness import Cluster, wait_for
from rediscluster import require_redis_cli
from rtp_phone import Phone
from sentinels import require_sentinel
from sip_probe import OptionsProbe
from sipp import Sipp

from conftest import REDIS_SERVER, require_redis_server

RATE = 10  # calls per second
CALLS = 200  # 20 s of load
HOLD_MS = 2000
RING_MS = 1000
REG_RATE = 5
REGISTRATIONS = 100
FAULT_AT = 10.0  # seconds after the load starts
CALLERS = [str(u) for u in range(1000, 1020)]
CALLEE = "1099"
REG_USERS = [str(u) for u in range(1100, 1150)]
PROBE_CALLER, PROBE_CALLEE = "1201", "1202"
PHASES = ("register", "challenged", "ringing", "answered", "re-INVITE", "BYE")
PORT_MIN, PORT_MAX = 26000, 26999
SETTINGS = {"media": {"mode": "relay", "relays": 2, "rtp_port_min": PORT_MIN,
                      "rtp_port_max": PORT_MAX}}
RELAY_GAP_LIMIT = 1.0  # seconds of media lost at most when a relay dies
PROBE_EVERY = 0.05  # seconds between OPTIONS probes
RESULTS = Path(__file__).resolve().parent.parent.parent / "run" / "fault-matrix.jsonl"


@pytest.fixture(autouse=True)
def _tools():
    require_redis_server()
    assert REDIS_SERVER is not None


# ------------------------------------------------------------------ one cell's world
@dataclass
class World:
    cluster: Cluster
    backend: AofRedis | SentinelRedis | ClusterRedis
    tmp: Path
    notes: dict = field(default_factory=dict)


def start_world(tmp: Path, backend) -> World:
    backend.start()
    cluster = Cluster(tmp / "cluster", backend.url, workers=2, settings=SETTINGS)
    cluster.start(timeout=30)
    for user in [*CALLERS, CALLEE, *REG_USERS, PROBE_CALLER, PROBE_CALLEE]:
        cluster.add_user(user, PASSWORD)
    return World(cluster, backend, tmp)


# ------------------------------------------------------------------ faults
def kill_program(program: str):
    def fault(world: World) -> None:
        world.notes["killed"] = f"{program} pid {world.cluster.kill9(program)}"
    return fault


def kill_probe_relay(world: World) -> None:
    record = world.cluster.store.relay_session(world.notes["probe_tag"])
    program = "relay:" + record["relay"].rsplit("/", 1)[1]
    world.notes["killed"] = f"{program} pid {world.cluster.kill9(program)}"


def kill_redis(world: World) -> None:
    world.backend.kill9()
    time.sleep(0.5)  # supervisord restarts a managed Redis about this fast
    world.backend.start()


def pause_redis(world: World) -> None:
    world.backend.pause(5.0)


def refuse_writes(world: World) -> None:
    world.backend.refuse_writes(5.0)


def restart_host(world: World) -> None:
    """Everything of the host goes down at once (Redis with SIGKILL: only its AOF is left),
    then comes back the way `make run` brings it up."""
    started = time.monotonic()
    world.cluster.stop()
    world.backend.kill9()
    world.backend.start()
    world.cluster.start(timeout=30)
    world.notes["down_s"] = round(time.monotonic() - started, 2)


def sentinel_failover(world: World) -> None:
    world.notes["promoted_after_s"] = round(world.backend.fail_over(), 2)
    world.notes["all_sentinels_after_s"] = round(world.backend.all_named_after, 2)
    world.notes["sentinel_tilt"] = world.backend.tilt


RESHARD_SLOTS = 2000  # of the 5461 the first primary has: timer shard 3 (slot 1584) moves


def cluster_reshard(world: World) -> None:
    source, target, took = world.backend.reshard(RESHARD_SLOTS)
    world.notes["resharded"] = f"{RESHARD_SLOTS} slots {source} -> {target} in {took:.2f} s"


def cluster_failover(world: World) -> None:
    promoted, took = world.backend.fail_over()
    world.notes["promoted"] = f"{promoted} after {took:.2f} s"


def cluster_primary_killed(world: World) -> None:
    promoted, took = world.backend.kill_primary()
    world.notes["promoted"] = f"{promoted} after {took:.2f} s"


# ------------------------------------------------------------------ the load
@dataclass
class Probe:
    """One call between two RTP phones through a relay, up across the fault."""

    caller: Phone
    callee: Phone
    tag: str


def start_probe(cluster: Cluster) -> Probe:
    caller_phone = Phone(cluster.address, PROBE_CALLER, PASSWORD)
    callee_phone = Phone(cluster.address, PROBE_CALLEE, PASSWORD)
    assert callee_phone.register() == 200
    answered: dict = {}

    def answer():
        invite = callee_phone.wait_call()
        answered["invite"] = invite
        callee_phone.answer(invite)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    caller_phone.call(PROBE_CALLEE)
    thread.join(timeout=10)
    tag = answered["invite"].call_id.split(".")[1]  # B-leg Call-IDs: "sc<slot>.<tag>.<n>"
    return Probe(caller_phone, callee_phone, tag)


def rtp_lost(sender: Phone, receiver: Phone) -> int:
    """RTP packets ``sender`` sent that ``receiver`` never got (both stopped first)."""
    return sender.media.sent - len({p.seq for p in receiver.media.packets()})


def longest_gap(phone: Phone, since: float) -> float:
    times = [p.at for p in phone.media.packets(since)]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))


def phases_at(moment: float, uac: list[SipMessage], uas: list[SipMessage],
              reg: list[SipMessage]) -> Counter:
    """How many calls (or registrations) were in each phase at ``moment`` (epoch s), from
    the SIPp traces: a phase runs from the first message that opens it to the first that
    closes it."""
    counts: Counter = Counter()
    for events in _by_call(uac).values():
        def at(key: str, events=events) -> float:
            return events.get(key, float("inf"))
        if at("< 407 INVITE 1") <= moment < at("> INVITE 2"):
            counts["challenged"] += 1
        elif at("> INVITE 2") <= moment < at("< 200 INVITE 2"):
            counts["ringing"] += 1
        elif (at("< 200 INVITE 2") <= moment < at("> INVITE 3")
              or at("< 200 INVITE 3") <= moment < at("> BYE 4")):
            counts["answered"] += 1
        elif at("> INVITE 3") <= moment < at("< 200 INVITE 3"):
            counts["re-INVITE"] += 1
        elif at("> BYE 4") <= moment < at("< 200 BYE 4"):
            counts["BYE"] += 1
    for events in _by_call(uas).values():  # the B-leg's BYE, answered after 200 ms
        if events.get("< BYE", float("inf")) <= moment < events.get("> 200 BYE", float("inf")):
            counts["BYE"] += 1
    for events in _by_call(reg).values():
        if events.get("> REGISTER 1", float("inf")) <= moment < events.get(
                "< 200 REGISTER 2", float("inf")):
            counts["register"] += 1
    return counts


def _by_call(messages: list[SipMessage]) -> dict[str, dict[str, float]]:
    """Call-ID -> the first time of each event, under two names: with the CSeq number
    ("> INVITE 2": the CSeq 2 INVITE sent; "< 200 BYE 4": its answer received) and without
    (for the callee, whose peer numbers the B-leg)."""
    calls: dict[str, dict[str, float]] = {}
    for msg in messages:
        number, method = ((msg.header("CSeq") or "0 ?").split() + ["?"])[:2]
        arrow = ">" if msg.direction == "sent" else "<"
        what = f"{arrow} {msg.status} {method}" if msg.is_response else f"{arrow} {method}"
        events = calls.setdefault(msg.header("Call-ID") or "", {})
        events.setdefault(what, msg.at)
        events.setdefault(f"{what} {number}", msg.at)
    return calls


# ------------------------------------------------------------------ one cell
def run_cell(tmp: Path, backend, fault, name: str) -> dict:
    world = start_world(tmp, backend)
    cluster = world.cluster
    probe = None
    parties = []
    try:
        timeout = CALLS / RATE + 60
        uas = start_listening(callee(cluster, tmp / "uas", scenario="ha_uas.xml", calls=CALLS,
                                     delay_ms=RING_MS, timeout=timeout))
        parties.append(uas)
        register(cluster, CALLEE, [uas.port])
        probe = start_probe(cluster)
        world.notes["probe_tag"] = probe.tag
        uac = caller(cluster, tmp / "uac", "", CALLEE, scenario="ha_uac.xml", users=CALLERS,
                     calls=CALLS, rate=RATE, hold_ms=HOLD_MS, timeout=timeout)
        parties.append(uac)
        reg = Sipp("ha_register.xml", cluster.address, tmp / "reg", calls=REGISTRATIONS,
                   rate=REG_RATE, users=[(u, PASSWORD) for u in REG_USERS], timeout=timeout,
                   extra=("-trace_msg", "-message_file", str(tmp / "reg" / "messages.log")))
        sip_probe = OptionsProbe(cluster.address, every=PROBE_EVERY).start()
        uac.sipp.start()
        reg.start()
        started = time.monotonic()
        time.sleep(max(0.0, started + FAULT_AT - time.monotonic()))
        fault_epoch, fault_mono = time.time(), time.monotonic()
        fault(world)
        recovered = time.monotonic() - fault_mono
        uac.result = uac.sipp.wait()
        uas.result = uas.sipp.wait()
        reg_result = reg.wait()
        sip_probe.stop()
        media_gaps = [round(longest_gap(phone, fault_mono - 1.0), 3)
                      for phone in (probe.caller, probe.callee)]
        for phone in (probe.caller, probe.callee):
            phone.media.stop()
        time.sleep(0.3)  # the last packets arrive
        lost = [rtp_lost(probe.caller, probe.callee), rtp_lost(probe.callee, probe.caller)]
        worst_wait, probes_lost = sip_probe.worst(fault_mono - 1.0, fault_mono + 20.0)
        silence_ms = round(1000 * worst_wait)
        probe_bye = probe.caller.hangup()
        phases = phases_at(fault_epoch, uac.messages, uas.messages,
                           read_messages(tmp / "reg" / "messages.log"))
        a_call_ids = {m.header("Call-ID") for m in uac.messages}
        cdrs = [c for c in cluster.store.cdrs_after() if c.get("a_call_id") in a_call_ids]
        per_call = Counter(c["a_call_id"] for c in cdrs)
        live = [tag for tag, rec in cluster.store.call_records()
                if rec.get("caller") in CALLERS and rec.get("state") != "ended"]
        states = cluster.processes()
        row = {
            "fault": name, "phases": {p: phases.get(p, 0) for p in PHASES},
            "calls": uac.result.created, "ok_uac": uac.result.successful,
            "failed_uac": uac.result.failed, "ok_uas": uas.result.successful,
            "failed_uas": uas.result.failed, "registrations": reg_result.created,
            "failed_registrations": reg_result.failed, "cdrs": len(cdrs),
            "calls_with_more_than_one_cdr": sum(1 for n in per_call.values() if n > 1),
            "causes": dict(Counter(c["hangup_cause"] for c in cdrs)),
            "media_gap_s": media_gaps, "rtp_lost": lost, "sip_silence_ms": silence_ms,
            "options_lost": probes_lost, "fault_took_s": round(recovered, 2),
            "probe_bye": probe_bye.status if probe_bye is not None else None,
            **{k: v for k, v in world.notes.items() if k != "probe_tag"},
        }
        report = json.dumps(row)
        print(report)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(report + "\n")
        # The cluster's own account first: SIPp's reports can run long enough for the
        # output to be cut before it.
        detail = (f"{report}\n{cluster.log_troubles()}\n{cluster.log_tail(15)}\n"
                  f"{uac.report()}\n{uas.report()}\n{reg_result.summary()}")
        for phase in PHASES:
            assert phases.get(phase, 0) >= 1, f"no {phase} at the fault: {detail}"
        assert uac.result.created == CALLS, detail
        assert (uac.result.successful, uac.result.failed) == (CALLS, 0), detail
        assert (uas.result.successful, uas.result.failed) == (CALLS, 0), detail
        assert (reg_result.created, reg_result.failed) == (REGISTRATIONS, 0), detail
        assert len(cdrs) == CALLS and len(per_call) == CALLS, detail
        assert set(row["causes"]) == {"NORMAL_CLEARING"}, detail
        assert live == [] or wait_for(lambda: not [
            t for t, r in cluster.store.call_records()
            if r.get("caller") in CALLERS and r.get("state") != "ended"], 5.0), detail
        assert probe_bye is not None and probe_bye.status == 200, detail
        assert all(state == "RUNNING" for state, _ in states.values()), (states, detail)
        return row
    finally:
        for party in parties:
            party.sipp.stop()
        if probe is not None:
            probe.caller.close()
            probe.callee.close()
        cluster.stop()
        backend.stop()


# ------------------------------------------------------------------ the rows
def test_worker_killed(tmp_path):
    run_cell(tmp_path, AofRedis(tmp_path / "redis"), kill_program("worker:worker-0"), "worker")


def test_dispatcher_killed(tmp_path):
    run_cell(tmp_path, AofRedis(tmp_path / "redis"), kill_program("dispatcher"), "dispatcher")


def test_relay_killed(tmp_path):
    row = run_cell(tmp_path, AofRedis(tmp_path / "redis"), kill_probe_relay, "relay")
    assert max(row["media_gap_s"]) < RELAY_GAP_LIMIT, row


def test_redis_killed_and_restarted_from_its_aof(tmp_path):
    run_cell(tmp_path, AofRedis(tmp_path / "redis"), kill_redis, "redis-server")


def test_redis_paused_5_seconds(tmp_path):
    run_cell(tmp_path, AofRedis(tmp_path / "redis"), pause_redis, "redis paused 5 s")


def test_redis_refusing_writes_5_seconds(tmp_path):
    run_cell(tmp_path, AofRedis(tmp_path / "redis"), refuse_writes, "redis OOM 5 s")


def test_whole_host_restart(tmp_path):
    run_cell(tmp_path, AofRedis(tmp_path / "redis"), restart_host, "host restart")


def test_redis_cluster_live_resharding(tmp_path):
    require_redis_cli()
    run_cell(tmp_path, ClusterRedis(tmp_path / "rcluster"), cluster_reshard,
             "redis cluster resharding")


def test_redis_cluster_primary_failover(tmp_path):
    require_redis_cli()
    run_cell(tmp_path, ClusterRedis(tmp_path / "rcluster"), cluster_failover,
             "redis cluster failover")


def test_redis_cluster_primary_killed(tmp_path):
    require_redis_cli()
    run_cell(tmp_path, ClusterRedis(tmp_path / "rcluster"), cluster_primary_killed,
             "redis cluster primary killed")


def test_sentinel_primary_failover(tmp_path):
    require_sentinel()
    run_cell(tmp_path, SentinelRedis(tmp_path / "sentinel"), sentinel_failover,
             "sentinel failover")
