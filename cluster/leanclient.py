"""The client of one Redis server (named directly or found through Sentinel), with a
short path from a command to its reply.

redis-py's own path costs a worker more than the round trip it makes: per pipeline it
takes a connection from the pool and polls it, builds a ``Pipeline`` (argument checks,
a retry wrapper, reset, watch bookkeeping) and returns the connection, all again on the
next one.  Measured on this 2-core machine, under gevent, for one pipeline of 3 ZADD/ZREM
and a 3 kB EVALSHA: 240 µs of client CPU through ``Pipeline.execute``, 140 µs on a kept
connection with the same packing and parsing, 105 µs with a hand-written reader (not
taken: redis-py's reader gives the error classes, RESP3 and Sentinel's READONLY handling
that the store relies on).  A call makes about 17 round trips.

So ``LeanRedis`` is a ``redis.Redis`` (every command method, the same response callbacks
and error classes) whose ``execute_command`` and non-transactional ``pipeline`` go
through a ``Lane``: connections taken from the pool once and kept, each checked for a
reply it should not have (a server that closed it) before it is used again, written with
one ``sendall`` and read back in order.  Connections, AUTH, SELECT, TLS, timeouts and the
Sentinel's primary discovery stay redis-py's: the lane only skips its bookkeeping.
"""

from __future__ import annotations

import redis
from redis.commands import CoreCommands
from redis.exceptions import DataError, ResponseError

# What the lane keeps idle per process: past this, a connection goes back to the pool.
# The worker bounds its concurrent requests itself (max_inflight).
KEEP_IDLE = 64


