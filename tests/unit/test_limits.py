"""Per-source token buckets, bans and the allow-list (cluster/limits.py)."""

import pytest

from cluster.config import LimitsConfig
from cluster.limits import AllowList, Bans, Limiter, Trusted

INVITE = (b"INVITE sip:1002@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKx\r\n"
          b"To: <sip:1002@example.com>\r\nFrom: <sip:1001@example.com>;tag=a\r\n"
          b"Call-ID: c1\r\nCSeq: 1 INVITE\r\n\r\n")
REINVITE = INVITE.replace(b"To: <sip:1002@example.com>", b"To: <sip:1002@example.com>;tag=b")
REGISTER = INVITE.replace(b"INVITE sip:1002@", b"REGISTER sip:").replace(b"1 INVITE",
                                                                       b"1 REGISTER")
OPTIONS = INVITE.replace(b"INVITE", b"OPTIONS")
BYE = REINVITE.replace(b"INVITE", b"BYE")
RESPONSE = b"SIP/2.0 200 OK\r\nTo: <sip:x>\r\nCall-ID: c1\r\n\r\n"


@pytest.mark.parametrize(("data", "kind"), [
    (INVITE, "invite"), (REINVITE, "dialog"), (REGISTER, "register"), (OPTIONS, "other"),
    (BYE, "dialog"), (b"ACK sip:x SIP/2.0\r\n\r\n", "dialog"), (RESPONSE, None),
    (b"\x00\x01garbage", "other"), (b"", "other")])
def test_classes(data, kind):
    assert Limiter.kind_of(data) == kind


def test_a_source_may_spend_its_burst_then_its_rate():
    limiter = Limiter({"invite": (10.0, 5)})
    results = [limiter.check("192.0.2.1", INVITE, 100.0) for _ in range(6)]
    assert results == [None] * 5 + ["invite"]
    # 0.1 s later one token is back (10/s), not two
    assert limiter.check("192.0.2.1", INVITE, 100.1 + 1e-9) is None
    assert limiter.check("192.0.2.1", INVITE, 100.1 + 2e-9) == "invite"
    # another source has its own bucket
    assert limiter.check("192.0.2.2", INVITE, 100.1) is None


def test_in_dialog_requests_and_responses_do_not_spend_invite_tokens():
    limiter = Limiter({"invite": (1.0, 2), "dialog": (1.0, 1000)})
    for _ in range(500):
        assert limiter.check("192.0.2.1", REINVITE, 5.0) is None
        assert limiter.check("192.0.2.1", RESPONSE, 5.0) is None
    assert [limiter.check("192.0.2.1", INVITE, 5.0) for _ in range(3)] == [None, None, "invite"]


def test_a_zero_rate_is_no_limit():
    limiter = Limiter({"invite": (0.0, 1), "register": (1.0, 1)})
    assert all(limiter.check("192.0.2.1", INVITE, 1.0) is None for _ in range(100))
    assert limiter.check("192.0.2.1", REGISTER, 1.0) is None
    assert limiter.check("192.0.2.1", REGISTER, 1.0) == "register"


def test_allow_listed_sources_are_never_limited():
    allow = AllowList(["10.0.0.0/8", "2001:db8::/32", "192.0.2.9"])
    limiter = Limiter({"invite": (1.0, 1)}, allow)
    for ip in ("10.1.2.3", "2001:db8::5", "192.0.2.9"):
        assert all(limiter.check(ip, INVITE, 1.0) is None for _ in range(50)), ip
    assert [limiter.check("192.0.2.10", INVITE, 1.0) for _ in range(2)] == [None, "invite"]
    assert "fe80::1%eth0" not in allow and "not-an-ip" not in allow


def test_forget_gives_a_full_bucket():
    limiter = Limiter({"invite": (0.001, 1)})
    limiter.check("192.0.2.1", INVITE, 1.0)
    assert limiter.check("192.0.2.1", INVITE, 1.0) == "invite"
    limiter.forget("192.0.2.1")
    assert limiter.check("192.0.2.1", INVITE, 1.0) is None


