"""`sipcluster up|down|status|render|run`: run the whole cluster of one host under supervisord.

`up` renders run/supervisord.conf from deploy/supervisord.conf.in (packaged as
cluster/data/) for the loaded configuration, stops whatever a killed supervisord left
running (they hold the ports), starts supervisord (or has a running one apply the new
configuration group by group), waits for Redis, provisions the demo users with
`sipctl users demo --if-empty` (only into a directory without any user, so an
operator's users and passwords are never touched), sends SIP OPTIONS to the
advertised address until the cluster answers, and waits for every relay's heartbeat.
Meanwhile it watches the programs over supervisord's XML-RPC interface: one that
cannot start ends the wait with one line, its name and the error it logged during
this start.  `down` shuts supervisord down and waits for it.

The SIPCLUSTER_* / REDIS_URL overrides given to `up` are kept in run/overrides.json
for later starts and sipctl (`--reset` drops them); the programs read them from there,
and each program's section carries a digest of the settings it reads, so a change
restarts only the programs it concerns.

The managed Redis keeps its data in redis.state_dir (an append-only file,
fsynced every second), outside run/: `make clean` keeps it, a host restart
finds every user, registration, live call and CDR again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import xmlrpc.client
from collections.abc import Callable, Mapping
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

import redis
from supervisor.xmlrpc import SupervisorTransport

from cluster import redisclient
from cluster.config import (
    DATA_DIR,
    DEFAULT_PATH,
    EXIT_CONFIG,
    HOME,
    OVERRIDES_FILE,
    ROOT,
    RUN_DIR,
    SECRET_FILE,
    Config,
    ConfigError,
    checkout_root,
    fill_redis_password,
    load,
    read_overrides,
    read_redis_password,
    redis_auth_file,
    setting_env_names,
    use_home,
    write_overrides,
)
from cluster.sip.ids import MAGIC_COOKIE, host_part, via

TEMPLATE = DATA_DIR / "supervisord.conf.in"
# The working folder of supervisord and its programs: the checkout (so `python -m` runs
# its code even without an install), else the home folder (never site-packages).
WORK_DIR = ROOT if checkout_root() is not None else HOME
# What `sipcluster up` last started, for sipctl (the realm and Redis URL in force) and for
# the next `up` (whether it would drop the managed Redis).
LAUNCH_RECORD = RUN_DIR / "launch.json"
VENV_BIN = Path(sys.executable).parent
REDIS_WAIT = 60.0  # a Redis loading a large append-only file answers LOADING meanwhile
SIP_WAIT = 30.0
PROBE_INTERVAL = 0.5
STOP_WAIT = 30.0
SETTLE_WAIT = 5.0  # startsecs is 1: a healthy process leaves STARTING well within this
RELAY_WAIT = 15.0
WATCH_INTERVAL = 0.2
LOG_TAIL_LINES = 5
# A process that dies within startsecs of its start is retried startretries times (after
# 1, 2, 3 s) and then left FATAL: a crash loop ends instead of going on for ever.
START_SECS = 1
START_RETRIES = 3
# Start order: Redis first, then the dispatcher the workers attach to.
PRIORITY = {"redis": 10, "dispatcher": 20, "relay": 30, "worker": 40}


class LaunchError(RuntimeError):
    """Something the operator has to fix; the message says what."""


class Timeout(LaunchError):
    """A wait ran out with no program saying why."""


# --- rendering ---------------------------------------------------------------------------------


def render_supervisord(
    config: Config,
    *,
    run_dir: Path = RUN_DIR,
    python: str = sys.executable,
    env: Mapping[str, str] = os.environ,
) -> str:
    """The text of run/supervisord.conf for ``config``."""
    log_dir = Path(config.log.dir)
    for path in (WORK_DIR, HOME, run_dir, log_dir, Path(python), Path(config.redis.state_dir)):
        # supervisord %-expands paths, some of them twice: a % cannot be escaped reliably.
        if "%" in str(path):
            raise LaunchError(f"paths with a % sign are not supported: {path}")
    env = {**passed_env(env), "SIPCLUSTER_HOME": str(HOME),
           "SIPCLUSTER_OVERRIDES": str(run_dir / OVERRIDES_FILE.name)}
    programs = [
        _program("dispatcher", [python, "-m", "cluster.dispatcher"], config, log_dir, env)
    ]
    if config.redis.managed:
        programs.insert(0, _redis_program(config, log_dir))
    if config.media.mode == "relay":
        programs.append(_program("relay", [python, "-m", "workers.relay"], config, log_dir, env,
                                 numprocs=config.media.relays, index_var="SIPCLUSTER_RELAY_INDEX"))
    programs.append(_program("worker", [python, "-m", "workers.sip"], config, log_dir, env,
                             numprocs=config.workers.count, index_var="SIPCLUSTER_WORKER_INDEX"))
    return Template(TEMPLATE.read_text()).substitute(
        root=WORK_DIR,
        run_dir=run_dir,
        log_dir=log_dir,
        programs="\n".join(programs),
    )


# The managed Redis persists every write: an append-only file (AOF) written out before the
# replies go (unless a slow disk holds an fsync for over a second: then up to 2 s later) and
# fsynced every second, so a kill -9 of Redis (or of every process) loses nothing it
# acknowledged, and a power loss or kernel crash about the last second.  RDB snapshots are
# off (the AOF holds it all; its rewrites start with an RDB preamble, which loads fast); a
# file cut short by a crash is loaded up to its last whole command; and no key is ever
# evicted (a full Redis refuses writes, which the cluster answers 503, rather than dropping
# calls).
REDIS_PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                     "--aof-use-rdb-preamble", "yes", "--aof-load-truncated", "yes",
                     "--maxmemory-policy", "noeviction")


def _redis_program(config: Config, log_dir: Path) -> str:
    server = shutil.which("redis-server") or "redis-server"
    # The password file is redis-server's configuration file (its first argument): the
    # password itself is on no command line.  Without one (a state folder the launcher has
    # not prepared: only tests render so), Redis runs without a password.
    auth = redis_auth_file(config)
    first = [str(auth)] if auth.exists() else []
    # A process title written over its environment would hide the supervisord marks by
    # which `sipcluster up` recognises a Redis that a killed supervisord left running.
    command = [server, *first, "--port", str(managed_redis_port(config)), "--bind", "127.0.0.1",
               *REDIS_PERSISTENCE, "--dir", config.redis.state_dir, "--set-proc-title", "no"]
    if config.redis.maxmemory:  # a full Redis refuses writes (noeviction): 503s, no OOM kill
        command += ["--maxmemory", config.redis.maxmemory]
    return _program("redis", command, config, log_dir, env={})


def _program(
    name: str,
    command: list[str],
    config: Config,
    log_dir: Path,
    env: Mapping[str, str],
    *,
    numprocs: int = 0,
    index_var: str = "",
) -> str:
    """One [program:x] section; ``numprocs`` > 0 makes a group of ``name-N`` processes."""
    environment = {"SIPCLUSTER_CONFIG": config.source, "PYTHONUNBUFFERED": "1"}
    environment.update(env)
    if name in CONCERNS:
        environment["SIPCLUSTER_DIGEST"] = config_digest(config, name)
    lines = [f"[program:{name}]", f"command = {shlex.join(command)}"]
    process_name = name
    if numprocs:
        process_name = f"{name}-%(process_num)d"
        lines += [f"process_name = {process_name}", f"numprocs = {numprocs}",
                  "numprocs_start = 0"]
        environment[index_var] = "%(process_num)d"  # expanded by supervisord, not escaped
    lines += [
        f"environment = {_environment(environment, keep_raw=index_var)}",
        f"directory = {WORK_DIR}",
        f"priority = {PRIORITY[name]}",
        "autostart = true",
        # Restarted whatever the exit, except a configuration error: it would fail the same.
        "autorestart = unexpected",
        f"exitcodes = {EXIT_CONFIG}",
        f"startsecs = {START_SECS}",
        f"startretries = {START_RETRIES}",
        "stopsignal = TERM",
        "stopwaitsecs = 10",
        "stopasgroup = true",
        "killasgroup = true",
        "redirect_stderr = true",
        f"stdout_logfile = {log_dir}/{process_name}.log",
        "stdout_logfile_maxbytes = 50MB",
        "stdout_logfile_backups = 5",
        "",
    ]
    return "\n".join(lines)


def passed_env(env: Mapping[str, str]) -> dict[str, str]:
    """The overrides in ``env``, handed on so every process sees them (`sipcluster up`
    passes none: its overrides are in the overrides file, which each process reads)."""
    return setting_env_names(env)


# The settings each program reads.  A program's section carries their digest, so
# supervisord's `update` restarts exactly the programs a change concerns: more workers
# restart the worker group only, never the dispatcher or the relays (the dispatcher
# reads workers.count only to know when every worker joined at its own start).
CONCERNS: dict[str, tuple[str, ...]] = {
    "dispatcher": ("sip", "dispatcher", "streams", "redis", "limits", "log", "metrics"),
    "relay": ("sip", "media", "redis", "log", "metrics"),
    "worker": ("sip", "dispatcher", "streams", "workers", "redis", "auth", "limits",
               "registrar", "hep", "timers", "media", "log", "metrics", "calls", "routes"),
}


def config_digest(config: Config, program: str) -> str:
    """A digest of the settings ``program`` reads (the secret included: a hash of it)."""
    values = {name: dataclasses.asdict(config)[name] for name in CONCERNS[program]}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _environment(variables: Mapping[str, str], keep_raw: str = "") -> str:
    pairs = []
    for name, value in variables.items():
        text = value if name == keep_raw else _escape(value)
        quote = '"' if '"' not in text else "'"
        if quote in text or "\n" in text:
            raise LaunchError(f"{name} holds quotes of both kinds or a newline; supervisord "
                              "cannot pass it on")
        pairs.append(f"{name}={quote}{text}{quote}")
    return ",".join(pairs)


def _escape(text: str) -> str:
    # supervisord expands %(name)s in these values: a literal % must be doubled.
    return text.replace("%", "%%")


def managed_redis_port(config: Config) -> int:
    """The port of the Redis the launcher runs, taken from redis.url."""
    url = urlsplit(config.redis.url)
    if url.scheme != "redis" or url.hostname not in ("127.0.0.1", "localhost"):
        raise LaunchError(
            f"redis.managed needs a redis://127.0.0.1:PORT URL, not {config.redis.url!r}; "
            "set REDIS_URL (or redis.managed = false) to use a Redis run elsewhere"
        )
    return url.port or 6379


# --- supervisord -------------------------------------------------------------------------------


def conf_path(run_dir: Path = RUN_DIR) -> Path:
    return run_dir / "supervisord.conf"


def supervisord_pid(run_dir: Path = RUN_DIR) -> int | None:
    """The pid of the supervisord serving run_dir, or None when none runs."""
    try:
        pid = int((run_dir / "supervisord.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid if b"supervisord" in cmdline else None


def supervisorctl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(VENV_BIN / "supervisorctl"), "-c", str(conf_path()), *args]
    return subprocess.run(command, text=True, capture_output=True, check=check)


def rpc(run_dir: Path = RUN_DIR) -> xmlrpc.client.ServerProxy:
    """supervisord's XML-RPC interface over its unix socket (what supervisorctl uses)."""
    transport = SupervisorTransport(None, None, f"unix://{run_dir}/supervisor.sock")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def write_config(config: Config, run_dir: Path = RUN_DIR) -> Path:
    """Render run/supervisord.conf (and create the folders it names)."""
    for folder in (run_dir, Path(config.log.dir)):
        folder.mkdir(parents=True, exist_ok=True)
    if config.redis.managed:
        state = Path(config.redis.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(0o700)  # the AOF holds every user's HA1 hashes
    target = conf_path(run_dir)
    temporary = target.with_suffix(".tmp")
    # No overrides in the sections: they are in the overrides file every program reads, so
    # a section changes only when a setting its program reads does.
    write_private(temporary, render_supervisord(config, run_dir=run_dir, env={}))
    temporary.replace(target)
    return target


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only (0600), whatever the umask and whatever
    mode an earlier file of that name had: run/supervisord.conf carries the environment
    handed to every process (SIPCLUSTER_AUTH_SECRET, a REDIS_URL with its password)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)


