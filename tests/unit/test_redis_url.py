"""redis.url: redis+sentinel:// URLs, parsed by cluster.redisclient and checked by the config."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.sentinel import SentinelConnectionPool

from cluster import launch, redisclient
from cluster.config import ConfigError, load
from cluster.redisclient import ClusterURL, SentinelURL, parse_cluster_url, parse_sentinel_url

THREE = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,10.0.0.3/sipcluster"


def load_url(tmp_path: Path, url: str):
    empty = tmp_path / "cluster.toml"
    empty.write_text("")
    return load(empty, env={"REDIS_URL": url}, secret_file=None)


@pytest.mark.parametrize("url, expected", [
    (THREE, SentinelURL((("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)),
                        "sipcluster")),
    ("redis+sentinel://s1/mymaster/2", SentinelURL((("s1", 26379),), "mymaster", 2)),
    ("redis+sentinel://s1:5000/mymaster/", SentinelURL((("s1", 5000),), "mymaster")),
    ("redis+sentinel://:pa%40ss@s1,s2/m/1",
     SentinelURL((("s1", 26379), ("s2", 26379)), "m", 1, password="pa@ss")),
    ("redis+sentinel://app:secret@[::1]:26379,[fd00::2]/m?sentinel_password=sp",
     SentinelURL((("::1", 26379), ("fd00::2", 26379)), "m", 0, "app", "secret", "sp")),
    ("REDIS+SENTINEL://s1/m", SentinelURL((("s1", 26379),), "m")),
])
def test_good_sentinel_urls(url, expected):
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize("url, message", [
    ("redis+sentinel://s1:26379", "master name is missing"),
    ("redis+sentinel://s1:26379/", "master name is missing"),
    ("redis+sentinel:///mymaster", "no sentinel named"),
    ("redis+sentinel://:pw@/mymaster", "no sentinel named"),
    ("redis+sentinel://s1:0/m", "'s1:0': port must be 1-65535"),
    ("redis+sentinel://s1:70000/m", "port must be 1-65535"),
    ("redis+sentinel://s1:abc/m", "'s1:abc': port must be 1-65535"),
    ("redis+sentinel://s1:/m", "the port is empty"),
    ("redis+sentinel://s1,,s2/m", "bad sentinel address ''"),
    ("redis+sentinel://s1 s2/m", "bad sentinel address"),
    ("redis+sentinel://[::1/m", "bad sentinel address"),
    ("redis+sentinel://s1/m/x", "database must be a number, not 'x'"),
    ("redis+sentinel://s1/m/0/extra", r"/<master name>\[/<db>\], nothing more"),
    ("redis+sentinel://s1/m?db=2", "unknown option.*db"),
    ("redis+sentinel://user@s1/m", "password is missing"),
    ("redis+sentinel://s1/m#x", "fragment"),
    ("redis+sentinel://s1/my%20master", "bad master name 'my master'"),
])
def test_bad_sentinel_urls_are_config_errors_that_say_why(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)
    with pytest.raises(ConfigError, match=rf"redis\.url: bad redis\+sentinel:// URL .*{message}"):
        load_url(tmp_path, url)


def test_config_error_hides_the_passwords(tmp_path):
    url = "redis+sentinel://:hunter2@s1:0/m?sentinel_password=topsecret"
    with pytest.raises(ConfigError) as error:
        load_url(tmp_path, url)
    assert "hunter2" not in str(error.value) and "topsecret" not in str(error.value)
    assert "redis+sentinel://:***@s1:0/m?sentinel_password=***" in str(error.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "sentinel://s1/m", "127.0.0.1:6379"])
def test_other_schemes_are_refused_naming_the_sentinel_one(tmp_path, url):
    with pytest.raises(ConfigError,
                       match=r"redis://, rediss://, unix://, redis\+sentinel:// or redis\+cluster"):
        load_url(tmp_path, url)


def test_a_sentinel_url_turns_managed_off_wherever_it_comes_from(tmp_path):
    toml = tmp_path / "cluster.toml"
    toml.write_text(f'[redis]\nurl = "{THREE}"\nmanaged = true\n')
    assert load(toml, env={}, secret_file=None).redis.managed is False
    plain = tmp_path / "plain.toml"
    plain.write_text("[redis]\nmanaged = true\n")
    config = load(plain, env={"SIPCLUSTER_REDIS_URL": THREE}, secret_file=None)
    assert (config.redis.url, config.redis.managed) == (THREE, False)
    # A plain URL keeps managed as set: only a Sentinel URL implies it.
    config = load(plain, env={"SIPCLUSTER_REDIS_URL": "redis://127.0.0.1:7000/0"},
                  secret_file=None)
    assert config.redis.managed is True


def test_the_launcher_runs_no_redis_for_a_sentinel_url(tmp_path: Path):
    url = "redis+sentinel://:p%ss@127.0.0.1:26379,127.0.0.1:26380/sipcluster/0"
    env = {"REDIS_URL": url, "SIPCLUSTER_LOG_DIR": str(tmp_path / "log")}
    config = load(env=env, secret_file=None)
    launch.check_tools(config)  # no managed_redis_port() complaint
    text = launch.render_supervisord(config, run_dir=tmp_path, python="/opt/venv/bin/python",
                                     env=env)
    assert "[program:redis]" not in text and "redis-server" not in text
    assert "REDIS_URL='redis+sentinel://:p%%ss@" in text or \
        'REDIS_URL="redis+sentinel://:p%%ss@' in text  # % doubled for supervisord


def test_connect_builds_a_sentinel_managed_pool_without_connecting():
    url = "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/sipcluster/3?sentinel_password=sp"
    client = redisclient.connect(url, timeout=0.25, max_connections=7)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "sipcluster"
    assert pool.is_master and pool.max_connections == 7
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"]) == (3, "pw")
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
    assert pool.sentinel_manager.min_other_sentinels == 1  # a lone sentinel is not believed
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    for sentinel in sentinels:
        options = sentinel.connection_pool.connection_kwargs
        assert options["password"] == "sp" and options["socket_timeout"] == 0.25


def test_a_single_sentinel_is_believed_alone():
    client = redisclient.connect("redis+sentinel://127.0.0.1:1/m", timeout=0.25)
    assert client.connection_pool.sentinel_manager.min_other_sentinels == 0


def test_connect_keeps_plain_urls_as_they_were():
    client = redisclient.connect("redis://:pw@127.0.0.1:6390/4", timeout=0.5, max_connections=3)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["password"]) == (6390, 4, "pw")
    assert kwargs["socket_timeout"] == 0.5 and client.connection_pool.max_connections == 3


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:pw@h/0", "redis://user:***@h/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis+sentinel://s1:26379,s2/m", "redis+sentinel://s1:26379,s2/m"),
])
def test_redacted(url, shown):
    assert redisclient.redacted(url) == shown


@pytest.mark.parametrize("env, message", [
    ({"SIPCLUSTER_REDIS_WAIT_REPLICAS": "-1"}, "redis.wait_replicas"),
    ({"SIPCLUSTER_REDIS_WAIT_TIMEOUT": "0"}, "redis.wait_timeout"),
    ({"SIPCLUSTER_REDIS_WAIT_TIMEOUT": "0.25"}, "shorter than workers.redis_timeout"),
])
def test_wait_settings_are_checked(tmp_path, env, message):
    empty = tmp_path / "cluster.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=message):
        load(empty, env=env, secret_file=None)


# ------------------------------------------------------------------ redis+cluster://
@pytest.mark.parametrize("url, expected", [
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,10.0.0.3/",
     ClusterURL((("10.0.0.1", 7000), ("10.0.0.2", 7001), ("10.0.0.3", 6379)))),
    ("redis+cluster://n1", ClusterURL((("n1", 6379),))),
    ("redis+cluster://n1:7000/0", ClusterURL((("n1", 7000),))),
    ("redis+cluster://:pa%40ss@n1,n2/", ClusterURL((("n1", 6379), ("n2", 6379)), None, "pa@ss")),
    ("redis+cluster://app:secret@[::1]:7000,[fd00::2]/",
     ClusterURL((("::1", 7000), ("fd00::2", 6379)), "app", "secret")),
    ("REDIS+CLUSTER://n1:7000/", ClusterURL((("n1", 7000),))),
])
def test_good_cluster_urls(url, expected):
    assert parse_cluster_url(url) == expected


@pytest.mark.parametrize("url, message", [
    ("redis+cluster:///", "no node named"),
    ("redis+cluster://:pw@/", "no node named"),
    ("redis+cluster://n1:0/", "'n1:0': port must be 1-65535"),
    ("redis+cluster://n1:/", "the port is empty"),
    ("redis+cluster://n1,,n2/", "bad node address ''"),
    ("redis+cluster://n1/3", "only database 0, not /3"),
    ("redis+cluster://n1/0/x", "only database 0"),
    ("redis+cluster://user@n1/", "password is missing"),
    ("redis+cluster://n1/?read_from_replicas=1", "no option"),
    ("redis+cluster://n1/#x", "fragment"),
])
def test_bad_cluster_urls_are_config_errors_that_say_why(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        parse_cluster_url(url)
    with pytest.raises(ConfigError, match=rf"redis\.url: bad redis\+cluster:// URL .*{message}"):
        load_url(tmp_path, url)


def test_a_cluster_url_turns_managed_off_and_the_launcher_runs_no_redis(tmp_path: Path):
    url = "redis+cluster://:p%ss@127.0.0.1:7000,127.0.0.1:7001/"
    toml = tmp_path / "cluster.toml"
    toml.write_text(f'[redis]\nurl = "{url}"\nmanaged = true\n')
    assert load(toml, env={}, secret_file=None).redis.managed is False
    env = {"REDIS_URL": url, "SIPCLUSTER_LOG_DIR": str(tmp_path / "log")}
    config = load(env=env, secret_file=None)
    launch.check_tools(config)
    text = launch.render_supervisord(config, run_dir=tmp_path, python="/opt/venv/bin/python",
                                     env=env)
    assert "[program:redis]" not in text and "redis-server" not in text
    assert redisclient.redacted(url) == "redis+cluster://:***@127.0.0.1:7000,127.0.0.1:7001/"


def test_connect_makes_a_cluster_client_without_connecting():
    from cluster.clusterclient import LazyCluster

    client = redisclient.connect("redis+cluster://app:pw@127.0.0.1:1,127.0.0.1:2/",
                                 timeout=0.25, max_connections=5)
    assert isinstance(client, LazyCluster)
    options = client._kwargs
    assert [(n.host, n.port) for n in options["startup_nodes"]] == [("127.0.0.1", 1),
                                                                   ("127.0.0.1", 2)]
    assert (options["username"], options["password"]) == ("app", "pw")
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 0.25
    assert options["max_connections"] == 5
    assert client._client is None  # nothing asked of the cluster yet
    script = client.register_script("return 1")
    assert client.scripts == {script.sha: script}
    assert callable(client.get) and client._client is None
