"""Ray started on this machine, or joined at an address, for `kiln serve` and `kiln batch`."""

from __future__ import annotations

import signal

from kiln.optimizer.errors import InputError


def init_ray(address: str | None) -> None:
    """Start Ray on this machine, or join the cluster at address. Ray's driver exits on SIGTERM; kiln
    keeps its own handlers, so a SIGTERM drains like Ctrl-C."""
    import ray

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def check_room(what: str, gpus: float, cpus: float, hint: str, refuse: bool, say) -> None:
    """Refuse (refuse=True: Ray on this machine, which cannot grow) actors Ray could never place: they
    would wait for resources forever. Else warn: a cluster may add nodes (Ray's autoscaler)."""
    import ray

    have = ray.cluster_resources()
    for unit, need in (("GPU", gpus), ("CPU", cpus)):
        if need > have.get(unit, 0):
            message = f"{what} need {need:g} {unit}s; the Ray cluster has {have.get(unit, 0):g}"
            if not refuse:
                say(f"warning: {message}: the rest wait until the cluster has room")
                continue
            ray.shutdown()
            raise InputError(message, hint=hint)