def ensure_redis_password(config: Config) -> bool:
    """Give the managed Redis a password once per state folder (also one that has run
    without: the next start sets it); whether one was made now.  Written like the nonce
    secret: 32 random bytes in hex, mode 0600, in the folder that holds the AOF (0700)."""
    if not config.redis.managed:
        return False
    auth = redis_auth_file(config)
    if read_redis_password(auth) is not None:
        auth.chmod(0o600)  # one copied in from elsewhere keeps no looser mode
        return False
    auth.parent.mkdir(parents=True, exist_ok=True)
    auth.parent.chmod(0o700)
    write_private(auth, f"requirepass {secrets.token_hex(32)}\n")
    return True


def ensure_secret(config: Config, secret_file: Path = SECRET_FILE) -> None:
    """Generate the nonce secret once per host when the configuration sets none."""
    if config.auth.secret or secret_file.exists():
        return
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def leftover_processes(run_dir: Path = RUN_DIR) -> dict[int, str]:
    """Processes an earlier supervisord of ``run_dir`` started and left running when it was
    killed (SIGKILL gives it no chance to stop them): pid -> program name.  supervisord
    marks every child's environment with its control socket, which names run_dir."""
    marker = f"SUPERVISOR_SERVER_URL=unix://{run_dir}/supervisor.sock".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in environ:
            name = next((v.split(b"=", 1)[1].decode(errors="replace") for v in environ
                         if v.startswith(b"SUPERVISOR_PROCESS_NAME=")), "?")
            found[int(entry.name)] = name
    return found


