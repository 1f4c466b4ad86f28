"""A GPU model as data: what its datasheet promises and what an hour of it costs.

The entries live in one module per architecture (turing, ampere, ada, hopper, blackwell), each figure
with its source. A GPU becomes targets with `gpu_targets`: the CUDA target with the GPU's precisions,
quantization formats and memory settings, and its TensorRT variant, so a new GPU is a new entry, not new code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

# The first compute capability whose tensor cores run each format fast.
FAST_FROM = {"fp16": (7, 0), "int8": (7, 5), "bf16": (8, 0), "fp8": (8, 9), "fp4": (10, 0)}


@dataclasses.dataclass(frozen=True)
class Price:
    usd_per_hour: float  # one GPU, on demand
    source: str  # provider, instance and region, and how the per-GPU figure was derived
    date: str  # when the source gave this price (a year, or YYYY-MM)


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str  # the target's name: "h100"
    label: str  # "NVIDIA H100 SXM5 80GB"
    architecture: str
    device_pattern: str  # a regular expression matching the CUDA device name ("NVIDIA H100 80GB HBM3")
    compute_capability: tuple[int, int]
    memory_gb: float
    bandwidth_gb_s: float
    # Peak dense tensor-core TFLOP/s (TOP/s for int8) per format, from the datasheet; fp32 is the
    # non-tensor rate, the one an fp32 engine runs at with TF32 off (kiln's fp32 default).
    peak_tflops: Mapping[str, float]
    price: Price

    @property
    def fast_precisions(self) -> tuple[str, ...]:
        """The formats its tensor cores run: bf16 from sm80, FP8 from sm89, FP4 from sm100."""
        return tuple(f for f, cc in FAST_FROM.items() if self.compute_capability >= cc)

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def matches(self, device_name: str) -> bool:
        return re.search(self.device_pattern, device_name) is not None

    def peak_flops(self, fmt: str) -> float:
        """Peak FLOP/s for a compute format."""
        tflops = self.peak_tflops.get(fmt)
        if tflops is None:
            raise KeyError(f"{self.label} has no {fmt} peak: it does not run {fmt} fast")
        return tflops * 1e12

    def describe(self) -> dict:
        return {
            "gpu": self.label, "architecture": self.architecture, "compute_capability": self.sm,
            "memory_gb": self.memory_gb, "bandwidth_gb_s": self.bandwidth_gb_s, "peak_tflops": dict(self.peak_tflops),
            "fast_precisions": list(self.fast_precisions), "usd_per_hour": self.price.usd_per_hour,
            "price_source": self.price.source, "price_date": self.price.date,
        }  # fmt: skip


def gpu_targets(gpu: GPU) -> tuple:
    """gpu's targets: `NAME` (ONNX Runtime CUDA: the `cuda` target narrowed to what the GPU runs fast),
    `NAME-trt` (a TensorRT plan built by kiln) and `NAME-ort-trt` (ONNX Runtime's TensorRT provider
    building its own); both TensorRT ones take standard ONNX ops only."""
    from kiln.targets.cuda import CUDA
    from kiln.targets.ort_tensorrt import OrtTensorRtTarget
    from kiln.targets.tensorrt import TensorRtTarget

    fast = gpu.fast_precisions
    cuda = dataclasses.replace(
        CUDA,
        name=gpu.name,
        description=f"{gpu.label} ({gpu.architecture}, sm {gpu.sm}) through ONNX Runtime CUDA",
        precisions=("fp32", *(p for p in ("fp16", "bf16") if p in fast)),
        capabilities=tuple(c for c in CUDA.capabilities if c != "fp8-gemm" or "fp8" in fast),
        quantize=tuple(q for q in ("int8", "fp8") if q in fast),
        # One model per GPU: let the arena grow by what each request needs, not by doubling.
        provider_options=(*CUDA.provider_options, ("arena_extend_strategy", "kSameAsRequested")),
        gpu=gpu,
    )
    ort_trt = OrtTensorRtTarget(
        name=f"{gpu.name}-ort-trt", family="tensorrt", description=f"{gpu.label} through ONNX Runtime's TensorRT provider (never run: see README)",
        # INT8 only: ONNX Runtime has no FP8 flag for TensorRT, and nothing here has run.
        precisions=cuda.precisions, capabilities=("dynamic-shapes", "external-data", "io-binding"), quantize=("int8",),
        gpu=gpu, providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), device="cuda",
    )  # fmt: skip
    trt = TensorRtTarget(
        name=f"{gpu.name}-trt", family="tensorrt", description=f"{gpu.label} as a TensorRT plan (never run: see README)",
        # FP8 too: a strongly typed network takes FP8 Q/DQ as the graph has it.
        precisions=cuda.precisions, capabilities=("dynamic-shapes", "io-binding"), quantize=cuda.quantize, gpu=gpu,
    )  # fmt: skip
    return cuda, trt, ort_trt
