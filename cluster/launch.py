"""`sipcluster up|down|status|render`: run the whole cluster of one host under supervisord.

`up` renders run/supervisord.conf from deploy/supervisord.conf.in for the
loaded configuration, stops whatever a killed supervisord left running (they
hold the ports), starts supervisord (or tells a running one to pick up the new
configuration), waits for Redis, provisions the demo users with
`sipctl users demo --if-empty` (only into a directory without any user, so an
operator's users and passwords are never touched), and then sends SIP OPTIONS
to the advertised address until the cluster answers.  `down` shuts
supervisord down and waits for it.

The managed Redis keeps its data in redis.state_dir (an append-only file,
fsynced every second), outside run/: `make clean` keeps it, a host restart
finds every user, registration, live call and CDR again.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

import redis

from cluster import redisclient
from cluster.config import (
    RESERVED_ENV,
    ROOT,
    RUN_DIR,
    SECRET_FILE,
    Config,
    ConfigError,
    fill_redis_password,
    load,
    read_redis_password,
    redis_auth_file,
)

TEMPLATE = ROOT / "deploy" / "supervisord.conf.in"
VENV_BIN = Path(sys.executable).parent
REDIS_WAIT = 60.0  # a Redis loading a large append-only file answers LOADING meanwhile
SIP_WAIT = 30.0
PROBE_INTERVAL = 0.5
STOP_WAIT = 30.0
SETTLE_WAIT = 5.0  # startsecs is 1: a healthy process leaves STARTING well within this
LOG_TAIL_LINES = 20
# Start order: Redis first, then the dispatcher the workers attach to.
PRIORITY = {"redis": 10, "dispatcher": 20, "relay": 30, "worker": 40}


class LaunchError(RuntimeError):
    """Something the operator has to fix; the message says what."""


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
    for path in (ROOT, run_dir, log_dir, Path(python), Path(config.redis.state_dir)):
        # supervisord %-expands paths, some of them twice: a % cannot be escaped reliably.
        if "%" in str(path):
            raise LaunchError(f"paths with a % sign are not supported: {path}")
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
        root=ROOT,
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
    environment.update(passed_env(env))
    lines = [f"[program:{name}]", f"command = {shlex.join(command)}"]
    process_name = name
    if numprocs:
        process_name = f"{name}-%(process_num)d"
        lines += [f"process_name = {process_name}", f"numprocs = {numprocs}",
                  "numprocs_start = 0"]
        environment[index_var] = "%(process_num)d"  # expanded by supervisord, not escaped
    lines += [
        f"environment = {_environment(environment, keep_raw=index_var)}",
        f"directory = {ROOT}",
        f"priority = {PRIORITY[name]}",
        "autostart = true",
        "autorestart = true",
        "startsecs = 1",
        "startretries = 10",
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
    """The overrides in the launcher's environment, handed on so every process sees them."""
    return {
        name: value
        for name, value in sorted(env.items())
        if (name.startswith("SIPCLUSTER_") and name not in RESERVED_ENV) or name == "REDIS_URL"
    }


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
    write_private(temporary, render_supervisord(config, run_dir=run_dir))
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
        print("supervisord is running: applying the new configuration")
        supervisorctl("update")
        supervisorctl("restart" if restart_all else "start", "all")
        return
    result = subprocess.run(supervisord_command(conf), text=True, capture_output=True, cwd=ROOT)
    if result.returncode != 0:
        raise LaunchError(f"supervisord failed to start:\n{result.stdout}{result.stderr}")


def check_tools(config: Config) -> None:
    if config.redis.managed:
        managed_redis_port(config)
        if shutil.which("redis-server") is None:
            raise LaunchError("redis-server not found: `apt-get install -y redis-server`, "
                              "or set REDIS_URL to use a Redis run elsewhere")


# --- readiness ---------------------------------------------------------------------------------