def stop_leftovers(run_dir: Path = RUN_DIR, timeout: float = STOP_WAIT) -> int:
    """Stop what a killed supervisord left behind, as `sipcluster down` would have: they hold
    the ports the new processes need (the new ones would crash-loop) and run unsupervised.
    SIGTERM, Redis last (the relays save their sessions into it as they stop; it writes out
    its AOF), then SIGKILL for whatever is still there after ``timeout``.  How many."""
    leftovers = leftover_processes(run_dir)
    if not leftovers:
        return 0
    print(f"stopping {len(leftovers)} process(es) an earlier supervisord left running: "
          + ", ".join(f"{name} (pid {pid})" for pid, name in sorted(leftovers.items())))
    phases = ([pid for pid, name in leftovers.items() if name != "redis"],
              [pid for pid, name in leftovers.items() if name == "redis"])
    deadline = time.monotonic() + timeout
    for pids in phases:
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
    for pid in leftovers:
        if _running(pid):
            _signal(pid, signal.SIGKILL)
    return len(leftovers)


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def supervisord_command(conf: Path) -> list[str]:
    """supervisord with prompt restarts (cluster/supervise.py), daemonizing itself."""
    return [sys.executable, "-m", "cluster.supervise", "-c", str(conf)]


def start_supervisord(conf: Path, restart_all: bool = False) -> None:
    """Start supervisord, or make a running one apply ``conf``; ``restart_all``: restart
    every program too (those whose section did not change would keep what they read at
    their start, such as a Redis URL without the password Redis now requires)."""
    if supervisord_pid() is not None:
        proxy = rpc()
        apply_update(proxy)
        if restart_all:
            proxy.supervisor.stopAllProcesses()
            proxy.supervisor.startAllProcesses(False)
        return
    # Overrides reach the programs through the overrides file only: supervisord's own
    # environment (which every program inherits) must not pin the values of this start.
    env = {name: value for name, value in os.environ.items()
           if name not in setting_env_names(os.environ)}
    result = subprocess.run(supervisord_command(conf), text=True, capture_output=True,
                            cwd=WORK_DIR, env=env)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().replace("\n", " ")
        raise LaunchError(f"supervisord failed to start: {output}")


