"""Engines on ONNX Runtime: the session settings are chosen at build time and kept in the manifest."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from targets.base import Engine, EngineError, Target, read_manifest, write_manifest
from targets.profile import Profile, TensorSpec

ENGINE_MODEL = "model.ort.onnx"
ort.set_default_logger_severity(3)  # errors only: kiln reports what matters itself
# Above this size the optimized model must keep its weights in a side file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


def _model_bytes(model_path: Path) -> int:
    return sum(p.stat().st_size for p in model_path.parent.iterdir() if p.is_file())


@dataclasses.dataclass(frozen=True)
class OrtTarget(Target):
    """A target whose engine is an ONNX Runtime session over an offline-optimized model."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Options for the first provider, e.g. cuDNN's convolution algorithm search on CUDA.
    provider_options: tuple[tuple[str, str], ...] = ()

    def available(self) -> str | None:
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            return f"onnxruntime {ort.__version__} here lacks {', '.join(missing)}"
        return None

    def session_providers(self) -> list:
        first, *rest = self.providers
        return [(first, dict(self.provider_options)), *rest]

    def session_options(self, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        return options

    def build(self, model_path: Path, engine_dir: Path, profile: Profile, extras: dict | None = None) -> dict:
        # Extended, not "all": layout rewrites are specific to the build machine's CPU, so they are
        # applied again when the engine loads, and the saved model stays portable.
        options = self.session_options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        options.optimized_model_filepath = os.fspath(engine_dir / ENGINE_MODEL)
        if _model_bytes(model_path) > EXTERNAL_DATA_BYTES:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", ENGINE_MODEL + ".data"
            )
        ort.InferenceSession(os.fspath(model_path), options, providers=self.session_providers())
        manifest = {
            "target": self.name,
            "providers": list(self.providers),
            "provider_options": dict(self.provider_options),
            "model": ENGINE_MODEL,
            "profile": profile.to_json(),
            **(extras or {}),
        }
        write_manifest(engine_dir, manifest)
        return manifest

    def load(self, engine_dir: Path) -> Engine:
        manifest = read_manifest(engine_dir)
        model = engine_dir / manifest.get("model", ENGINE_MODEL)
        if not model.is_file():
            raise EngineError(f"engine model {model} is missing; rebuild the engine with `kiln optimize`")
        options = self.session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        session = ort.InferenceSession(os.fspath(model), options, providers=self.session_providers())
        return OrtEngine(session, Profile.from_json(manifest["profile"]))


class OrtEngine:
    """An ONNX Runtime session behind the Engine protocol."""

    def __init__(self, session: ort.InferenceSession, profile: Profile):
        self.session = session
        self.profile = profile
        self.inputs = tuple(_spec(a) for a in session.get_inputs())
        self.outputs = tuple(_spec(a) for a in session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, dict(feeds))
        return {spec.name: value for spec, value in zip(self.outputs, values, strict=True)}
