"""Entry point of one RTP relay process (run under supervisord as relay-<index>).

SIPCLUSTER_RELAY_INDEX picks the relay's slice of [media.rtp_port_min,
media.rtp_port_max]; the first port of the slice is its control port (on
``media.control_address``: loopback for one host, the host's inter-host address
for several), the rest are RTP/RTCP pairs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from cluster import cadence
from cluster.config import Config, load_or_exit
from cluster.logsetup import setup_logging
from cluster.relayctl import control_key
from cluster.store import Store

from .ports import relay_slice
from .relay import Relay, RelaySettings

# The relay's Redis calls sit between packet batches: fail fast rather than hold packets.
REDIS_TIMEOUT = 0.1


def settings_for(config: Config, index: int) -> RelaySettings:
    media = config.media
    lo, hi = relay_slice(media.rtp_port_min, media.rtp_port_max, media.relays, index)
    if hi - lo < 3:
        raise ValueError("a relay's port slice needs room for its control port and one pair")
    host = config.sip.effective_host_id
    name = f"relay-{index}"
    return RelaySettings(
        relay_id=f"{host}/{name}", host=host, name=name, bind=media.bind,
        advertised=media.advertised_address, port_lo=lo, port_hi=hi,
        media_timeout=float(media.media_timeout),
        media_timeout_hold=float(media.media_timeout_hold),
        control_host=config.relay_control_address, key=control_key(config.auth.secret))


def main() -> int:
    config = load_or_exit()
    index = int(os.environ.get("SIPCLUSTER_RELAY_INDEX", "0"))
    name = f"relay-{index}"
    setup_logging(config, name)
    try:
        settings = settings_for(config, index)
    except ValueError as exc:
        logging.getLogger("relay").error("%s", exc)
        return 2
    if not settings.key:
        logging.getLogger("relay").error(
            "auth.secret is empty: relay commands could not be authenticated "
            "(`sipcluster up` writes one into run/secret; set it alike on every host)")
        return 2
    if config.dispatcher.inter_host_port and settings.control_host.startswith("127."):
        # Another host's worker handling one of this relay's calls would reach its own
        # relay of the same index at this address, not this one.
        logging.getLogger("relay").warning(
            "dispatcher.inter_host_port is set (several hosts) but relay control is on %s: "
            "other hosts cannot reach this relay; set dispatcher.inter_host_address or "
            "media.control_address", settings.control_host)
    store = Store(config.redis.url, timeout=REDIS_TIMEOUT, max_connections=4)
    cadence.set_phase_for(settings.relay_id)
    relay = Relay(settings, store)
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    relay.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