def apply_update(proxy: xmlrpc.client.ServerProxy) -> None:
    """What `supervisorctl update` does, group by group (a group is restarted only when its
    section changed), then start whatever is stopped: a FATAL program gets another go."""
    added, changed, removed = proxy.supervisor.reloadConfig()[0]
    for group in removed:
        proxy.supervisor.stopProcessGroup(group)
        proxy.supervisor.removeProcessGroup(group)
    for group in changed:
        proxy.supervisor.stopProcessGroup(group)
        proxy.supervisor.removeProcessGroup(group)
        proxy.supervisor.addProcessGroup(group)
    for group in added:
        proxy.supervisor.addProcessGroup(group)
    started = set()
    for info in proxy.supervisor.getAllProcessInfo():
        if info["statename"] in ("STOPPED", "EXITED", "FATAL"):
            proxy.supervisor.startProcess(f"{info['group']}:{info['name']}", False)
            started.add(info["group"])
    groups = {info["group"] for info in proxy.supervisor.getAllProcessInfo()}
    kept = sorted(groups - set(changed) - set(added) - started)
    parts = [(f"restarted {', '.join(sorted(changed))}", changed),
             (f"added {', '.join(sorted(added))}", added),
             (f"removed {', '.join(sorted(removed))}", removed),
             (f"started again {', '.join(sorted(started))}", started),
             (f"unchanged {', '.join(kept)}", kept)]
    print("supervisord is running: " + "; ".join(text for text, names in parts if names))


