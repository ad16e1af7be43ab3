"""The workers' shared round trips (cluster/leanclient.py ``Coalescing``), over a lane
that records what it is asked to send: who joins a batch, who goes alone, and that every
caller gets its own replies or the batch's trouble.  tests/integration/test_lean_client.py
runs it against a real redis-server."""

from __future__ import annotations

import gevent
import gevent.event
import pytest
from redis.exceptions import ResponseError

from cluster.leanclient import Coalescing


class RecordingLane:
    """Answers each command with ("reply", its args), or raises ``trouble`` once."""

    def __init__(self) -> None:
        self.writes: list[list[tuple]] = []
        self.trouble: BaseException | None = None
        self.dropped = 0

    def run(self, stack):
        self.writes.append([args for args, _ in stack])
        if self.trouble is not None:
            trouble, self.trouble = self.trouble, None
            raise trouble
        return [ResponseError("ERR " + args[1]) if args[0] == "FAIL" else ("reply", args)
                for args, _ in stack]

    def drop_idle(self) -> None:
        self.dropped += 1


def make(lane: RecordingLane) -> Coalescing:
    return Coalescing(lane, gevent.sleep, gevent.event.AsyncResult)


def stack(*commands: tuple) -> list[tuple[tuple, dict]]:
    return [(args, {}) for args in commands]


def test_one_caller_alone_is_one_write_of_its_own_commands():
    lane = RecordingLane()
    lanes = make(lane)
    assert lanes.run(stack(("GET", "a"), ("GET", "b"))) == [("reply", ("GET", "a")),
                                                            ("reply", ("GET", "b"))]
    assert lane.writes == [[("GET", "a"), ("GET", "b")]]
    assert (lanes.batches, lanes.callers) == (1, 1)


def test_callers_of_one_turn_share_one_write_and_get_their_own_replies():
    lane = RecordingLane()
    lanes = make(lane)
    callers = [gevent.spawn(lanes.run, stack(*[("GET", f"{n}.{i}") for i in range(n + 1)]))
               for n in range(4)]
    gevent.joinall(callers, raise_error=True)
    assert len(lane.writes) == 1
    assert lane.writes[0] == [("GET", f"{n}.{i}") for n in range(4) for i in range(n + 1)]
    for n, caller in enumerate(callers):
        assert caller.value == [("reply", ("GET", f"{n}.{i}")) for i in range(n + 1)]
    assert (lanes.batches, lanes.callers) == (1, 4)


def test_an_error_reply_stays_in_its_callers_place():
    lane = RecordingLane()
    lanes = make(lane)
    good = gevent.spawn(lanes.run, stack(("GET", "a")))
    bad = gevent.spawn(lanes.run, stack(("FAIL", "x"), ("GET", "b")))
    gevent.joinall([good, bad], raise_error=True)
    assert good.value == [("reply", ("GET", "a"))]
    assert isinstance(bad.value[0], ResponseError) and bad.value[1] == ("reply", ("GET", "b"))


def test_a_later_turn_is_a_later_write():
    lane = RecordingLane()
    lanes = make(lane)

    def twice(key):
        lanes.run(stack(("GET", key)))
        lanes.run(stack(("SET", key)))  # after its own first reply: the next turn's batch

    gevent.joinall([gevent.spawn(twice, "a"), gevent.spawn(twice, "b")], raise_error=True)
    assert lane.writes == [[("GET", "a"), ("GET", "b")], [("SET", "a"), ("SET", "b")]]


@pytest.mark.parametrize("blocking", [
    ("WAIT", 1, 100), ("wait", 1, 100), ("BLPOP", "l", 1),
    ("XREADGROUP", "GROUP", "g", "c", "BLOCK", 100, "STREAMS", "s", ">"),
    (b"XREAD", b"BLOCK", b"100", b"STREAMS", b"s", b"$"),
])
def test_a_blocking_command_goes_alone(blocking):
    lane = RecordingLane()
    lanes = make(lane)
    other = gevent.spawn(lanes.run, stack(("GET", "a")))
    alone = gevent.spawn(lanes.run, stack(("SET", "k"), blocking))
    gevent.joinall([other, alone], raise_error=True)
    assert sorted(lane.writes, key=len) == [[("GET", "a")], [("SET", "k"), blocking]]
    assert lanes.batches == 1  # the blocking stack took the lane directly


def test_a_non_blocking_stream_read_joins():
    lane = RecordingLane()
    lanes = make(lane)
    read = ("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "s", ">")
    gevent.joinall([gevent.spawn(lanes.run, stack(("GET", "a"))),
                    gevent.spawn(lanes.run, stack(read))], raise_error=True)
    assert lane.writes == [[("GET", "a"), read]]


def test_the_batchs_trouble_reaches_every_caller():
    lane = RecordingLane()
    lane.trouble = ConnectionError("gone")
    lanes = make(lane)
    callers = [gevent.spawn(lanes.run, stack(("GET", str(n)))) for n in range(3)]
    gevent.joinall(callers)
    assert len(lane.writes) == 1
    assert all(isinstance(c.exception, ConnectionError) for c in callers)
    # and the lane goes on: the next turn is a new write
    assert lanes.run(stack(("GET", "z"))) == [("reply", ("GET", "z"))]


class Interrupted(BaseException):
    """What a gevent.Timeout or a kill raises in the opener while it yields."""


def interrupted_turn(seconds: float) -> None:
    gevent.sleep(seconds)  # the others of the turn join meanwhile
    raise Interrupted


def test_an_opener_interrupted_while_gathering_still_sends_the_others():
    lane = RecordingLane()
    lanes = Coalescing(lane, interrupted_turn, gevent.event.AsyncResult)
    opener = gevent.spawn(lanes.run, stack(("GET", "opener")))
    joiner = gevent.spawn(lanes.run, stack(("GET", "joiner")))
    gevent.joinall([opener, joiner])
    assert isinstance(opener.exception, Interrupted)
    assert joiner.value == [("reply", ("GET", "joiner"))]
    assert lane.writes == [[("GET", "joiner")]]


def test_an_opener_interrupted_alone_sends_nothing():
    lane = RecordingLane()
    lanes = Coalescing(lane, interrupted_turn, gevent.event.AsyncResult)
    with pytest.raises(Interrupted):
        lanes.run(stack(("GET", "opener")))
    assert lane.writes == []
    assert lanes.run(stack(("WAIT", 0, 0))) == [("reply", ("WAIT", 0, 0))]  # alone: no turn


def test_drop_idle_reaches_the_lane():
    lane = RecordingLane()
    make(lane).drop_idle()
    assert lane.dropped == 1
