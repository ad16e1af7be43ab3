"""The one place a Redis client is made from ``redis.url``.

Two kinds of URL:

* ``redis://``, ``rediss://``, ``unix://``: one Redis server (redis-py's own URL syntax);
* ``redis+sentinel://[[user]:password@]host1:26379,host2:26379,.../<master name>[/<db>]``
  with optional query ``?sentinel_password=...``: a replicated Redis watched by Redis
  Sentinel.  The client asks the sentinels which server is the primary before every new
  connection, so it follows a failover.  The password (and user) are the data servers';
  the sentinels get ``sentinel_password`` when given, none otherwise.  Default port 26379,
  default db 0.  IPv6 hosts in brackets: ``[::1]:26379``;
* ``redis+cluster://[[user]:password@]host1:6379,host2:6379,...[/]``: a Redis Cluster.  The
  nodes named are only where the client starts: it asks one of them for the slot map
  (CLUSTER SLOTS) and then talks to every primary, following MOVED/ASK redirections,
  resharding and failovers.  Name a few nodes so that a start does not depend on one.
  Default port 6379; a cluster has only database 0 (the path is empty, ``/`` or ``/0``).

One string carries the whole setting, so ``REDIS_URL`` and every process (workers, relays,
dispatcher, sipctl, metrics, the launcher's readiness check) reach the same Redis the same
way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

if TYPE_CHECKING:
    import redis

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
CLUSTER_SCHEME = "redis+cluster"
DEFAULT_CLUSTER_PORT = 6379
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))"
                   r"(?::(?P<port>[^:]*))?$")
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


@dataclass(frozen=True)
class ClusterURL:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(SENTINEL_SCHEME + "://")


def is_cluster_url(url: str) -> bool:
    return url.lower().startswith(CLUSTER_SCHEME + "://")


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse a redis+cluster:// URL; ValueError saying what is wrong otherwise."""
    if not is_cluster_url(url):
        raise ValueError(f"not a {CLUSTER_SCHEME}:// URL")
    rest = url[len(CLUSTER_SCHEME) + 3:]
    if "#" in rest:
        raise ValueError("a fragment (#...) means nothing here")
    if "?" in rest:
        raise ValueError("no option is known after '?'")
    netloc, slash, path = rest.partition("/")
    username, password, hosts = _credentials(netloc)
    if not hosts:
        raise ValueError("no node named: expected host:port[,host:port...]")
    nodes = tuple(_address(item, "node", DEFAULT_CLUSTER_PORT) for item in hosts.split(","))
    if path not in ("", "0", "0/"):
        raise ValueError(f"a Redis Cluster has only database 0, not /{path}")
    return ClusterURL(nodes, username, password)


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """(user, password, hosts) of ``[[user]:password@]hosts``."""
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if password is None:
            raise ValueError("credentials must be [user]:password@ (the password is missing)")
    return username, password, hosts


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a redis+sentinel:// URL; ValueError saying what is wrong otherwise."""
    if not is_sentinel_url(url):
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    rest = url[len(SENTINEL_SCHEME) + 3:]
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise ValueError("a fragment (#...) means nothing here")
    netloc, slash, path = rest.partition("/")
    username, password, hosts = _credentials(netloc)
    if not hosts:
        raise ValueError("no sentinel named: expected host:port[,host:port...]")
    sentinels = tuple(_address(item, "sentinel", DEFAULT_SENTINEL_PORT)
                      for item in hosts.split(","))
    parts = path.split("/") if slash else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise ValueError("the master name is missing: .../<master name>[/<db>]")
    if len(parts) > 2:
        raise ValueError("the path is /<master name>[/<db>], nothing more")
    service = unquote(parts[0])
    if not _SERVICE.match(service):
        raise ValueError(f"bad master name {service!r} (letters, digits, '.', '_', '-')")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"the database must be a number, not {parts[1]!r}")
        db = int(parts[1])
    options = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
    unknown = set(options) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} "
                         "(only sentinel_password)")
    sentinel_password = options.get("sentinel_password", [None])[-1] or None
    return SentinelURL(sentinels, service, db, username, password, sentinel_password)


