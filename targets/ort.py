"""Engines on ONNX Runtime: the session settings are chosen at build time and kept in the manifest."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import onnxruntime as ort

from kiln.targets.align import Alignment
from kiln.targets.base import Target
from kiln.targets.engine import session_options, session_specs
from kiln.targets.manifest import BuildConfig, write_manifest
from kiln.targets.profile import Profile, TensorSpec
from kiln.targets.gpu import fingerprint
from kiln.targets.versions import runtime_versions

# onnx and onnx_ir are imported where a build needs them: a serving replica that only loads engines
# starts without them (onnx_ir pulls in sympy, a few hundred milliseconds).

ENGINE_MODEL = "model.ort.onnx"
# Above this size the optimized model must keep its weights in a side file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30
# Ops whose CUDA kernels cannot be captured in a CUDA graph, and why: an engine holding one runs op by op.
UNCAPTURABLE = {
    ("com.microsoft", "GemmFloat8"): "onnxruntime's GemmFloat8 kernel allocates and frees its cuBLASLt workspace, "
    "and synchronizes the stream, on every call (onnxruntime 1.31)",
}


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
    # ONNX Runtime graph optimizers the engine's sessions leave out, at build and at load.
    disabled_optimizers: tuple[str, ...] = ()

    def available(self) -> str | None:
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            return f"onnxruntime {ort.__version__} here lacks {', '.join(missing)}"
        return self.other_gpu()

    def config(self, profile: Profile, precision: str = "fp32", alignment: Alignment | None = None,
               uncapturable: bool = False) -> BuildConfig:  # fmt: skip
        """The build config for an engine of this target; inputs and outputs are filled in by build()."""
        cuda_graph = self.cuda_graphs and profile.is_static() and not uncapturable
        # fp32 is verified to fp32's tolerance, which TF32 misses (3e-4 on the tiny VAE decoder). Only for
        # fp32: use_tf32=0 also takes cuDNN's fp16 convolutions off the tensor cores (FILM fp16 at 1080p
        # went from 84 to 1009 ms on an H200).
        tf32 = self.device == "cuda" and precision != "fp32"
        options = dict(self.provider_options)
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        if self.device == "cuda" and not tf32:
            options["use_tf32"] = "0"
        return BuildConfig(
            target=self.name, model=ENGINE_MODEL, device=self.device, providers=self.providers,
            provider_options=options, precision=precision, tf32=tf32, cuda_graph=cuda_graph, profile=profile,
            inputs=(), outputs=(), alignment=alignment, disabled_optimizers=self.disabled_optimizers,
        )  # fmt: skip

    def build(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str = "fp32",
              alignment: Alignment | None = None) -> BuildConfig:  # fmt: skip
        config = self.config(profile, precision, alignment, bool(self.device == "cuda" and uncapturable_ops(model_path)))
        # Extended, not "all": layout rewrites are specific to the build machine's CPU, so they are
        # applied again when the engine loads, and the saved model stays portable. No CUDA graph here:
        # this session only writes the optimized model.
        options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        options.optimized_model_filepath = os.fspath(engine_dir / ENGINE_MODEL)
        if _model_bytes(model_path) > EXTERNAL_DATA_BYTES:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", ENGINE_MODEL + ".data"
            )
        first, *rest = config.session_providers()
        first = (first[0], {k: v for k, v in first[1].items() if k != "enable_cuda_graph"})
        session = ort.InferenceSession(os.fspath(model_path), options, providers=[first, *rest], **config.session_kwargs())
        config = dataclasses.replace(
            config,
            inputs=session_specs(session.get_inputs()),
            outputs=session_specs(session.get_outputs()),
            # A GPU engine also records the machine: loading elsewhere is checked against it (portability.py).
            built_with={**runtime_versions(), "session_providers": ",".join(session.get_providers()),
                        **(fingerprint() if self.device == "cuda" else {})},  # fmt: skip
            optimized_at_build=self.device == "cuda",
        )
        if _repeats_names(engine_dir / ENGINE_MODEL):
            # onnxruntime 1.32 names the Casts it inserts inside subgraphs (around float16 ops it has no
            # CPU kernel for) once per subgraph, so the model it writes repeats names and does not load
            # (INVALID_GRAPH). The engine then keeps the model as given, optimized as it loads.
            for path in engine_dir.glob(ENGINE_MODEL + "*"):
                path.unlink()
            _copy_model(model_path, engine_dir)
            config = dataclasses.replace(config, model=model_path.name, optimized_at_build=False)
        write_manifest(engine_dir, config)
        return config


    def deferrable(self) -> bool:
        return self.device == "cuda"

    def defer(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str = "fp32",
              alignment: Alignment | None = None) -> BuildConfig:  # fmt: skip
        """The model as given (ONNX Runtime optimizes it as it loads) and a manifest marked not yet verified."""
        config = dataclasses.replace(self.config(profile, precision, alignment, bool(uncapturable_ops(model_path))), verified=False)
        return write_deferred(model_path, engine_dir, config)


def write_deferred(model_path: Path, engine_dir: Path, config: BuildConfig, machine: dict | None = None) -> BuildConfig:
    """An engine of the model as given (its runtime optimizes it as it loads): model_path's files
    copied, and config with the model's inputs and outputs, this machine's runtime and the GPU (machine)
    where there is one to record."""
    import onnx

    _copy_model(model_path, engine_dir)
    graph = onnx.load(model_path, load_external_data=False).graph
    config = dataclasses.replace(config, model=model_path.name, inputs=graph_specs(graph.input, graph.initializer),
                                 outputs=graph_specs(graph.output), built_with={**runtime_versions(), **(machine or {})})  # fmt: skip
    write_manifest(engine_dir, config)
    return config


def _copy_model(model_path: Path, engine_dir: Path) -> None:
    """model_path and its external data file, if any, into engine_dir."""
    for path in (model_path, *model_path.parent.glob(model_path.name + ".data")):
        shutil.copyfile(path, engine_dir / path.name)


def _repeats_names(model_path: Path) -> bool:
    """Whether two nodes anywhere in the model (subgraphs included) write a value of the same name."""
    import onnx_ir as ir

    names: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(ir.load(model_path).graph):
        for value in node.outputs:
            if value.name in names:
                return True
            names.add(value.name)
    return False


def uncapturable_ops(model_path: Path) -> dict[str, str]:
    """'domain::op' -> why, for each op of the model that a CUDA graph cannot capture."""
    import onnx_ir as ir

    found = {}
    for node in ir.load(model_path).graph:
        why = UNCAPTURABLE.get((node.domain, node.op_type))
        if why:
            found[f"{node.domain}::{node.op_type}"] = why
    return found


def graph_specs(values, initializers=()) -> tuple[TensorSpec, ...]:
    """TensorSpecs of graph inputs (initializers left out) or outputs; a dim the graph leaves unnamed
    gets a name of its own (value_axis), never a size."""
    import onnx

    weights = {t.name for t in initializers}
    specs = []
    for value in values:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else f"{value.name}_{axis}") for axis, d in enumerate(tensor.shape.dim))
        specs.append(TensorSpec(value.name, dtype, dims))
    return tuple(specs)
