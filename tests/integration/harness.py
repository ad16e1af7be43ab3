"""A real cluster for integration tests: supervisord, dispatcher, workers, on free ports.

It renders the same supervisord configuration ``make run`` uses, into a
temporary folder, against the test's own redis-server.  ``netns`` starts
supervisord (and so every process of the cluster) inside a network namespace
the test made, as one host of several (tests/integration/netns.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.cli import ha1_hashes
from cluster.config import load
from cluster.launch import render_supervisord, supervisord_command
from cluster.store import TX_PREFIX, Store, StoreUnavailable, reg_key
from conftest import ROOT, free_tcp_port, free_udp_port

SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")
# sipctl as ``python -m cluster.cli`` from this checkout, the package the cluster runs (an
# installed ``sipctl`` script may import another checkout's).
SIPCTL = (sys.executable, "-m", "cluster.cli")
SECRET = "integration-test-secret"


class Cluster:
    def __init__(self, tmp: Path, redis_url: str, *, workers: int = 2,
                 settings: dict | None = None, netns: str | None = None,
                 client_bind: str = "127.0.0.1"):
        self.tmp = tmp
        self.netns = netns
        self.client_bind = client_bind  # where the readiness probe sends from
        self.redis_url = redis_url
        self.sip_port = free_sip_port()
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "log"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sections = {
            "sip": {"bind": "127.0.0.1", "port": self.sip_port, "host_id": "test-host"},
            "dispatcher": {"control_path": str(self.run_dir / "dispatcher.sock"),
                           "heartbeat_interval": 0.2, "dead_after": 1.0},
            "workers": {"count": workers},
            "redis": {"url": redis_url, "managed": False},
            "auth": {"secret": SECRET, "realm": "127.0.0.1"},
            "log": {"dir": str(self.log_dir), "level": "INFO"},
            "metrics": {"port": free_tcp_port()},
            "media": {"mode": "bypass"},
        }
        for section, values in (settings or {}).items():
            sections.setdefault(section, {}).update(values)
        self.config_path = tmp / "cluster.toml"
        self.config_path.write_text(_toml(sections))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SIPCLUSTER_") and k != "REDIS_URL"}
        env["SIPCLUSTER_CONFIG"] = str(self.config_path)
        self.env = env
        self.config = load(str(self.config_path), env=env)
        # The configuration's URL: a managed Redis's carries the password of its state folder.
        self.store = Store(self.config.redis.url, timeout=2.0)
        self.conf = self.run_dir / "supervisord.conf"
        self.conf.write_text(render_supervisord(
            self.config, run_dir=self.run_dir, python=sys.executable,
            env={"SIPCLUSTER_CONFIG": str(self.config_path)}))

    @property
    def address(self) -> tuple[str, int]:
        return (self.config.sip.bind, self.config.sip.port)

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 20.0) -> Cluster:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        subprocess.run([*prefix, *supervisord_command(self.conf)], check=True, cwd=ROOT,
                       env=self.env)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every worker has joined the dispatcher, OPTIONS is answered and every
        program is RUNNING (past its startsecs: a test may read the processes' pids)."""
        from sipua import UA
        deadline = time.monotonic() + timeout
        with UA(self.address, bind=self.client_bind) as ua:
            while time.monotonic() < deadline:
                if self.joined_workers() >= self.config.workers.count:
                    if ua.options(timeout=0.5) is not None:
                        break
                time.sleep(0.1)
            else:
                raise RuntimeError("cluster did not come up:\n" + self.log_tail())
        while time.monotonic() < deadline:
            states = [state for state, _ in self.processes().values()]
            if states and all(state == "RUNNING" for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError(f"cluster did not come up: {self.processes()}\n" + self.log_tail())

    def joined_workers(self) -> int:
        """Workers the dispatcher routes to, from its heartbeat in Redis (any log level);
        0 while Redis does not answer (a managed one starting with the cluster)."""
        try:
            processes = self.store.processes("dispatcher")
        except StoreUnavailable:
            return 0
        for proc in processes:
            if proc.get("host") == self.config.sip.effective_host_id:
                return len(proc.get("workers", []))
        return 0

    def stop(self) -> None:
        subprocess.run([SUPERVISORCTL, "-c", str(self.conf), "shutdown"],
                       capture_output=True, cwd=ROOT, env=self.env)
        pid_file = self.run_dir / "supervisord.pid"
        deadline = time.monotonic() + 15
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def ctl(self, *args: str) -> str:
        return subprocess.run([SUPERVISORCTL, "-c", str(self.conf), *args], capture_output=True,
                              text=True, cwd=ROOT, env=self.env).stdout

    def processes(self) -> dict[str, tuple[str, int]]:
        """Program name -> (state, pid) as supervisorctl reports them (pid 0 when not running)."""
        table = {}
        for line in self.ctl("status").splitlines():
            fields = line.split()
            if len(fields) >= 2:
                pid = re.search(r"\bpid (\d+)", line)
                table[fields[0]] = (fields[1], int(pid.group(1)) if pid else 0)
        return table

    def pid_of(self, program: str) -> int:
        return int(self.ctl("pid", program).strip())

    def kill9(self, program: str) -> int:
        pid = self.pid_of(program)
        os.kill(pid, signal.SIGKILL)
        return pid

    def sipctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``sipctl --config <this cluster's> ARGS``; with ``check`` a non-zero exit fails
        the test, showing what it printed."""
        done = subprocess.run([*SIPCTL, "--config", str(self.config_path), *args],
                              capture_output=True, text=True, cwd=ROOT, env=self.env,
                              timeout=30)
        if check:
            assert done.returncode == 0, f"sipctl {' '.join(args)}: {done.stderr}{done.stdout}"
        return done

    def sipctl_json(self, *args: str):
        """``sipctl ARGS --json``, decoded."""
        return json.loads(self.sipctl(*args, "--json").stdout)

    # ---------------------------------------------------------------- data
    def add_user(self, user: str, password: str) -> None:
        realm = self.config.realm
        self.store.put_user(user, realm, ha1_hashes(user, realm, password))

    def clear_registrations(self) -> None:
        """Forget bindings, nonce-counts, stored transactions and auth failures; keep users."""
        client = self.store.redis
        for aor in self.store.registered_aors():
            client.delete(reg_key(aor))
        indexes = self.store.registration_index_keys()
        if indexes:
            client.delete(*indexes)
        for pattern in ("nc:*", f"{TX_PREFIX}:*", "authfail:*", "authuser:*", "authlock:*"):
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)

    def read_log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def log_troubles(self, lines: int = 30) -> str:
        """The first WARNING and ERROR lines of each program's log: what a failing test
        needs first (the first line of a streak names the error; later ones only count)."""
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            found = [line for line in path.read_text(errors="replace").splitlines()
                     if " WARNING " in line or " ERROR " in line][:lines]
            if found:
                out.append(f"--- {path.name} (warnings and errors)\n" + "\n".join(found))
        return "\n".join(out)


@contextmanager
def running_cluster(tmp: Path, redis_url: str, **kwargs) -> Iterator[Cluster]:
    """A started cluster that is shut down afterwards, also when it failed to come up."""
    cluster = Cluster(tmp, redis_url, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _toml(sections: dict) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value}")
            elif isinstance(value, (list, tuple)):
                items = ", ".join(repr(str(v)).replace("'", '"') for v in value)
                lines.append(f"{key} = [{items}]")
            else:
                lines.append(f'{key} = "{value}"')
        lines.append("")
    return "\n".join(lines)


def free_sip_port() -> int:
    """A port free for both UDP and TCP: the dispatcher listens for SIP on both."""
    for _ in range(50):
        port = free_udp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


def wait_for(condition, timeout: float, step: float = 0.05):
    """Poll ``condition`` until it returns something true; that value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)