def _address(item: str, what: str, default_port: int) -> tuple[str, int]:
    match = _HOST.match(item.strip())
    if not item.strip() or match is None:
        raise ValueError(f"bad {what} address {item!r}: expected host:port")
    host = match.group("v6") or match.group("name")
    port_text = match.group("port")
    if port_text is None or port_text == "":
        if port_text == "":
            raise ValueError(f"bad {what} address {item!r}: the port is empty")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad {what} address {item!r}: port must be 1-65535")
    return host, int(port_text)


def connect(url: str, timeout: float, max_connections: int = 64,
            wrap_lane=None) -> redis.Redis:
    """A client for ``url`` whose commands give up after ``timeout`` seconds.

    For a Sentinel URL, redis-py's SentinelConnectionPool asks the sentinels for the
    primary's address whenever it opens a connection (the newest configuration any of
    them knows: cluster/sentinelclient.py), and drops idle connections when the address
    changed; a connection is kept only if ROLE says primary, and READONLY (a demoted
    primary still reached) turns into a ConnectionError after disconnecting, so the next
    command rediscovers the primary instead of failing for ever.

    One server, direct or through Sentinel, gets a ``LeanRedis`` (cluster/leanclient.py):
    redis-py's client with a shorter path from a command or pipeline to its reply;
    ``wrap_lane``, when given, wraps that path (the workers' ``leanclient.Coalescing``).
    A Redis Cluster client is redis-py's own and takes no wrapper.

    redis-py is imported here, not with the module: the configuration (which checks URLs
    with the parser above) is loaded by every process, and the dispatcher takes its SIP
    socket back after a crash before it needs Redis (redis-py takes ~80 ms to import).
    """
    import redis

    from .leanclient import LeanRedis
    from .sentinelclient import EpochSentinel, PrimaryConnection, no_retries

    if is_cluster_url(url):
        return _cluster_client(parse_cluster_url(url), timeout, max_connections)
    if not is_sentinel_url(url):
        # A plain pool: measured cheaper per command than the blocking one; the worker
        # bounds its concurrency (max_inflight) itself.
        pool = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            max_connections=max_connections)
        return _wrapped(LeanRedis(connection_pool=pool), wrap_lane)
    parsed = parse_sentinel_url(url)
    sockets = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel_kwargs = {**sockets, "retry": no_retries()}
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    # With several sentinels named, one that sees none of the others is cut off from them
    # (a partition) and may still name a primary the majority has replaced: not believed.
    # Of the others, the newest configuration wins (cluster/sentinelclient.py).
    sentinel = EpochSentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs,
                             min_other_sentinels=1 if len(parsed.sentinels) > 1 else 0)
    return _wrapped(sentinel.master_for(
        parsed.service, redis_class=LeanRedis, connection_class=PrimaryConnection,
        db=parsed.db, username=parsed.username, password=parsed.password,
        max_connections=max_connections, **sockets), wrap_lane)


def _wrapped(client, wrap_lane):
    if wrap_lane is not None:
        client.lane = wrap_lane(client.lane)
    return client


def _cluster_client(parsed: ClusterURL, timeout: float, max_connections: int):
    """A RedisCluster (made at first use) whose pipelines may hold scripts: see
    cluster/clusterclient.py.  ``max_connections`` is per node."""
    from redis.cluster import ClusterNode

    from .clusterclient import LazyCluster

    return LazyCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username, password=parsed.password,
        socket_timeout=timeout, socket_connect_timeout=timeout,
        max_connections=max_connections,
        # A MOVED patches the one slot it names.  By default every fifth MOVED makes
        # RedisCluster read the whole slot map again and close its pooled connections, and
        # a live resharding answers MOVED for every key of every slot moved.  (Under the
        # fault matrix's load both settings lost no call when the host was quiet; that this
        # one is better is not measured.)  A node that is gone still makes it read the map.
        reinitialize_steps=0)


def redacted(url: str) -> str:
    """The URL without its passwords, for logs and messages."""
    url = re.sub(r"(sentinel_password=)[^&]*", r"\1***", url)
    return re.sub(r"^([a-z+]+://[^/@]*?:)[^/@]*@", r"\1***@", url)
