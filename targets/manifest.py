"""The engine manifest (engine.json): the typed build config an engine is loaded from, and nothing else.

Every session setting a build chose is here (precision and TF32, providers and their options, CUDA
graph, alignment, the engine's input and output types), with the versions it was built with. Loading
reads only this, so an engine runs as it was built and verified, whoever built it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kiln.targets.align import Alignment
from kiln.targets.profile import Profile, TensorSpec

ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT = "kiln-engine"
ENGINE_FORMAT_VERSION = 3  # 2: the typed build config; 3: with several profiles (one profile is still written as 2)
# Provider options naming a folder of the engine directory (ONNX Runtime TensorRT's caches), kept relative.
DIRECTORY_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path")
# The option that makes each provider capture its run as a CUDA graph.
CUDA_GRAPH_OPTIONS = {"CUDAExecutionProvider": "enable_cuda_graph", "TensorrtExecutionProvider": "trt_cuda_graph_enable"}


class EngineError(ValueError):
    """An engine that cannot be loaded or cannot take what it was given; the message says which and why."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    target: str
    model: str  # the engine's model file, inside the engine directory
    device: str  # where the engine's inputs and outputs live: "cpu", or "cuda" (IO binding on the GPU)
    providers: tuple[str, ...]
    # Options of the first provider, exactly as the session gets them (TF32 and CUDA graph included).
    provider_options: Mapping[str, str]
    precision: str
    tf32: bool
    cuda_graph: bool  # one shape only, captured as one CUDA graph; with profiles: each static profile's
    profile: Profile  # with profiles: the range they span together
    inputs: tuple[TensorSpec, ...]  # the engine's own, with the types it takes (float16 IO included)
    outputs: tuple[TensorSpec, ...]
    alignment: Alignment | None = None
    built_with: Mapping[str, str] = dataclasses.field(default_factory=dict)  # runtime version, providers
    disabled_optimizers: tuple[str, ...] = ()  # ONNX Runtime graph optimizers left out, at build and at load
    # False: built on a machine without the target's GPU (Target.defer) and not yet verified; `kiln verify`
    # builds it for real on the GPU and verifies it.
    verified: bool = True
    # Several profiles (from --profile-from's buckets): the engine runs each in a session of its own (the
    # dynamic ones share one where their settings are the same), and a request goes to the smallest
    # profile that holds its shape.
    profiles: tuple[Profile, ...] = ()
    # The model is the graph ONNX Runtime optimized at build for this GPU provider, so loading skips the
    # optimizer (seconds off a replica's cold start); a CPU engine's layout rewrites depend on the CPU.
    optimized_at_build: bool = False

    def member(self, index: int) -> BuildConfig:
        """The one-profile config that profiles[index] runs with: a static profile is a CUDA graph where
        the engine captures them, and a TensorRT provider builds for that profile's shapes alone."""
        profile = self.profiles[index]
        graph = self.cuda_graph and profile.is_static()
        options = for_profile(self.provider_options, profile, graph and self.providers[0])
        if "trt_engine_cache_path" in options:  # TensorRT's cache names do not tell the profiles' engines apart
            options["trt_engine_cache_path"] += f"/profile-{index + 1}"
        return dataclasses.replace(self, profile=profile, profiles=(), cuda_graph=graph, provider_options=options)

    def session_providers(self, cuda_stream: int | None = None, directory: Path | None = None) -> list:
        """Providers for ONNX Runtime; a CUDA engine's session runs on cuda_stream (a cudaStream_t) if given,
        and its cache folders are in directory (the engine directory)."""
        first, *rest = self.providers
        options = dict(self.provider_options)
        for key in DIRECTORY_OPTIONS:
            if key in options and directory is not None:
                options[key] = str(directory / options[key])
        if self.device == "cuda" and cuda_stream is not None:
            options["user_compute_stream"] = str(cuda_stream)
        return [(first, options), *rest]

    def session_kwargs(self) -> dict:
        """InferenceSession's keyword arguments beyond the options and providers."""
        return {"disabled_optimizers": list(self.disabled_optimizers)} if self.disabled_optimizers else {}

    def to_json(self) -> dict:
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "providers": list(self.providers),
            "provider_options": dict(self.provider_options),
            "profile": self.profile.to_json(),
            "profiles": [p.to_json() for p in self.profiles],
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "alignment": self.alignment.to_json() if self.alignment else None,
            "built_with": dict(self.built_with),
            "disabled_optimizers": list(self.disabled_optimizers),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> BuildConfig:
        return cls(
            target=data["target"],
            model=data["model"],
            device=data["device"],
            providers=tuple(data["providers"]),
            provider_options=dict(data["provider_options"]),
            precision=data["precision"],
            tf32=bool(data["tf32"]),
            cuda_graph=bool(data["cuda_graph"]),
            profile=Profile.from_json(data["profile"]),
            inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
            alignment=Alignment.from_json(data["alignment"]) if data.get("alignment") else None,
            built_with=dict(data.get("built_with", {})),
            disabled_optimizers=tuple(str(name) for name in data.get("disabled_optimizers", ())),
            verified=data.get("verified", True) is not False,
            profiles=tuple(Profile.from_json(p) for p in data.get("profiles", ())),
            optimized_at_build=data.get("optimized_at_build", False) is True,
        )


