"""The relay's port slice and its pool of RTP/RTCP pairs (workers/relay/ports.py)."""

from __future__ import annotations

import pytest

from workers.relay.ports import PortPool, relay_slice


def test_slices_are_equal_even_aligned_and_disjoint():
    slices = [relay_slice(20000, 29999, 3, i) for i in range(3)]
    assert slices == [(20000, 23331), (23332, 26663), (26664, 29995)]
    for lo, hi in slices:
        assert lo % 2 == 0 and hi % 2 == 1
    for (_, hi), (lo, _) in zip(slices, slices[1:], strict=False):
        assert hi < lo


def test_odd_range_start_is_rounded_up():
    assert relay_slice(20001, 20010, 2, 0) == (20002, 20005)
    assert relay_slice(20001, 20010, 2, 1) == (20006, 20009)


def test_bad_index_or_tiny_range():
    with pytest.raises(ValueError):
        relay_slice(20000, 29999, 2, 2)
    with pytest.raises(ValueError):
        relay_slice(20000, 20002, 4, 0)


def test_pool_hands_out_even_ports_and_reuses_them_last():
    pool = PortPool(100, 107)
    assert [pool.take(), pool.take()] == [100, 102]
    pool.release(100)
    assert [pool.take(), pool.take(), pool.take()] == [104, 106, 100]
    with pytest.raises(IndexError):
        pool.take()


def test_reserve_takes_a_given_pair_once():
    pool = PortPool(100, 107)
    pool.reserve(104)
    assert len(pool) == 3
    with pytest.raises(ValueError):
        pool.reserve(104)
    with pytest.raises(ValueError):
        pool.reserve(105)  # odd: an RTCP port
    with pytest.raises(ValueError):
        pool.reserve(108)  # outside
    assert 104 not in [pool.take() for _ in range(3)]


def test_release_of_an_unknown_port_is_harmless():
    pool = PortPool(100, 103)
    pool.release(100)
    assert len(pool) == 2
