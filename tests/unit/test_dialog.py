"""Dialogs (RFC 3261 section 12): creation from the seed's two legs, CSeq rules, target
refresh, route sets with loose and strict routing, in-dialog requests, records."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from cluster.sip.dialog import CONFIRMED, EARLY, Dialog, dialog_id
from cluster.sip.message import Request, Response, build_response, parse
from cluster.sip.uri import parse_uri

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FS_TAG = "4Z6N2Z34t5KXF"  # FreeSWITCH's To tag towards Zoiper (seed 09, 12)
FS_CONTACT = b"sip:1009@192.168.31.109:5060;transport=udp"
BYE_REASON = (b"Reason", b'Q.850;cause=16;text="NORMAL_CLEARING"')


def wire(name: str) -> bytes:
    return (FIXTURES / "seed" / f"{name}.sip").read_bytes()


def seed(name: str) -> Request | Response:
    return parse(wire(name))


def b_leg(response: str = "08-180") -> Dialog:
    """FreeSWITCH's side of the B-leg: it sent 06-invite, MicroSIP answered."""
    return Dialog.from_uac(seed("06-invite"), seed(response))


def a_leg() -> Dialog:
    """FreeSWITCH's side of the A-leg: it got 04-invite from Zoiper."""
    return Dialog.from_uas(seed("04-invite"), FS_TAG, FS_CONTACT)


def send(dialog: Dialog, method: str, **kw) -> tuple[Request, tuple[str, int] | None]:
    """Build an in-dialog request and parse it back from its bytes, as the peer would."""
    kw = {"branch": "z9hG4bKtest1", "via_host": "192.168.31.109", "via_port": 5060,
          "contact": b"sip:mod_sofia@192.168.31.109:5060", **kw}
    req, hop = dialog.create_request(method, **kw)
    parsed = parse(req.to_bytes())
    parsed.validate()
    return parsed, hop


def with_headers(data: bytes, *lines: bytes) -> bytes:
    """``data`` with header lines added after the first line."""
    start, rest = data.split(b"\r\n", 1)
    return b"\r\n".join([start, *lines, rest])


# --------------------------------------------------------------------------- UAC side


def test_uac_dialog_from_the_seed_b_leg_180():
    dialog = b_leg("08-180")
    assert dialog.call_id == b"81a36a1e-f284-123d-5799-f111227aced7"
    assert (dialog.local_tag, dialog.remote_tag) == ("58Ze4tm8QeagB",
                                                     "d4e3674ca23d4b22bebd2e39245254d5")
    assert dialog.local_uri == b'"Extension 1002" <sip:1002@192.168.31.109>'
    assert dialog.remote_uri == b"<sip:1009@192.168.31.109:60119;ob>"
    assert (dialog.local_seq, dialog.remote_seq) == (88896036, None)
    assert dialog.remote_target == b"sip:1009@192.168.31.109:60119;ob"
    assert dialog.local_target == b"sip:mod_sofia@192.168.31.109:5060"
    assert (dialog.route_set, dialog.state, dialog.secure) == ([], EARLY, False)


def test_uac_dialog_confirmed_by_the_seed_200():
    dialog = b_leg("08-180")
    assert dialog.update_from_response(seed("10-200"))
    assert dialog.state == CONFIRMED
    assert b_leg("10-200") == dialog  # created from the 200 directly: the same dialog


def test_ack_for_the_seed_200_matches_freeswitchs():
    dialog = b_leg("10-200")
    ack, hop = send(dialog, "ACK", branch="z9hG4bKN2QDH39QNa3eg", cseq=88896036)
    sent = seed("11-ack")
    assert ack.uri_raw == sent.uri_raw and hop == ("192.168.31.109", 60119)
    assert (ack.from_.tag, ack.to.tag, ack.call_id) == (sent.from_.tag, sent.to.tag, sent.call_id)
    assert ack.cseq == sent.cseq and ack.via.branch == sent.via.branch
    assert ack.contacts[0].uri == sent.contacts[0].uri
    assert dialog.local_seq == 88896036  # an ACK takes no new number