def check_tools(config: Config) -> None:
    if config.redis.managed:
        managed_redis_port(config)
        if shutil.which("redis-server") is None:
            raise LaunchError("redis-server not found: `apt-get install -y redis-server`, "
                              "or set REDIS_URL to use a Redis run elsewhere")


# --- readiness ---------------------------------------------------------------------------------


def wait_for_redis(url: str, timeout: float = REDIS_WAIT,
                   check: Callable[[], None] = lambda: None) -> None:
    client = redisclient.connect(url, timeout=1.0, max_connections=1)  # or via Sentinel
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.RedisError as e:
            check()
            if time.monotonic() > deadline:
                raise Timeout(
                    f"Redis at {redisclient.redacted(url)} did not answer PING within "
                    f"{timeout:.0f} s: {e}"
                ) from e
            time.sleep(0.2)
        finally:
            client.close()


def provision_demo_users(config: Config) -> bool:
    """The demo users, only into a directory that has no user at all: a user the operator
    deleted cannot be told from one never created, so once anybody is in the directory
    (the demo users themselves after the first start) the launcher adds nobody."""
    sipctl = [sys.executable, "-m", "cluster.cli"]  # this very code, installed or not
    env = {**os.environ, "SIPCLUSTER_CONFIG": config.source}
    try:
        result = subprocess.run([*sipctl, "users", "demo", "--if-empty"], env=env, cwd=WORK_DIR,
                                text=True, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"ERROR: `sipctl users demo` could not run: {e}", file=sys.stderr)
        return False
    if result.returncode != 0:
        print(f"ERROR: `sipctl users demo` failed (exit {result.returncode}):\n"
              f"{result.stdout}{result.stderr}", file=sys.stderr)
        return False
    print(result.stdout.rstrip() or "demo users provisioned")
    if result.stderr.strip():
        print(result.stderr.rstrip(), file=sys.stderr)  # the warning: change those passwords
    return True


def probe_target(config: Config) -> tuple[str, int]:
    """Where to send the OPTIONS probe: the advertised address, loopback for a wildcard."""
    host = config.sip.effective_address
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, config.sip.effective_port


