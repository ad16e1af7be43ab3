"""The relay's share of the RTP port range, and the pool of even/odd pairs in it."""

from __future__ import annotations

from collections import deque


def relay_slice(port_min: int, port_max: int, relays: int, index: int) -> tuple[int, int]:
    """Relay ``index``'s ports [lo, hi]: an equal, even-aligned slice of [port_min, port_max].

    lo is even and hi odd, so the slice holds whole RTP/RTCP pairs; slices never overlap.
    """
    if not 0 <= index < relays:
        raise ValueError(f"relay index {index} outside 0..{relays - 1}")
    first = port_min + (port_min & 1)
    pairs = (port_max - first + 1) // 2
    share = pairs // relays
    if share < 1:
        raise ValueError("the RTP port range is too small for that many relays")
    lo = first + 2 * share * index
    return lo, lo + 2 * share - 1


class PortPool:
    """Even RTP ports of [lo, hi]; port + 1 is the RTCP port.

    Freed pairs go to the back of the queue, so a port is reused as late as
    possible: packets still in flight to an ended call do not reach the next.
    """

    def __init__(self, lo: int, hi: int):
        if lo & 1 or not hi & 1 or hi <= lo:
            raise ValueError(f"need an even lo below an odd hi, not [{lo}, {hi}]")
        self.lo, self.hi = lo, hi
        self._free: deque[int] = deque(range(lo, hi, 2))
        self._taken: set[int] = set()

    def __len__(self) -> int:
        return len(self._free)

    def owns(self, port: int) -> bool:
        return self.lo <= port < self.hi and not port & 1

    def take(self) -> int:
        """The next free even port; IndexError when none is left."""
        port = self._free.popleft()
        self._taken.add(port)
        return port

    def reserve(self, port: int) -> None:
        """Take a given pair (a restored session's); ValueError if it is not free."""
        if not self.owns(port) or port in self._taken:
            raise ValueError(f"port {port} is not a free pair of [{self.lo}, {self.hi}]")
        self._free.remove(port)
        self._taken.add(port)

    def release(self, port: int) -> None:
        if port in self._taken:
            self._taken.remove(port)
            self._free.append(port)

    def skip(self, port: int) -> None:
        """A taken pair that cannot be bound (another program holds it): retry it last."""
        self.release(port)
