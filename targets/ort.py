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
    # Where the engine keeps its input and output buffers: "cpu", or "cuda" for IO binding on the GPU.
    device: str = "cpu"
    # Capture the run as one CUDA graph when the profile is static (one shape): no per-kernel launches.
    cuda_graphs: bool = False

    def available(self) -> str | None:
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            return f"onnxruntime {ort.__version__} here lacks {', '.join(missing)}"
        return None

    def session_providers(self, profile: Profile | None = None, cuda_stream: int | None = None, precision: str | None = None) -> list:
        first, *rest = self.providers
        options = dict(self.provider_options)
        if self.uses_cuda_graph(profile):
            options["enable_cuda_graph"] = "1"
        if self.device == "cuda":
            if cuda_stream is not None:
                options["user_compute_stream"] = str(cuda_stream)
            if precision == "fp32":
                # fp32 is verified to fp32's tolerance, which TF32 misses (3e-4 on the tiny VAE decoder).
                # Only for fp32: use_tf32=0 also takes cuDNN's fp16 convolutions off the tensor cores
                # (FILM fp16 at 1080p went from 84 to 1009 ms on an H200).
                options["use_tf32"] = "0"
        return [(first, options), *rest]

    def uses_cuda_graph(self, profile: Profile | None) -> bool:
        return self.cuda_graphs and profile is not None and profile.is_static()

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
            "device": self.device,
            "cuda_graph": self.uses_cuda_graph(profile),
            "model": ENGINE_MODEL,
            "profile": profile.to_json(),
            **(extras or {}),
        }
        write_manifest(engine_dir, manifest)
        return manifest

    def load(self, engine_dir: Path, cuda_stream: int | None = None) -> Engine:
        manifest = read_manifest(engine_dir)
        model = engine_dir / manifest.get("model", ENGINE_MODEL)
        if not model.is_file():
            raise EngineError(f"engine model {model} is missing; rebuild the engine with `kiln optimize`")
        profile = Profile.from_json(manifest["profile"])
        options = self.session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        providers = self.session_providers(profile, cuda_stream, manifest.get("precision"))
        session = ort.InferenceSession(os.fspath(model), options, providers=providers)
        if self.device == "cpu":
            return OrtEngine(session, profile)
        return BoundEngine(session, profile, self.device, static=self.uses_cuda_graph(profile))


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


class BoundEngine(OrtEngine):
    """An engine whose inputs and outputs live in device buffers (ONNX Runtime IO binding).

    The buffers are allocated once per shape and refilled in place, so the addresses stay fixed, as
    CUDA graph replay requires; `device_runner` times the engine on device-resident data alone."""

    def __init__(self, session: ort.InferenceSession, profile: Profile, device: str, static: bool = False):
        super().__init__(session, profile)
        self.device = device
        self.static = static  # one shape only, outputs preallocated (a captured CUDA graph)
        self._binding = session.io_binding()
        self._buffers: dict[str, ort.OrtValue] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        if shapes == self._shapes:
            for name, array in feeds.items():
                self._buffers[name].update_inplace(np.ascontiguousarray(array))
            return
        if self.static and self._shapes is not None:
            raise EngineError(f"this engine runs one shape, {self._shapes}, captured as a CUDA graph; got {shapes}")
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._buffers = {}
        for name, array in feeds.items():
            self._buffers[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
            self._binding.bind_ortvalue_input(name, self._buffers[name])
        for spec in self.outputs:
            if self.static and all(isinstance(d, int) for d in spec.shape):  # a graph replays into the same buffers
                out = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), np.dtype(spec.dtype), self.device, 0)
                self._binding.bind_ortvalue_output(spec.name, out)
            else:
                self._binding.bind_output(spec.name, self.device)
        self._shapes = shapes

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._bind(feeds)
        self.session.run_with_iobinding(self._binding)
        values = self._binding.copy_outputs_to_cpu()
        return {spec.name: value for spec, value in zip(self.outputs, values, strict=True)}

    def device_runner(self, feeds: Mapping[str, np.ndarray]):
        """A function that runs the engine on feeds already on the device, and waits for it."""
        self._bind(feeds)

        def run() -> None:
            self.session.run_with_iobinding(self._binding)
            self._binding.synchronize_outputs()

        return run
