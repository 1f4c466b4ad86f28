"""Targets: one module per GPU family (and the CPU), each building and loading engines."""

from targets.base import Engine, EngineError, Target, read_manifest
from targets.cpu import CPU
from targets.cuda import CUDA, H100
from targets.profile import CORNERS, DimRange, Profile, TensorSpec

TARGETS: dict[str, Target] = {t.name: t for t in (CPU, CUDA, H100)}


def get_target(name: str) -> Target:
    """The registered target called name; KeyError lists the known names."""
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}") from None


__all__ = [
    "CORNERS",
    "CPU",
    "CUDA",
    "H100",
    "TARGETS",
    "DimRange",
    "Engine",
    "EngineError",
    "Profile",
    "Target",
    "TensorSpec",
    "get_target",
    "read_manifest",
]