def pack_commands(commands: list[tuple]) -> bytes:
    """RESP arrays of bulk strings, as redis-py's packer writes them (its encoder's rules:
    bytes as they are, text as UTF-8, numbers as their repr, anything else refused) at
    about a third of its CPU: 11 against 29 µs for a call write of 3 timer commands and a
    6 kB record (each argument is copied once, by the final join)."""
    out: list[bytes] = []
    add = out.append
    for args in commands:
        name = args[0]  # "XGROUP CREATE", "SCRIPT LOAD": words sent as arguments
        if isinstance(name, str):
            name = name.encode()
        if b" " in name:
            args = (*name.split(), *args[1:])
        add(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                pass
            elif kind is str:
                arg = arg.encode()
            elif kind is int or kind is float:
                arg = repr(arg).encode()
            else:
                arg = _encoded(arg)
            add(b"$%d\r\n" % len(arg))
            add(arg)
            add(b"\r\n")
    return b"".join(out)


def _encoded(arg) -> bytes:
    """What is not exactly bytes, str, int or float: their subclasses, bytearray and
    memoryview, in the order of redis-py's encoder."""
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return bytes(arg)
    if isinstance(arg, bool):
        pass  # refused, as redis-py refuses it
    elif isinstance(arg, (int, float)):
        return repr(arg).encode()
    elif isinstance(arg, str):
        return str(arg).encode()
    raise DataError(f"Invalid input of type: '{type(arg).__name__}'. "
                    "Convert to a bytes, string, int or float first.")


_UNKNOWN = object()


class Lane:
    """Connections of one client's pool, kept for its commands; replies are parsed by the
    client's own ``parse_response`` (its callbacks, its error classes)."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._parse = client.parse_response
        # The client's reply callbacks by the command name as sent.  Its own lookup
        # upper-cases the name twice a reply (a CaseInsensitiveDict), 4% of a relay's
        # control-plane CPU (py-spy, bench_relay's control run).
        self._callbacks = client.response_callbacks
        self._callback_of: dict[str, object] = {}
        self._idle: list = []

    def run(self, stack: list[tuple[tuple, dict]]) -> list:
        """Send every command of ``stack`` ((args, options) each) in one write and read
        their replies in order; an error reply is returned in its place, as redis-py's
        pipelines do.  Connection trouble (and anything else that leaves the connection
        in doubt, a Timeout included) disconnects it and is raised."""
        conn = self._take()
        try:
            conn.send_packed_command([pack_commands([args for args, _ in stack])],
                                     check_health=False)
            replies = []
            for args, options in stack:
                try:
                    replies.append(self._reply(conn, args[0], options))
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._discard(conn)
            raise
        # A Sentinel's pool owns no connection to a primary it has learnt was replaced.
        if len(self._idle) < KEEP_IDLE and self._pool.owns_connection(conn):
            self._idle.append(conn)
        else:
            self._pool.release(conn)  # which closes one it does not own
        return replies

    def _reply(self, conn, name: str, options: dict):
        """What the client's ``parse_response`` gives for one reply.  Options other than
        ``keys`` (which it only drops) go its way; without them the callback is found in a
        cache of this lane's own."""
        if options and (len(options) > 1 or "keys" not in options):
            return self._parse(conn, name, **options)
        reply = conn.read_response()
        callback = self._callback_of.get(name, _UNKNOWN)
        if callback is _UNKNOWN:
            callback = self._callback_of[name] = self._callbacks.get(name)
        return reply if callback is None else callback(reply)

    def _take(self):
        try:
            conn = self._idle.pop()  # atomic: a relay's writer thread shares the lane
        except IndexError:
            return self._pool.get_connection()  # connected and checked by the pool
        try:
            # Data waiting before a command was sent, or end of file: the server closed
            # it (a restart, a demoted primary dropping its clients).
            stale = conn.can_read()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            stale = True
        if not stale:
            return conn
        try:
            # A new connection, through ``connect``: a Sentinel's asks for the primary.
            conn.disconnect()
            conn.connect()
        except BaseException:
            self._discard(conn)
            raise
        return conn

    def _discard(self, conn) -> None:
        """Close ``conn`` and give it back to the pool, which connects it anew if reused."""
        conn.disconnect()
        self._pool.release(conn)

    def drop_idle(self) -> None:
        """Close every kept connection (a primary was demoted: find the new one)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)


# What holds its connection until an event, a replica or a timeout: sent on its own, so
# that no other command waits behind it.
_BLOCKING = frozenset({"WAIT", "WAITAOF", "BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH",
                       "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP"})


def _blocking(stack: list[tuple[tuple, dict]]) -> bool:
    for args, _options in stack:
        name = args[0]
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        name = name.upper()
        if name in _BLOCKING or (name in ("XREAD", "XREADGROUP")
                                 and any(a in ("BLOCK", b"BLOCK") for a in args)):
            return True
    return False


class Coalescing:
    """A lane whose callers in one turn of a cooperative scheduler share a write.

    The first caller of a turn opens a batch and yields once (``yield_turn``); every
    caller that runs before it is back adds its commands and waits.  Then the batch goes
    out in one write on one connection, each caller's commands together and in the order
    they came, and each gets its own replies (or the batch's trouble, raised).  Blocking
    commands (WAIT, XREADGROUP ... BLOCK) go alone.  Measured (bench_scale's call, shipped
    configuration, 2 workers): at 110 calls/s, 11.6-11.9 Redis round trips a call against
    12.1-12.2 without, and about 7% less CPU a call in two alternating pairs; at 40 calls/s
    concurrent requests are rare, and CPU a call was the same in four pairs (12.1-14.8 ms
    with, 12.3-14.6 without): the one yield a batch costs does not show.  An idle worker
    gains nothing: its loops already wake together (cluster/cadence.py), and the wake-up,
    not the round trip, is what idling costs.

    ``yield_turn``: lets every runnable task run once (``gevent.sleep``; called with 0);
    ``make_result``: a one-shot slot a task waits on (``gevent.event.AsyncResult``: set,
    set_exception, get).  Given, not imported, so that this module stays free of any
    scheduler; only one scheduler's tasks may share a ``Coalescing`` (not threads)."""

    def __init__(self, lane: Lane, yield_turn, make_result) -> None:
        self._lane = lane
        self._yield = yield_turn
        self._result = make_result
        self._open: list | None = None  # [(stack, slot or None for the opener)]
        self.batches = 0  # writes sent, and the callers they carried (read by the tests;
        # not yet in the heartbeat or the metrics)
        self.callers = 0

    def run(self, stack: list[tuple[tuple, dict]]) -> list:
        if _blocking(stack):
            return self._lane.run(stack)
        if self._open is not None:  # a batch of this turn is gathering: join it
            slot = self._result()
            self._open.append((stack, slot))
            return slot.get()
        batch = self._open = [(stack, None)]
        try:
            self._yield(0)
        except BaseException:  # the opener was killed or timed out: the others still go
            self._open = None
            self._send(batch[1:])
            raise
        self._open = None
        return self._send(batch)

    def _send(self, batch: list) -> list:
        if not batch:
            return []
        flat = [command for stack, _slot in batch for command in stack]
        self.batches += 1
        self.callers += len(batch)
        try:
            replies = self._lane.run(flat)
        except BaseException as exc:
            for _stack, slot in batch:
                if slot is not None:
                    slot.set_exception(exc)
            if batch[0][1] is None:
                raise
            return []
        mine: list = []
        start = 0
        for stack, slot in batch:
            part = replies[start:start + len(stack)]
            start += len(stack)
            if slot is None:
                mine = part
            else:
                slot.set(part)
        return mine

    def drop_idle(self) -> None:
        self._lane.drop_idle()


class Batch(CoreCommands):
    """Commands queued with redis-py's command methods and sent in one write: what a
    non-transactional ``Pipeline`` is to the store (``command_stack``, ``execute``,
    ``len``), without its bookkeeping."""

    def __init__(self, lane: Lane) -> None:
        self._lane = lane
        self.command_stack: list[tuple[tuple, dict]] = []

    def execute_command(self, *args, **options):
        self.command_stack.append((args, options))
        return self

    def __len__(self) -> int:
        return len(self.command_stack)

    def execute(self, raise_on_error: bool = True) -> list:
        stack, self.command_stack = self.command_stack, []
        if not stack:
            return []
        replies = self._lane.run(stack)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        return replies


class LeanRedis(redis.Redis):
    """``redis.Redis`` whose commands and non-transactional pipelines take the lane."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lane = Lane(self)

    def execute_command(self, *args, **options):
        reply = self.lane.run([(args, options)])[0]
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def pipeline(self, transaction: bool = True, shard_hint=None):
        if transaction or shard_hint is not None:
            return super().pipeline(transaction, shard_hint)
        return Batch(self.lane)
