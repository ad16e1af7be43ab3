"""Configuration: one TOML file plus environment overrides.

The settings form a tree of frozen dataclasses whose defaults are the demo
deployment's.  ``load()`` reads the TOML file, then applies, in this order:

* ``REDIS_URL``: sets ``redis.url`` and turns ``redis.managed`` off, because a
  Redis somebody else runs is not one the launcher should start;
* ``SIPCLUSTER_<SECTION>_<KEY>``: any single setting, for example
  ``SIPCLUSTER_SIP_PORT=5070`` or ``SIPCLUSTER_AUTH_ALGORITHMS=SHA-256,MD5``.

A ``redis+sentinel://`` or ``redis+cluster://`` URL (cluster/redisclient.py), wherever
it comes from, turns ``redis.managed`` off as well: the launcher runs no replicated Redis
and no Redis Cluster.

Unknown sections and keys are errors in both places: a misspelt setting that
silently keeps its default is worse than a process that refuses to start.

Relative paths (``dispatcher.control_path``, ``log.dir``, ``redis.state_dir``) are
taken from the home folder (``home_dir()``: $SIPCLUSTER_HOME, else the checkout, else
$XDG_STATE_HOME/sipcluster), so every process agrees on them whatever its working
directory.

The launcher persists the overrides it was started with (OVERRIDES_FILE); a process
started by supervisord finds them through $SIPCLUSTER_OVERRIDES, sipctl through
``overrides_file``.  They apply under the process's own environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import socket
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .redisclient import (
    is_cluster_url,
    is_sentinel_url,
    parse_cluster_url,
    parse_sentinel_url,
    redacted,
)

ROOT = Path(__file__).resolve().parent.parent
# The example configuration and the supervisord template, shipped inside the package (in a
# checkout these are links to deploy/, where they are edited).
DATA_DIR = Path(__file__).resolve().parent / "data"


def checkout_root() -> Path | None:
    """The source checkout this code runs from, or None for an installed package."""
    if (ROOT / "pyproject.toml").is_file() and (ROOT / "deploy" / "cluster.toml").is_file():
        return ROOT
    return None


def home_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where run/ (sockets, pid, secret, the overrides in force) and state/ (the managed
    Redis's data) live, and what relative paths in the configuration are taken from:
    $SIPCLUSTER_HOME; else the checkout when run from one; else $XDG_STATE_HOME/sipcluster
    (~/.local/state/sipcluster), never the installed package's folder."""
    if env.get("SIPCLUSTER_HOME"):
        return Path(env["SIPCLUSTER_HOME"]).expanduser().resolve()
    checkout = checkout_root()
    if checkout is not None:
        return checkout
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser().resolve() / "sipcluster"


HOME = home_dir()


def use_home(home: str | None, module: str, argv: list[str] | None) -> None:
    """A command's --home: the folders are fixed at import (HOME, RUN_DIR...), so a home
    other than the one this process was started with means starting again with
    $SIPCLUSTER_HOME set (the same arguments: the second time it matches)."""
    if not home or Path(home).expanduser().resolve() == HOME:
        return
    os.environ["SIPCLUSTER_HOME"] = str(Path(home).expanduser().resolve())
    arguments = sys.argv[1:] if argv is None else argv
    os.execv(sys.executable, [sys.executable, "-m", module, *arguments])
DEFAULT_PATH = (ROOT / "deploy" / "cluster.toml" if checkout_root() is not None
                else DATA_DIR / "cluster.toml")
RUN_DIR = HOME / "run"
# Written by `sipcluster up` when auth.secret is empty; read back by load().
SECRET_FILE = RUN_DIR / "secret"
# The SIPCLUSTER_* overrides given to `sipcluster up` (JSON, 0600: REDIS_URL may hold a
# password); every later `up` and sipctl apply them under their own environment.
OVERRIDES_FILE = RUN_DIR / "overrides.json"

