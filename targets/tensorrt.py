"""The native TensorRT target, `NAME-trt`: a thin adapter over TensorRT's Python API (the [trt] extra).

`build_settings` decides everything a build hands TensorRT: a strongly typed network for a Q/DQ model
(TensorRT then takes every tensor's type from the graph, as ModelOpt's FP8/INT8 models expect), else
the precision flag; one optimization profile per kiln profile; the builder optimization level; the
timing cache file; and a build-time limit, enforced by a progress monitor that cancels the build.
`build_plan` applies them, call by call, and writes the plan.

The plan runs through ONNX Runtime's TensorRT provider, so kiln keeps one runtime (bindings, CUDA
graphs, the frame pipeline): beside the plan, the build writes its ONNX face, a one-node model whose
EPContext node names the plan (`context_model`), which that provider deserializes instead of building.
The manifest records the GPU and the TensorRT version: a plan is compiled code for one GPU model and one
TensorRT release, so it is refused anywhere else (portability.py) before ONNX Runtime sees it.

NOT EXECUTED: TensorRT cannot be installed where kiln is built and tested (its libraries are on no
registry those machines reach), so no plan has been built or run. The settings, the context model (which
ONNX Runtime parses and checks against the EPContext schema) and the refusals are tested; the build
test skips without `tensorrt`. With the engine cache on, builds of one target share its timing cache
(in the cache's timing/ folder); without it, a build keeps its own in the engine directory.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from kiln.targets.align import Alignment
from kiln.targets.base import Target
from kiln.targets.gpu import fingerprint
from kiln.targets.manifest import BuildConfig, EngineError, write_manifest
from kiln.targets.ort import graph_specs
from kiln.targets.ort_tensorrt import qdq_format
from kiln.targets.profile import Profile
from kiln.targets.versions import runtime_versions

if TYPE_CHECKING:  # onnx is imported where a build needs it
    import onnx

PLAN = "model.plan"
CONTEXT_MODEL = "model.trt.onnx"  # the plan's ONNX face (see the module's docstring)
TIMING_CACHE = "timing.cache"
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}  # trt.BuilderFlag names


def tensorrt():
    """The tensorrt module, or an EngineError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError("TensorRT is not installed: this target builds and runs TensorRT plans",
                          hint="pip install 'kiln-ml[trt]' on a machine with NVIDIA's TensorRT libraries, "
                               "or use the ONNX Runtime target of this GPU (`kiln targets`)") from None  # fmt: skip
    return trt


@dataclasses.dataclass(frozen=True)
class TrtBuildSettings:
    strongly_typed: bool
    precision_flags: tuple[str, ...]
    profiles: tuple[tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...], ...]  # (input, min, opt, max)
    optimization_level: int
    timing_cache: str | None
    time_limit_s: float | None


def build_settings(graph: onnx.GraphProto, profiles: list[Profile], precision: str, timing_cache: Path | None = None,
                   optimization_level: int = 3, time_limit_s: float | None = None) -> TrtBuildSettings:  # fmt: skip
    """What a build of this graph hands TensorRT. A Q/DQ graph gets a strongly typed network, in which
    precision flags are not allowed (its types say it all)."""
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"TensorRT's builder optimization level is 0 to 5, not {optimization_level}")
    strongly_typed = qdq_format(graph) is not None
    return TrtBuildSettings(
        strongly_typed=strongly_typed,
        precision_flags=() if strongly_typed else PRECISION_FLAGS[precision],
        profiles=tuple(
            tuple((spec.name, *(spec.concrete(p.sizes(c)) for c in ("min", "opt", "max"))) for spec in p.inputs) for p in profiles
        ),
        optimization_level=optimization_level,
        timing_cache=os.fspath(timing_cache) if timing_cache else None,
        time_limit_s=time_limit_s,
    )


def build_plan(model_path: Path, plan_path: Path, settings: TrtBuildSettings) -> None:
    """Build model_path's plan with settings into plan_path (and the timing cache back to its file)."""
    trt = tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {model_path}: {errors}", hint="see which op it names; `kiln targets` lists the ONNX Runtime targets")
    config = builder.create_builder_config()
    for flag in settings.precision_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.builder_optimization_level = settings.optimization_level
    for shapes in settings.profiles:
        profile = builder.create_optimization_profile()
        for name, low, opt, high in shapes:
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _deadline(trt, settings.time_limit_s) if settings.time_limit_s else None
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        why = f"the build passed its {settings.time_limit_s:g} s limit" if monitor is not None and monitor.expired else "see TensorRT's log above"
        raise EngineError(f"TensorRT could not build {model_path}: {why}", hint="raise --trt-time-limit, or lower the optimization level")
    tmp = plan_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(plan_path)
    if cache_path is not None:  # shared by builds of one target: a temporary name of this build's own
        fd, cache_tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=f".{cache_path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(config.get_timing_cache().serialize()))
        os.replace(cache_tmp, cache_path)