def test_requests_from_the_peer_are_checked_in_order():
    """Seed 16: MicroSIP's BYE reaches FreeSWITCH's B-leg dialog."""
    dialog = b_leg("10-200")
    bye = seed("16-bye")
    assert dialog_id(bye.call_id, bye.to.tag, bye.from_.tag) == dialog.id
    assert dialog.check_remote_cseq(bye) and dialog.remote_seq == 30422
    assert not dialog.check_remote_cseq(bye)  # equal: a new request must go higher
    lower = parse(wire("16-bye").replace(b"CSeq: 30422 BYE", b"CSeq: 30421 BYE"))
    assert not dialog.check_remote_cseq(lower) and dialog.remote_seq == 30422
    for method in ("ACK", "CANCEL"):
        old = parse(wire("16-bye").replace(b"BYE", method.encode()).replace(b"30422", b"1"))
        assert dialog.check_remote_cseq(old)
    assert dialog.remote_seq == 30422


def test_responses_without_a_dialog_are_refused():
    invite = seed("06-invite")
    with pytest.raises(ValueError):
        Dialog.from_uac(invite, seed("07-100"))  # no To tag
    with pytest.raises(ValueError):
        Dialog.from_uac(invite, build_response(invite, 486, to_tag="x"))


def test_provisional_without_contact_targets_the_request_uri_until_the_200():
    invite = seed("06-invite")
    dialog = Dialog.from_uac(invite, build_response(invite, 180, to_tag="d4e3"))
    assert dialog.remote_target == invite.uri_raw
    ok = build_response(invite, 200, to_tag="d4e3",
                        headers=[(b"Contact", b"<sip:1009@10.0.0.5:5062>")])
    assert dialog.update_from_response(ok) and dialog.remote_target == b"sip:1009@10.0.0.5:5062"


# --------------------------------------------------------------------------- UAS side


def test_uas_dialog_from_the_seed_a_leg_invite():
    dialog = a_leg()
    assert dialog.call_id == b"cqBcUqknj-sTLjz_cI-GKw.."
    assert (dialog.local_tag, dialog.remote_tag) == (FS_TAG, "0e837329")
    assert dialog.local_uri == b"<sip:1009@192.168.31.109:5060>"
    assert dialog.remote_uri == b'"1002" <sip:1002@192.168.31.109:5060;transport=UDP>'
    assert dialog.remote_target == b"sip:1002@192.168.31.142:55747;transport=UDP"
    assert dialog.remote_seq == 2 and dialog.local_target == FS_CONTACT
    assert (dialog.route_set, dialog.state) == ([], EARLY)
    dialog.confirm()
    assert dialog.state == CONFIRMED


def test_bye_on_the_a_leg_matches_the_seed_bye():
    """Seed 18: the BYE FreeSWITCH sent Zoiper, built from the A-leg dialog."""
    dialog = a_leg()
    dialog.confirm()
    bye, hop = send(dialog, "BYE", branch="z9hG4bKpBH6jytUjKS1B", headers=(BYE_REASON,))
    sent = seed("18-bye")
    assert bye.uri_raw == sent.uri_raw and hop == ("192.168.31.142", 55747)
    assert (bye.from_.tag, bye.to.tag, bye.call_id) == (sent.from_.tag, sent.to.tag, sent.call_id)
    assert (bye.from_.uri, bye.to.uri) == (sent.from_.uri, sent.to.uri)
    assert bye.cseq.method == "BYE" and bye.cseq.number > seed("04-invite").cseq.number
    assert bye.header("reason") == sent.header("reason")
    assert bye.via.branch == sent.via.branch and bye.via.has_rport and bye.max_forwards == 70
    assert bye.contacts == [] and bye.routes == [] and bye.body == b""


def test_local_cseq_goes_up_by_one_per_request():
    dialog = a_leg()
    numbers = [send(dialog, m)[0].cseq.number for m in ("INFO", "INVITE", "ACK", "BYE")]
    assert numbers == [3, 4, 4, 5] and dialog.local_seq == 5
    assert send(dialog, "ACK", cseq=4)[0].cseq.number == 4
    assert send(dialog, "OPTIONS", cseq=10)[0].cseq.number == 10 and dialog.local_seq == 10


