"""The bookkeeping of call writes whose reply was lost (workers/sip/unsure.py): every way a
look at Redis can find one, as a row."""

from __future__ import annotations

from workers.sip.call import Cdr, Out, Reply
from workers.sip.unsure import KEEP, KEEP_END, PER_CALL, UnsureWrites

BYE = Out(b"BYE sip:callee SIP/2.0\r\n\r\n", ("192.0.2.5", 5060), "h1")
CDR = Cdr({"hangup_cause": "NORMAL_CLEARING"})
LIVE = {"state": "answered", "n": 1}
ENDED = {"state": "ended", "ended": 100.5, "n": 2}
LATER = {"state": "ended", "ended": 100.5, "n": 3}  # the same end, its timers fired since


def noted_end() -> UnsureWrites:
    unsure = UnsureWrites()
    unsure.note("t", 7, ENDED, [BYE, Reply(200), CDR], 100.5, now=0.0)
    return unsure


def test_redis_holding_that_very_write_means_rearm_and_do_all_it_would_have_done():
    outcome = noted_end().look("t", 9, dict(ENDED), now=1.0)
    assert (outcome.actions, outcome.rearm, outcome.left) == ([BYE, CDR], True, [])


def test_an_end_that_landed_and_moved_on_gives_its_cdr_only():
    outcome = noted_end().look("t", 11, LATER, now=1.0)
    assert (outcome.actions, outcome.rearm, outcome.left) == ([CDR], False, [])


def test_a_call_still_at_the_base_version_is_watched_until_its_time():
    unsure = noted_end()
    assert unsure.waiting("t", 7, now=1.0)
    assert not unsure.waiting("t", 8, now=1.0)
    assert not unsure.waiting("t", 7, now=KEEP_END + 1)
    outcome = unsure.look("t", 7, LIVE, now=1.0)
    assert (outcome.actions, outcome.rearm, len(outcome.left)) == ([], False, 1)
    assert unsure.look("t", 7, LIVE, now=KEEP_END + 1).left == []


def test_a_write_overtaken_by_another_never_lands():
    outcome = noted_end().look("t", 8, {"state": "answered", "n": 5}, now=1.0)
    assert (outcome.actions, outcome.rearm, outcome.left) == ([], False, [])


def test_a_write_of_a_call_gone_from_redis_is_dropped_once_the_version_moved():
    unsure = UnsureWrites()
    unsure.note("t", 0, LIVE, [BYE], None, now=0.0)  # a new call: based on no record
    assert unsure.waiting("t", 0, now=KEEP - 1) and not unsure.waiting("t", 0, now=KEEP + 1)
    assert unsure.look("t", 0, None, now=1.0).left != []
    assert unsure.look("t", 0, None, now=KEEP + 1).left == []


def test_keep_drops_a_settled_call_and_the_tries_per_call_are_bounded():
    unsure = UnsureWrites()
    for n in range(PER_CALL + 3):
        unsure.note("t", n, {"n": n}, [BYE], None, now=0.0)
    assert len(unsure.look("t", PER_CALL + 2, None, now=1.0).left) == 1
    unsure.keep("t", [])
    assert not unsure and unsure.tags() == []


def test_only_sends_and_cdrs_are_redone():
    unsure = UnsureWrites()
    unsure.note("t", 1, LIVE, [Reply(503), BYE], None, now=0.0)
    assert unsure.look("t", 2, dict(LIVE), now=1.0).actions == [BYE]