def wait_for_redis(url: str, timeout: float = REDIS_WAIT) -> None:
    client = redisclient.connect(url, timeout=1.0, max_connections=1)  # or via Sentinel
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.RedisError as e:
            if time.monotonic() > deadline:
                raise LaunchError(
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
    sipctl = VENV_BIN / "sipctl"
    env = {**os.environ, "SIPCLUSTER_CONFIG": config.source}
    try:
        result = subprocess.run([str(sipctl), "users", "demo", "--if-empty"], env=env,
                                text=True, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"ERROR: `{sipctl} users demo` could not run: {e}", file=sys.stderr)
        return False
    if result.returncode != 0:
        print(f"ERROR: `{sipctl} users demo` failed (exit {result.returncode}):\n"
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
        f"Via: SIP/2.0/UDP {local_host}:{local[1]};branch=z9hG4bK{token[:16]};rport",
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
    return f"[{host}]" if ":" in host else host


def wait_for_sip(target: tuple[str, int], timeout: float = SIP_WAIT) -> bytes:
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
    raise LaunchError(f"no SIP response from {target[0]}:{target[1]} within {timeout:.0f} s")


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


def print_log_tails(config: Config, lines: int = LOG_TAIL_LINES) -> None:
    for log in sorted(Path(config.log.dir).glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log} (last {len(tail)} lines)", file=sys.stderr)
        for line in tail:
            print(line, file=sys.stderr)


# --- commands ----------------------------------------------------------------------------------


def up(config: Config) -> int:
    check_tools(config)
    ensure_secret(config)
    new_password = ensure_redis_password(config)
    config = _with_redis_password(config, new_password)
    conf = write_config(config)
    if supervisord_pid() is None:
        stop_leftovers()
    start_supervisord(conf, restart_all=new_password)
    try:
        wait_for_redis(config.redis.url)
        users_ok = provision_demo_users(config)
        target = probe_target(config)
        answer = wait_for_sip(target)
    except LaunchError as e:
        print_log_tails(config)
        print(supervisorctl("status").stdout.rstrip(), file=sys.stderr)
        print(f"ERROR: {e}", file=sys.stderr)
        print(f"the processes are still running: see `sipcluster status`, logs in {config.log.dir}",
              file=sys.stderr)
        return 1
    print_summary(config, target, answer)
    return 0 if users_ok else 1


def _with_redis_password(config: Config, new: bool) -> Config:
    """The configuration with the managed Redis's password in its URL."""
    if new:
        print(f"the managed Redis now requires a password (in {redis_auth_file(config)})")
    return fill_redis_password(config)


def settled_status(timeout: float = SETTLE_WAIT) -> str:
    """`supervisorctl status` once no process is still STARTING (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        text = supervisorctl("status").stdout.rstrip()
        if " STARTING " not in text or time.monotonic() > deadline:
            return text
        time.sleep(0.25)


def print_summary(config: Config, target: tuple[str, int], answer: bytes) -> None:
    print(settled_status())
    print(f"SIP        udp {target[0]}:{target[1]} answers: {answer.decode(errors='replace')}")
    managed = " (managed)" if config.redis.managed else ""
    print(f"Redis      {redisclient.redacted(config.redis.url)}{managed}")
    print(f"Media      {config.media.mode}")
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


def render(config: Config) -> int:
    """Write run/supervisord.conf (and the secret) without starting anything: for systemd."""
    check_tools(config)
    ensure_secret(config)
    config = _with_redis_password(config, ensure_redis_password(config))
    print(write_config(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sipcluster", description="Run this host's part of the SIP cluster under supervisord."
    )
    parser.add_argument("--config", help="TOML file (default: $SIPCLUSTER_CONFIG or "
                                         "deploy/cluster.toml)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start (or update) everything and wait until SIP answers")
    commands.add_parser("down", help="stop everything and supervisord")
    commands.add_parser("status", help="show the processes")
    commands.add_parser("render", help="only write run/supervisord.conf (used by systemd)")
    args = parser.parse_args(argv)
    try:
        if args.command == "down":
            return down()
        if args.command == "status":
            return status()
        config = load(args.config)
        return up(config) if args.command == "up" else render(config)
    except (ConfigError, LaunchError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