def test_rfc2543_invite_makes_a_dialog_without_tags_or_contact():
    invite = parse((FIXTURES / "rfc4475" / "inv2543.dat").read_bytes())
    dialog = Dialog.from_uas(invite, "ours", b"sip:b2bua@192.0.2.1")
    assert dialog.remote_tag == ""
    assert dialog.remote_target == b"sip:+13035551111@ift.client.example.net;user=phone"
    assert dialog.route_set == [b"<sip:UserB@example.com;maddr=ss1.example.com>"]
    bye, hop = send(dialog, "BYE")
    assert bye.to.tag is None and bye.from_.tag == "ours"
    assert bye.uri_raw == b"sip:UserB@example.com;maddr=ss1.example.com"  # strict route
    assert hop == ("ss1.example.com", 5060)  # maddr wins over the host


# --------------------------------------------------------------------------- target refresh


def reinvite_ok(dialog: Dialog, contact: bytes, method: str = "INVITE") -> Response:
    """A 2xx from the peer to a request of ours, carrying ``contact``."""
    req, _ = send(dialog, method)
    return build_response(req, 200, headers=[(b"Contact", contact)])


def test_2xx_to_reinvite_or_update_moves_the_remote_target():
    dialog = b_leg("10-200")
    assert dialog.update_from_response(reinvite_ok(dialog, b"<sip:1009@10.1.1.1:6000>"))
    assert dialog.remote_target == b"sip:1009@10.1.1.1:6000"
    assert dialog.update_from_response(reinvite_ok(dialog, b"<sip:1009@10.1.1.2>", "UPDATE"))
    assert dialog.remote_target == b"sip:1009@10.1.1.2"


def test_other_responses_leave_the_target_alone():
    dialog = b_leg("10-200")
    target = dialog.remote_target
    assert not dialog.update_from_response(reinvite_ok(dialog, b"<sip:x@10.9.9.9>", "BYE"))
    other_fork = build_response(seed("06-invite"), 200, to_tag="another-fork",
                                headers=[(b"Contact", b"<sip:x@10.9.9.9>")])
    assert not dialog.update_from_response(other_fork)
    req, _ = send(dialog, "INVITE")
    failed = build_response(req, 488, headers=[(b"Contact", b"<sip:x@10.9.9.9>")])
    assert not dialog.update_from_response(failed)
    assert dialog.remote_target == target


def test_target_refresh_request_from_the_peer():
    dialog = a_leg()
    reinvite = parse(wire("04-invite").replace(
        b"Contact: <sip:1002@192.168.31.142:55747;transport=UDP>",
        b"Contact: <sip:1002@203.0.113.9:40000>"))
    assert dialog.update_from_request(reinvite)
    assert dialog.remote_target == b"sip:1002@203.0.113.9:40000"
    assert not dialog.update_from_request(seed("18-bye"))
    assert dialog.remote_target == b"sip:1002@203.0.113.9:40000"


# --------------------------------------------------------------------------- route sets

RR = (b"Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com:5070;lr>",
      b"Record-Route: <sip:p3.example.com;lr>")


def test_route_set_in_order_for_the_uas_and_reversed_for_the_uac():
    invite = parse(with_headers(wire("06-invite"), *RR))
    ok = parse(with_headers(wire("10-200"), *RR))
    uas = Dialog.from_uas(invite, "mine", b"sip:me@192.0.2.1")
    uac = Dialog.from_uac(seed("06-invite"), ok)
    routes = [b"<sip:p1.example.com;lr>", b"<sip:p2.example.com:5070;lr>",
              b"<sip:p3.example.com;lr>"]
    assert uas.route_set == routes and uac.route_set == routes[::-1]


def test_loose_routing_keeps_the_target_in_the_request_uri():
    uac = Dialog.from_uac(seed("06-invite"), parse(with_headers(wire("10-200"), *RR)))
    bye, hop = send(uac, "BYE")
    assert bye.uri_raw == uac.remote_target
    assert [bytes(r) for r in bye.routes] == uac.route_set
    assert hop == ("p3.example.com", 5060)


