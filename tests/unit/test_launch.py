"""cluster.launch: the rendered supervisord configuration, the secret, the SIP probe."""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
from pathlib import Path

import pytest
from supervisor.datatypes import RestartWhenExitUnexpected
from supervisor.options import ServerOptions

from cluster import launch
from cluster.config import ROOT, Config, load
from conftest import free_udp_port

PYTHON = "/opt/venv/bin/python"


def render(tmp_path: Path, env: dict[str, str]) -> tuple[Config, Path]:
    """Load a config from ``env``, render it into tmp_path and return the file."""
    env = {"SIPCLUSTER_LOG_DIR": str(tmp_path / "log"), **env}
    config = load(env=env, secret_file=None)
    run_dir = tmp_path / "run"
    for folder in (run_dir, tmp_path / "log"):
        folder.mkdir(exist_ok=True)
    conf = run_dir / "supervisord.conf"
    conf.write_text(launch.render_supervisord(config, run_dir=run_dir, python=PYTHON, env=env))
    return config, conf


def supervisord_view(conf: Path) -> dict[str, list]:
    """What supervisord itself makes of the file: {group: [process configs]}."""
    options = ServerOptions()
    try:
        options.realize(args=["-c", str(conf)])
    except SystemExit:
        pytest.fail(f"supervisord rejects {conf}:\n{conf.read_text()}")
    return {group.name: group.process_configs for group in options.process_group_configs}


def test_three_workers_in_relay_mode(tmp_path):
    config, conf = render(tmp_path, {"SIPCLUSTER_WORKERS_COUNT": "3",
                                     "SIPCLUSTER_MEDIA_MODE": "relay",
                                     "SIPCLUSTER_MEDIA_RELAYS": "2"})
    groups = supervisord_view(conf)
    assert set(groups) == {"redis", "dispatcher", "relay", "worker"}

    workers = groups["worker"]
    assert [p.name for p in workers] == ["worker-0", "worker-1", "worker-2"]
    assert [p.environment["SIPCLUSTER_WORKER_INDEX"] for p in workers] == ["0", "1", "2"]
    assert workers[0].command == f"{PYTHON} -m workers.sip"

    relays = groups["relay"]
    assert [p.name for p in relays] == ["relay-0", "relay-1"]
    assert [p.environment["SIPCLUSTER_RELAY_INDEX"] for p in relays] == ["0", "1"]
    assert relays[0].command == f"{PYTHON} -m workers.relay"

    (dispatcher,) = groups["dispatcher"]
    assert dispatcher.command == f"{PYTHON} -m cluster.dispatcher"
    # Redis before the dispatcher before the relays and workers.
    order = [groups[name][0].priority for name in ("redis", "dispatcher", "relay", "worker")]
    assert order == sorted(order)

    for process in [p for group in groups.values() for p in group]:
        assert process.environment["SIPCLUSTER_CONFIG"] == config.source
        # Restarted on any exit but a configuration error's (78): it would fail again.
        assert process.autorestart is RestartWhenExitUnexpected
        assert process.exitcodes == [78]
        # Died within 1 s, 3 times: FATAL (a crash loop ends; the launcher reports it).
        assert (process.startsecs, process.startretries, process.stopwaitsecs) == (1, 3, 10)
        assert process.stopsignal == 15
        assert process.directory == str(ROOT)
        assert process.stdout_logfile == str(tmp_path / "log" / f"{process.name}.log")
        assert process.redirect_stderr is True


def test_managed_redis_takes_its_port_from_the_url(tmp_path):
    _, conf = render(tmp_path, {"SIPCLUSTER_REDIS_URL": "redis://127.0.0.1:6390/0"})
    (redis,) = supervisord_view(conf)["redis"]
    argv = redis.command.split()
    assert argv[0].endswith("redis-server")
    assert argv[argv.index("--port") + 1] == "6390"
    assert argv[argv.index("--bind") + 1] == "127.0.0.1"


