"""cluster.config: defaults, the TOML file, environment overrides, errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from cluster import config as cfg
from cluster.config import Config, ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def load_env(tmp_path: Path, env: dict[str, str], text: str = "") -> Config:
    return load(write(tmp_path, text), env=env, secret_file=None)


def test_empty_file_gives_the_defaults(tmp_path):
    config = load_env(tmp_path, {})
    assert config.sip == cfg.SipConfig()
    assert config.workers.count == 2
    assert config.redis == cfg.RedisConfig(url="redis://127.0.0.1:6379/0", managed=True,
                                           state_dir=str(cfg.ROOT / "state" / "redis"))
    assert config.auth.algorithms == ("MD5",)
    assert config.timers == cfg.TimersConfig(t1=0.5, t2=4.0, t4=5.0)
    assert config.media.mode == "relay"  # the relays carry media by default
    assert config.calls.trace is True
    assert config.source == str((tmp_path / "cluster.toml").resolve())


def test_example_file_holds_every_setting_at_its_default():
    with open(cfg.DEFAULT_PATH, "rb") as f:
        example = tomllib.load(f)
    defaults = Config()
    for section, cls in cfg.SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(example[section]) == names, section
        for key in names:
            default = getattr(getattr(defaults, section), key)
            value = example[section][key]
            assert (tuple(value) if isinstance(value, list) else value) == default, (section, key)


def test_example_file_loads_to_the_defaults():
    loaded = load(cfg.DEFAULT_PATH, env={}, secret_file=None)
    assert loaded == cfg._resolve_paths(Config())


def test_toml_values_are_used(tmp_path):
    config = load_env(tmp_path, {}, """
        [sip]
        port = 5070
        advertised_address = "203.0.113.7"
        [workers]
        count = 4
        [auth]
        algorithms = ["SHA-256", "MD5"]
        [timers]
        t1 = 1          # an integer is fine where seconds are floats
        [calls]
        trace = false
    """)
    assert config.sip.port == 5070
    assert config.workers.count == 4
    assert config.auth.algorithms == ("SHA-256", "MD5")
    assert config.timers.t1 == 1.0 and isinstance(config.timers.t1, float)
    assert config.calls.trace is False


@pytest.mark.parametrize("name, raw, section, key, expected", [
    ("SIPCLUSTER_SIP_PORT", "5070", "sip", "port", 5070),
    ("SIPCLUSTER_WORKERS_COUNT", "4", "workers", "count", 4),
    ("SIPCLUSTER_WORKERS_REDIS_TIMEOUT", "0.5", "workers", "redis_timeout", 0.5),
    ("SIPCLUSTER_TIMERS_T2", "8", "timers", "t2", 8.0),
    ("SIPCLUSTER_CALLS_TRACE", "false", "calls", "trace", False),
    ("SIPCLUSTER_CALLS_TRACE", "0", "calls", "trace", False),
    ("SIPCLUSTER_CALLS_TRACE", "TRUE", "calls", "trace", True),
    ("SIPCLUSTER_REDIS_MANAGED", "1", "redis", "managed", True),
    ("SIPCLUSTER_AUTH_ALGORITHMS", "SHA-256,MD5", "auth", "algorithms", ("SHA-256", "MD5")),
    ("SIPCLUSTER_AUTH_ALGORITHMS", " SHA-256 ", "auth", "algorithms", ("SHA-256",)),
    ("SIPCLUSTER_SIP_USER_AGENT", "edge 1", "sip", "user_agent", "edge 1"),
    ("SIPCLUSTER_DISPATCHER_HEARTBEAT_INTERVAL", "0.25", "dispatcher", "heartbeat_interval",
     0.25),
    ("SIPCLUSTER_MEDIA_MODE", "relay", "media", "mode", "relay"),
    ("SIPCLUSTER_AUTH_USER_MAX_FAILURES", "0", "auth", "user_max_failures", 0),
    ("SIPCLUSTER_AUTH_USER_LOCKOUT", "900", "auth", "user_lockout", 900),
])
def test_env_overrides_convert_to_the_setting_type(tmp_path, name, raw, section, key, expected):
    config = load_env(tmp_path, {name: raw})
    value = getattr(getattr(config, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_env_overrides_the_file(tmp_path):
    config = load_env(tmp_path, {"SIPCLUSTER_SIP_PORT": "5080"}, "[sip]\nport = 5070\n")
    assert config.sip.port == 5080


def test_redis_url_env_sets_url_and_turns_managed_off(tmp_path):
    config = load_env(tmp_path, {"REDIS_URL": "redis://10.0.0.5:6380/2"})
    assert (config.redis.url, config.redis.managed) == ("redis://10.0.0.5:6380/2", False)


def test_sipcluster_redis_url_is_an_ordinary_override(tmp_path):
    config = load_env(tmp_path, {"SIPCLUSTER_REDIS_URL": "redis://127.0.0.1:7000/0"})
    assert config.redis.url == "redis://127.0.0.1:7000/0"
    assert config.redis.managed is True


def test_reserved_and_foreign_variables_are_ignored(tmp_path):
    env = {"SIPCLUSTER_WORKER_INDEX": "3", "SIPCLUSTER_RELAY_INDEX": "1", "HOME": "/root",
           "SIPCLUSTERX": "1"}
    assert load_env(tmp_path, env) == load_env(tmp_path, {})


@pytest.mark.parametrize("name, message", [
    ("SIPCLUSTER_SIP_PROT", "SIPCLUSTER_SIP_PROT"),
    ("SIPCLUSTER_WORKER_COUNT", "SIPCLUSTER_WORKER_COUNT"),  # section misspelt
    ("SIPCLUSTER_SIP", "SIPCLUSTER_SIP"),
])
def test_unknown_env_setting_is_an_error_naming_it(tmp_path, name, message):
    with pytest.raises(ConfigError, match=message):
        load_env(tmp_path, {name: "1"})


@pytest.mark.parametrize("name, raw", [
    ("SIPCLUSTER_SIP_PORT", "five"),
    ("SIPCLUSTER_TIMERS_T1", "fast"),
    ("SIPCLUSTER_CALLS_TRACE", "yes please"),
])
def test_unconvertible_env_value_is_an_error_naming_it(tmp_path, name, raw):
    with pytest.raises(ConfigError, match=name):
        load_env(tmp_path, {name: raw})


@pytest.mark.parametrize("text, message", [
    ("[sip]\nprot = 5060\n", "sip.prot"),
    ("[sips]\nport = 5060\n", r"\[sips\]"),
    ("[sip]\nport = \"5060\"\n", "sip.port must be an integer"),
    ("[calls]\ntrace = 1\n", "calls.trace must be true or false"),
    ("[auth]\nalgorithms = \"MD5\"\n", "auth.algorithms must be a list"),
    ("[timers]\nt1 = \"0.5\"\n", "timers.t1 must be a number"),
    ("[sip]\nbind = 127\n", "sip.bind must be a string"),
    ("sip = 1\n", r"\[sip\] must be a table"),
    ("[sip\n", "cluster.toml"),
])
def test_bad_toml_is_an_error_naming_the_setting(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_env(tmp_path, {}, text)


@pytest.mark.parametrize("env, message", [
    ({"SIPCLUSTER_SIP_PORT": "70000"}, "sip.port"),
    ({"SIPCLUSTER_WORKERS_COUNT": "0"}, "workers.count"),
    ({"SIPCLUSTER_MEDIA_MODE": "proxy"}, "media.mode"),
    ({"SIPCLUSTER_AUTH_ALGORITHMS": "SHA-1"}, "SHA-1"),
    ({"SIPCLUSTER_AUTH_ALGORITHMS": ""}, "auth.algorithms"),
    ({"SIPCLUSTER_REGISTRAR_MIN_EXPIRES": "7200"}, "min_expires"),
    ({"SIPCLUSTER_MEDIA_RTP_PORT_MIN": "30000"}, "rtp_port_min"),
    ({"SIPCLUSTER_DISPATCHER_DEAD_AFTER": "0.1"}, "dead_after"),
    ({"SIPCLUSTER_LOG_LEVEL": "LOUD"}, "log.level"),
    ({"SIPCLUSTER_AUTH_USER_MAX_FAILURES": "-1"}, "auth.user_max_failures"),
    ({"SIPCLUSTER_AUTH_USER_LOCKOUT": "0"}, "auth.user_lockout"),
    ({"REDIS_URL": "127.0.0.1:6379"}, "redis.url"),
    ({"SIPCLUSTER_LIMITS_ALLOW": "10.0.0.0/8,not-a-net"}, "limits.allow"),
    ({"SIPCLUSTER_LIMITS_INVITE_RATE": "-1"}, "limits.invite_rate"),
    ({"SIPCLUSTER_LIMITS_BAN_SECONDS": "0"}, "limits.ban_seconds"),
    ({"SIPCLUSTER_MEDIA_CONTROL_ADDRESS": "0.0.0.0"}, "media.control_address"),
    ({"SIPCLUSTER_MEDIA_CONTROL_ADDRESS": "::1"}, "media.control_address"),
    ({"SIPCLUSTER_MEDIA_CONTROL_ADDRESS": "relay.example"}, "media.control_address"),
    ({"SIPCLUSTER_STREAMS_TLS_PORT": "5060"}, "streams.tls_port"),
    ({"SIPCLUSTER_STREAMS_TLS_PORT": "0"}, "streams.tls_port"),
    ({"SIPCLUSTER_STREAMS_TLS_CERT": "/etc/cert.pem"}, "streams.tls_cert and streams.tls_key"),
    ({"SIPCLUSTER_STREAMS_TLS_KEY": "/etc/key.pem"}, "streams.tls_cert and streams.tls_key"),
    ({"SIPCLUSTER_STREAMS_IDLE_TIMEOUT": "0"}, "streams.idle_timeout"),
    ({"SIPCLUSTER_STREAMS_MESSAGE_TIMEOUT": "-1"}, "streams.message_timeout"),
    ({"SIPCLUSTER_STREAMS_MAX_PER_SOURCE": "0"}, "streams.max_per_source"),
    ({"SIPCLUSTER_STREAMS_MAX_HEADER_BYTES": "100"}, "max_header_bytes"),
    ({"SIPCLUSTER_STREAMS_MAX_BODY_BYTES": "60000"}, "max_body_bytes"),
    ({"SIPCLUSTER_STREAMS_WS": "true", "SIPCLUSTER_STREAMS_WS_PORT": "5060"},
     "streams.ws_port 5060 is already sip.port"),
    ({"SIPCLUSTER_STREAMS_WS_PORT": "0"}, "streams.ws_port must be 1-65535"),
    ({"SIPCLUSTER_STREAMS_WSS": "true"}, "streams.wss needs streams.tls_cert"),
    ({"SIPCLUSTER_STREAMS_WS": "true", "SIPCLUSTER_STREAMS_WSS": "true",
      "SIPCLUSTER_STREAMS_TLS_CERT": "/c.pem", "SIPCLUSTER_STREAMS_TLS_KEY": "/k.pem",
      "SIPCLUSTER_STREAMS_WSS_PORT": "8080"}, "streams.wss_port 8080 is already streams.ws_port"),
    ({"SIPCLUSTER_STREAMS_WS_PATH": "ws"}, "streams.ws_path"),
    ({"SIPCLUSTER_STREAMS_WS_FRAME_RATE": "0"}, "streams.ws_frame_rate"),
])
def test_impossible_values_are_rejected(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        load_env(tmp_path, env)


def test_named_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="not found"):
        load(env={"SIPCLUSTER_CONFIG": str(tmp_path / "missing.toml")})


def test_path_comes_from_sipcluster_config(tmp_path):
    path = write(tmp_path, "[workers]\ncount = 7\n")
    config = load(env={"SIPCLUSTER_CONFIG": str(path)}, secret_file=None)
    assert config.workers.count == 7
    assert config.source == str(path.resolve())


def test_default_path_is_the_example_file():
    assert cfg.default_path({}) == cfg.DEFAULT_PATH
    assert cfg.DEFAULT_PATH == cfg.ROOT / "deploy" / "cluster.toml"


def test_relative_paths_are_taken_from_the_repository_root(tmp_path):
    config = load_env(tmp_path, {"SIPCLUSTER_LOG_DIR": "/var/log/sipcluster"})
    assert config.dispatcher.control_path == str(cfg.ROOT / "run" / "dispatcher.sock")
    assert config.log.dir == "/var/log/sipcluster"


def test_streams_default_to_tcp_without_tls(tmp_path):
    streams = load_env(tmp_path, {}).streams
    assert streams.tcp and not streams.tls_cert and not streams.tls_key
    assert streams.tls_port == 5061
    # WebSocket only when asked for, on the ports jambonz and Kamailio set-ups use.
    assert not streams.ws and not streams.wss
    assert (streams.ws_port, streams.wss_port, streams.ws_path) == (8080, 8443, "/")


def test_tls_files_are_taken_from_the_home_folder(tmp_path):
    config = load_env(tmp_path, {"SIPCLUSTER_STREAMS_TLS_CERT": "tls/cert.pem",
                                 "SIPCLUSTER_STREAMS_TLS_KEY": "/etc/sip/key.pem"})
    assert config.streams.tls_cert == str(cfg.ROOT / "tls" / "cert.pem")
    assert config.streams.tls_key == "/etc/sip/key.pem"


def test_advertised_address_and_port_fall_back_to_the_bind(tmp_path):
    config = load_env(tmp_path, {"SIPCLUSTER_SIP_BIND": "192.0.2.1", "SIPCLUSTER_SIP_PORT": "5070"})
    assert (config.advertised_address, config.advertised_port) == ("192.0.2.1", 5070)
    assert config.realm == "192.0.2.1"


def test_advertised_address_port_and_realm_when_set(tmp_path):
    config = load_env(tmp_path, {}, """
        [sip]
        bind = "0.0.0.0"
        advertised_address = "198.51.100.4"
        advertised_port = 15060
    """)
    assert (config.advertised_address, config.advertised_port) == ("198.51.100.4", 15060)
    assert config.realm == "198.51.100.4"
    named = load_env(tmp_path, {"SIPCLUSTER_AUTH_REALM": "pbx.example.org"})
    assert named.realm == "pbx.example.org"


def test_media_advertised_address_falls_back_to_its_bind(tmp_path):
    assert load_env(tmp_path, {}).media.effective_address == "127.0.0.1"
    config = load_env(tmp_path, {"SIPCLUSTER_MEDIA_ADVERTISED_ADDRESS": "198.51.100.4"})
    assert config.media.effective_address == "198.51.100.4"


def test_host_id_falls_back_to_the_hostname(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg.socket, "gethostname", lambda: "edge-7")
    assert load_env(tmp_path, {}).sip.effective_host_id == "edge-7"
    assert load_env(tmp_path, {"SIPCLUSTER_SIP_HOST_ID": "a"}).sip.effective_host_id == "a"


def test_empty_secret_is_read_from_the_secret_file(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("0123abcd\n")
    path = write(tmp_path, "")
    assert load(path, env={}, secret_file=secret_file).auth.secret == "0123abcd"
    configured = load(path, env={"SIPCLUSTER_AUTH_SECRET": "set"}, secret_file=secret_file)
    assert configured.auth.secret == "set"
    assert load(path, env={}, secret_file=tmp_path / "none").auth.secret == ""


def test_config_is_frozen(tmp_path):
    config = load_env(tmp_path, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sip.port = 1  # type: ignore[misc]


def test_misspelt_settings_get_a_suggestion(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"unknown setting workers.cuont \(did you mean count\?\)"):
        load_env(tmp_path, {}, "[workers]\ncuont = 3\n")
    with pytest.raises(ConfigError,
                       match=r"unknown section \[worker\] \(did you mean workers\?\)"):
        load_env(tmp_path, {}, "[worker]\ncount = 3\n")
    with pytest.raises(ConfigError, match="did you mean SIPCLUSTER_WORKERS_COUNT"):
        load_env(tmp_path, {"SIPCLUSTER_WORKER_COUNT": "3"})
    with pytest.raises(ConfigError, match="did you mean SIPCLUSTER_SIP_ADVERTISED_ADDRESS"):
        load_env(tmp_path, {"SIPCLUSTER_SIP_ADVERTISED_ADRESS": "192.0.2.1"})


def test_kept_overrides_apply_under_the_environment(tmp_path):
    kept = tmp_path / "overrides.json"
    cfg.write_overrides(kept, {"SIPCLUSTER_WORKERS_COUNT": "4", "SIPCLUSTER_SIP_PORT": "5070"})
    path = write(tmp_path, "")
    config = load(path, env={"SIPCLUSTER_SIP_PORT": "5080"}, secret_file=None,
                  overrides_file=kept)
    assert (config.workers.count, config.sip.port) == (4, 5080)
    # A process started by supervisord finds the file through its environment.
    config = load(path, env={"SIPCLUSTER_OVERRIDES": str(kept)}, secret_file=None)
    assert (config.workers.count, config.sip.port) == (4, 5070)
    assert load(path, env={}, secret_file=None).workers.count == 2  # not read unless named


def test_the_home_folder_outside_a_checkout(monkeypatch, tmp_path):
    assert cfg.home_dir({}) == cfg.ROOT  # this checkout
    assert cfg.home_dir({"SIPCLUSTER_HOME": str(tmp_path)}) == tmp_path
    monkeypatch.setattr(cfg, "checkout_root", lambda: None)  # an installed package
    assert cfg.home_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "sipcluster"
    assert cfg.home_dir({}) == Path.home() / ".local" / "state" / "sipcluster"


def test_relay_control_address_follows_the_inter_host_address(tmp_path):
    """One host: loopback.  Several: the address the other hosts reach this one at, unless
    media.control_address names another."""
    assert load_env(tmp_path, {}).relay_control_address == "127.0.0.1"
    several = {"SIPCLUSTER_DISPATCHER_INTER_HOST_PORT": "5070",
               "SIPCLUSTER_DISPATCHER_INTER_HOST_ADDRESS": "10.0.0.11"}
    assert load_env(tmp_path, several).relay_control_address == "10.0.0.11"
    assert load_env(tmp_path, {**several, "SIPCLUSTER_MEDIA_CONTROL_ADDRESS": "10.0.1.11"}
                    ).relay_control_address == "10.0.1.11"
    # An inter-host address without the hand-off port is a single host still.
    assert load_env(tmp_path, {"SIPCLUSTER_DISPATCHER_INTER_HOST_ADDRESS": "10.0.0.11"}
                    ).relay_control_address == "127.0.0.1"


@pytest.mark.parametrize("value, good", [
    ("4gb", True), ("512mb", True), ("1073741824", True), ("2G", True), ("", True),
    ("4 gb", False), ("-1", False), ("0", False), ("lots", False), ("4tb", False),
])
def test_the_managed_redis_memory_limit_is_a_size(tmp_path, value, good):
    if good:
        assert load_env(tmp_path, {"SIPCLUSTER_REDIS_MAXMEMORY": value}).redis.maxmemory == value
    else:
        with pytest.raises(ConfigError, match="redis.maxmemory"):
            load_env(tmp_path, {"SIPCLUSTER_REDIS_MAXMEMORY": value})
