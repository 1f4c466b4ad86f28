"""Targets: one module per GPU family (and the CPU), each building engines, and the engine runtime
that loads and runs them from their manifest."""

from kiln.targets.align import Alignment, CropBox
from kiln.targets.base import Target
from kiln.targets.buffers import HostBuffers, OrtDeviceBuffers, TorchCudaBuffers
from kiln.targets.cpu import CPU
from kiln.targets.cuda import CUDA
from kiln.targets.engine import Binding, Engine, EngineSet, load_engine
from kiln.targets.gpus import GPUS, gpu_here
from kiln.targets.hardware import GPU, gpu_targets
from kiln.targets.manifest import BuildConfig, EngineError, read_manifest
from kiln.targets.profile import CORNERS, DimRange, Profile, TensorSpec

TARGETS: dict[str, Target] = {t.name: t for t in (CPU, CUDA, *(t for g in GPUS.values() for t in gpu_targets(g)))}
H100 = TARGETS["h100"]


def get_target(name: str) -> Target:
    """The registered target called name ("auto": this machine's, see detect_target); KeyError lists the known names."""
    if name == "auto":
        return detect_target()[0]
    try:
        return TARGETS[name]
    except KeyError:
        known = f"auto, cpu, cuda, {', '.join(GPUS)}, and each GPU's NAME-trt and NAME-ort-trt"
        raise KeyError(f"unknown target {name!r}; known targets: {known}") from None


def detect_target() -> tuple[Target, str]:
    """The target for this machine's GPU (`--target auto`), and a line saying how it was chosen."""
    device, gpu = gpu_here()
    if device is None:
        return CPU, "target auto: no CUDA GPU here, so cpu"
    if gpu is None:
        return CUDA, f"target auto: kiln has no entry for {device}, so the generic cuda target (no cost figures)"
    return TARGETS[gpu.name], f"target auto: {device} is {gpu.name} ({gpu.label}, compute capability {gpu.sm})"


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
    "EngineSet",
    "GPU",
    "GPUS",
    "EngineError",
    "HostBuffers",
    "OrtDeviceBuffers",
    "Profile",
    "Target",
    "TensorSpec",
    "TorchCudaBuffers",
    "detect_target",
    "get_target",
    "gpu_targets",
    "load_engine",
    "read_manifest",
]
