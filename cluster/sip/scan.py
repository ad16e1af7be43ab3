"""Cheap look-ups in raw datagrams for the dispatcher, which must not parse.

They find the first Call-ID and the top Via branch with one regex search over
the header block (the body may quote another SIP message, so it is never
searched), unfolding continuation lines when there are any.  They never raise:
a datagram they cannot read returns None and is forwarded by source address.
"""

from __future__ import annotations

import re

_CALL_ID = re.compile(rb"\n[ \t]*(?:call-id|i)[ \t]*:", re.I)
_VIA = re.compile(rb"\n(?:via|v)[ \t]*:", re.I)
_TO = re.compile(rb"\n(?:to|t)[ \t]*:", re.I)
_TAG = re.compile(rb";[ \t]*tag[ \t]*=", re.I)
_BRANCH = re.compile(rb";[ \t]*branch[ \t]*=[ \t]*([^;, \t\r\n]+)", re.I)
_FOLD = re.compile(rb"\r?\n[ \t]+")


def _head(data: bytes) -> bytes:
    """The start line and headers, up to the first empty line."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data if end < 0 else data[:end + 1]


def _value(head: bytes, pattern: re.Pattern) -> bytes | None:
    """The unfolded value of the first header line ``pattern`` finds (one regex search:
    measured faster than plain searches in a lower-cased copy)."""
    m = pattern.search(head)
    if m is None:
        return None
    start = m.end()
    end = head.find(b"\n", start)
    while end >= 0 and head[end + 1:end + 2] in (b" ", b"\t"):  # folded onto the next line
        end = head.find(b"\n", end + 1)
    value = head[start:] if end < 0 else head[start:end]
    if b"\n" in value:
        value = _FOLD.sub(b" ", value)
    return value.strip(b" \t\r")


def call_id(data: bytes) -> bytes | None:
    """The Call-ID value, or None when there is none."""
    return _value(_head(data), _CALL_ID) or None


def top_branch(data: bytes) -> bytes | None:
    """The branch parameter of the first Via value, or None."""
    via = _value(_head(data), _VIA)
    if not via:
        return None
    m = _BRANCH.search(_first_value(via))
    return m.group(1) if m else None


def has_to_tag(data: bytes) -> bool:
    """Whether the To header carries a tag: a request inside a dialog (or the ACK of a
    failed INVITE), not one that starts something."""
    # Fast path for the usual spelling, measured 0.4 us against 2 us for the regex
    # search of the header block (the dispatcher asks for every new request).
    at = data.find(b"\r\nTo:")
    if at > 0:
        end = data.find(b"\r\n", at + 5)
        line = data[at + 5:end] if end > 0 else data[at + 5:]
        if end > 0 and data[end + 2:end + 3] not in (b" ", b"\t"):  # not folded
            return _TAG.search(line) is not None
    to = _value(_head(data), _TO)
    return bool(to) and _TAG.search(to) is not None


def _first_value(value: bytes) -> bytes:
    """The part before the first comma that is not inside quotes."""
    comma = value.find(b",")
    if comma < 0 or b'"' not in value[:comma]:
        return value if comma < 0 else value[:comma]
    quoted = False
    for i, ch in enumerate(value):
        if ch == 0x22:
            quoted = not quoted
        elif ch == 0x2C and not quoted:
            return value[:i]
    return value


def is_response(data: bytes) -> bool:
    return data[:4] == b"SIP/"
