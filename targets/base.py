"""What every target provides: a description of its capabilities and an engine builder."""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path

from kiln.targets.align import Alignment
from kiln.targets.hardware import GPU
from kiln.targets.manifest import BuildConfig, with_profiles, write_manifest
from kiln.targets.profile import Profile


@dataclasses.dataclass(frozen=True)
class Target(abc.ABC):
    """One deployment target: a GPU family or model, or the CPU."""

    name: str
    family: str
    description: str
    precisions: tuple[str, ...]
    capabilities: tuple[str, ...]
    quantize: tuple[str, ...] = ()  # the 8-bit formats its engines run (FP8 also needs the GPU to have it)
    gpu: GPU | None = None  # the one GPU model it builds for, if it is a per-GPU target
    one_profile: str | None = None  # why its engines take one profile only, if they do

    @abc.abstractmethod
    def available(self) -> str | None:
        """None when this machine can build and run the target, else why not."""

    @abc.abstractmethod
    def build(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str = "fp32",
              alignment: Alignment | None = None) -> BuildConfig:  # fmt: skip
        """Write the engine files for model_path and their manifest into engine_dir; return the build config.
        `targets.load_engine(engine_dir)` loads it."""

    def build_for(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str = "fp32", alignment: Alignment | None = None,
                  profiles: tuple[Profile, ...] = (), deferred: bool = False) -> BuildConfig:  # fmt: skip
        """build (or defer) for profile, or for several profiles that profile spans: the target writes the
        config of a static one (if any; its cuda_graph says whether static profiles are captured as CUDA
        graphs), which is then made the config of them all."""
        write = self.defer if deferred else self.build
        config = write(model_path, engine_dir, next((p for p in profiles if p.is_static()), profile), precision, alignment)
        if profiles:
            config = with_profiles(config, profile, profiles)
            write_manifest(engine_dir, config)
        return config

    def deferrable(self) -> bool:
        """Whether a build may be deferred where the target does not run: such a target also has
        `defer(model_path, engine_dir, profile, precision, alignment)` (the ONNX Runtime GPU targets)."""
        return False

    def other_gpu(self) -> str | None:
        """Why a per-GPU target does not run on this machine's GPU (another model, or none), or None."""
        from kiln.targets.gpu import device_name

        if self.gpu is None:
            return None
        device = device_name()
        if device is None:
            return f"this machine has no CUDA GPU, and {self.name} is for the {self.gpu.label}"
        if not self.gpu.matches(device):
            return f"this machine's GPU is {device}, not the {self.gpu.label} (`--target auto` picks the one here)"
        return None

    def describe(self) -> dict:
        reason = self.available()
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "precisions": list(self.precisions),
            "capabilities": list(self.capabilities),
            "quantize": list(self.quantize),
            "available": reason is None,
            "unavailable_reason": reason,
            **({"gpu": self.gpu.describe()} if self.gpu else {}),
        }