def _deadline(trt, seconds: float):
    """A progress monitor that cancels the build once it has run for seconds."""

    class Deadline(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.end, self.expired = time.monotonic() + seconds, False

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            self.expired = time.monotonic() > self.end
            return not self.expired  # False cancels the build

        def phase_finish(self, phase_name):
            pass

    return Deadline()


def context_model(model: onnx.ModelProto, plan: str, compute_capability: str, tensorrt_version: str) -> onnx.ModelProto:
    """The model ONNX Runtime's TensorRT provider runs a prebuilt plan from: model's inputs and outputs
    around one com.microsoft EPContext node whose ep_cache_context is the plan's file name, relative to
    this model's folder (the provider refuses absolute paths and '..')."""
    import onnx

    weights = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    node = onnx.helper.make_node(
        "EPContext", [v.name for v in inputs], [v.name for v in model.graph.output], name="tensorrt_plan", domain="com.microsoft",
        main_context=1, embed_mode=0, ep_cache_context=plan, source="TensorrtExecutionProvider", ep_sdk_version=tensorrt_version,
        hardware_architecture=compute_capability.replace(".", ""),  # the provider's form: "90" for 9.0
    )  # fmt: skip
    graph = onnx.helper.make_graph([node], "tensorrt_plan", inputs, list(model.graph.output))
    opsets = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", "com.microsoft")]
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    opsets += [onnx.helper.make_opsetid("", default), onnx.helper.make_opsetid("com.microsoft", 1)]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version, producer_name="kiln")


@dataclasses.dataclass(frozen=True)
class TensorRtTarget(Target):
    optimization_level: int = 3  # TensorRT's default; 5 searches longest
    time_limit_s: float | None = None
    # Where timing caches are shared between builds (one file per target and TensorRT version); None:
    # the engine directory, a cache for this build alone.
    timing_cache_dir: Path | None = None
    one_profile: str | None = ("its plan runs through ONNX Runtime's TensorRT provider, which kiln has not run with a plan "
                               "of several profiles")  # fmt: skip

    def available(self) -> str | None:
        try:
            tensorrt()
        except EngineError as exc:
            return exc.message
        if PROVIDERS[0] not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} here lacks {PROVIDERS[0]}, which runs the plans (pip install 'kiln-ml[trt]')"
        return self.other_gpu()

    def timing_cache(self, engine_dir: Path, tensorrt_version: str) -> Path:
        """The timing cache file a build reads and writes back."""
        if self.timing_cache_dir is None:
            return engine_dir / TIMING_CACHE
        return self.timing_cache_dir / f"{self.name}-tensorrt-{tensorrt_version}.cache"

    def build(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str = "fp32",
              alignment: Alignment | None = None) -> BuildConfig:  # fmt: skip
        """The plan, its context model and the manifest (the plan and the timing cache through temporary files)."""
        reason = self.available()
        if reason:
            raise EngineError(f"target {self.name!r} cannot build here: {reason}", hint="`kiln targets` shows what runs here")
        import onnx

        model, version = onnx.load(model_path, load_external_data=False), tensorrt().__version__
        settings = build_settings(model.graph, [profile], precision, self.timing_cache(engine_dir, version), self.optimization_level, self.time_limit_s)
        build_plan(model_path, engine_dir / PLAN, settings)
        machine = fingerprint()
        onnx.save(context_model(model, PLAN, machine["compute_capability"], version), engine_dir / CONTEXT_MODEL)
        config = BuildConfig(
            target=self.name, model=CONTEXT_MODEL, device="cuda", providers=PROVIDERS,
            # TensorRT's own CUDA graph for a static engine: one binding, one shape.
            provider_options={"trt_cuda_graph_enable": "1"} if profile.is_static() else {}, precision=precision,
            tf32=False, cuda_graph=profile.is_static(), profile=profile, inputs=graph_specs(model.graph.input, model.graph.initializer),
            outputs=graph_specs(model.graph.output), alignment=alignment,
            built_with={**runtime_versions(), **machine, "tensorrt": version, "tensorrt_optimization_level": str(self.optimization_level)},
        )  # fmt: skip
        write_manifest(engine_dir, config)
        return config
