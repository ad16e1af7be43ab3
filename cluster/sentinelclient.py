"""Finding the primary through Redis Sentinel without trusting one sentinel's word.

redis-py's ``Sentinel`` believes the first sentinel that names a primary it thinks is up,
and puts that sentinel first for next time.  A sentinel can be behind the others: one in
TILT (its timer stalled for 2 s on a loaded host) stops judging instances for 30 s and
keeps calling the primary that died healthy, and one cut off from the others keeps the
primary it knew.  Believed, it sends every new connection to a dead port, or to a server
that is now a replica.  Its sentinel clients also retry a command ten times with backoff
(up to about 4 s of sleeps) before the next sentinel is asked, so a sentinel that is down or
slow holds a discovery up for seconds.

Here the rule is the sentinels' own: each configuration carries the epoch of the
failover that made it, and the highest epoch wins.  Every sentinel is asked once (no
retries: the next sentinel is the retry); of the primaries named by sentinels that see
it up and see at least ``min_other_sentinels`` peers, the one with the highest
``config-epoch`` is taken.  Discovery runs only when a connection is opened.

Then, as Sentinel's client guidelines ask, a connection to the named primary checks with
ROLE that the server is a primary before any command goes through it; a replica refuses
the connection (ConnectionError), so the next attempt discovers again.  (A user whose ACL
denies ROLE is not checked: READONLY at the first write tells the same, later.)
"""

from __future__ import annotations

from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, ResponseError, TimeoutError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection


def no_retries() -> Retry:
    """For sentinel clients: one try each, the next sentinel is the retry."""
    return Retry(NoBackoff(), 0)


def newest_primary(answers: list[tuple[int, str, int] | None]) -> tuple[str, int] | None:
    """Of (config epoch, host, port) per sentinel (None where a sentinel gave no usable
    answer), the address with the highest epoch; the first sentinel's among equals."""
    best: tuple[int, str, int] | None = None
    for answer in answers:
        if answer is not None and (best is None or answer[0] > best[0]):
            best = answer
    return None if best is None else (best[1], best[2])


class EpochSentinel(Sentinel):
    """redis-py's Sentinel, whose discovery takes the newest configuration any sentinel
    knows instead of the first one named."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        answers: list[tuple[int, str, int] | None] = []
        errors = []
        for sentinel in self.sentinels:
            try:
                masters = sentinel.sentinel_masters()
            except (ConnectionError, TimeoutError) as exc:
                errors.append(f"{sentinel} - {exc!r}")
                answers.append(None)
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                host = self._force_master_ip or state["ip"]
                answers.append((int(state.get("config-epoch", 0)), host, int(state["port"])))
            else:
                answers.append(None)
        address = newest_primary(answers)
        if address is None:
            detail = f" : {', '.join(errors)}" if errors else ""
            raise MasterNotFoundError(f"No master found for {service_name!r}{detail}")
        return address


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary the sentinels name, refused unless ROLE says primary."""

    def connect_to(self, address) -> None:
        super().connect_to(address)
        if not self.connection_pool.is_master:
            return
        try:
            self.send_command("ROLE", check_health=False)
            reply = self.read_response()
        except ResponseError:
            # An ACL user without ROLE (it is in @admin and @dangerous): not checked here;
            # a replica still shows itself with READONLY at the first write.
            return
        except BaseException:
            self.disconnect()
            raise
        role = reply[0] if reply else b""
        if isinstance(role, bytes):
            role = role.decode(errors="replace")
        if role != "master":
            self.disconnect()
            raise ConnectionError(f"{address[0]}:{address[1]}, named the primary, is a {role}")