def options_request(target: tuple[str, int], local: tuple[str, int]) -> bytes:
    """A minimal OPTIONS with a fresh branch, tag and Call-ID."""
    uri_host, local_host = _uri_host(target[0]), _uri_host(local[0])
    token = uuid.uuid4().hex
    lines = [
        f"OPTIONS sip:{uri_host}:{target[1]} SIP/2.0",
        "Via: " + via(local[0], local[1], MAGIC_COOKIE + token[:16]).decode(),
        "Max-Forwards: 70",
        f"From: <sip:probe@{local_host}>;tag={token[16:24]}",
        f"To: <sip:{uri_host}:{target[1]}>",
        f"Call-ID: {token}@{local_host}",
        "CSeq: 1 OPTIONS",
        f"Contact: <sip:probe@{local_host}:{local[1]}>",
        "User-Agent: sipcluster-launcher",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _uri_host(host: str) -> str:
    return host_part(host)


def wait_for_sip(target: tuple[str, int], timeout: float = SIP_WAIT,
                 check: Callable[[], None] = lambda: None) -> bytes:
    """Send OPTIONS every PROBE_INTERVAL until any SIP response arrives; return its first line."""
    family, _, _, _, address = socket.getaddrinfo(target[0], target[1], type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((_local_address(family, address), 0))
        local = sock.getsockname()[:2]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.sendto(options_request(target, local), address)
            answer = _receive_response(sock, time.monotonic() + PROBE_INTERVAL)
            if answer is not None:
                return answer
            check()
    raise Timeout(f"no SIP response from {target[0]}:{target[1]} within {timeout:.0f} s")


def _local_address(family: int, address: tuple) -> str:
    # A connected probe socket picks the source address the kernel would route from.
    with socket.socket(family, socket.SOCK_DGRAM) as route:
        route.connect(address)
        return route.getsockname()[0]


def _receive_response(sock: socket.socket, until: float) -> bytes | None:
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return None
        except ConnectionRefusedError:  # ICMP port unreachable: nothing listens yet
            time.sleep(max(0.0, until - time.monotonic()))
            return None
        if data.startswith(b"SIP/2.0 "):
            return data.split(b"\r\n", 1)[0]
    return None


# --- watching the programs -----------------------------------------------------------------

# The closing line of a traceback ("OSError: [Errno 98] ..."), bare or as logsetup indents it.
EXCEPTION_LINE = re.compile(
    r"^(?:  \| )?([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*)$")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Watch:
    """The programs of one start, through supervisord's XML-RPC interface: a program in
    BACKOFF (died within startsecs) or FATAL ends the wait with its cause, read from the
    log lines written since this start (the offsets are taken before anything starts)."""

    def __init__(self, log_dir: Path, run_dir: Path = RUN_DIR):
        self.log_dir = log_dir
        self.run_dir = run_dir
        self.offsets = {log.name: log.stat().st_size for log in log_dir.glob("*.log")}
        self.created = time.monotonic()

    def processes(self) -> list[dict]:
        try:
            return rpc(self.run_dir).supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error) as e:
            if time.monotonic() - self.created < SETTLE_WAIT:
                return []  # a supervisord just started may not listen yet
            raise LaunchError(f"supervisord does not answer: {e}") from e

    def check(self) -> None:
        """Raise LaunchError naming the first program that cannot start, and why."""
        for info in self.processes():
            state = info["statename"]
            if state == "FATAL" or (state == "EXITED" and info["exitstatus"] == EXIT_CONFIG):
                raise LaunchError(self.cause(info))
            # A BACKOFF is supervisord retrying; it is an answer only when the program said
            # why (a worker racing its dispatcher's first second says nothing).
            if state == "BACKOFF" and self.error_lines(info["name"]):
                raise LaunchError(self.cause(info))

    def new_lines(self, name: str) -> list[str]:
        """What program ``name`` logged since this start."""
        log = self.log_dir / f"{name}.log"
        try:
            with open(log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = self.offsets.get(log.name, 0)
                f.seek(start if start <= size else 0)  # smaller: rotated meanwhile
                return f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def error_lines(self, name: str) -> list[str]:
        found = []
        for line in self.new_lines(name):
            parts = line.split(" ", 5)
            if len(parts) == 6 and parts[2] in ("ERROR", "CRITICAL"):
                found.append(_message(line))
            elif line.startswith("configuration error: "):
                found.append(line)
            elif (match := EXCEPTION_LINE.match(line)) is not None:
                found.append(match.group(1))
        return found

    def cause(self, info: dict) -> str:
        """One line: the program and the last error it logged during this start."""
        name = info["name"]
        errors = self.error_lines(name)
        if errors:
            why = errors[-1]
        elif info.get("spawnerr"):
            why = info["spawnerr"]
        else:
            tail = [line for line in self.new_lines(name) if line.strip()]
            why = (_message(tail[-1]) if tail
                   else f"{info['statename']} ({info['description'] or 'no output'})")
        return f"{name}: {why}"

    def settle(self, timeout: float = SETTLE_WAIT) -> list[dict]:
        """The processes once none is STARTING or BACKOFF (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            infos = self.processes()
            if (all(i["statename"] not in ("STARTING", "BACKOFF") for i in infos)
                    or time.monotonic() > deadline):
                return infos
            time.sleep(WATCH_INTERVAL)

    def tails(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last lines each program wrote since this start (none of an earlier run)."""
        shown = []
        for log in sorted(self.log_dir.glob("*.log")):
            shown += [f"{log.stem}: {line}" for line in self.new_lines(log.stem)[-lines:]]
        return shown


def _message(line: str) -> str:
    """A log line without its time, level and process: "2026-01-01 10:00:00,123 ERROR
    dispatcher[42] dispatcher: cannot bind ..." -> "cannot bind ..."."""
    parts = line.split(" ", 5)
    if len(parts) == 6 and parts[2] in LEVELS and parts[4].endswith(":"):
        return parts[5]
    return line.strip()


def wait_for_relays(config: Config, watch: Watch, timeout: float = RELAY_WAIT) -> int:
    """Until every relay of this host has announced itself in Redis since it was started:
    before that a call gets 503 "no live relay".  How many are live."""
    from cluster.relayctl import RELAY_DEAD_AFTER
    from cluster.store import Store, StoreUnavailable

    host = config.sip.effective_host_id
    store = Store(config.redis.url, timeout=1.0, max_connections=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            started = {i["name"]: i["start"] for i in watch.processes() if i["group"] == "relay"}
            try:
                nodes = store.relay_nodes()
            except StoreUnavailable:
                nodes = []
            wall = time.time()
            live = {n.get("name") for n in nodes
                    if n.get("host") == host and n.get("name") in started
                    and wall - float(n.get("seen", 0)) <= RELAY_DEAD_AFTER
                    and float(n.get("seen", 0)) >= started[n.get("name")]}
            if len(live) >= config.media.relays:
                return len(live)
            watch.check()
            if time.monotonic() > deadline:
                missing = sorted(set(started) - live) or ["relay"]
                raise Timeout(f"{', '.join(missing)}: no heartbeat in Redis within "
                                  f"{timeout:.0f} s")
            time.sleep(WATCH_INTERVAL)
    finally:
        store.redis.close()


# --- what is in force --------------------------------------------------------------------------


def launch_overrides(env: Mapping[str, str], reset: bool,
                     path: Path = OVERRIDES_FILE) -> dict[str, str]:
    """The overrides of this start: those kept from earlier starts (none with ``reset``),
    updated by those in ``env``."""
    kept = {} if reset else read_overrides(path)
    return {**kept, **setting_env_names(env)}


def read_record(path: Path = LAUNCH_RECORD) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(config: Config, path: Path = LAUNCH_RECORD) -> None:
    """What this start runs with, for sipctl and the next start (0600: the Redis URL)."""
    record = {"config": config.source, "realm": config.realm,
              "redis_url": config.redis.url, "redis_managed": config.redis.managed,
              "home": str(HOME)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    write_private(temporary, json.dumps(record, indent=1))
    temporary.replace(path)


def check_redis_change(config: Config, force: bool, run_dir: Path = RUN_DIR) -> None:
    """Refuse (unless ``force``) a start that would stop the managed Redis a running
    cluster uses: its users, registrations and calls would stay behind in it."""
    if force or supervisord_pid(run_dir) is None:
        return
    record = read_record(run_dir / LAUNCH_RECORD.name)
    if not record.get("redis_managed"):
        return
    try:
        running = any(i["group"] == "redis" and i["statename"] == "RUNNING"
                      for i in rpc(run_dir).supervisor.getAllProcessInfo())
    except (OSError, xmlrpc.client.Error):
        return
    port = urlsplit(str(record.get("redis_url", ""))).port or 6379
    if not running or (config.redis.managed and managed_redis_port(config) == port):
        return
    wanted = redisclient.redacted(config.redis.url) + ("" if config.redis.managed
                                                       else " (not managed)")
    raise LaunchError(
        f"refusing to stop the managed Redis on 127.0.0.1:{port} that the running cluster "
        f"uses for redis.url {wanted} (its data stays in {config.redis.state_dir}): "
        "add --force (make run FORCE=1) to switch anyway")


def describe_overrides(overrides: Mapping[str, str]) -> str:
    if not overrides:
        return "Overrides  none"
    shown = ", ".join(f"{name}={redisclient.redacted(value) if 'URL' in name else value}"
                      for name, value in overrides.items())
    return (f"Overrides  {shown} (kept in {OVERRIDES_FILE} for later starts and sipctl; "
            "`make run RESET=1` drops them)")


# --- commands ----------------------------------------------------------------------------------


def up(config: Config, overrides: Mapping[str, str] | None = None,
       force: bool = False) -> int:
    check_tools(config)
    check_redis_change(config, force)
    if overrides is not None:
        write_overrides(OVERRIDES_FILE, overrides)
        print(describe_overrides(overrides))
    ensure_secret(config)
    Path(config.log.dir).mkdir(parents=True, exist_ok=True)
    watch = Watch(Path(config.log.dir))  # the log offsets, before anything starts
    new_password = ensure_redis_password(config)
    config = _with_redis_password(config, new_password)
    conf = write_config(config)
    if supervisord_pid() is None:
        stop_leftovers()
    start_supervisord(conf, restart_all=new_password)
    write_record(config)
    relays = 0
    try:
        wait_for_redis(config.redis.url, check=watch.check)
        users_ok = provision_demo_users(config)
        target = probe_target(config)
        answer = wait_for_sip(target, check=watch.check)
        if config.media.mode == "relay":
            relays = wait_for_relays(config, watch)
        infos = watch.settle()
    except LaunchError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        if isinstance(e, Timeout):  # no program said why: what they wrote meanwhile
            for line in watch.tails():
                print(f"  {line}", file=sys.stderr)
        print(f"(`sipcluster status` for the processes, logs in {config.log.dir}, "
              "`make stop` stops them)", file=sys.stderr)
        return 1
    print_summary(config, target, answer, infos, relays)
    return 0 if users_ok else 1


def _with_redis_password(config: Config, new: bool) -> Config:
    """The configuration with the managed Redis's password in its URL."""
    if new:
        print(f"the managed Redis now requires a password (in {redis_auth_file(config)})")
    return fill_redis_password(config)


def print_summary(config: Config, target: tuple[str, int], answer: bytes,
                  infos: list[dict], relays: int = 0) -> None:
    for info in infos:
        print(f"{info['group']}:{info['name']}".ljust(24)
              + f"{info['statename']:<10}{info['description']}")
    print(f"SIP        udp {target[0]}:{target[1]} answers: {answer.decode(errors='replace')}")
    print(f"Realm      {config.realm}")
    managed = " (managed)" if config.redis.managed else ""
    print(f"Redis      {redisclient.redacted(config.redis.url)}{managed}")
    media = f" ({relays} relays up)" if config.media.mode == "relay" else ""
    print(f"Media      {config.media.mode}{media}")
    print(f"Config     {config.source}")
    print(f"Logs       {config.log.dir}")
    print("Stop with  `make stop` (or `sipcluster down`)")


def down() -> int:
    pid = supervisord_pid()
    if pid is None:
        print("supervisord is not running")
        return 0
    supervisorctl("shutdown")
    deadline = time.monotonic() + STOP_WAIT
    while supervisord_pid() == pid:
        if time.monotonic() > deadline:
            print(f"supervisord (pid {pid}) still running after {STOP_WAIT:.0f} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    print("stopped")
    return 0


def status() -> int:
    if supervisord_pid() is None:
        print("supervisord is not running")
        return 3
    result = supervisorctl("status")
    print(result.stdout.rstrip())
    return result.returncode


def render(config: Config, overrides: Mapping[str, str] | None = None) -> int:
    """Write run/supervisord.conf (and the secret) without starting anything: for systemd."""
    check_tools(config)
    if overrides is not None:
        write_overrides(OVERRIDES_FILE, overrides)
    ensure_secret(config)
    config = _with_redis_password(config, ensure_redis_password(config))
    print(write_config(config))
    write_record(config)
    return 0


def foreground(config: Config, overrides: Mapping[str, str]) -> int:
    """Render, then become supervisord in the foreground (a container's main process)."""
    render(config, overrides)
    os.chdir(WORK_DIR)
    os.execv(sys.executable, [*supervisord_command(conf_path()), "--nodaemon"])
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sipcluster", description="Run this host's part of the SIP cluster under "
        "supervisord.  SIPCLUSTER_<SECTION>_<KEY> and REDIS_URL given to `up` or `render` "
        f"are kept (in {OVERRIDES_FILE}) for later starts and for sipctl, until --reset.  "
        f"run/ and state/ live under {HOME} (set $SIPCLUSTER_HOME to move them).")
    parser.add_argument("--config", help="TOML file (default: $SIPCLUSTER_CONFIG or "
                                         f"{DEFAULT_PATH})")
    parser.add_argument("--home", help=f"folder of run/ and state/ (default: {HOME})")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("up", "start (or update) everything and wait until SIP answers"),
                       ("render", "only write run/supervisord.conf (used by systemd)"),
                       ("run", "render, then run supervisord in the foreground (containers)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--reset", action="store_true",
                             help="drop the overrides kept from earlier starts")
        command.add_argument("--force", action="store_true",
                             help="allow a redis.url change that stops the managed Redis")
    commands.add_parser("down", help="stop everything and supervisord")
    commands.add_parser("status", help="show the processes")
    args = parser.parse_args(argv)
    use_home(args.home, "cluster.launch", argv)
    try:
        if args.command == "down":
            return down()
        if args.command == "status":
            return status()
        overrides = launch_overrides(os.environ, args.reset)
        config = load(args.config, env={**os.environ, **overrides})
        if args.command == "up":
            return up(config, overrides, force=args.force)
        if args.command == "run":
            return foreground(config, overrides)
        return render(config, overrides)
    except (ConfigError, LaunchError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