def test_strict_routing_puts_the_first_route_in_the_request_uri():
    strict = (b"Record-Route: <sip:p1.example.com;lr>, "
              b"<sip:strict.example.com:5080;transport=udp>",)
    uac = Dialog.from_uac(seed("06-invite"), parse(with_headers(wire("10-200"), *strict)))
    assert uac.route_set[0] == b"<sip:strict.example.com:5080;transport=udp>"
    bye, hop = send(uac, "BYE")
    assert bye.uri_raw == b"sip:strict.example.com:5080;transport=udp"
    assert [bytes(r) for r in bye.routes] == [
        b"<sip:p1.example.com;lr>", b"<" + uac.remote_target + b">"]
    assert hop == ("strict.example.com", 5080)


def test_early_dialog_takes_the_route_set_of_the_2xx():
    invite = seed("06-invite")
    early = Dialog.from_uac(invite, parse(with_headers(wire("08-180"), RR[1])))
    assert early.route_set == [b"<sip:p3.example.com;lr>"]
    assert early.update_from_response(parse(with_headers(wire("10-200"), *RR)))
    assert early.route_set[0] == b"<sip:p3.example.com;lr>" and len(early.route_set) == 3
    confirmed_rr = parse(with_headers(wire("10-200"), b"Record-Route: <sip:other.example;lr>"))
    assert early.update_from_response(confirmed_rr)  # confirmed now: the route set stays
    assert len(early.route_set) == 3


# --------------------------------------------------------------------------- requests and ids


def test_invite_in_the_dialog_carries_contact_body_and_ipv6_via():
    dialog = b_leg("10-200")
    sdp = b"v=0\r\n"
    reinvite, _ = send(dialog, "INVITE", via_host="2001:db8::1", via_port=5062,
                       body=sdp, content_type=b"application/sdp")
    assert reinvite.via.host == "[2001:db8::1]" and reinvite.via.port == 5062
    assert reinvite.contacts[0].uri == parse_uri(b"sip:mod_sofia@192.168.31.109:5060")
    assert (reinvite.body, reinvite.content_type) == (sdp, b"application/sdp")


def test_next_hop_is_none_for_a_target_that_is_not_sip():
    dialog = b_leg("10-200")
    dialog.remote_target = b"tel:+15551234"
    assert send(dialog, "BYE")[1] is None


def test_dialog_ids_are_usable_inside_keys():
    assert dialog_id(b"abc@host", "l", "r") == "abc@host|l|r"
    odd = dialog_id(b"a b{c}", "l", None)
    assert " " not in odd and "{" not in odd and odd.endswith("|l|")
    assert dialog_id(b"a b{c}", "l", None) == odd
    assert dialog_id(b"x", "l", "r") != dialog_id(b"x", "r", "l")


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize("make", [b_leg, lambda: b_leg("10-200"), a_leg],
                         ids=["uac-early", "uac-confirmed", "uas"])
def test_record_round_trip_through_msgpack(make):
    dialog = make()
    send(dialog, "INFO")
    dialog.check_remote_cseq(parse(wire("16-bye").replace(b"30422", b"99999999")))
    packed = msgpack.packb(dialog.to_record(), use_bin_type=True)
    copy = Dialog.from_record(msgpack.unpackb(packed, raw=False))
    assert copy == dialog
    assert send(copy, "BYE")[0].to_bytes() == send(dialog, "BYE")[0].to_bytes()


def test_record_holds_plain_values_only():
    record = Dialog.from_uac(seed("06-invite"),
                             parse(with_headers(wire("10-200"), *RR))).to_record()
    assert all(isinstance(k, str) for k in record)
    assert {type(v) for v in record.values()} <= {bytes, str, int, bool, list, type(None)}
    assert all(isinstance(r, bytes) for r in record["route_set"])


def test_built_request_is_a_valid_new_request():
    dialog = a_leg()
    req, _ = dialog.create_request("OPTIONS", branch="z9hG4bKx", via_host="192.0.2.1",
                                   via_port=5060, contact=b"<sip:me@192.0.2.1>")
    assert isinstance(req, Request)
    again = parse(req.to_bytes())
    assert again.contacts[0].uri == parse_uri(b"sip:me@192.0.2.1")