def test_managed_redis_persists_into_the_state_folder(tmp_path):
    config, conf = render(tmp_path, {})
    (redis,) = supervisord_view(conf)["redis"]
    argv = redis.command.split()
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--appendfsync") + 1] == "everysec"
    assert argv[argv.index("--aof-load-truncated") + 1] == "yes"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--save ''" in redis.command  # an empty argument: no RDB snapshots beside the AOF
    # Its environment stays readable: how `sipcluster up` finds one a killed supervisord left.
    assert argv[argv.index("--set-proc-title") + 1] == "no"
    # The default state folder is state/redis of the checkout, outside run/ (make clean).
    assert argv[argv.index("--dir") + 1] == str(ROOT / "state" / "redis")
    assert config.redis.state_dir == str(ROOT / "state" / "redis")
    assert ROOT / "run" not in Path(config.redis.state_dir).parents


def test_the_managed_redis_memory_limit_is_a_setting(tmp_path):
    _, conf = render(tmp_path, {})
    assert "--maxmemory " not in supervisord_view(conf)["redis"][0].command + " "
    _, conf = render(tmp_path, {"SIPCLUSTER_REDIS_MAXMEMORY": "4gb"})
    argv = supervisord_view(conf)["redis"][0].command.split()
    assert argv[argv.index("--maxmemory") + 1] == "4gb"


def test_the_state_folder_is_a_setting_and_created_private(tmp_path):
    state = tmp_path / "var" / "redis"
    config, conf = render(tmp_path, {"SIPCLUSTER_REDIS_STATE_DIR": str(state)})
    (redis,) = supervisord_view(conf)["redis"]
    argv = redis.command.split()
    assert argv[argv.index("--dir") + 1] == str(state)
    launch.write_config(config, run_dir=tmp_path / "run")
    assert state.is_dir() and stat.S_IMODE(state.stat().st_mode) == 0o700


def test_bypass_mode_and_external_redis_run_neither_relays_nor_redis(tmp_path):
    _, conf = render(tmp_path, {"REDIS_URL": "redis://127.0.0.1:7001/0",
                                "SIPCLUSTER_MEDIA_MODE": "bypass"})
    groups = supervisord_view(conf)
    assert set(groups) == {"dispatcher", "worker"}
    assert [p.name for p in groups["worker"]] == ["worker-0", "worker-1"]


def test_environment_overrides_reach_every_process(tmp_path):
    env = {"REDIS_URL": "redis://:pa%ss@127.0.0.1:7001/0", "SIPCLUSTER_SIP_PORT": "5090"}
    _, conf = render(tmp_path, env)
    for group in supervisord_view(conf).values():
        for process in group:
            assert process.environment["REDIS_URL"] == "redis://:pa%ss@127.0.0.1:7001/0"
            assert process.environment["SIPCLUSTER_SIP_PORT"] == "5090"


def test_supervisord_files_live_in_the_run_folder(tmp_path):
    _, conf = render(tmp_path, {})
    text = conf.read_text()
    run_dir = tmp_path / "run"
    assert f"file = {run_dir}/supervisor.sock" in text
    assert f"pidfile = {run_dir}/supervisord.pid" in text
    assert f"serverurl = unix://{run_dir}/supervisor.sock" in text
    assert f"logfile = {tmp_path}/log/supervisord.log" in text


def test_managed_redis_must_be_local(tmp_path):
    config = load(env={"SIPCLUSTER_REDIS_URL": "redis://192.0.2.10:6379/0"}, secret_file=None)
    with pytest.raises(launch.LaunchError, match="REDIS_URL"):
        launch.render_supervisord(config, run_dir=tmp_path, python=PYTHON, env={})


def test_secret_is_generated_once_and_private(tmp_path):
    secret_file = tmp_path / "run" / "secret"
    launch.ensure_secret(Config(), secret_file)
    first = secret_file.read_text()
    assert len(first.strip()) == 64
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    launch.ensure_secret(Config(), secret_file)
    assert secret_file.read_text() == first


def test_probe_target_maps_a_wildcard_bind_to_loopback():
    config = load(env={"SIPCLUSTER_SIP_BIND": "0.0.0.0", "SIPCLUSTER_SIP_PORT": "5071"},
                  secret_file=None)
    assert launch.probe_target(config) == ("127.0.0.1", 5071)
    config = load(env={"SIPCLUSTER_SIP_ADVERTISED_ADDRESS": "127.0.0.2",
                       "SIPCLUSTER_SIP_ADVERTISED_PORT": "5072"}, secret_file=None)
    assert launch.probe_target(config) == ("127.0.0.2", 5072)


