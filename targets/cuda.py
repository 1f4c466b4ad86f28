"""NVIDIA GPUs through ONNX Runtime's CUDA execution provider (onnxruntime-gpu, the [gpu] extra).

`cuda` is the family; a target for one GPU model inherits it and sets what matters on that GPU.
The engine takes and returns host arrays; kiln's GPU benchmarks bind device buffers themselves.
"""

import dataclasses

from targets.ort import OrtTarget

CUDA = OrtTarget(
    name="cuda",
    family="cuda",
    description="ONNX Runtime CUDA execution provider (any recent NVIDIA GPU)",
    precisions=("fp32", "fp16"),
    capabilities=("dynamic-shapes", "contrib-ops", "ort-fusions", "external-data"),
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    # Exhaustive search times every cuDNN convolution algorithm once per shape: slow first run, fastest after.
    provider_options=(("cudnn_conv_algo_search", "EXHAUSTIVE"),),
)

H100 = dataclasses.replace(
    CUDA,
    name="h100",
    description="NVIDIA H100 (Hopper) through ONNX Runtime CUDA; fp16 uses its tensor cores",
    # The H100 has 80 GB: let the arena grow by what each request needs, not by doubling.
    provider_options=(*CUDA.provider_options, ("arena_extend_strategy", "kSameAsRequested")),
)
