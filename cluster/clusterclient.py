"""The Redis Cluster client behind a ``redis+cluster://`` URL (see cluster/redisclient.py).

redis-py's ``RedisCluster`` routes each command to the primary owning its key's slot and
follows MOVED/ASK/TRYAGAIN.  Two things the store needs it does not give:

* **Pipelines with Lua and WAIT.**  redis-py refuses EVALSHA inside a cluster pipeline, and
  sends WAIT (keyless) to an arbitrary node, where it says nothing about the write before
  it.  The store's hot paths pipeline a compare-and-set script with the timers it arms,
  then WAIT.  ``SlotPipeline`` is a plain redis-py pipeline that records the commands and,
  at ``execute``, groups them by the primary owning each command's key (EVALSHA: its first
  key, which is every key of the script since each script touches one slot; WAIT: the node
  of the command before it, the write it waits for), writes every node's share on that
  node's connection, then reads the answers: one round trip (the nodes answer in
  parallel), as on a single Redis.  A command answered MOVED, ASK, TRYAGAIN or
  CLUSTERDOWN (a slot moved by a resharding or a failover) did not run; those are run
  again one by one through ``RedisCluster``, which follows the redirection and refreshes
  its slot map (a WAIT among them is skipped and counts as no replica reached).  A script
  a node does not know (NOSCRIPT: a replica promoted, a node restarted) is loaded there
  and run again the same way.
* **Starting while the cluster is away.**  ``RedisCluster()`` asks for the slot map at
  once and raises when no node answers; a process starting then would die.
  ``LazyCluster`` makes it at first use instead and turns that failure into a
  ``ConnectionError``, the same Redis trouble a single server's client raises.
"""

from __future__ import annotations

import threading
import time

import redis
from redis.client import Pipeline
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)

# Replies that say "this command did not run here, now": run it again through the client.
_REDIRECTED = (AskError, TryAgainError, ClusterDownError)  # AskError: also MovedError
_SCRIPT_COMMANDS = ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO")
REFRESH_EVERY = 0.5  # seconds between two readings of the slot map after connection trouble


def routing_key(args: tuple):
    """The key that decides where a command goes; None for WAIT (it follows the write)."""
    name = str(args[0]).upper()
    if name == "WAIT":
        return None
    if name in _SCRIPT_COMMANDS:
        if int(args[2]) < 1:
            raise RedisClusterException(f"{name} without a key cannot be routed")
        return args[3]
    if name in ("XREADGROUP", "XREAD"):  # the key follows STREAMS (one stream per command)
        words = [(a.decode("latin-1") if isinstance(a, bytes) else str(a)).upper()
                 for a in args]
        return args[words.index("STREAMS") + 1]
    return args[1]


