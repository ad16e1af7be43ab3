"""A cache bounded in entries and in bytes, oldest out first.

Per-process caches keyed or filled by what comes off the wire (answers remembered for
retransmissions, HA1 look-ups by user name, held requests...) must not grow with what an
attacker sends: an entry count alone does not bound them, since one entry may hold a
Call-ID or a user name of up to 64 KB.  A junk flood of large well-formed requests grew a
worker from 42 MB to ~390 MB through the answers cache alone (50,000 entries of ~8 KB).
Each entry is charged what its owner says it costs (its variable bytes plus a fixed
overhead for the Python objects around them); past either bound the oldest entries go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

# What a small entry costs beyond its bytes objects' contents: the dict slot, the key and
# value objects' headers, a tuple of two or three, a float (sys.getsizeof, CPython 3.11):
# ~200 bytes.
ENTRY_OVERHEAD = 200


class BoundedCache:
    """An insertion-ordered mapping of at most ``max_entries`` entries and ``max_bytes``
    charged bytes; ``__setitem__`` takes (value, nbytes) via ``put``."""

    __slots__ = ("_items", "max_entries", "max_bytes", "bytes")

    def __init__(self, max_entries: int, max_bytes: int):
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, default: Any = None) -> Any:
        item = self._items.get(key)
        return default if item is None else item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Add or replace ``key`` (it becomes the newest), then drop the oldest entries
        while a bound is exceeded (the new one too, if it alone is over ``max_bytes``)."""
        items = self._items
        old = items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        nbytes += ENTRY_OVERHEAD
        items[key] = (value, nbytes)
        self.bytes += nbytes
        while items and (len(items) > self.max_entries or self.bytes > self.max_bytes):
            self.bytes -= items.popitem(last=False)[1][1]

    def pop(self, key: Hashable, default: Any = None) -> Any:
        item = self._items.pop(key, None)
        if item is None:
            return default
        self.bytes -= item[1]
        return item[0]

    def oldest(self) -> tuple[Hashable, Any] | None:
        """(key, value) of the oldest entry, None when empty."""
        if not self._items:
            return None
        key = next(iter(self._items))
        return key, self._items[key][0]

    def pop_oldest(self) -> None:
        self.bytes -= self._items.popitem(last=False)[1][1]

    def items(self) -> list[tuple[Hashable, Any]]:
        """A snapshot of (key, value), oldest first."""
        return [(key, item[0]) for key, item in self._items.items()]

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
