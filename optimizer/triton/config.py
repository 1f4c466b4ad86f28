"""A Triton model configuration (config.pbtxt) from a kiln engine's manifest, as Triton's own protobuf
schema (tritonclient's model_config_pb2) holds it: each rule below is one function, tested one by one.

- Names and data types are the engine's own (an fp16-IO engine takes TYPE_FP16).
- A dynamic dim that leads every input and output is Triton's batch: max_batch_size is its max, and the
  dims leave it out. Other dynamic dims are -1, a dim of one size is that size. A static batch is a dim
  like any other (max_batch_size 0).
- dynamic_batching prefers each profile's opt and max batch.
- instance_group: KIND_GPU for an engine on the GPU, KIND_CPU otherwise.
- The ONNX Runtime backend gets the TensorRT accelerator with the options the target gave the provider.
"""

from __future__ import annotations

import dataclasses

from kiln.optimizer.errors import InputError
from kiln.targets.manifest import BuildConfig
from kiln.targets.profile import Profile, base_dim, dim_size

DATA_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
}  # fmt: skip
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# ONNX Runtime's TensorRT provider options under the names Triton's ONNX Runtime backend takes them
# (its README's mapping table); trt_fp16_enable and trt_int8_enable become precision_mode.
TENSORRT_OPTIONS = {
    "trt_max_workspace_size": "max_workspace_size_bytes", "trt_max_partition_iterations": "trt_max_partition_iterations",
    "trt_min_subgraph_size": "trt_min_subgraph_size", "trt_builder_optimization_level": "trt_builder_optimization_level",
    "trt_profile_min_shapes": "trt_profile_min_shapes", "trt_profile_opt_shapes": "trt_profile_opt_shapes",
    "trt_profile_max_shapes": "trt_profile_max_shapes", "trt_cuda_graph_enable": "trt_cuda_graph_enable",
    "trt_layer_norm_fp32_fallback": "trt_layer_norm_fp32_fallback", "trt_sparsity_enable": "trt_sparsity_enable",
    "trt_build_heuristics_enable": "trt_build_heuristics_enable", "trt_auxiliary_streams": "trt_auxiliary_streams",
}  # fmt: skip
# Folders inside the kiln engine directory; Triton's backend would resolve them against the server's
# working directory, so the exported model builds its TensorRT engines afresh where it is served.
CACHE_OPTIONS = {"trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable", "trt_timing_cache_path"}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    backend: str
    instances: int = 1
    batch_wait_us: int = 2000  # how long Triton's dynamic batcher waits to fill a batch


def model_config_pb2():
    from kiln.optimizer.lazy import require

    return require("tritonclient.grpc.model_config_pb2", "triton", "a Triton model configuration")


def refusal(config: BuildConfig, backend: str) -> str | None:
    """Why Triton's backend cannot serve the engine as kiln built it, or None."""
    plan = is_plan(config)
    if backend == "tensorrt" and not plan:
        return f"the engine (target {config.target}) is not a TensorRT plan; its backend is onnxruntime"
    if backend == "onnxruntime" and plan:
        return f"the engine (target {config.target}) is a TensorRT plan, which Triton serves with the tensorrt backend"
    if backend == "onnxruntime" and len(config.profiles) > 1:
        return (f"the engine has {len(config.profiles)} profiles, and Triton's ONNX Runtime backend runs one session "
                "for every shape; kiln's runtime sends each request to its own profile")  # fmt: skip
    if backend == "python" and any(s.dtype == "bfloat16" for s in (*config.inputs, *config.outputs)):
        return "the engine takes or gives bfloat16 tensors, which Triton's Python backend cannot hand over as numpy arrays"
    if unknown := sorted({s.dtype for s in (*config.inputs, *config.outputs)} - set(DATA_TYPES)):
        return f"Triton has no data type for {', '.join(unknown)}"
    return non_leading_batch(config)


def is_plan(config: BuildConfig) -> bool:
    """Whether the engine is a TensorRT plan (the tensorrt target's), not an ONNX model."""
    from kiln.targets.tensorrt import CONTEXT_MODEL

    return config.model == CONTEXT_MODEL


def batch_dim(config: BuildConfig) -> str | None:
    """The dim kiln's runtime stacks requests along (axis 0 of every input and output), if its size
    varies: Triton's batch. None otherwise."""
    from kiln.optimizer.serve.worker import batch_dim as leading_dim

    dim = leading_dim(config)
    limits = config.profile.dims.get(dim) if dim else None
    return dim if limits and limits.min < limits.max else None


