"""The SIP ladder drawing (cluster/ladder.py), on the seed call as the cluster would
have traced it: FreeSWITCH's place is the cluster's, Zoiper is the caller, MicroSIP the
callee."""

from __future__ import annotations

import pytest

from cluster import ladder
from conftest import FIXTURES

SEED = FIXTURES / "seed"
ZOIPER = ["192.168.31.142", 55747]
MICROSIP = ["192.168.31.50", 60119]
# (seed message, direction seen from the cluster, leg); 14-15 are the REGISTER, no call.
SEED_CALL = [
    ("01-invite", "in", "a"), ("02-407", "out", "a"), ("03-ack", "in", "a"),
    ("04-invite", "in", "a"), ("05-100", "out", "a"), ("06-invite", "out", "b0"),
    ("07-100", "in", "b0"), ("08-180", "in", "b0"), ("09-183", "out", "a"),
    ("10-200", "in", "b0"), ("11-ack", "out", "b0"), ("12-200", "out", "a"),
    ("13-ack", "in", "a"), ("16-bye", "in", "b0"), ("17-200", "out", "b0"),
    ("18-bye", "out", "a"), ("19-bye", "out", "a"), ("20-200", "in", "a"),
    ("21-200", "in", "a"),
]
# What each row must show: side, arrow pointing right, label.
EXPECTED = [
    ("caller", True, "INVITE (SDP)"), ("caller", False, "407 Proxy Authentication Required"),
    ("caller", True, "ACK"), ("caller", True, "INVITE (SDP)"),
    ("caller", False, "100 Trying"), ("callee", True, "INVITE (SDP)"),
    ("callee", False, "100 Trying"), ("callee", False, "180 Ringing"),
    ("caller", False, "183 Session Progress (SDP)"), ("callee", False, "200 OK (SDP)"),
    ("callee", True, "ACK"), ("caller", False, "200 OK (SDP)"), ("caller", True, "ACK"),
    ("callee", False, "BYE"), ("callee", True, "200 OK"), ("caller", False, "BYE"),
    ("caller", False, "BYE"), ("caller", True, "200 OK"), ("caller", True, "200 OK"),
]


def seed_entries() -> list[dict]:
    entries = []
    for index, (name, direction, leg) in enumerate(SEED_CALL):
        data = (SEED / f"{name}.sip").read_bytes()
        entries.append({"t": 1000.0 + index * 0.25, "dir": direction, "leg": leg,
                        "peer": ZOIPER if leg == "a" else MICROSIP,
                        "first": data.split(b"\r\n", 1)[0].decode(), "data": data})
    return entries


def shows(shown: str, label: str) -> bool:
    """The label, or its beginning when cut to the lane (keeping an SDP mark)."""
    mark = ladder.SDP_MARK.strip()
    if shown.endswith(mark) != label.endswith(mark):
        return False
    return label.startswith(shown.removesuffix(mark).rstrip())


def rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("+")]


def test_every_message_becomes_an_arrow_on_its_side_in_order():
    arrows = ladder.arrows(seed_entries())
    assert [(a.side, a.rightwards, a.label) for a in arrows] == EXPECTED


def test_retransmissions_are_marked():
    arrows = ladder.arrows(seed_entries())
    # 19 is FreeSWITCH's BYE sent again (Timer E), 21 Zoiper's second 200 to it.
    assert [a.retransmission for a in arrows].count(True) == 2
    assert arrows[16].retransmission and arrows[18].retransmission
    assert not arrows[15].retransmission and not arrows[17].retransmission


def test_the_drawing_has_three_columns_and_one_row_per_message():
    text = ladder.draw(seed_entries(), caller="1002", callee="1009")
    header = text.splitlines()[0]
    assert header.split() == ["time", "caller", "1002", "cluster", "callee", "1009"]
    drawn = rows(text)
    assert len(drawn) == len(SEED_CALL)
    bars = {tuple(i for i, ch in enumerate(row) if ch == "|")[:3] for row in drawn}
    assert len(bars) == 1, "the column bars line up on every row"
    first, second, third = bars.pop()
    # The header names stand on the bars.
    assert header.index("caller") == first and header.index("cluster") == second
    assert header.index("callee") == third
    for row, (side, rightwards, label) in zip(drawn, EXPECTED, strict=True):
        lane = row[first + 1:second] if side == "caller" else row[second + 1:third]
        other = row[second + 1:third] if side == "caller" else row[first + 1:second]
        assert other.strip() == ""
        assert lane.endswith(">") if rightwards else lane.startswith("<")
        assert shows(lane.strip("<>- "), label)


def test_rows_carry_the_time_leg_and_peer():
    drawn = rows(ladder.draw(seed_entries()))
    assert drawn[0].startswith("+0.000 ") and drawn[5].startswith("+1.250 ")
    assert drawn[0].endswith("  a 192.168.31.142:55747")
    assert drawn[5].endswith("  b0 192.168.31.50:60119")
    assert drawn[16].endswith("  a 192.168.31.142:55747  retransmission")


def test_long_labels_are_cut_to_the_lane_and_keep_the_sdp_mark():
    text = ladder.draw(seed_entries())
    row = rows(text)[8]  # 183 Session Progress with SDP, to the caller
    lane = row.split("|")[1]
    assert len(lane) == ladder.LANE and lane.startswith("<-")
    assert lane.strip("<- ").startswith("183 Session") and lane.rstrip("- ").endswith("(SDP)")


def test_full_prints_each_message_under_its_arrow():
    entries = seed_entries()[:2]
    lines = ladder.draw(entries, full=True).splitlines()
    assert lines[1].startswith("+0.000")
    assert lines[2].strip() == "INVITE sip:1009@192.168.31.109:5060;transport=UDP SIP/2.0"
    assert "a=rtcp-mux" in [line.strip() for line in lines]
    at_407 = next(i for i, line in enumerate(lines) if line.startswith("+0.250"))
    assert lines[at_407 + 1].strip() == "SIP/2.0 407 Proxy Authentication Required"
    assert all("\r" not in line for line in lines)


def test_an_entry_with_an_unknown_leg_goes_by_its_call_id():
    data = (SEED / "16-bye.sip").read_bytes().replace(
        b"Call-ID: ", b"Call-ID: sc7.0123456789abcdef01234567.0-")
    [arrow] = ladder.arrows([{"t": 1.0, "dir": "in", "leg": "?", "peer": MICROSIP,
                              "first": "BYE sip:x SIP/2.0", "data": data}])
    assert (arrow.side, arrow.rightwards, arrow.label) == ("callee", False, "BYE")


@pytest.mark.parametrize("first, label", [
    ("SIP/2.0 486 Busy Here", "486 Busy Here"),
    ("SIP/2.0 200", "200"),
    ("OPTIONS sip:1009@example.com SIP/2.0", "OPTIONS"),
])
def test_labels(first, label):
    assert ladder.label_of(first) == label


def test_an_empty_trace_says_so():
    assert ladder.draw([]).splitlines()[-1] == "(no messages traced)"


def test_json_form_of_an_arrow():
    arrow = ladder.arrows(seed_entries())[1]
    assert arrow.to_json() == {"t": 1000.25, "side": "caller", "direction": "from cluster",
                               "label": "407 Proxy Authentication Required", "leg": "a",
                               "peer": "192.168.31.142:55747", "retransmission": False}
