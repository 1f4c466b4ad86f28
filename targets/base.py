"""What every target provides: a description of its capabilities, an engine builder and an engine loader."""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from targets.profile import Profile, TensorSpec

ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT = "kiln-engine"
ENGINE_FORMAT_VERSION = 1


class EngineError(ValueError):
    """An engine directory that cannot be loaded; the message says which file and why."""


class Engine(Protocol):
    """A loaded engine: run it on host arrays, get host arrays back."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: Profile

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class Target(abc.ABC):
    """One deployment target: a GPU family or model, or the CPU."""

    name: str
    family: str
    description: str
    precisions: tuple[str, ...]
    capabilities: tuple[str, ...]

    @abc.abstractmethod
    def available(self) -> str | None:
        """None when this machine can build and run the target, else why not."""

    @abc.abstractmethod
    def build(self, model_path: Path, engine_dir: Path, profile: Profile, extras: dict | None = None) -> dict:
        """Write the engine files for model_path into engine_dir; return the manifest written.

        extras are kept in the manifest for whoever loads the engine (e.g. the alignment rule)."""

    @abc.abstractmethod
    def load(self, engine_dir: Path, cuda_stream: int | None = None) -> Engine:
        """Load an engine that build() wrote; a GPU engine runs on cuda_stream (a cudaStream_t) if given."""

    def describe(self) -> dict:
        reason = self.available()
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "precisions": list(self.precisions),
            "capabilities": list(self.capabilities),
            "available": reason is None,
            "unavailable_reason": reason,
        }


def as_input_types(engine: Engine, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """feeds cast to the engine's input dtypes (an fp16-IO engine takes the same data as its original)."""
    dtypes = {spec.name: spec.dtype for spec in engine.inputs}
    return {k: v.astype(dtypes[k]) if dtypes.get(k, v.dtype.name) != v.dtype.name else v for k, v in feeds.items()}


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    body = {"format": ENGINE_FORMAT, "version": ENGINE_FORMAT_VERSION, **manifest}
    (engine_dir / ENGINE_MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_manifest(engine_dir: Path) -> dict:
    path = engine_dir / ENGINE_MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir} holds no engine: {ENGINE_MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise EngineError(f"{path} is not a kiln engine manifest")
    if manifest.get("version") != ENGINE_FORMAT_VERSION:
        raise EngineError(
            f"{path} has engine format version {manifest.get('version')}, this kiln reads version "
            f"{ENGINE_FORMAT_VERSION}; rebuild it with this kiln"
        )
    return manifest
