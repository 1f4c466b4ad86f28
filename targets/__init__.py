"""Targets: one module per GPU family (and the CPU), each building engines, and the engine runtime
that loads and runs them from their manifest."""

from kiln.targets.align import Alignment, CropBox
from kiln.targets.base import Target
from kiln.targets.buffers import HostBuffers, OrtDeviceBuffers, TorchCudaBuffers
from kiln.targets.cpu import CPU
from kiln.targets.cuda import CUDA, H100
from kiln.targets.engine import Binding, Engine, load_engine
from kiln.targets.manifest import BuildConfig, EngineError, read_manifest
from kiln.targets.profile import CORNERS, DimRange, Profile, TensorSpec

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
    "Alignment",
    "Binding",
    "BuildConfig",
    "CropBox",
    "DimRange",
    "Engine",
    "EngineError",
    "HostBuffers",
    "OrtDeviceBuffers",
    "Profile",
    "Target",
    "TensorSpec",
    "TorchCudaBuffers",
    "get_target",
    "load_engine",
    "read_manifest",
]
