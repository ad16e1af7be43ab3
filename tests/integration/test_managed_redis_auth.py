"""The managed Redis requires a password (design invariant 14), set up by the launcher.

The launcher writes it once per state folder (mode 0600, as redis-server's configuration
file, so it is on no command line) and every process, sipctl included, reads it from
there.  A state folder from before passwords keeps its data: the next start sets one.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time

import pytest
import redis

from cluster import launch
from cluster.config import load, redis_auth_file
from conftest import ROOT, free_tcp_port, require_redis_server


def _start(config, log_dir) -> subprocess.Popen:
    """redis-server exactly as the rendered supervisord configuration runs it."""
    section = launch._redis_program(config, log_dir)
    command = next(line for line in section.splitlines() if line.startswith("command = "))
    process = subprocess.Popen(shlex.split(command[len("command = "):]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis.from_url(config.redis.url, socket_timeout=1.0)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.05)
        finally:
            client.close()


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(10)


def test_the_managed_redis_refuses_clients_without_its_password(tmp_path):
    require_redis_server()
    state = tmp_path / "state" / "redis"
    state.mkdir(parents=True)
    port = free_tcp_port()
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\nmanaged = true\n'
                           f'state_dir = "{state}"\n[log]\ndir = "{tmp_path / "log"}"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIPCLUSTER_") and k != "REDIS_URL"}
    env["SIPCLUSTER_CONFIG"] = str(config_path)
    secret = tmp_path / "secret"

    # A state folder from before: no password, some data.
    config = load(str(config_path), env=env, secret_file=secret)
    assert "@" not in config.redis.url
    process = _start(config, tmp_path)
    try:
        redis.Redis(port=port).set("written-before", b"1")
    finally:
        _stop(process)

    assert launch.ensure_redis_password(config)
    auth = redis_auth_file(config)
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    password = auth.read_text().split()[1]
    config = load(str(config_path), env=env, secret_file=secret)
    assert config.redis.url == f"redis://:{password}@127.0.0.1:{port}/0"
    process = _start(config, tmp_path)
    try:
        anonymous = redis.Redis(port=port, socket_timeout=1.0)
        with pytest.raises(redis.AuthenticationError):
            anonymous.get("written-before")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="guess", socket_timeout=1.0).ping()
        assert redis.Redis.from_url(config.redis.url).get("written-before") == b"1"
        cmdline = open(f"/proc/{process.pid}/cmdline", "rb").read()
        assert password.encode() not in cmdline

        # sipctl finds the password on its own; the new user's password comes from stdin.
        def sipctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "cluster.cli", *args], input=stdin,
                                  env=env, cwd=ROOT, text=True, capture_output=True,
                                  timeout=30)
        added = sipctl("users", "add", "1002", "--password-stdin", stdin="s3cret\n")
        assert added.returncode == 0, added.stderr
        listed = sipctl("users", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert '"1002"' in listed.stdout
    finally:
        _stop(process)


def test_an_external_redis_with_an_acl_user_and_no_default_user(tmp_path):
    """REDIS_URL with an ACL user's credentials (redis://user:pw@host:port/db): the store
    works with it, and without them the server refuses."""
    from cluster.store import Store
    from conftest import RedisServer

    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        admin = server.client()
        admin.acl_setuser("sip", enabled=True, passwords=["+s1p-p@ss/word"], keys=["*"],
                          channels=["*"], commands=["+@all"])
        admin.acl_setuser("default", enabled=False)
        url = f"redis://sip:s1p-p%40ss%2Fword@127.0.0.1:{server.port}/3"
        env = {"REDIS_URL": url}
        config = load(env=env, secret_file=tmp_path / "secret")
        assert config.redis.url == url and not config.redis.managed
        store = Store(config.redis.url, timeout=2.0)
        store.put_user("1002", "example.org", {"MD5": "0" * 32})
        assert store.get_user("1002", "example.org")["ha1"] == {"MD5": "0" * 32}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, socket_timeout=1.0).ping()
    finally:
        server.stop()
