"""Every GPU kiln has an entry for, by target name, and which one this machine has."""

from __future__ import annotations

from kiln.targets import ada, ampere, blackwell, hopper, turing
from kiln.targets.gpu import device_name
from kiln.targets.hardware import GPU

GPUS: dict[str, GPU] = {g.name: g for module in (turing, ampere, ada, hopper, blackwell) for g in module.GPUS}


def gpu_named(device: str) -> GPU | None:
    """The entry whose pattern matches a CUDA device name, or None."""
    return next((g for g in GPUS.values() if g.matches(device)), None)


def gpu_here() -> tuple[str | None, GPU | None]:
    """This machine's CUDA device name (None without one) and its entry (None if kiln has none)."""
    name = device_name()
    return name, gpu_named(name) if name else None
