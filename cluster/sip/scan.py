"""Cheap look-ups in raw datagrams for the dispatcher, which must not parse.

They find the first Call-ID and the top Via branch with plain byte searches
(plus one case-insensitive regex when the usual spellings are absent).  They
never raise: a datagram they cannot read returns None and is forwarded by
source address instead.
"""

from __future__ import annotations

import re

_CALL_ID_ANY = re.compile(rb"\n[ \t]*(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.I)
_VIA_ANY = re.compile(rb"\n(?:via|v)[ \t]*:([^\r\n]*)", re.I)
_BRANCH = re.compile(rb";[ \t]*branch[ \t]*=[ \t]*([^;, \t\r\n]+)", re.I)
_USUAL_CALL_ID = (b"\nCall-ID:", b"\ni:", b"\nCall-Id:", b"\nCALL-ID:")


def call_id(data: bytes) -> bytes | None:
    """The Call-ID value, or None when there is none."""
    for marker in _USUAL_CALL_ID:
        start = data.find(marker)
        if start >= 0:
            start += len(marker)
            end = data.find(b"\n", start)
            value = (data[start:] if end < 0 else data[start:end]).strip()
            return value or None
    m = _CALL_ID_ANY.search(data)
    return m.group(1).strip() or None if m else None


def top_branch(data: bytes) -> bytes | None:
    """The branch parameter of the first Via value, or None."""
    start = data.find(b"\nVia:")
    if start >= 0:
        end = data.find(b"\n", start + 5)
        line = data[start + 5:] if end < 0 else data[start + 5:end]
    else:
        m = _VIA_ANY.search(data)
        if m is None:
            return None
        line = m.group(1)
    line = line.split(b",", 1)[0]
    m = _BRANCH.search(line)
    return m.group(1) if m else None


def is_response(data: bytes) -> bool:
    return data[:4] == b"SIP/"
