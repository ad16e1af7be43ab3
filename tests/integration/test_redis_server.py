"""The shared test Redis (tests/conftest.py): real, private, emptied between tests."""

from __future__ import annotations

from conftest import RedisServer, free_tcp_port


def test_redis_url_starts_empty_and_is_usable(redis_server, redis_url):
    assert redis_url == redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis_server.client()
    try:
        assert client.dbsize() == 0
        client.set("probe", b"1")
        assert client.get("probe") == b"1"
    finally:
        client.close()


def test_each_test_gets_a_flushed_server(redis_server, redis_url):
    client = redis_server.client()
    try:
        assert client.get("probe") is None  # written by the test before
    finally:
        client.close()


def test_persistence_is_off(redis_server):
    client = redis_server.client()
    try:
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()


def test_a_private_server_can_be_stopped_and_restarted_on_its_port(tmp_path):
    server = RedisServer(tmp_path / "redis", port=free_tcp_port()).start()
    try:
        port = server.port
        server.stop()
        server.start()
        assert server.port == port
        client = server.client()
        try:
            assert client.ping()
        finally:
            client.close()
    finally:
        server.stop()
