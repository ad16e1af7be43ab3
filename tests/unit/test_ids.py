"""cluster/sip/ids.py: the one scheme of B-leg Call-IDs and call keys, our Via, fresh
identifiers and the Allow list; and cluster/ never reaching into workers/ for them."""

from __future__ import annotations

import hashlib
import itertools
import zlib
from pathlib import Path

import pytest
from importscan import absolute_imports

from cluster.envelope import SLOTS, affinity_key
from cluster.sip import ids
from cluster.sip.message import parse

ROOT = Path(__file__).resolve().parents[2]
TAG = "0123456789abcdef01234567"


def test_a_b_leg_call_id_carries_slot_tag_and_fork():
    call_id = ids.b_leg_call_id(7, TAG, 2)
    assert call_id == b"sc7.0123456789abcdef01234567.2"
    assert ids.b_leg_slot(call_id) == 7
    assert ids.b_leg_parts(call_id) == (TAG, "2")
    assert ids.call_tag(call_id) == TAG
    assert ids.leg_name(call_id) == "b2"
    assert affinity_key(call_id) == 7


def test_an_a_leg_hashes_to_its_key_and_slot():
    call_id = b"VCvJ2R4e_GZoFGeOQvVHrg..@192.168.31.142"
    assert ids.call_tag(call_id) == hashlib.blake2b(call_id, digest_size=12).hexdigest()
    assert len(ids.call_tag(call_id)) == ids.TAG_DIGITS
    assert ids.leg_name(call_id) == "a"
    assert ids.b_leg_slot(call_id) is None
    assert affinity_key(call_id) == zlib.crc32(call_id) % SLOTS


@pytest.mark.parametrize("call_id", [
    b"sc7.short.0",  # a tag that is not 24 characters
    b"sc7x.0123456789abcdef01234567.0",  # a slot that is not a number
    b"sc7.0123456789abcdef01234567",  # no fork
    b"sc7.0123456789abcdef01234567.0.1",  # one part too many
    b"xx7.0123456789abcdef01234567.0",
])
def test_look_alikes_are_a_legs(call_id):
    assert ids.b_leg_parts(call_id) is None
    assert ids.leg_name(call_id) == "a"
    assert ids.call_tag(call_id) == hashlib.blake2b(call_id, digest_size=12).hexdigest()


def test_the_slot_is_read_from_the_prefix_alone():
    # The dispatcher reads only "sc<digits>." (cheap, per datagram); the slot wraps.
    assert ids.b_leg_slot(b"sc12.anything") == 12
    assert affinity_key(b"sc%d.x" % (SLOTS + 3)) == 3
    assert ids.b_leg_slot(b"sc.x") is None
    assert ids.b_leg_slot(b"sc1234567.x") is None  # the dot must come within 8 bytes


@pytest.mark.parametrize(("address", "host"), [
    ("192.168.31.109", b"192.168.31.109"), ("sip.example.com", b"sip.example.com"),
    ("2001:db8::1", b"[2001:db8::1]"), ("[2001:db8::1]", b"[2001:db8::1]"),
])
def test_our_via_brackets_ipv6(address, host):
    value = ids.via(address, 5070, "z9hG4bKx1")
    assert value == b"SIP/2.0/UDP %s:5070;branch=z9hG4bKx1;rport" % host
    msg = parse(b"OPTIONS sip:a@b SIP/2.0\r\nVia: " + value + b"\r\nCall-ID: c\r\n"
                b"CSeq: 1 OPTIONS\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\n"
                b"Content-Length: 0\r\n\r\n")
    assert (msg.via.port, msg.via.branch) == (5070, "z9hG4bKx1")


def test_fresh_ids_come_from_the_random_source():
    counter = itertools.count(1)
    source = ids.Ids(lambda n: bytes([next(counter)]) * n)
    assert source.tag() == "01" * 8
    assert source.branch() == ids.MAGIC_COOKIE + "02" * 10
    assert source.token(4) == "03" * 4
    with pytest.raises(NotImplementedError):
        ids.Ids().tag()


def test_one_allow_list_with_every_method_the_b2bua_relays():
    from workers.sip.call import RELAYED_METHODS, Settings
    from workers.sip.worker import CALL_METHODS
    assert Settings("h", 5060).allow == ids.ALLOW
    assert set(RELAYED_METHODS) <= set(ids.ALLOWED)
    assert CALL_METHODS == frozenset(ids.ALLOWED) - {"REGISTER", "OPTIONS"}
    assert "PRACK" in ids.ALLOW.decode().split(", ")


def workers_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of workers/ in ``path``, at any depth."""
    return [(line, name) for line, name in absolute_imports(path.read_text(), str(path))
            if name.split(".")[0] == "workers"]


@pytest.mark.parametrize("path", sorted((ROOT / "cluster").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_cluster_never_imports_workers(path):
    # cluster/ is what every process shares; workers/ builds on it, never the reverse.
    assert workers_imports(path) == []


def test_the_workers_import_scan_finds_one(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from workers.sip.b2bua import call_tag\n")
    assert workers_imports(module) == [(2, "workers.sip.b2bua")]