ENV_PREFIX = "SIPCLUSTER_"
# SIPCLUSTER_* variables that are not settings: the launcher and supervisord
# set them for the processes they start.
RESERVED_ENV = frozenset(
    {"SIPCLUSTER_CONFIG", "SIPCLUSTER_WORKER_INDEX", "SIPCLUSTER_RELAY_INDEX",
     "SIPCLUSTER_HOME", "SIPCLUSTER_OVERRIDES", "SIPCLUSTER_DIGEST"}
)
# Exit status of a process whose configuration cannot be used (sysexits.h EX_CONFIG):
# supervisord does not restart it (exitcodes in the rendered file), a restart would only
# fail the same way.
EXIT_CONFIG = 78

MEDIA_MODES = ("bypass", "relay")
DIGEST_ALGORITHMS = ("MD5", "SHA-256")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# The largest message a stream may carry: it reaches its worker as one loopback datagram
# (64 KB less the envelope's header, with room to spare).
MAX_STREAM_MESSAGE = 65000


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as it is."""


@dataclass(frozen=True)
class SipConfig:
    bind: str = "127.0.0.1"
    port: int = 5060
    bind6: str = ""
    advertised_address: str = ""
    advertised_port: int = 0
    user_agent: str = "sipcluster"
    host_id: str = ""

    @property
    def effective_address(self) -> str:
        """The address put in Via, Contact and SDP origin: what peers reach."""
        return self.advertised_address or self.bind

    @property
    def effective_port(self) -> int:
        return self.advertised_port or self.port

    @property
    def effective_host_id(self) -> str:
        return self.host_id or socket.gethostname()


@dataclass(frozen=True)
class DispatcherConfig:
    control_path: str = "run/dispatcher.sock"
    heartbeat_interval: float = 0.5
    dead_after: float = 1.5
    inter_host_port: int = 0
    inter_host_address: str = ""


@dataclass(frozen=True)
class StreamsConfig:
    """SIP over TCP and TLS (RFC 3261 section 18), served by the dispatcher
    (cluster/streams.py): the connections live there, the workers stay stateless."""

    tcp: bool = True  # a TCP listener on sip.bind:sip.port (and sip.bind6)
    tls_port: int = 5061  # the TLS listener's port, when a certificate and key are set
    tls_cert: str = ""  # PEM certificate (chain); "" (or no key) = no TLS listener
    tls_key: str = ""  # PEM private key
    idle_timeout: float = 900.0  # seconds without a message or keep-alive: closed
    message_timeout: float = 10.0  # seconds a message begun has to arrive whole: closed
    max_per_source: int = 32  # connections open at once from one source address
    max_header_bytes: int = 16384  # start line and headers of one message
    max_body_bytes: int = 32768  # Content-Length of one message
    # SIP over WebSocket (RFC 7118) for browser phones, on listeners of their own
    ws: bool = False  # a WS listener on sip.bind:ws_port (and sip.bind6)
    ws_port: int = 8080
    wss: bool = False  # a WSS listener on wss_port, with tls_cert and tls_key
    wss_port: int = 8443
    ws_path: str = "/"  # the HTTP path of the upgrade request; others get 404
    ws_frame_rate: float = 100.0  # frames a second from one connection (burst: twice)
    # Connections the cluster opens itself (cluster/dialer.py, RFC 3261 18.1.1).
    udp_max_request: int = 1300  # a request longer than this for a UDP target goes over TCP
    connect_timeout: float = 3.0  # seconds a TCP connection the cluster opens has to connect


@dataclass(frozen=True)
class WorkersConfig:
    count: int = 2
    redis_timeout: float = 0.25
    max_inflight: int = 200
    queue_limit: float = 0.2
    outage_hold: float = 6.0


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    managed: bool = True
    state_dir: str = "state/redis"
    maxmemory: str = ""  # the managed Redis's maxmemory ("4gb"); empty: no limit
    wait_replicas: int = 0
    wait_timeout: float = 0.05


@dataclass(frozen=True)
class AuthConfig:
    realm: str = ""
    algorithms: tuple[str, ...] = ("MD5",)
    nonce_lifetime: int = 300
    secret: str = ""
    max_failures: int = 5
    failure_window: int = 60
    user_max_failures: int = 20
    user_failure_window: int = 600
    user_lockout: int = 600


@dataclass(frozen=True)
class LimitsConfig:
    """Per-source limits (cluster/limits.py): token buckets the dispatcher keeps per
    source address, and the scanner patterns the workers count.  A rate of 0 turns its
    bucket off."""

    register_rate: float = 100.0
    register_burst: int = 200
    invite_rate: float = 100.0
    invite_burst: int = 50
    other_rate: float = 100.0
    other_burst: int = 50
    dialog_rate: float = 300.0
    dialog_burst: int = 150
    ban_seconds: int = 300
    scan_users: int = 500
    scan_errors: int = 200
    scan_window: int = 60
    trust_seconds: int = 600
    trusted_factor: float = 50.0
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegistrarConfig:
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    max_contacts: int = 10
    ping_interval: int = 0


@dataclass(frozen=True)
class TimersConfig:
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0


@dataclass(frozen=True)
class MediaConfig:
    mode: str = "relay"
    rtp_port_min: int = 20000
    rtp_port_max: int = 29999
    relays: int = 2
    bind: str = "127.0.0.1"
    advertised_address: str = ""
    # Where each relay binds and announces its control port (IPv4); empty: the
    # dispatcher's inter-host address when the host has one (several hosts), else loopback.
    control_address: str = ""
    media_timeout: float = 60.0
    media_timeout_hold: float = 3600.0

    @property
    def effective_address(self) -> str:
        """The address written into rewritten SDP (c= lines)."""
        return self.advertised_address or self.bind


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    dir: str = "run/log"


@dataclass(frozen=True)
class MetricsConfig:
    bind: str = "127.0.0.1"
    port: int = 9160


@dataclass(frozen=True)
class HepConfig:
    address: str = ""  # HEP3 collector (Homer); "" = no capture
    port: int = 9060
    capture_id: int = 2001
    password: str = ""  # the collector's auth key, if it wants one


@dataclass(frozen=True)
class CallsConfig:
    no_answer_timeout: int = 60
    max_duration: int = 0
    trace: bool = True
    trace_max: int = 200
    trace_ttl: int = 3600
    allow_from_mismatch: bool = False
    # Header carrying the A-leg Call-ID on every request to a B-leg, so sngrep (sip.xcid)
    # and Homer show both legs as one call; "" leaves it out.
    xcid_header: str = "X-Call-ID"


@dataclass(frozen=True)
class Route:
    """One row of the route table (TOML ``[[routes]]``), tried in order for callees that
    are not local users.  ``match`` is a regular expression on the Request-URI user;
    ``uri`` the gateway target, where ``{user}`` is the dialled user and ``{1}``... are
    the expression's groups.  ``username``/``password`` answer the gateway's 401/407.
    Calls from ``trusted_source`` (the gateway's IP) to local users need no digest."""

    match: str
    uri: str
    username: str = ""
    password: str = ""
    trusted_source: str = ""


@dataclass(frozen=True)
class Config:
    sip: SipConfig = field(default_factory=SipConfig)
    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    timers: TimersConfig = field(default_factory=TimersConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    hep: HepConfig = field(default_factory=HepConfig)
    routes: tuple[Route, ...] = ()
    # The file this was loaded from ("" when built in code); the launcher
    # hands it on to the processes it starts.
    source: str = field(default="", compare=False)

    @property
    def realm(self) -> str:
        """The digest realm: the configured one, else the advertised SIP address."""
        return self.auth.realm or self.sip.effective_address

    @property
    def advertised_address(self) -> str:
        return self.sip.effective_address

    @property
    def advertised_port(self) -> int:
        return self.sip.effective_port

    @property
    def relay_control_address(self) -> str:
        """The address relay control ports bind and announce: workers of every host
        reach it when there are several hosts (a session is changed at its owner)."""
        if self.media.control_address:
            return self.media.control_address
        if self.dispatcher.inter_host_port and self.dispatcher.inter_host_address:
            return self.dispatcher.inter_host_address
        return "127.0.0.1"


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name not in ("source", "routes")
}
# Settings that are file system paths, resolved against HOME by load().
PATH_KEYS = {("dispatcher", "control_path"), ("log", "dir"), ("redis", "state_dir"),
             ("streams", "tls_cert"), ("streams", "tls_key")}


def default_path(env: Mapping[str, str] = os.environ) -> Path:
    """The config file used when none is named: $SIPCLUSTER_CONFIG or deploy/cluster.toml."""
    return Path(env.get("SIPCLUSTER_CONFIG") or DEFAULT_PATH)


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
    secret_file: str | os.PathLike[str] | None = SECRET_FILE,
    overrides_file: str | os.PathLike[str] | None = None,
) -> Config:
    """Read the TOML file at ``path`` (default: ``default_path(env)``) and apply overrides.

    A missing file is an error only when it was named explicitly (argument or
    SIPCLUSTER_CONFIG); without one the defaults and the environment apply.
    The persisted overrides (``overrides_file``, else $SIPCLUSTER_OVERRIDES when set)
    apply first, ``env`` over them.
    When ``auth.secret`` ends up empty and ``secret_file`` exists, the secret
    is read from it (the launcher writes it at `sipcluster up`).  The managed
    Redis's password is read from ``redis_auth_file(config)`` the same way and
    put into ``redis.url``.  ``secret_file=None`` reads neither (tests).
    """
    named = path is not None or bool(env.get("SIPCLUSTER_CONFIG"))
    config_path = Path(path) if path is not None else default_path(env)
    values = _read_toml(config_path, required=named)
    routes = _build_routes(values.pop("routes", []))
    if overrides_file is None and env.get("SIPCLUSTER_OVERRIDES"):
        overrides_file = env["SIPCLUSTER_OVERRIDES"]
    if overrides_file is not None:
        env = {**read_overrides(Path(overrides_file)), **env}
    _apply_env(values, env)
    redis = values.get("redis", {})
    if is_sentinel_url(str(redis.get("url", ""))) or is_cluster_url(str(redis.get("url", ""))):
        redis["managed"] = False  # a replicated Redis is run elsewhere, never by the launcher
    sections = {name: _build_section(name, values.get(name, {})) for name in SECTIONS}
    config = Config(**sections, routes=routes, source=str(config_path.resolve()))
    config = _resolve_paths(config)
    config = _fill_secret(config, secret_file)
    if secret_file is not None:
        config = fill_redis_password(config)
    validate(config)
    return config


