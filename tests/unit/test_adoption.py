"""Which dead hosts a dispatcher adopts (cluster/adoption.py), decided without Redis."""

from __future__ import annotations

from cluster import envelope
from cluster.adoption import (
    ADOPT_AFTER,
    ADOPTED_BASE,
    SOCKETS_PER_HOST,
    adoptable_address,
    virtual_base,
    wanted,
)

NOW = 1_000_000.0


def here(*addresses: str):
    return lambda address: address in addresses


def test_a_host_silent_past_the_limit_whose_address_is_here_is_adopted():
    hosts = {"h1": {"sip": ["10.0.0.111", 5060], "seen": NOW - ADOPT_AFTER - 0.1},
             "h2": {"sip": ["10.0.0.112", 5060], "seen": NOW}}
    assert wanted(hosts, "h2", NOW, local=here("10.0.0.111", "10.0.0.112")) == {
        "h1": ("10.0.0.111", 5060)}


def test_a_live_host_or_an_address_elsewhere_is_not_adopted():
    fresh = {"h1": {"sip": ["10.0.0.111", 5060], "seen": NOW - 0.9}}
    assert wanted(fresh, "h2", NOW, local=here("10.0.0.111")) == {}
    silent = {"h1": {"sip": ["10.0.0.111", 5060], "seen": NOW - 60}}
    assert wanted(silent, "h2", NOW, local=here()) == {}


def test_an_adoption_is_kept_while_the_address_stays_and_dropped_when_it_leaves():
    ours = {"h1": {"sip": ["10.0.0.111", 5060], "seen": NOW, "by": "h2"}}
    assert wanted(ours, "h2", NOW, local=here("10.0.0.111")) == {"h1": ("10.0.0.111", 5060)}
    assert wanted(ours, "h2", NOW, local=here()) == {}
    # Another host's fresh adoption of it is not contested.
    theirs = {"h1": {"sip": ["10.0.0.111", 5060], "seen": NOW, "by": "h3"}}
    assert wanted(theirs, "h2", NOW, local=here("10.0.0.111")) == {}


def test_wildcard_and_loopback_addresses_are_never_adopted():
    for address in ("0.0.0.0", "127.0.0.1", "::", "::1", "not-an-ip"):
        assert not adoptable_address(address)
        hosts = {"h1": {"sip": [address, 5060], "seen": NOW - 60}}
        assert wanted(hosts, "h2", NOW, local=lambda _a: True) == {}
    assert adoptable_address("10.0.0.111")


def test_virtual_socket_indexes_fit_an_envelope_above_the_own_sockets():
    bases = {virtual_base(f"h{n}") for n in range(200)}
    assert min(bases) >= ADOPTED_BASE
    assert max(bases) + SOCKETS_PER_HOST - 1 <= 255
    assert virtual_base("h1") == virtual_base("h1")  # stable across restarts
    top = max(bases) + SOCKETS_PER_HOST - 1
    wrapped = envelope.wrap(("10.0.0.1", 5060), top, b"x")
    assert envelope.unwrap(wrapped) == (("10.0.0.1", 5060), top, b"x")
