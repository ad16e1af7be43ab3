"""Configuration: one TOML file plus environment overrides.

The settings form a tree of frozen dataclasses whose defaults are the demo
deployment's.  ``load()`` reads the TOML file, then applies, in this order:

* ``REDIS_URL``: sets ``redis.url`` and turns ``redis.managed`` off, because a
  Redis somebody else runs is not one the launcher should start;
* ``SIPCLUSTER_<SECTION>_<KEY>``: any single setting, for example
  ``SIPCLUSTER_SIP_PORT=5070`` or ``SIPCLUSTER_AUTH_ALGORITHMS=SHA-256,MD5``.

A ``redis+sentinel://`` URL (cluster/redisclient.py), wherever it comes from,
turns ``redis.managed`` off as well: the launcher runs no replicated Redis.

Unknown sections and keys are errors in both places: a misspelt setting that
silently keeps its default is worse than a process that refuses to start.

Relative paths (``dispatcher.control_path``, ``log.dir``, ``redis.state_dir``) are
taken from the repository root, so every process agrees on them whatever its
working directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .redisclient import is_sentinel_url, parse_sentinel_url, redacted

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "deploy" / "cluster.toml"
RUN_DIR = ROOT / "run"
# Written by `sipcluster up` when auth.secret is empty; read back by load().
SECRET_FILE = RUN_DIR / "secret"

ENV_PREFIX = "SIPCLUSTER_"
# SIPCLUSTER_* variables that are not settings: the launcher and supervisord
# set them for the processes they start.
RESERVED_ENV = frozenset(
    {"SIPCLUSTER_CONFIG", "SIPCLUSTER_WORKER_INDEX", "SIPCLUSTER_RELAY_INDEX"}
)

MEDIA_MODES = ("bypass", "relay")
DIGEST_ALGORITHMS = ("MD5", "SHA-256")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    redis: RedisConfig = field(default_factory=RedisConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
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


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name not in ("source", "routes")
}
# Settings that are file system paths, resolved against ROOT by load().
PATH_KEYS = {("dispatcher", "control_path"), ("log", "dir"), ("redis", "state_dir")}


def default_path(env: Mapping[str, str] = os.environ) -> Path:
    """The config file used when none is named: $SIPCLUSTER_CONFIG or deploy/cluster.toml."""
    return Path(env.get("SIPCLUSTER_CONFIG") or DEFAULT_PATH)


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
    secret_file: str | os.PathLike[str] | None = SECRET_FILE,
) -> Config:
    """Read the TOML file at ``path`` (default: ``default_path(env)``) and apply overrides.

    A missing file is an error only when it was named explicitly (argument or
    SIPCLUSTER_CONFIG); without one the defaults and the environment apply.
    When ``auth.secret`` ends up empty and ``secret_file`` exists, the secret
    is read from it (the launcher writes it at `sipcluster up`).
    """
    named = path is not None or bool(env.get("SIPCLUSTER_CONFIG"))
    config_path = Path(path) if path is not None else default_path(env)
    values = _read_toml(config_path, required=named)
    routes = _build_routes(values.pop("routes", []))
    _apply_env(values, env)
    redis = values.get("redis", {})
    if is_sentinel_url(str(redis.get("url", ""))):
        redis["managed"] = False  # a replicated Redis is run elsewhere, never by the launcher
    sections = {name: _build_section(name, values.get(name, {})) for name in SECTIONS}
    config = Config(**sections, routes=routes, source=str(config_path.resolve()))
    config = _resolve_paths(config)
    config = _fill_secret(config, secret_file)
    validate(config)
    return config


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
            raise ConfigError(f"{path}: unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        known = _field_names(section)
        for key in table:
            if key not in known:
                raise ConfigError(f"{path}: unknown setting {section}.{key}")
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
    if section not in SECTIONS:
        raise ConfigError(f"unknown setting in environment: {name} (no section [{section}])")
    if key not in _field_names(section):
        raise ConfigError(f"unknown setting in environment: {name} (no {section}.{key})")
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
        absolute = str(ROOT / getattr(current, key))  # ROOT / "/abs" == "/abs"
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


def _validate_redis(redis: RedisConfig) -> None:
    if is_sentinel_url(redis.url):
        try:
            parse_sentinel_url(redis.url)
        except ValueError as e:
            raise ConfigError(f"redis.url: bad redis+sentinel:// URL {redacted(redis.url)!r}: "
                              f"{e}") from None
        # The launcher runs one redis-server, never a replicated set with its sentinels.
        _require(not redis.managed, "redis.managed must be false with a redis+sentinel:// URL "
                 "(the launcher runs no Sentinel)")
        return
    _require(redis.url.startswith(("redis://", "rediss://", "unix://")),
             "redis.url must be a redis://, rediss://, unix:// or redis+sentinel:// URL, "
             f"not {redacted(redis.url)!r}")


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
    _require(0 < media.media_timeout <= media.media_timeout_hold,
             "media: need 0 < media_timeout <= media_timeout_hold")
    # Each relay owns an even-aligned slice with room for at least one RTP/RTCP pair.
    span = media.rtp_port_max - media.rtp_port_min + 1
    _require(span // media.relays >= 2,
             "media: the RTP port range is too small for media.relays relays")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
