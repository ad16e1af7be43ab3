"""Durable state: Redis (or the whole host) dies, and nothing of the cluster's is lost.

Redis here keeps an append-only file (AOF, fsync every second), as the managed Redis of
`make run` does.  Each test puts the cluster in the same state before the fault, in relay
mode, with digest on every call (SIPp):

* an earlier call, complete: its CDR;
* call "up": answered, held, hung up by its caller after the fault;
* call "ringing": its callee answers after the fault;
* call "unanswered": its callee never answers; the no-answer timer, armed before the fault
  in Redis (a sorted set), fires after it: 480 to the caller, CANCEL to the callee;
* a phone registered before the fault and called only after it (its SIPp callee waits).

Faults: kill -9 of redis-server, restarted on the same port and folder; a host restart
(`make stop; make run`: supervisord shuts everything down, the managed Redis too, and
starts again); a host crash (supervisord and every process it runs killed with SIGKILL,
then started again); supervisord alone killed with SIGKILL (what it left running is
stopped, as `sipcluster up` does, then everything is started again).

Afterwards users, registrations, the call records, their relay sessions and the earlier CDR
are still there; the calls complete on both SIPp sides (each callee gets its BYE or CANCEL),
exactly one CDR each; the phone registered before the fault rings without registering
again; and no process is left crash-looping.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from calls_helpers import (
    CallRun,
    all_ended,
    callee,
    caller,
    calls_of,
    cdrs_of,
    provision,
    received,
    register,
    run_call,
    start_listening,
    trace_lines,
    wait_cdrs,
    wait_for,
)
from harness import Cluster, running_cluster
from sipp import SIPP

from cluster import launch
from cluster.config import load
from cluster.relayctl import RelayClient, control_key
from cluster.store import Store
from conftest import ROOT, RedisServer, free_tcp_port, require_redis_server

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed")

REASON = 'Q.850;cause=16;text="NORMAL_CLEARING"'
NO_ANSWER = 20  # seconds: due after every fault and restart, longer than any answer delay
SETTINGS = {
    "media": {"mode": "relay", "relays": 2, "rtp_port_min": 38600, "rtp_port_max": 38799,
              "media_timeout": 120},  # SIPp sends no RTP: no media timeout in these tests
    "calls": {"no_answer_timeout": NO_ANSWER},
}
USERS = [str(u) for u in range(1000, 1010)]
EARLIER = ("1000", "1001")  # the call made before the fault
UP = ("1002", "1003")  # answered before the fault, hung up after it
RINGING = ("1004", "1005")  # ringing at the fault, answered after it
LATER = ("1006", "1007")  # 1007 registers before the fault and is called after it
UNANSWERED = ("1008", "1009")  # rings until the no-answer timer fires, after the fault
DOWN = 1.5  # seconds without Redis (more than the AOF's fsync period)
# The calls' timing, from their start (ms); the fault comes right after they are set up.
# The BYE comes once the cluster is back, generously: a request arriving while the cluster
# runs without Redis is refused (503), which these tests are not about.  An answer arriving
# meanwhile is only delayed (the callee repeats its 200 until it is ACKed).
UP_HOLD_MS = {"redis": 12000, "host": 16000}
RING_MS = {"redis": 7000, "host": 11000}
RESTART_LIMIT = 12.0  # seconds a host restart may take: within the phones' retransmissions
PROCESSES_WAIT = 20.0


@dataclass
class Calls:
    up: CallRun
    ringing: CallRun
    unanswered: CallRun
    later_callee: object  # the Party waiting for the call after the fault
    up_tag: str
    ringing_tag: str


def call_in_state(cluster: Cluster, user: str, states: tuple[str, ...],
                  timeout: float = 10.0) -> tuple[str, dict]:
    def found():
        return next(((tag, rec) for tag, rec in calls_of(cluster, user)
                     if rec["state"] in states), None)
    hit = wait_for(found, timeout, step=0.05)
    assert hit is not None, (user, calls_of(cluster, user), cluster.log_tail())
    return hit


def start_call(cluster: Cluster, workdir: Path, parties: tuple[str, str], *, hold_ms: int,
               answer_after_ms: int, timeout: float = 90.0, uac: str = "call_uac.xml",
               uas: str = "call_uas.xml") -> CallRun:
    callee_party = start_listening(callee(cluster, workdir / "uas", scenario=uas,
                                          delay_ms=answer_after_ms, timeout=timeout))
    register(cluster, parties[1], [callee_party.port])
    run = CallRun(caller(cluster, workdir / "uac", parties[0], parties[1], scenario=uac,
                         hold_ms=hold_ms, timeout=timeout), [callee_party])
    run.uac.sipp.start()
    return run


def finish(run: CallRun) -> None:
    try:
        for party in [run.uac, *run.uas]:
            if party.sipp.process is not None:
                party.result = party.sipp.wait()
    finally:
        for party in [run.uac, *run.uas]:
            party.sipp.stop()


def set_up_calls(cluster: Cluster, tmp_path: Path, fault: str) -> Calls:
    """The earlier call done, call "up" answered and ACKed, call "ringing" ringing."""
    provision(cluster, USERS)
    earlier = run_call(cluster, tmp_path / "earlier", *EARLIER, uac={"hold_ms": 200})
    assert earlier.uac.ok and earlier.uas[0].ok, earlier.report()
    assert len(wait_cdrs(cluster, EARLIER[0])) == 1
    later_callee = start_listening(callee(cluster, tmp_path / "later-uas", timeout=120))
    register(cluster, LATER[1], [later_callee.port])
    up = start_call(cluster, tmp_path / "up", UP, hold_ms=UP_HOLD_MS[fault], answer_after_ms=0)
    up_tag, _ = call_in_state(cluster, UP[0], ("answered",))
    ringing = start_call(cluster, tmp_path / "ringing", RINGING, hold_ms=500,
                         answer_after_ms=RING_MS[fault])
    ringing_tag, _ = call_in_state(cluster, RINGING[0], ("ringing", "early"))
    unanswered = start_call(cluster, tmp_path / "unanswered", UNANSWERED, hold_ms=0,
                            answer_after_ms=0, uac="call_uac_fail.xml",
                            uas="call_uas_ring.xml")
    call_in_state(cluster, UNANSWERED[0], ("ringing", "early"))
    # The caller's ACK of "up" is in once the call's INVITE transaction says so.
    assert wait_for(lambda: acked(cluster, up_tag), 5.0), trace_lines(cluster, up_tag)
    return Calls(up, ringing, unanswered, later_callee, up_tag, ringing_tag)


def acked(cluster: Cluster, tag: str) -> bool:
    return any(e["first"].startswith("ACK") and e["leg"] == "a" and e["dir"] == "in"
               for e in cluster.store.trace(tag))


def snapshot(cluster: Cluster, calls: Calls) -> dict:
    """What must come back after the fault."""
    store = cluster.store
    realm = cluster.config.realm
    return {
        "users": sorted(u["user"] for u in store.list_users(realm)),
        "bindings": {user: sorted(b.contact for b in store.bindings(f"{user}@{realm}"))
                     for user in (UP[1], RINGING[1], LATER[1], UNANSWERED[1])},
        "calls": {tag: store.load_call(tag) for tag in (calls.up_tag, calls.ringing_tag)},
        "sessions": {tag: (store.relay_session(tag) or {}).get("relay")
                     for tag in (calls.up_tag, calls.ringing_tag)},
        "cdrs": store.cdrs_after(),
    }


def check_state_is_back(cluster: Cluster, calls: Calls, before: dict) -> None:
    after = wait_for(lambda: _snapshot_or_none(cluster, calls), 15.0, step=0.2)
    assert after is not None, "Redis did not come back:\n" + cluster.log_tail()
    assert after["users"] == before["users"] == sorted(USERS)
    assert after["bindings"] == before["bindings"]
    assert all(after["bindings"].values())
    # Each call's record is the one written last before the fault, version and all.
    assert after["calls"] == before["calls"]
    assert after["sessions"] == before["sessions"]
    assert all(after["sessions"].values()), after["sessions"]
    assert after["cdrs"] == before["cdrs"] and len(before["cdrs"]) == 1


def _snapshot_or_none(cluster: Cluster, calls: Calls) -> dict | None:
    try:
        return snapshot(cluster, calls)
    except Exception:  # Redis still loading or starting
        return None


def check_calls_complete(cluster: Cluster, tmp_path: Path, calls: Calls) -> None:
    for run in (calls.up, calls.ringing, calls.unanswered):
        finish(run)
    for (user, _), run, tag in ((UP, calls.up, calls.up_tag),
                                (RINGING, calls.ringing, calls.ringing_tag)):
        assert run.uac.ok and run.uas[0].ok, run.report() + "\n" + trace_lines(cluster, tag)
        (bye,) = received(run.uas[0].messages, "BYE")
        assert bye.header("Reason") == REASON
        (answer,) = received(run.uac.messages, "INVITE", 200)
        cdrs = wait_cdrs(cluster, user)
        assert len(cdrs) == 1, cdrs
        assert (cdrs[0]["hangup_cause"], cdrs[0]["hangup_side"]) == ("NORMAL_CLEARING",
                                                                     "caller")
        assert all_ended(cluster, user) == []
    # The no-answer timer armed before the fault fired after it.
    run = calls.unanswered
    assert run.uac.ok and run.uas[0].ok, run.report()
    finals = {m.status for m in received(run.uac.messages, "INVITE", final=True)
              if m.header("CSeq") == "2 INVITE"}
    assert finals == {480}
    assert received(run.uas[0].messages, "CANCEL")
    assert [(c["hangup_cause"], c["hangup_side"]) for c in wait_cdrs(cluster, UNANSWERED[0])] \
        == [("NO_ANSWER", "system")]
    # A phone registered before the fault rings without registering again.
    later = CallRun(caller(cluster, tmp_path / "later-uac", *LATER, hold_ms=200),
                    [calls.later_callee])
    later.uac.result = later.uac.sipp.run()
    finish(later)
    assert later.uac.ok and later.uas[0].ok, later.report()
    assert [c["hangup_cause"] for c in wait_cdrs(cluster, LATER[0])] == ["NORMAL_CLEARING"]
    assert len(cdrs_of(cluster, EARLIER[0])) == 1


def check_processes_settle(cluster: Cluster) -> None:
    """Every process RUNNING (none FATAL or in a restart loop) and every worker joined."""
    def settled():
        states = cluster.processes()
        return (states and all(state == "RUNNING" for state, _ in states.values())
                and cluster.joined_workers() == cluster.config.workers.count)
    assert wait_for(settled, PROCESSES_WAIT, step=0.2), (cluster.processes(),
                                                         cluster.log_tail())


def stop_calls(calls: Calls | None) -> None:
    if calls is None:
        return
    for run in (calls.up, calls.ringing, calls.unanswered):
        for party in [run.uac, *run.uas]:
            party.sipp.stop()
    for party in [calls.later_callee]:
        party.sipp.stop()


# ------------------------------------------------------------------ kill -9 of redis-server
@pytest.fixture
def aof_redis(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


def test_calls_registrations_and_cdrs_survive_kill9_of_redis(tmp_path, aof_redis):
    calls = None
    with running_cluster(tmp_path / "cluster", aof_redis.url, workers=2,
                         settings=SETTINGS) as cluster:
        try:
            calls = set_up_calls(cluster, tmp_path, "redis")
            time.sleep(1.1)  # past one AOF fsync: the state is on disk, not only written
            before = snapshot(cluster, calls)
            killed = time.monotonic()
            aof_redis.restart(down=DOWN)
            print(f"redis kill -9: answering again after {time.monotonic() - killed:.2f} s")
            check_state_is_back(cluster, calls, before)
            check_calls_complete(cluster, tmp_path, calls)
            check_processes_settle(cluster)
        finally:
            stop_calls(calls)


# ------------------------------------------------------------------ the whole host
def managed_cluster(tmp_path: Path) -> Cluster:
    """A cluster whose Redis is the managed one, rendered by the launcher like `make run`'s:
    an AOF in its own state folder."""
    state = tmp_path / "state" / "redis"
    state.mkdir(parents=True)  # `sipcluster up` creates it (launch.write_config)
    url = f"redis://127.0.0.1:{free_tcp_port()}/0"
    settings = {**SETTINGS, "redis": {"managed": True, "state_dir": str(state)}}
    # and gives it a password, which every process reads from the state folder
    launch.ensure_redis_password(load(env={"SIPCLUSTER_REDIS_STATE_DIR": str(state)},
                                      secret_file=None))
    cluster = Cluster(tmp_path / "cluster", url, workers=2, settings=settings)
    assert "--appendonly yes" in cluster.conf.read_text()
    assert f"{state}/redis-auth.conf" in cluster.conf.read_text()
    assert cluster.config.redis.url != url  # the password is in it
    return cluster


def start(cluster: Cluster) -> None:
    subprocess.run(launch.supervisord_command(cluster.conf), check=True, cwd=ROOT,
                   env=cluster.env)
    launch.wait_for_redis(cluster.config.redis.url, timeout=20.0)
    cluster.wait_ready(30.0)
    wait_relays(cluster)


def wait_relays(cluster: Cluster, timeout: float = 20.0) -> None:
    """Until every relay announces itself: a call offered before gets 503 (no relay)."""
    client = RelayClient(cluster.store, host=cluster.config.sip.effective_host_id,
                         key=control_key(cluster.config.auth.secret))

    def live() -> bool:
        client._nodes_read = -1e9  # read relay:nodes again now
        return len(client.relays()) == cluster.config.media.relays
    assert wait_for(live, timeout, step=0.1), cluster.log_tail()


def crash(cluster: Cluster) -> None:
    """The host dies: supervisord first (so it restarts nothing), then every process it ran,
    all with SIGKILL."""
    children = [pid for _, pid in cluster.processes().values() if pid]
    supervisord = int((cluster.run_dir / "supervisord.pid").read_text())
    os.kill(supervisord, signal.SIGKILL)
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)  # supervisord makes each child a group leader
        except ProcessLookupError:
            pass
    for pid in [supervisord, *children]:
        assert wait_for(lambda pid=pid: not _alive(pid), 10.0), f"pid {pid} survived SIGKILL"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["stop", "crash", "supervisord"])
def test_calls_registrations_and_cdrs_survive_a_host_restart(tmp_path, how):
    require_redis_server()
    cluster = managed_cluster(tmp_path)
    calls = None
    try:
        start(cluster)
        calls = set_up_calls(cluster, tmp_path, "host")
        time.sleep(1.1)  # past one AOF fsync
        before = snapshot(cluster, calls)
        down_at = time.monotonic()
        if how == "stop":
            cluster.stop()  # `make stop`: workers drain, relays save, Redis closes its AOF
            assert not (cluster.run_dir / "supervisord.pid").exists(), cluster.log_tail()
        elif how == "crash":
            crash(cluster)
        else:  # only supervisord is killed: `sipcluster up` stops what it left running
            programs = {name.split(":")[-1] for name in cluster.processes()}
            os.kill(int((cluster.run_dir / "supervisord.pid").read_text()), signal.SIGKILL)
            assert set(launch.leftover_processes(cluster.run_dir).values()) == programs
            assert launch.stop_leftovers(cluster.run_dir) == len(programs)
            assert launch.leftover_processes(cluster.run_dir) == {}
        start(cluster)
        outage = time.monotonic() - down_at
        check_state_is_back(cluster, calls, before)
        # The relays bound their sessions again from Redis.
        restored = sum(int(n) for name in ("relay-0", "relay-1")
                       for n in re.findall(r"restored (\d+) sessions", cluster.read_log(name)))
        assert restored == 3, cluster.log_tail()  # up, ringing, unanswered
        print(f"host {how}: SIP back after {outage:.1f} s")
        assert outage < RESTART_LIMIT, f"the restart took {outage:.1f} s"
        check_calls_complete(cluster, tmp_path, calls)
        check_processes_settle(cluster)
    finally:
        stop_calls(calls)
        cluster.stop()
        launch.stop_leftovers(cluster.run_dir, timeout=10.0)  # had supervisord been killed


# ------------------------------------------------------------------ demo users
def test_demo_users_go_only_into_an_empty_directory(tmp_path, redis_url):
    """`sipctl users demo --if-empty` (what `sipcluster up` runs) adds the demo users to an
    empty directory once; after that an operator's change of password and deletion stay,
    whatever the number of starts.  Plain `sipctl users demo` still adds them."""
    from cluster.cli import main as sipctl

    config_path = tmp_path / "cluster.toml"
    config_path.write_text(f'[redis]\nurl = "{redis_url}"\nmanaged = false\n'
                           '[auth]\nrealm = "demo.test"\nsecret = "s"\n')
    config = load(str(config_path), env={}, secret_file=None)
    store = Store(redis_url, timeout=2.0)
    realm = config.realm

    def ha1(user: str) -> str:
        return store.get_user(user, realm)["ha1"]["MD5"]

    assert not store.has_users()
    assert sipctl(["--config", str(config_path), "users", "demo", "--if-empty"]) == 0
    demo = [u["user"] for u in store.list_users(realm)]
    assert demo == [str(n) for n in range(1000, 1020)]
    demo_ha1 = ha1("1002")
    # The operator changes a password and deletes a user; the cluster is started again.
    assert sipctl(["--config", str(config_path), "users", "add", "1002",
                   "--password", "n3w-secret"]) == 0
    assert sipctl(["--config", str(config_path), "users", "del", "1019"]) == 0
    changed = ha1("1002")
    assert changed != demo_ha1
    for _ in range(2):
        assert sipctl(["--config", str(config_path), "users", "demo", "--if-empty"]) == 0
    assert ha1("1002") == changed
    assert store.get_user("1019", realm) is None
    # A directory of an operator's own users, in another realm even, gets no demo user.
    store.redis.flushdb()
    store.put_user("alice", "other.test", {"MD5": "0" * 32})
    assert sipctl(["--config", str(config_path), "users", "demo", "--if-empty"]) == 0
    assert store.list_users(realm) == []
    # Asked for explicitly, the demo users are written (passwords reset to the demo one).
    assert sipctl(["--config", str(config_path), "users", "demo"]) == 0
    assert len(store.list_users(realm)) == 20 and ha1("1002") == demo_ha1


# ------------------------------------------------------------------ a relay starting early
def test_a_relay_started_before_redis_answers_restores_its_sessions_later(redis_url):
    """After a host restart the relays may start while Redis still loads its data: they
    read their sessions again once it answers, instead of starting empty."""
    from test_relay import KEY, Phone, RelayProcs, call, receive, rtp, wait_for_relays

    ports = {"rtp_port_min": "38800", "rtp_port_max": "38999", "media_timeout": "30"}
    store = Store(redis_url, timeout=2.0)
    client = RelayClient(store, host="relay-test", key=KEY)
    relays = RelayProcs(redis_url)
    a, b = Phone(), Phone()
    try:
        relays.start(0, **ports)
        wait_for_relays(client, 1)
        to_a, to_b = call(client, a, b, call_id="early-start")
        a.rtp.sendto(rtp(1), ("127.0.0.1", to_a.port))
        assert receive(b.rtp) is not None
        assert wait_for(lambda: store.relay_session("early-start"), 5.0)
        relays.kill(0)
        # Every command waits while Redis is paused, as while it loads: the relay's first
        # read of its sessions times out.
        store.redis.execute_command("CLIENT", "PAUSE", 2500, "ALL")
        paused = time.monotonic()
        relays.start(0, **ports)
        resumed = None
        seq = 1
        while resumed is None and time.monotonic() - paused < 8.0:
            seq += 1
            a.rtp.sendto(rtp(seq), ("127.0.0.1", to_a.port))
            if receive(b.rtp, 0.05) is not None:
                resumed = time.monotonic() - paused
        assert resumed is not None, "the session was never restored"
        assert resumed > 2.0  # not before Redis answered: the read did fail first
    finally:
        relays.stop_all()
        a.close()
        b.close()



# ------------------------------------------------------------------ a version Redis lost
def test_a_call_version_lost_by_redis_is_not_given_again(redis_url):
    """Redis comes back without its last write (the AOF's last second after a power loss):
    the next write must not reuse the lost version number, or a worker holding the lost
    record in its cache would pass its compare-and-set and write from a state Redis no
    longer has."""
    from cluster.store import call_key

    store = Store(redis_url, timeout=2.0)
    first = store.save_call("lost-version", 0, {"state": "ringing"}, 60.0)
    kept = store.redis.dump(call_key("lost-version"))
    lost = store.save_call("lost-version", first, {"state": "answered"}, 60.0)
    assert lost is not None and lost > first
    store.redis.restore(call_key("lost-version"), 0, kept, replace=True)  # the rollback
    again = store.save_call("lost-version", first, {"state": "ended"}, 60.0)  # another worker
    assert again is not None and again > first
    assert again != lost
    # The worker that cached the lost record loses its compare-and-set and reads Redis's.
    assert store.save_call("lost-version", lost, {"state": "answered", "stale": True},
                           60.0) is None
    assert store.load_call("lost-version") == (again, {"state": "ended"})


# ------------------------------------------------------------------ a session set up blind
def test_a_relay_session_set_up_while_redis_is_down_is_kept(tmp_path):
    """A call set up while the relay cannot reach Redis (killed, about to come back): the
    session's first record is written once Redis answers, and the session is not taken for
    one whose record was deleted (the callee's answer would then find no session, and the
    call would never be answered)."""
    from test_relay import KEY, Phone, RelayProcs, receive, rtp, wait_for_relays

    require_redis_server()
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    ports = {"rtp_port_min": "38800", "rtp_port_max": "38999", "media_timeout": "30"}
    store = Store(server.url, timeout=2.0)
    client = RelayClient(store, host="relay-test", key=KEY)
    relays = RelayProcs(server.url)
    a, b = Phone(), Phone()
    try:
        relays.start(0, **ports)
        wait_for_relays(client, 1)
        server.stop()
        relay_failed_just_now(server.port)
        server.start()
        # Redis answers again, but the relay waits out its back-off (1 s) before it tries
        # Redis again: the session's first save is left to its next flush.
        client.offer("set-up-blind", "a", [a.spec()])
        # The relay writes the session's record once its back-off is over (a few seconds
        # at most); until then the answer finds no session (the callee repeats its 200).
        assert wait_for(lambda: _session_or_none(store, "set-up-blind"), 8.0, step=0.2)
        time.sleep(1.0)  # a session taken for gone would have been dropped by now
        to_a = client.answer("set-up-blind", "b", [b.spec()]).streams[0]
        a.rtp.sendto(rtp(1), ("127.0.0.1", to_a.port))
        assert receive(b.rtp) is not None
    finally:
        relays.stop_all()
        a.close()
        b.close()
        server.stop()


def relay_failed_just_now(port: int, timeout: float = 5.0) -> None:
    """While Redis is down, stand in for it on its port until the relay connects (its
    heartbeat, every 0.5 s unless backing off), and hang up on it: the relay then backs off
    for a second from now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        listener.settimeout(timeout)
        connection, _ = listener.accept()
        connection.close()


def _session_or_none(store, call_id: str):
    try:
        return store.relay_session(call_id)
    except Exception:  # Redis still starting
        return None
