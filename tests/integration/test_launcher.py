"""`sipcluster up` as an operator runs it: a taken SIP port, overrides kept between starts,
a change that restarts only the programs it concerns, a Redis URL change refused.

Each test runs the launcher itself (python -m cluster.launch) with its own home folder
(SIPCLUSTER_HOME: run/, the logs, the overrides) against the session's Redis.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest
from supervisor.xmlrpc import SupervisorTransport
from test_calls_relay import PASSWORD, assert_received_all, call_between, settle_and_stop

from conftest import ROOT, free_tcp_port, free_udp_port

pytestmark = pytest.mark.integration


class Launcher:
    def __init__(self, tmp: Path, redis_url: str, sip_port: int, **sections: dict):
        self.home = tmp / "home"
        self.address = ("127.0.0.1", sip_port)
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "cluster.toml"
        values = {"sip": {"port": sip_port, "host_id": f"launch-{sip_port}"},
                  "metrics": {"port": free_tcp_port()},
                  "media": {"mode": "bypass"}, "redis": {"url": redis_url, "managed": False},
                  "auth": {"realm": "127.0.0.1"}}
        for name, table in sections.items():
            values.setdefault(name, {}).update(table)
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
            for name, table in values.items()))
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SIPCLUSTER_") and k != "REDIS_URL"}
        self.env.update(SIPCLUSTER_HOME=str(self.home), SIPCLUSTER_CONFIG=str(self.config))

    def run(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.launch", *args], cwd=ROOT,
                              env={**self.env, **env}, text=True, capture_output=True,
                              timeout=timeout)

    def processes(self) -> dict[str, tuple[str, int]]:
        transport = SupervisorTransport(None, None, f"unix://{self.home}/run/supervisor.sock")
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return {f"{i['group']}:{i['name']}": (i["statename"], i["pid"])
                for i in proxy.supervisor.getAllProcessInfo()}

    def stop(self) -> None:
        self.run("down", timeout=40)


@pytest.fixture
def launcher_factory(tmp_path, redis_url):
    made: list[Launcher] = []

    def make(sip_port: int | None = None, **sections) -> Launcher:
        launcher = Launcher(tmp_path / f"l{len(made)}", redis_url,
                            sip_port or free_udp_port(), **sections)
        made.append(launcher)
        return launcher

    yield make
    for launcher in made:
        launcher.stop()


def test_a_taken_sip_port_fails_within_5_s_with_one_line(launcher_factory):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.1", 0))
        port = stranger.getsockname()[1]
        launcher = launcher_factory(port)
        started = time.monotonic()
        done = launcher.run("up", timeout=30)
        elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert elapsed < 5.0, f"{elapsed:.1f} s:\n{done.stderr}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(
        f"ERROR: dispatcher: cannot bind 127.0.0.1:{port}: Address already in use (held by "
        f"pid {os.getpid()} "), done.stderr
    assert len(done.stderr.splitlines()) <= 3, done.stderr


def test_a_configuration_error_in_a_restarted_program_ends_the_start(launcher_factory):
    launcher = launcher_factory()
    assert launcher.run("up").returncode == 0
    # The file changes under a running cluster: what a restarted worker would read.
    launcher.config.write_text(launcher.config.read_text() + "[workers]\ncount = 3\n"
                               "max_inflihgt = 10\n")
    done = launcher.run("up")
    assert done.returncode == 1
    assert "unknown setting workers.max_inflihgt (did you mean max_inflight?)" in done.stderr
    assert "Traceback" not in done.stderr


def test_overrides_are_kept_and_restart_only_what_they_concern(launcher_factory):
    launcher = launcher_factory(media={"mode": "relay", "relays": 1,
                                       "rtp_port_min": 41000 + os.getpid() % 1000 * 20,
                                       "rtp_port_max": 41019 + os.getpid() % 1000 * 20})
    first = launcher.run("up")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Overrides  none" in first.stdout
    assert "(1 relays up)" in first.stdout
    before = launcher.processes()
    assert sorted(before) == ["dispatcher:dispatcher", "relay:relay-0", "worker:worker-0",
                              "worker:worker-1"]

    scaled = launcher.run("up", SIPCLUSTER_WORKERS_COUNT="3")
    assert scaled.returncode == 0, scaled.stdout + scaled.stderr
    assert "Overrides  SIPCLUSTER_WORKERS_COUNT=3" in scaled.stdout
    after = launcher.processes()
    assert sorted(after) == [*sorted(before)[:2], "worker:worker-0", "worker:worker-1",
                             "worker:worker-2"]
    for program in ("dispatcher:dispatcher", "relay:relay-0"):
        assert after[program] == before[program], scaled.stdout  # same pid: not restarted
    assert all(state == "RUNNING" for state, _ in after.values()), after

    # A later plain start keeps the override (and restarts nothing); RESET drops it.
    again = launcher.run("up")
    assert again.returncode == 0 and "SIPCLUSTER_WORKERS_COUNT=3" in again.stdout
    assert launcher.processes() == after
    reset = launcher.run("up", "--reset")
    assert reset.returncode == 0 and "Overrides  none" in reset.stdout
    assert sorted(launcher.processes()) == sorted(before)

    # sipctl reads the realm the cluster runs with, and says when its own differs.
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "users", "add", "2000",
                           "--password", "pw"], cwd=ROOT, text=True, capture_output=True,
                          env={**launcher.env, "SIPCLUSTER_AUTH_REALM": "elsewhere"}, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "user 2000@127.0.0.1 saved" in done.stdout
    assert "elsewhere" in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_scaling_workers_with_a_call_up_loses_no_rtp_packet(launcher_factory):
    """More workers restart the worker group only: the relay carrying an answered call keeps
    every packet in both directions, and the call is still there to hang up."""
    base = 43000 + os.getpid() % 1000 * 20
    launcher = launcher_factory(media={"mode": "relay", "relays": 1, "rtp_port_min": base,
                                       "rtp_port_max": base + 19})
    started = launcher.run("up")
    assert started.returncode == 0, started.stdout + started.stderr
    for user in ("2301", "2302"):
        added = subprocess.run([sys.executable, "-m", "cluster.cli", "users", "add", user,
                                "--password", PASSWORD], cwd=ROOT, text=True,
                               capture_output=True, env=launcher.env, timeout=30)
        assert added.returncode == 0, added.stderr
    relay_pid = launcher.processes()["relay:relay-0"][1]
    with call_between(launcher, 2301, 2302) as call:
        caller, callee = call.caller, call.callee
        assert caller.media.wait_packets(25, 3.0) and callee.media.wait_packets(25, 3.0)
        scaled = launcher.run("up", SIPCLUSTER_WORKERS_COUNT="3")
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr
        after = launcher.processes()
        assert after["relay:relay-0"] == ("RUNNING", relay_pid)
        assert sorted(after)[-3:] == ["worker:worker-0", "worker:worker-1", "worker:worker-2"]
        time.sleep(1.0)  # media keeps flowing after the new workers are up
        settle_and_stop(caller, callee)
        assert_received_all(callee, caller, call.callee_relay_port)
        assert_received_all(caller, callee, call.caller_relay_port)
        assert caller.media.sent >= 100 and callee.media.sent >= 100  # 2 s or more of audio
        assert caller.hangup().status == 200
        assert callee.wait_request("BYE") is not None


def test_a_redis_url_that_would_drop_the_managed_redis_needs_force(launcher_factory, redis_url):
    port = free_tcp_port()
    launcher = launcher_factory(redis={"url": f"redis://127.0.0.1:{port}/0", "managed": True})
    first = launcher.run("up")
    assert first.returncode == 0, first.stdout + first.stderr
    managed = launcher.processes()["redis:redis"]

    refused = launcher.run("up", REDIS_URL=redis_url)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"ERROR: refusing to stop the managed Redis on 127.0.0.1:{port} that the running "
        f"cluster uses for redis.url {redis_url} (not managed) (its data stays in "
        f"{launcher.home}/state/redis): add --force (make run FORCE=1) to switch anyway"]
    assert launcher.processes()["redis:redis"] == managed  # untouched
    assert not (launcher.home / "run" / "overrides.json").read_text().count("REDIS_URL")

    forced = launcher.run("up", "--force", REDIS_URL=redis_url)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "redis:redis" not in launcher.processes()
