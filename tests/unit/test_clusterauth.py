"""Sealed datagrams between the cluster's processes: keys, tags, time window, replays."""

from __future__ import annotations

import pytest

from cluster import clusterauth as ca

KEY = ca.derive_key("shared secret", ca.PURPOSE_RELAY)


def test_keys_differ_per_purpose_and_secret():
    assert ca.derive_key("shared secret", ca.PURPOSE_HANDOFF) != KEY
    assert ca.derive_key("another secret", ca.PURPOSE_RELAY) != KEY
    assert ca.derive_key("", ca.PURPOSE_RELAY) == b""
    assert len(KEY) == 32


def test_a_sealed_datagram_opens_with_its_key_only():
    data = ca.seal(KEY, b"body", now=1000.0, nonce=b"n" * 8)
    assert ca.unseal(KEY, data, now=1000.0) == (b"n" * 8, b"body")
    other = ca.derive_key("shared secret", ca.PURPOSE_HANDOFF)
    with pytest.raises(ca.Rejected, match="bad tag"):
        ca.unseal(other, data, now=1000.0)
    tampered = data[:-1] + b"B"
    with pytest.raises(ca.Rejected, match="bad tag"):
        ca.unseal(KEY, tampered, now=1000.0)
    later = bytearray(data)
    later[5] ^= 1  # the time, changed to make an old datagram look new
    with pytest.raises(ca.Rejected, match="bad tag"):
        ca.unseal(KEY, bytes(later), now=1000.0)
    for junk in (b"", b"\x04\x00\x13\xc4\x7f\x00\x00\x01BYE sip:x SIP/2.0", b"SCa1short"):
        with pytest.raises(ca.Rejected, match="unsealed"):
            ca.unseal(KEY, junk)
    with pytest.raises(ca.Rejected, match="no key"):
        ca.unseal(b"", data, now=1000.0)
    with pytest.raises(ValueError):
        ca.seal(b"", b"body")


def test_the_time_window():
    data = ca.seal(KEY, b"body", now=1000.0)
    assert ca.unseal(KEY, data, now=1000.0 + ca.WINDOW)[1] == b"body"
    assert ca.unseal(KEY, data, now=1000.0 - ca.WINDOW)[1] == b"body"  # a clock behind
    for now in (1000.0 + ca.WINDOW + 0.5, 1000.0 - ca.WINDOW - 0.5):
        with pytest.raises(ca.Rejected, match="stale"):
            ca.unseal(KEY, data, now=now)
    nan = ca.seal(KEY, b"body", now=float("nan"))
    with pytest.raises(ca.Rejected, match="stale"):
        ca.unseal(KEY, nan, now=1000.0)


def test_a_nonce_is_accepted_once_within_the_window():
    replays = ca.Replays(window=10.0)
    assert replays.first(b"a", now=0.0) and replays.first(b"b", now=1.0)
    assert not replays.first(b"a", now=5.0) and not replays.first(b"b", now=20.0)
    assert replays.first(b"a", now=21.0)  # forgotten after twice the window
    bounded = ca.Replays(window=10.0, limit=3)
    for nonce in (b"1", b"2", b"3", b"4"):
        assert bounded.first(nonce, now=0.0)
    assert len(bounded._seen) <= 3


def test_rate_limited_log_counts_what_it_suppressed(caplog):
    import logging
    limited = ca.RateLimitedLog(logging.getLogger("test-rate"), every=3600.0)
    with caplog.at_level(logging.WARNING, logger="test-rate"):
        for n in range(5):
            limited.warning("dropped %d", n)
        limited._next = 0.0
        limited.warning("dropped %d", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 0", "dropped 5 (and 4 more like it)"]