class LazyCluster:
    """A ``RedisCluster`` made at first use (see the module's docstring)."""

    def __init__(self, **kwargs):
        self._kwargs = kwargs
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()
        self._encoder = redis.Redis().get_encoder()  # a client's default (utf-8) encoder
        self.scripts: dict[str, Script] = {}  # sha -> script, to load where one is missing
        self._refreshed = 0.0

    def client(self) -> RedisCluster:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = RedisCluster(**self._kwargs)
                    except RedisClusterException as exc:  # no node answered
                        raise redis.ConnectionError(str(exc)) from exc
        return self._client

    def __getattr__(self, name):
        if callable(getattr(RedisCluster, name, None)):
            # A method: the client is made when it is called, so that ``store.redis.get``
            # is evaluated outside the store's error handling without raising.
            def method(*args, **kwargs):
                return getattr(self.client(), name)(*args, **kwargs)
            return method
        return getattr(self.client(), name)

    def get_encoder(self):
        return self._encoder

    def register_script(self, script) -> Script:
        made = Script(self, script)
        self.scripts[made.sha] = made
        return made

    def pipeline(self, transaction=None, shard_hint=None) -> SlotPipeline:
        if transaction:
            raise RedisClusterException("no MULTI across slots: use a script")
        return SlotPipeline(self)

    def xreadgroup(self, groupname, consumername, streams: dict, count=None, block=None,
                   noack=False):
        """XREADGROUP of one stream, sent to the primary of its slot.  RedisCluster cannot
        find the keys of XREADGROUP itself and asks a node (COMMAND GETKEYS) first: measured
        2 extra round trips per read, and the workers' stream readers read all the time."""
        client = self.client()
        if len(streams) != 1:
            return client.xreadgroup(groupname, consumername, streams, count=count,
                                     block=block, noack=noack)
        (stream, start), = streams.items()
        args = ["XREADGROUP", "GROUP", groupname, consumername]
        if count is not None:
            args += ["COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        if noack:
            args.append("NOACK")
        args += ["STREAMS", stream, start]
        # With the node named, RedisCluster does not follow a MOVED itself: the store's
        # caller sees Redis trouble once and the next read goes where the slot went.
        return client.execute_command(*args, target_nodes=client.get_node_from_key(stream))

    def refresh(self) -> None:
        """Read the slot map again (at most once per REFRESH_EVERY seconds)."""
        now = time.monotonic()
        if self._client is None or now - self._refreshed < REFRESH_EVERY:
            return
        self._refreshed = now
        try:
            self._client.nodes_manager.initialize()
        except (redis.RedisError, RedisClusterException, OSError):
            pass  # no node answers: the next command tries again

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class SlotPipeline(Pipeline):
    """Records commands; ``execute`` sends each primary its share (see the docstring)."""

    def __init__(self, cluster: LazyCluster):
        super().__init__(connection_pool=None, response_callbacks={}, transaction=False,
                         shard_hint=None)
        self.cluster = cluster

    def execute(self, raise_on_error: bool = True) -> list:
        stack = self.command_stack
        try:
            if not stack:
                return []
            return self._execute(stack, raise_on_error)
        finally:
            self.reset()

    def _execute(self, stack: list, raise_on_error: bool) -> list:
        client = self.cluster.client()
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        node = None
        for index, (args, _options) in enumerate(stack):
            key = routing_key(args)
            if key is not None:
                node = client.get_node_from_key(key)
            elif node is None:
                node = client.get_default_node()
            groups.setdefault(node.name, (node, []))[1].append(index)
        replies: list = [None] * len(stack)
        self._send(client, stack, groups, replies)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, _REDIRECTED)
                 or (isinstance(reply, NoScriptError) and self._load(client, stack[i][0]))]
        for index in again:  # in order: a timer armed before the record it belongs to
            args, options = stack[index]
            if routing_key(args) is None:
                replies[index] = 0  # WAIT after a redirected write: no replica known
                continue
            try:
                replies[index] = client.execute_command(*args, **dict(options))
            except redis.ResponseError as exc:
                replies[index] = exc
        if raise_on_error:
            for index, reply in enumerate(replies):
                if isinstance(reply, redis.ResponseError):
                    self.annotate_exception(reply, index + 1, stack[index][0])
                    raise reply
        return replies

    def _send(self, client: RedisCluster, stack: list, groups: dict, replies: list) -> None:
        taken = []  # (node client, connection, indexes)
        clean = False
        try:
            for node, indexes in groups.values():
                redis_node = client.get_redis_connection(node)
                connection = redis_node.connection_pool.get_connection()
                taken.append((redis_node, connection, indexes))
                connection.send_packed_command(
                    connection.pack_commands([stack[i][0] for i in indexes]))
            for redis_node, connection, indexes in taken:
                for i in indexes:
                    args, options = stack[i]
                    try:
                        replies[i] = redis_node.parse_response(connection, args[0],
                                                               **dict(options))
                    except redis.ResponseError as exc:
                        replies[i] = exc
            clean = True
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            # A node went away (a failover?): ask for the slot map again before the next
            # command, as RedisCluster does for its own commands; not for a pool that is
            # merely full (the worker's own load), and once per REFRESH_EVERY at most, so
            # a node that stopped answering does not make every greenlet read the map.
            if not isinstance(exc, MaxConnectionsError):
                self.cluster.refresh()
            raise
        finally:
            for redis_node, connection, _indexes in taken:
                if not clean:  # answers may be left unread on it: never reuse it
                    connection.disconnect()
                redis_node.connection_pool.release(connection)

    def _load(self, client: RedisCluster, args: tuple) -> bool:
        """Load the script an EVALSHA named on the node owning its key: whether it could."""
        script = self.cluster.scripts.get(str(args[1]))
        if script is None:
            return False
        try:
            node = client.get_redis_connection(client.get_node_from_key(routing_key(args)))
            node.script_load(script.script)
        except (redis.RedisError, RedisClusterException, OSError):
            return False  # the NOSCRIPT stands: the store reloads and retries on its own
        return True