def test_options_requests_are_fresh_each_time():
    first = launch.options_request(("127.0.0.1", 5060), ("127.0.0.1", 40000))
    second = launch.options_request(("127.0.0.1", 5060), ("127.0.0.1", 40000))
    assert first.startswith(b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n")
    assert first.endswith(b"Content-Length: 0\r\n\r\n")
    assert header(first, b"Via") != header(second, b"Via")
    assert header(first, b"Call-ID") != header(second, b"Call-ID")
    assert b";branch=z9hG4bK" in header(first, b"Via")
    ipv6 = launch.options_request(("::1", 5060), ("::1", 40000))
    assert ipv6.startswith(b"OPTIONS sip:[::1]:5060 SIP/2.0\r\n")


def header(message: bytes, name: bytes) -> bytes:
    for line in message.split(b"\r\n"):
        if line.startswith(name + b":"):
            return line
    raise AssertionError(f"no {name!r} header")


def test_wait_for_sip_returns_the_first_response_line():
    port = free_udp_port()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", port))
    seen: list[bytes] = []

    def answer_the_second_request():  # the first one is "lost", so the probe must resend
        for _ in range(2):
            data, source = server.recvfrom(65535)
            seen.append(data)
        server.sendto(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", source)

    responder = threading.Thread(target=answer_the_second_request, daemon=True)
    responder.start()
    try:
        assert launch.wait_for_sip(("127.0.0.1", port), timeout=5) == b"SIP/2.0 200 OK"
    finally:
        responder.join(5)
        server.close()
    assert len(seen) == 2 and all(m.startswith(b"OPTIONS ") for m in seen)
    assert header(seen[0], b"Call-ID") != header(seen[1], b"Call-ID")


def test_wait_for_sip_gives_up(monkeypatch):
    monkeypatch.setattr(launch, "PROBE_INTERVAL", 0.1)
    with pytest.raises(launch.LaunchError, match="no SIP response"):
        launch.wait_for_sip(("127.0.0.1", free_udp_port()), timeout=0.3)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for command in ("up", "down", "status", "render"):
        assert command in usage


def test_a_change_touches_only_the_sections_of_the_programs_that_read_it(tmp_path):
    """supervisord's update restarts a group whose section changed: each section carries
    the digest of the settings its program reads, and no override of its own."""
    def sections(env):
        config = load(env={"SIPCLUSTER_LOG_DIR": str(tmp_path / "log"), **env},
                      secret_file=None)
        text = launch.render_supervisord(config, run_dir=tmp_path, python=PYTHON, env={})
        return {part.split("]", 1)[0]: part for part in text.split("[program:")[1:]}

    base = sections({})
    changed = {env_name: {name for name, text in sections({env_name: value}).items()
                          if text != base[name]}
               for env_name, value in (("SIPCLUSTER_WORKERS_COUNT", "4"),
                                       ("SIPCLUSTER_MEDIA_RELAYS", "3"),
                                       ("SIPCLUSTER_SIP_PORT", "5070"),
                                       ("SIPCLUSTER_AUTH_REALM", "example.org"))}
    assert changed == {"SIPCLUSTER_WORKERS_COUNT": {"worker"},
                       "SIPCLUSTER_MEDIA_RELAYS": {"relay", "worker"},
                       "SIPCLUSTER_SIP_PORT": {"dispatcher", "relay", "worker"},
                       "SIPCLUSTER_AUTH_REALM": {"worker"}}


def test_overrides_are_kept_between_starts_until_reset(tmp_path):
    path = tmp_path / "run" / "overrides.json"
    first = launch.launch_overrides({"SIPCLUSTER_WORKERS_COUNT": "4", "HOME": "/root"},
                                    reset=False, path=path)
    assert first == {"SIPCLUSTER_WORKERS_COUNT": "4"}
    launch.write_overrides(path, first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # REDIS_URL may carry a password
    later = launch.launch_overrides({"REDIS_URL": "redis://127.0.0.1:7000/0"}, False, path)
    assert later == {"SIPCLUSTER_WORKERS_COUNT": "4", "REDIS_URL": "redis://127.0.0.1:7000/0"}
    assert launch.launch_overrides({}, reset=True, path=path) == {}
    assert "SIPCLUSTER_WORKERS_COUNT=4" in launch.describe_overrides(first)


def test_the_cause_is_read_from_the_lines_of_this_start_only(tmp_path):
    log = tmp_path / "dispatcher.log"
    log.write_text("2026-01-01 09:00:00,000 ERROR dispatcher[1] dispatcher: an old error\n")
    watch = launch.Watch(tmp_path, run_dir=tmp_path)
    info = {"name": "dispatcher", "statename": "BACKOFF", "spawnerr": "", "description": ""}
    assert watch.error_lines("dispatcher") == []
    with log.open("a") as f:
        f.write("2026-01-01 10:00:00,000 INFO dispatcher[2] dispatcher: starting\n"
                "2026-01-01 10:00:00,100 ERROR dispatcher[2] dispatcher: cannot bind "
                "127.0.0.1:5060: Address already in use\n")
    assert watch.cause(info) == "dispatcher: cannot bind 127.0.0.1:5060: Address already in use"
    (tmp_path / "worker-0.log").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "ModuleNotFoundError: No module named 'gevent'\n")
    assert watch.cause({**info, "name": "worker-0"}) == (
        "worker-0: ModuleNotFoundError: No module named 'gevent'")
def test_the_managed_redis_gets_a_private_password_once(tmp_path):
    state = tmp_path / "state" / "redis"
    config = load(env={"SIPCLUSTER_REDIS_STATE_DIR": str(state)}, secret_file=None)
    assert launch.ensure_redis_password(config) is True
    auth = state / "redis-auth.conf"
    text = auth.read_text()
    assert re.fullmatch(r"requirepass [0-9a-f]{64}\n", text)
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert launch.ensure_redis_password(config) is False
    assert auth.read_text() == text
    # redis-server reads it as its configuration file: the password is on no command line.
    conf = launch.write_config(config, run_dir=tmp_path / "run")
    (redis,) = supervisord_view(conf)["redis"]
    argv = redis.command.split()
    assert argv[1] == str(auth)
    assert text.split()[1] not in conf.read_text()


def test_every_process_reads_the_managed_redis_password(tmp_path):
    state = tmp_path / "redis"
    env = {"SIPCLUSTER_REDIS_STATE_DIR": str(state)}
    secret = tmp_path / "secret"
    assert load(env=env, secret_file=secret).redis.url == "redis://127.0.0.1:6379/0"
    launch.ensure_redis_password(load(env=env, secret_file=None))
    password = (state / "redis-auth.conf").read_text().split()[1]
    assert load(env=env, secret_file=secret).redis.url == f"redis://:{password}@127.0.0.1:6379/0"
    # Credentials given in the URL, and a Redis run elsewhere, are left as they are.
    given = {**env, "SIPCLUSTER_REDIS_URL": "redis://:mine@127.0.0.1:6379/0"}
    assert load(env=given, secret_file=secret).redis.url == "redis://:mine@127.0.0.1:6379/0"
    external = {**env, "REDIS_URL": "redis://127.0.0.1:7001/0"}
    assert load(env=external, secret_file=secret).redis.url == "redis://127.0.0.1:7001/0"


def test_the_rendered_configuration_is_private_whatever_the_umask(tmp_path, monkeypatch):
    env = {"SIPCLUSTER_AUTH_SECRET": "s3cret-nonce-key", "SIPCLUSTER_LOG_DIR": str(tmp_path)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # as `make run` would see them
    config = load(env=env, secret_file=None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "supervisord.conf").write_text("old")
    (run_dir / "supervisord.conf").chmod(0o644)
    previous = os.umask(0o022)
    try:
        conf = launch.write_config(config, run_dir=run_dir)
    finally:
        os.umask(previous)
    # The overrides (the secret among them) reach the programs through run/overrides.json
    # (0600), not through supervisord's configuration.
    assert "s3cret-nonce-key" not in conf.read_text()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600


def test_every_section_is_read_by_a_program_it_restarts():
    """A section missing from CONCERNS would change without restarting what reads it."""
    import dataclasses

    from cluster.config import Config
    sections = {f.name for f in dataclasses.fields(Config)} - {"source"}
    concerned = {name for names in launch.CONCERNS.values() for name in names}
    assert sections <= concerned, sections - concerned
