"""Entry point of one SIP worker process (run under supervisord)."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

import gevent  # noqa: E402

from cluster import cadence  # noqa: E402
from cluster.config import load_or_exit  # noqa: E402
from cluster.logsetup import setup_logging  # noqa: E402

from .worker import Worker  # noqa: E402


def main() -> None:
    config = load_or_exit()
    name = f"worker-{os.environ.get('SIPCLUSTER_WORKER_INDEX', os.getpid())}"
    setup_logging(config, name, schedule=gevent.spawn_later)
    cadence.set_phase_for(f"{config.sip.effective_host_id}/{name}")
    Worker(config, name).run()


if __name__ == "__main__":
    main()
