"""Ray started on this machine, or joined at an address, for `kiln serve` and `kiln batch`."""

from __future__ import annotations

import signal


def init_ray(address: str | None) -> None:
    """Start Ray on this machine, or join the cluster at address. Ray's driver exits on SIGTERM; kiln
    keeps its own handlers, so a SIGTERM drains like Ctrl-C."""
    import ray

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