def setting_env_names(env: Mapping[str, str]) -> dict[str, str]:
    """The settings among ``env``: SIPCLUSTER_* (not the reserved ones) and REDIS_URL."""
    return {name: value for name, value in sorted(env.items())
            if (name.startswith(ENV_PREFIX) and name not in RESERVED_ENV)
            or name == "REDIS_URL"}


def read_overrides(path: Path) -> dict[str, str]:
    """The persisted overrides ({} when there is no file)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable overrides file ({e}); delete it or run "
                          "`sipcluster up --reset`") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"{path}: overrides must be a JSON object of strings")
    return setting_env_names(data)


def write_overrides(path: Path, overrides: Mapping[str, str]) -> None:
    """Persist ``overrides`` (0600 from the start: REDIS_URL may carry a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        json.dump(dict(sorted(overrides.items())), f, indent=1)
        f.write("\n")
    temporary.replace(path)


def load_or_exit(**kwargs: Any) -> Config:
    """load() for a process supervisord runs: a configuration error is one line on stderr
    and exit status EXIT_CONFIG (not restarted: it would fail the same way)."""
    try:
        return load(**kwargs)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)


def _did_you_mean(word: str, known: Any) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_toml(path: Path, required: bool) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file not found: {path}") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    values: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section == "routes":
            values["routes"] = table  # checked by _build_routes
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]"
                              + _did_you_mean(section, [*SECTIONS, "routes"]))
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        known = _field_names(section)
        for key in table:
            if key not in known:
                raise ConfigError(f"{path}: unknown setting {section}.{key}"
                                  + _did_you_mean(key, known))
        values[section] = dict(table)
    return values