def test_bans_end_and_can_be_lifted():
    bans = Bans()
    bans.add("192.0.2.1", 10, now=100.0)
    assert bans.banned("192.0.2.1", 109.9) and not bans.banned("192.0.2.2", 109.9)
    assert not bans.banned("192.0.2.1", 110.0)
    assert "192.0.2.1" not in bans.until  # forgotten once over
    bans.add("192.0.2.1", 10, now=100.0)
    bans.add("192.0.2.1", 1, now=100.0)  # a shorter announcement does not cut it
    assert bans.banned("192.0.2.1", 105.0)
    bans.remove("192.0.2.1")
    assert not bans.banned("192.0.2.1", 105.0)


def test_from_config_defaults():
    limiter = Limiter.from_config(LimitsConfig(allow=("127.0.0.0/8",)))
    assert set(limiter.buckets) == {"register", "invite", "other", "dialog"}
    assert "127.0.0.77" in limiter.allow


@pytest.mark.parametrize(("to_line", "tagged"), [
    (b"To: <sip:b@x>;tag=1", True), (b"To: <sip:b@x>", False),
    (b"to: <sip:b@x> ; TAG = 1", True), (b"t: <sip:b@x>;tag=1", True),
    (b"To: <sip:b@x>\r\n ;tag=1", True),  # folded: the slow path unfolds it
    (b'To: "a;tag=x" <sip:b@x>', True),  # a cheap look: quoted text may pass for a tag
])
def test_to_tag_spellings(to_line, tagged):
    data = b"INVITE sip:b@x SIP/2.0\r\n" + to_line + b"\r\nCall-ID: c\r\n\r\n"
    assert Limiter.kind_of(data) == ("dialog" if tagged else "invite")


def test_a_trusted_source_gets_factor_times_the_rate_and_burst():
    trusted = Trusted()
    limiter = Limiter({"invite": (10.0, 5)}, trusted=trusted, factor=50)
    # untrusted: 5 at once, the 6th empties the bucket
    assert [limiter.check("192.0.2.1", INVITE, 1.0) for _ in range(6)] == [None] * 5 + ["invite"]
    # the same source proven (a bucket already empty): refills at 500/s up to 250
    trusted.add("192.0.2.1", 600, 1.0)
    assert limiter.check("192.0.2.1", INVITE, 1.0) == "invite"  # nothing back yet
    results = [limiter.check("192.0.2.1", INVITE, 2.0) for _ in range(251)]
    assert results == [None] * 250 + ["invite"]
    # a fresh trusted source starts with the trusted burst; others keep the plain one
    trusted.add("192.0.2.2", 600, 2.0)
    assert [limiter.check("192.0.2.2", INVITE, 2.0) for _ in range(251)] == [None] * 250 + [
        "invite"]
    assert [limiter.check("192.0.2.3", INVITE, 2.0) for _ in range(6)] == [None] * 5 + ["invite"]
    # a flood far past the trusted rate (20,000/s) still empties it within 20 ms
    trusted.add("192.0.2.4", 600, 3.0)
    verdicts = [limiter.check("192.0.2.4", INVITE, 3.0 + n / 20_000) for n in range(400)]
    assert "invite" in verdicts and 250 <= verdicts.index("invite") < 270


def test_trust_ends_and_then_the_plain_rates_apply():
    trusted = Trusted()
    limiter = Limiter({"register": (10.0, 5)}, trusted=trusted, factor=50)
    trusted.add("192.0.2.1", 10, 0.0)
    trusted.add("192.0.2.1", 5, 0.0)  # an older announcement never shortens it
    assert trusted.trusted("192.0.2.1", 9.9) and trusted.live(9.9) == 1
    assert not trusted.trusted("192.0.2.1", 10.0) and trusted.live(10.0) == 0
    # past it, the bucket holds at most the plain burst however long it was idle
    assert [limiter.check("192.0.2.1", REGISTER, 20.0) for _ in range(6)] == [None] * 5 + [
        "register"]


def test_the_trusted_factor_comes_from_the_configuration():
    trusted = Trusted()
    limiter = Limiter.from_config(LimitsConfig(invite_rate=10.0, invite_burst=2,
                                               trusted_factor=3), trusted)
    trusted.add("192.0.2.1", 600, 0.0)
    assert [limiter.check("192.0.2.1", INVITE, 0.0) for _ in range(7)] == [None] * 6 + ["invite"]