def non_leading_batch(config: BuildConfig) -> str | None:
    """Why a dynamic dim that every input and output has cannot be Triton's batch (it is not axis 0 of
    each), or None."""
    tensors = (*config.inputs, *config.outputs)
    for dim, limits in config.profile.dims.items():
        if limits.min == limits.max or not all(dim in [base_dim(d) for d in s.shape if isinstance(d, str)] for s in tensors):
            continue
        if dim == batch_dim(config):
            return None
        spec = next(s for s in tensors if not s.shape or s.shape[0] != dim)
        axis = [base_dim(d) if isinstance(d, str) else d for d in spec.shape].index(dim)
        return (f"the dynamic dim {dim!r}, which every input and output has, is axis {axis} of {spec.name!r}: "
                "Triton batches requests along axis 0 only")  # fmt: skip
    return None


def tensor_dims(shape, profile: Profile, batched: bool) -> list[int]:
    """Triton's dims of a tensor: the batch left out, a dim of one size that size, every other -1."""
    fixed = {d: r.min for d, r in profile.dims.items() if r.min == r.max}
    sized = [dim_size(d, fixed) if isinstance(d, str) and base_dim(d) in fixed else d for d in shape[1 if batched else 0 :]]
    return [d if isinstance(d, int) else -1 for d in sized]


def preferred_batches(config: BuildConfig, dim: str) -> list[int]:
    """Each profile's opt and max of the batch dim, smallest first."""
    profiles = config.profiles or (config.profile,)
    return sorted({getattr(p.dims[dim], corner) for p in profiles if dim in p.dims for corner in ("opt", "max")})


def tensorrt_accelerator(config: BuildConfig) -> dict[str, str]:
    """Triton's parameters of the tensorrt accelerator for the options the target gave ONNX Runtime's
    TensorRT provider; an option Triton's backend does not take refuses the export."""
    options = dict(config.provider_options)
    int8, fp16 = options.pop("trt_int8_enable", "0") == "1", options.pop("trt_fp16_enable", "0") == "1"
    params = {"precision_mode": "INT8" if int8 else "FP16" if fp16 else "FP32"}
    for key, value in sorted(options.items()):
        if key in CACHE_OPTIONS:
            continue
        if key not in TENSORRT_OPTIONS:
            raise InputError(f"the engine's TensorRT provider option {key}={value} has no counterpart in Triton's ONNX Runtime backend",
                             hint="export it with --backend python, which runs the engine with kiln's runtime")  # fmt: skip
        params[TENSORRT_OPTIONS[key]] = value
    return params


def model_config(name: str, config: BuildConfig, options: ExportOptions, filenames: dict[str, str] | None = None):
    """The ModelConfig message of the engine under name; filenames: compute capability -> plan file, for
    plans built for several GPUs."""
    if why := refusal(config, options.backend):
        own = "tensorrt" if is_plan(config) else "onnxruntime"
        hint = (f"leave --backend out: the engine's own is {own}" if options.backend not in ("python", own)
                else "export it with --backend python, which runs it with kiln's runtime" if options.backend != "python" else None)  # fmt: skip
        raise InputError(f"Triton cannot serve this engine with the {options.backend} backend: {why}", hint=hint)
    pb = model_config_pb2()
    message = pb.ModelConfig(name=name)
    if options.backend == "python":
        message.backend = "python"
    else:
        message.platform = "onnxruntime_onnx" if options.backend == "onnxruntime" else "tensorrt_plan"
    dim = batch_dim(config)
    message.max_batch_size = config.profile.dims[dim].max if dim else 0
    for specs, field in ((config.inputs, message.input), (config.outputs, message.output)):
        for spec in specs:
            field.add(name=spec.name, data_type=pb.DataType.Value(DATA_TYPES[spec.dtype]), dims=tensor_dims(spec.shape, config.profile, dim is not None))
    if dim:
        message.dynamic_batching.preferred_batch_size.extend(preferred_batches(config, dim))
        message.dynamic_batching.max_queue_delay_microseconds = options.batch_wait_us
    gpu = config.device == "cuda"
    group = pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if gpu else "KIND_CPU")
    message.instance_group.add(kind=group, count=options.instances)
    if options.backend == "onnxruntime" and config.providers[0] == TENSORRT_PROVIDER:
        accelerator = message.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update(tensorrt_accelerator(config))
    if filenames:
        message.cc_model_filenames.update(filenames)
    return message


def config_text(message) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(message)


def parse_config(text: str):
    """A config.pbtxt read with Triton's schema: a field Triton does not know raises ParseError."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())