def for_profile(options: Mapping[str, str], profile: Profile, graph_provider: str | bool = False) -> dict[str, str]:
    """Provider options for a session of one profile: a TensorRT provider's profile shapes set to it,
    and a CUDA graph only where graph_provider names the provider to capture one."""
    options = {k: v for k, v in options.items() if k not in CUDA_GRAPH_OPTIONS.values()}
    if graph_provider:
        options[CUDA_GRAPH_OPTIONS[graph_provider]] = "1"
    if "trt_profile_min_shapes" in options:
        options.update({f"trt_profile_{corner}_shapes": profile.shapes_text(corner) for corner in ("min", "opt", "max")})
    return options


def with_profiles(config: BuildConfig, envelope: Profile, profiles: tuple[Profile, ...]) -> BuildConfig:
    """A config a target wrote for one of profiles (a static one, if any: its cuda_graph then says
    whether the target captures static profiles as CUDA graphs), made the config of them all."""
    return dataclasses.replace(config, profile=envelope, profiles=profiles, provider_options=for_profile(config.provider_options, envelope),
                               cuda_graph=config.cuda_graph and any(p.is_static() for p in profiles))  # fmt: skip


def write_manifest(engine_dir: Path, config: BuildConfig) -> None:
    # An engine of several profiles is version 3, which a kiln that would take it for one profile refuses.
    version = ENGINE_FORMAT_VERSION if config.profiles else ENGINE_FORMAT_VERSION - 1
    body = {"format": ENGINE_FORMAT, "version": version, **config.to_json()}
    (engine_dir / ENGINE_MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_manifest(engine_dir: Path) -> BuildConfig:
    path = engine_dir / ENGINE_MANIFEST
    rebuild = "rebuild the engine with this kiln (`kiln optimize`)"
    if not path.is_file():
        raise EngineError(f"{engine_dir} holds no engine: {ENGINE_MANIFEST} is missing", hint="pass the OUTDIR that `kiln optimize -o` wrote")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path} is not valid JSON ({exc})", hint=rebuild) from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise EngineError(f"{path} is not a kiln engine manifest", hint="pass the OUTDIR that `kiln optimize -o` wrote")
    if manifest.get("version") not in (ENGINE_FORMAT_VERSION - 1, ENGINE_FORMAT_VERSION):
        raise EngineError(
            f"{path} has engine format version {manifest.get('version')}, this kiln reads versions {ENGINE_FORMAT_VERSION - 1} and {ENGINE_FORMAT_VERSION}",
            hint=rebuild,
        )
    try:
        config = BuildConfig.from_json(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineError(f"{path} is incomplete or damaged ({type(exc).__name__}: {exc})", hint=rebuild) from None
    problem = _damage(config)
    if problem:
        raise EngineError(f"{path} is damaged: {problem}", hint=rebuild)
    # The engine's model is a file of its own directory: a manifest must not make kiln load anything else.
    if not isinstance(config.model, str) or Path(config.model).name != config.model or config.model in ("", ".", ".."):
        raise EngineError(f"{path} names the engine model {config.model!r}, which is not a file of {engine_dir}", hint=rebuild)
    return config


def _damage(config: BuildConfig) -> str | None:
    """What makes a parsed manifest one that loading must not trust, if anything."""
    if not config.outputs:
        return "it lists no outputs"
    for field in ("target", "device", "precision"):
        if not isinstance(getattr(config, field), str):
            return f"{field} is {getattr(config, field)!r}, not a name"
    if not all(isinstance(p, str) for p in config.providers):
        return f"providers {list(config.providers)} are not all names"
    for key, value in config.provider_options.items():
        # A manifest names no file outside its engine directory: no plugin or decryption library to load,
        # no cache elsewhere. The cache folders kiln writes are plain names inside it.
        if key in DIRECTORY_OPTIONS:
            if not isinstance(value, str) or Path(value).name != value or value in ("", ".", ".."):
                return f"provider option {key} is {value!r}, not a folder of the engine directory"
        elif set(key.split("_")) & {"path", "paths", "lib", "libs", "folder", "file", "prefix", "dir"}:  # not "profile"
            return f"provider option {key} names a file or library, which kiln never writes into a manifest"
    profiles = (config.profile, *config.profiles)
    for spec in (*config.inputs, *config.outputs, *(spec for profile in profiles for spec in profile.inputs)):
        problem = _spec_problem(spec)
        if problem:
            return f"{spec.name!r} {problem}"
    names = [s.name for s in config.inputs]
    for profile in profiles:
        if [s.name for s in profile.inputs] != names:
            return f"its inputs {names} and its profile's {[s.name for s in profile.inputs]} differ"
    return None


def _spec_problem(spec: TensorSpec) -> str | None:
    try:
        np.dtype(spec.dtype)
    except TypeError:
        return f"has dtype {spec.dtype!r}, which is no numpy dtype"
    if not isinstance(spec.name, str) or not spec.name:
        return "has no name"
    # A static 0 is a model's own (an empty list of axes); check_feeds holds feeds to it.
    if not all((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d) for d in spec.shape):
        return f"has shape {list(spec.shape)}; dims are sizes or names"
    return None
