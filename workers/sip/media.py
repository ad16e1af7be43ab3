"""Where a call's SDP goes: straight through (bypass) or through an RTP relay.

The shell's media step (mediastep.py) hands every SDP body that crosses from one
leg to the other to ``rewrite``, around the call's decision; the call state machine
learns nothing of relays (these classes are call/media.py's ``MediaPort``).  In relay
mode the body is announced to the call's relay session (``offer`` for an offer, ``answer`` for an
answer: each tells where that party receives media and returns where the other
party must send) and comes back pointing at the relay.  ``end`` deletes the
session when the call ends, for any reason, and returns its final figures.
"""

from __future__ import annotations

import contextlib
import logging
import time

import gevent

from cluster import relayctl
from cluster.backoff import Backoff
from cluster.cadence import until_next_tick
from cluster.relayctl import RelayClient, RelayError, StreamSpec
from cluster.sip import sdp
from cluster.sip.errors import SipError

log = logging.getLogger("media")
EVENTS_GROUP = "b2bua"
CLAIM_AFTER_MS = 30_000  # an event read but not acknowledged this long is taken over
CLAIM_EVERY = 5.0  # seconds between looks for such events
# Seconds between reads of the media events when none came: a media timeout is acted on at
# most this much later (timeouts are tens of seconds).  A blocking read is capped at half
# the Redis timeout (0.25 s), so reading that way kept an idle worker at ~7 reads a second.
EVENTS_POLL = 2.0
# A host is dead when its dispatcher's announcement has lapsed (3 s after its last one)
# and its relays have been silent this long: a relay that supervisord restarts, or a
# host restarted quickly (supervisord stopped and started again), is back well within it
# and its calls carry on (invariant 13).  Past it no media can flow through its relays.
DEAD_HOST_AFTER = 10.0
DEAD_HOST_CHECK = 2.0  # seconds between looks at the relays' heartbeats (a death takes >= 10 s)
# ...and its announcement must have been missing at every look for this long: right after
# Redis comes back from an outage every heartbeat looks old until the next one (1 s), and
# a live host must not be taken for dead then.
DEAD_HOST_CONFIRM = 4.0


class Bypass:
    """Media goes end to end: SDP passes unchanged."""

    mode = "bypass"

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        return body

    def end(self, tag: str) -> dict | None:
        return None

    @contextlib.contextmanager
    def session_read(self, tag: str, session: dict | None):
        yield


class Relayed:
    """Every stream through a relay; the relay latches on the phone's SIP source IP."""

    mode = "relay"

    def __init__(self, store, host: str, key: bytes):
        # New sessions on this host's relays; a call's session is changed at its owner,
        # whichever host's worker handles the message (its announced control address).
        self.client = RelayClient(store, host=host, key=key)

    def rewrite(self, tag: str, leg: str, body: bytes, *, offer: bool, peer_ip: str) -> bytes:
        described = sdp.parse(body)
        specs = [self._spec(described, i, peer_ip) for i in range(len(described.media))]
        hold = any(described.is_hold(i) for i in range(len(described.media)))
        command = self.client.offer if offer else self.client.answer
        try:
            result = command(tag, "a" if leg == "a" else "b", specs, hold=hold)
        except RelayError as exc:
            raise SipError(503, f"Media relay unavailable: {exc}") from exc
        ports = [stream.port if spec.port else None
                 for stream, spec in zip(result.streams, specs, strict=True)]
        rtcp = [s.port if s.rtcp_mux else s.rtcp_port for s in result.streams]
        rewritten = sdp.rewrite(described, address=result.streams[0].address, ports=ports,
                                rtcp_ports=rtcp)
        return sdp.serialise(rewritten)

    @staticmethod
    def _spec(described: sdp.SessionDescription, index: int, peer_ip: str) -> StreamSpec:
        media = described.media[index]
        connection = described.effective_connection(index)
        address = connection.address if connection else peer_ip
        rtcp = media.rtcp
        return StreamSpec(media=media.media, addr=address, port=media.port,
                          rtcp_port=rtcp.port if rtcp else None, rtcp_mux=media.rtcp_mux,
                          latch_ip=peer_ip)

    @contextlib.contextmanager
    def session_read(self, tag: str, session: dict | None):
        """Within: the call's session record (None: none) was read with the call, so its
        first offer needs no read of its own."""
        self.client.read_owner(tag, session["relay"] if session else None)
        try:
            yield
        finally:
            self.client.forget_read(tag)

    def end(self, tag: str) -> dict | None:
        try:
            return self.client.delete(tag)
        except RelayError as exc:  # the session's hard TTL frees it anyway
            log.warning("call %s: relay delete failed: %s", tag, exc)
            return None