def _build_routes(rows: Any) -> tuple[Route, ...]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError("routes must be an array of tables: [[routes]]")
    known = {f.name for f in dataclasses.fields(Route)}
    routes = []
    for number, row in enumerate(rows, 1):
        unknown = set(row) - known
        if unknown:
            raise ConfigError(f"routes #{number}: unknown setting(s) {', '.join(sorted(unknown))}")
        if not isinstance(row.get("match"), str) or not isinstance(row.get("uri"), str):
            raise ConfigError(f"routes #{number}: match and uri (strings) are required")
        try:
            re.compile(row["match"])
        except re.error as e:
            raise ConfigError(f"routes #{number}: bad match expression: {e}") from None
        routes.append(Route(**{k: str(v) for k, v in row.items()}))
    return tuple(routes)


def _apply_env(values: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    if env.get("REDIS_URL"):
        redis = values.setdefault("redis", {})
        redis["url"] = env["REDIS_URL"]
        redis["managed"] = False
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        section, key = _split_env_name(name)
        default = getattr(SECTIONS[section](), key)
        values.setdefault(section, {})[key] = _parse_env_value(name, raw, default)


def _split_env_name(name: str) -> tuple[str, str]:
    # Section names have no underscore, so the first one after the prefix
    # separates section from key (SIPCLUSTER_DISPATCHER_CONTROL_PATH).
    section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
    if section not in SECTIONS or key not in _field_names(section):
        known = [f"{ENV_PREFIX}{s.upper()}_{k.upper()}" for s in SECTIONS
                 for k in _field_names(s)]
        what = f"no section [{section}]" if section not in SECTIONS else f"no {section}.{key}"
        hint = _did_you_mean(name, known).strip(" ()")
        raise ConfigError(f"unknown setting in environment: {name} ({what}"
                          + (f"; {hint})" if hint else ")"))
    return section, key


def _parse_env_value(name: str, raw: str, default: Any) -> Any:
    text = raw.strip()
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise ConfigError(f"{name}={raw!r}: expected true, false, 1 or 0")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if isinstance(default, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    return raw


def _build_section(section: str, table: dict[str, Any]) -> Any:
    cls = SECTIONS[section]
    defaults = cls()
    converted = {
        key: _check_type(f"{section}.{key}", value, getattr(defaults, key))
        for key, value in table.items()
    }
    return cls(**converted)


def _check_type(name: str, value: Any, default: Any) -> Any:
    """Accept ``value`` if it has the default's type; ints are fine where floats are."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} must be a number, not {value!r}")
    if isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"{name} must be a list of strings, not {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{name} must be a string, not {value!r}")


def _field_names(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(SECTIONS[section])}


def _resolve_paths(config: Config) -> Config:
    for section, key in PATH_KEYS:
        current = getattr(config, section)
        if not getattr(current, key):
            continue  # unset stays unset (no TLS certificate is not the home folder)
        absolute = str(HOME / getattr(current, key))  # HOME / "/abs" == "/abs"
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(current, **{key: absolute})}
        )
    return config


def _fill_secret(config: Config, secret_file: str | os.PathLike[str] | None) -> Config:
    if config.auth.secret or secret_file is None:
        return config
    try:
        secret = Path(secret_file).read_text().strip()
    except FileNotFoundError:
        return config
    return dataclasses.replace(config, auth=dataclasses.replace(config.auth, secret=secret))


# The managed Redis's password lives in one file under redis.state_dir, mode 0600, in the
# form redis-server reads as a configuration file ("requirepass <password>"): the launcher
# names it on redis-server's command line, so the password is in no command line (ps), no
# environment and no supervisord configuration; every other process reads it from here.
REDIS_AUTH_FILE = "redis-auth.conf"


def redis_auth_file(config: Config) -> Path:
    return Path(config.redis.state_dir) / REDIS_AUTH_FILE


def read_redis_password(path: Path) -> str | None:
    """The password in a redis-auth.conf; None when the file is missing or unreadable."""
    try:
        text = path.read_text()
    except OSError:  # missing, or another user's (then Redis refuses: NOAUTH says why)
        return None
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if name == "requirepass" and value.strip():
            return value.strip()
    return None


def with_password(url: str, password: str) -> str:
    """``url`` (redis://host:port/db) with ``password`` as its credentials."""
    from urllib.parse import quote
    scheme, rest = url.split("://", 1)
    return f"{scheme}://:{quote(password, safe='')}@{rest}"


def fill_redis_password(config: Config) -> Config:
    redis = config.redis
    if not redis.managed or "@" in redis.url.split("/", 3)[2]:
        return config  # a Redis run elsewhere, or credentials given in the URL
    password = read_redis_password(redis_auth_file(config))
    if password is None:
        return config
    return dataclasses.replace(
        config, redis=dataclasses.replace(redis, url=with_password(redis.url, password)))


def validate(config: Config) -> None:
    """Reject values no process could work with, naming the setting."""
    for name, port in (("sip.port", config.sip.port), ("metrics.port", config.metrics.port)):
        _require(1 <= port <= 65535, f"{name} must be 1-65535, not {port}")
    for name, port in (
        ("sip.advertised_port", config.sip.advertised_port),
        ("dispatcher.inter_host_port", config.dispatcher.inter_host_port),
    ):
        _require(0 <= port <= 65535, f"{name} must be 0-65535 (0 = unset), not {port}")
    _require(config.workers.count >= 1, "workers.count must be at least 1")
    _require(config.workers.max_inflight >= 1, "workers.max_inflight must be at least 1")
    _require(config.workers.redis_timeout > 0, "workers.redis_timeout must be positive")
    _require(
        0 < config.dispatcher.heartbeat_interval < config.dispatcher.dead_after,
        "dispatcher.dead_after must be longer than dispatcher.heartbeat_interval (> 0)",
    )
    _validate_redis(config.redis)
    # WAIT rides in the write's own round trip: it must give up well before the socket does,
    # or a missing replica would turn every call write into a 503.
    _require(config.redis.wait_replicas >= 0, "redis.wait_replicas must not be negative")
    _require(0 < config.redis.wait_timeout < config.workers.redis_timeout,
             "redis.wait_timeout must be positive and shorter than workers.redis_timeout")
    _validate_auth(config.auth)
    _validate_streams(config.streams, config.sip.port)
    _validate_limits(config.limits)
    _validate_registrar(config.registrar)
    _validate_media(config.media)
    timers = config.timers
    _require(0 < timers.t1 <= timers.t2, "timers: need 0 < t1 <= t2")
    _require(timers.t4 > 0, "timers.t4 must be positive")
    _require(config.log.level.upper() in LOG_LEVELS,
             f"log.level must be one of {', '.join(LOG_LEVELS)}, not {config.log.level!r}")
    calls = config.calls
    _require(calls.no_answer_timeout >= 0 and calls.max_duration >= 0,
             "calls.no_answer_timeout and calls.max_duration must not be negative")
    _require(calls.trace_max >= 0 and calls.trace_ttl >= 0,
             "calls.trace_max and calls.trace_ttl must not be negative")
    _require(0 < config.hep.port < 65536 and 0 <= config.hep.capture_id < 2**32,
             "hep.port must be a port and hep.capture_id a 32-bit number")
    _require(re.fullmatch(r"[A-Za-z0-9!%*_+`'~.-]*", calls.xcid_header) is not None,
             "calls.xcid_header must be a header name (a token) or empty")


_MAXMEMORY = re.compile(r"[1-9][0-9]*(?:[kmg]b?|b)?", re.IGNORECASE)


def _validate_redis(redis: RedisConfig) -> None:
    _require(not redis.maxmemory or _MAXMEMORY.fullmatch(redis.maxmemory) is not None,
             f"redis.maxmemory must be a size such as 4gb, 512mb or 1073741824, not "
             f"{redis.maxmemory!r}")
    # The launcher runs one redis-server, never a replicated set or a cluster.
    for scheme, is_kind, parse_url, runs in (
            ("redis+sentinel", is_sentinel_url, parse_sentinel_url, "Sentinel"),
            ("redis+cluster", is_cluster_url, parse_cluster_url, "Redis Cluster")):
        if not is_kind(redis.url):
            continue
        try:
            parse_url(redis.url)
        except ValueError as e:
            raise ConfigError(f"redis.url: bad {scheme}:// URL {redacted(redis.url)!r}: "
                              f"{e}") from None
        _require(not redis.managed, f"redis.managed must be false with a {scheme}:// URL "
                 f"(the launcher runs no {runs})")
        return
    _require(redis.url.startswith(("redis://", "rediss://", "unix://")),
             "redis.url must be a redis://, rediss://, unix://, redis+sentinel:// or "
             "redis+cluster:// URL, "
             f"not {redacted(redis.url)!r}")


def _validate_streams(streams: StreamsConfig, sip_port: int) -> None:
    _require(1 <= streams.tls_port <= 65535 and streams.tls_port != sip_port,
             f"streams.tls_port must be 1-65535 and not sip.port, not {streams.tls_port}")
    _require(bool(streams.tls_cert) == bool(streams.tls_key),
             "streams.tls_cert and streams.tls_key go together (both set, or neither)")
    _require(streams.udp_max_request >= 0,
             f"streams.udp_max_request must be 0 (off) or more, not {streams.udp_max_request}")
    _require(streams.connect_timeout > 0,
             f"streams.connect_timeout must be above 0, not {streams.connect_timeout}")
    _require(streams.idle_timeout > 0 and streams.message_timeout > 0,
             "streams.idle_timeout and streams.message_timeout must be positive")
    _require(streams.max_per_source >= 1, "streams.max_per_source must be at least 1")
    _validate_websocket(streams, sip_port)
    # A message travels to its worker in one datagram of the envelope (cluster/envelope.py).
    _require(256 <= streams.max_header_bytes and 0 <= streams.max_body_bytes
             and streams.max_header_bytes + streams.max_body_bytes <= MAX_STREAM_MESSAGE,
             f"streams: need max_header_bytes >= 256, max_body_bytes >= 0 and their sum "
             f"at most {MAX_STREAM_MESSAGE}")


def _validate_websocket(streams: StreamsConfig, sip_port: int) -> None:
    ports = {"sip.port": sip_port}
    if streams.tls_cert:
        ports["streams.tls_port"] = streams.tls_port
    for on, key in ((streams.ws, "ws_port"), (streams.wss, "wss_port")):
        port = getattr(streams, key)
        _require(1 <= port <= 65535, f"streams.{key} must be 1-65535, not {port}")
        if on:
            taken = [k for k, v in ports.items() if v == port]
            _require(not taken, f"streams.{key} {port} is already {', '.join(taken)}")
            ports[f"streams.{key}"] = port
    _require(not streams.wss or bool(streams.tls_cert),
             "streams.wss needs streams.tls_cert and streams.tls_key (the same certificate)")
    _require(streams.ws_path.startswith("/") and not any(c.isspace() for c in streams.ws_path),
             f"streams.ws_path must be an absolute HTTP path, not {streams.ws_path!r}")
    _require(streams.ws_frame_rate > 0, "streams.ws_frame_rate must be positive")


def _validate_auth(auth: AuthConfig) -> None:
    _require(len(auth.algorithms) > 0, "auth.algorithms must name at least one algorithm")
    for algorithm in auth.algorithms:
        _require(algorithm in DIGEST_ALGORITHMS,
                 f"auth.algorithms: unknown algorithm {algorithm!r} "
                 f"(known: {', '.join(DIGEST_ALGORITHMS)})")
    _require(auth.nonce_lifetime > 0, "auth.nonce_lifetime must be positive")
    _require(auth.max_failures >= 1, "auth.max_failures must be at least 1")
    _require(auth.failure_window > 0, "auth.failure_window must be positive")
    _require(auth.user_max_failures >= 0, "auth.user_max_failures must be 0 (off) or more")
    _require(auth.user_failure_window > 0, "auth.user_failure_window must be positive")
    _require(auth.user_lockout > 0, "auth.user_lockout must be positive")


def _validate_limits(limits: LimitsConfig) -> None:
    for kind in ("register", "invite", "other", "dialog"):
        rate, burst = getattr(limits, f"{kind}_rate"), getattr(limits, f"{kind}_burst")
        _require(rate >= 0, f"limits.{kind}_rate must be 0 (off) or positive")
        _require(rate == 0 or burst >= 1, f"limits.{kind}_burst must be at least 1")
    _require(limits.ban_seconds >= 1, "limits.ban_seconds must be at least 1")
    _require(limits.scan_users >= 0 and limits.scan_errors >= 0,
             "limits.scan_users and limits.scan_errors must be 0 (off) or more")
    _require(limits.scan_window >= 1, "limits.scan_window must be at least 1")
    _require(limits.trust_seconds >= 0, "limits.trust_seconds must be 0 (off) or more")
    _require(limits.trusted_factor >= 1, "limits.trusted_factor must be at least 1")
    for cidr in limits.allow:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"limits.allow: {cidr!r} is not an address or CIDR") from None


def _validate_registrar(registrar: RegistrarConfig) -> None:
    _require(
        0 < registrar.min_expires <= registrar.default_expires <= registrar.max_expires,
        "registrar: need 0 < min_expires <= default_expires <= max_expires",
    )
    _require(registrar.max_contacts >= 1, "registrar.max_contacts must be at least 1")
    _require(registrar.ping_interval >= 0, "registrar.ping_interval must not be negative")


def _validate_media(media: MediaConfig) -> None:
    _require(media.mode in MEDIA_MODES,
             f"media.mode must be one of {', '.join(MEDIA_MODES)}, not {media.mode!r}")
    _require(
        1024 <= media.rtp_port_min < media.rtp_port_max <= 65535,
        "media: need 1024 <= rtp_port_min < rtp_port_max <= 65535",
    )
    _require(media.relays >= 1, "media.relays must be at least 1")
    if media.control_address:
        try:
            control = ipaddress.IPv4Address(media.control_address)
        except ValueError:
            control = None
        _require(control is not None and not control.is_unspecified,
                 "media.control_address must be one IPv4 address of this host (it is "
                 f"announced to the other hosts), not {media.control_address!r}")
    _require(0 < media.media_timeout <= media.media_timeout_hold,
             "media: need 0 < media_timeout <= media_timeout_hold")
    # Each relay owns an even-aligned slice with room for at least one RTP/RTCP pair.
    span = media.rtp_port_max - media.rtp_port_min + 1
    _require(span // media.relays >= 2,
             "media: the RTP port range is too small for media.relays relays")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