def media_for(config, store, host: str):
    if config.media.mode != "relay":
        return Bypass()
    return Relayed(store, host, relayctl.control_key(config.auth.secret))


def follow_media_timeouts(b2bua, store, consumer: str) -> None:
    """Hang up calls whose media stopped, once each: the relays' events are read from a
    stream by a consumer group, so an event nobody read yet waits, and one a dead worker
    read but did not finish is claimed by another (design: reliable, not pub/sub).

    No trouble ends this loop: it backs off and goes on, and the store makes the group
    anew when a fresh Redis (or a deleted stream) lacks it.  An event whose hang-up
    failed is not acknowledged, so it is claimed again after ``CLAIM_AFTER_MS``.
    ``consumer``: this worker's name in the group, one per worker of the cluster."""
    backoff = Backoff(log, "media events")
    grouped, next_claim = False, 0.0
    while getattr(b2bua, "running", True):
        try:
            if not grouped:
                store.media_events_group(EVENTS_GROUP)
                grouped = True
            events = []
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + CLAIM_EVERY
                events += store.claim_stale_media_events(EVENTS_GROUP, consumer,
                                                         CLAIM_AFTER_MS)
            events += store.read_media_events(EVENTS_GROUP, consumer)
            for event_id, event in events:
                if event.get("event") == "media-timeout":
                    b2bua.media_timeout(event["call_id"])
                store.ack_media_events(EVENTS_GROUP, [event_id])
        except Exception as exc:  # whatever it is, media timeouts go on being followed
            gevent.sleep(backoff.failed(exc))
            continue
        backoff.ok()
        if not events:
            gevent.sleep(until_next_tick(EVENTS_POLL))


def follow_dead_hosts(b2bua, store, host: str) -> None:
    """End the calls whose relay is on a dead host (BYE to both sides, a CDR with cause
    38 NETWORK_OUT_OF_ORDER): nothing else would, since the relay that would report
    their media timeout is gone.  Every worker of every host looks; the call's
    compare-and-set lets one hang it up, the others find it ended."""
    media = b2bua.media
    backoff = Backoff(log, "dead hosts")
    missing_since: dict[str, float] = {}  # host -> when its announcement was first missed
    while getattr(b2bua, "running", True):
        gevent.sleep(until_next_tick(DEAD_HOST_CHECK))
        try:
            now, mono = time.time(), time.monotonic()
            silent: dict[str, list[str]] = {}
            others: set[str] = set()
            for node in store.relay_nodes():
                if node.get("host") and node["host"] != host:
                    others.add(node["host"])
                    if now - float(node.get("seen", 0)) > DEAD_HOST_AFTER:
                        silent.setdefault(node["host"], []).append(node["id"])
            for other in others:
                info = store.host_info(other)
                # Announced by the host that adopted its address (cluster/adoption.py): it
                # is dead all the same; its relays' sessions that were not adopted with it
                # (its media address did not move) have no media any more.
                if info is None or info.get("by", other) != other:
                    missing_since.setdefault(other, mono)
                else:
                    missing_since.pop(other, None)
            for other in [h for h in missing_since if h not in others]:
                del missing_since[other]
            dead = {h for h, since in missing_since.items()
                    if mono - since >= DEAD_HOST_CONFIRM and h in silent}
            media.client.dead_hosts = dead
            for relay_id in (r for h in dead for r in silent[h]):
                for record in store.relay_owned_sessions(relay_id):
                    b2bua.host_down(record["call_id"], relay_id)
                    # The session dies with its relay; its record would keep the call
                    # pointing at it.
                    store.relay_drop_sessions(relay_id, [record["call_id"]])
        except Exception as exc:  # whatever it is, the watch goes on
            missing_since.clear()  # what was missed meanwhile says nothing of the hosts
            gevent.sleep(backoff.failed(exc))
            continue
        backoff.ok()


__all__ = ["Bypass", "Relayed", "media_for", "follow_dead_hosts", "follow_media_timeouts",
           "relayctl"]
