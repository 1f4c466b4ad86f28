"""NVIDIA GPUs through ONNX Runtime's CUDA execution provider (onnxruntime-gpu, the [gpu] extra).

`cuda` is the family, for any NVIDIA GPU; the per-GPU targets (hardware.gpu_target) narrow it to one model.
The engine binds its inputs and outputs to GPU buffers (IO binding); with a static profile it captures
the whole run as one CUDA graph, and `kiln bench` times it on device-resident inputs.
"""

from kiln.targets.ort import OrtTarget

CUDA = OrtTarget(
    name="cuda",
    family="cuda",
    description="ONNX Runtime CUDA execution provider (any recent NVIDIA GPU)",
    precisions=("fp32", "fp16", "bf16"),
    capabilities=("dynamic-shapes", "contrib-ops", "ort-fusions", "external-data", "cuda-graphs", "io-binding", "fp8-gemm"),
    quantize=("int8", "fp8"),
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    device="cuda",
    cuda_graphs=True,
    # cuDNN's heuristic choice of each convolution's algorithm, not the exhaustive search that times them all
    # on the first run: FILM at 1080p fp16 on an H100 started in 2.5 s instead of 7.8 s, and ran 96 ms a
    # frame instead of 100 (benchmarks/cold_start.py --heuristic; the VAE decoders were not re-measured).
    provider_options=(("cudnn_conv_algo_search", "HEURISTIC"),),
    # MatMulAddFusion turns a 3-D MatMul + Add into Reshape, Gemm, Reshape, and the CUDA Gemm first writes its
    # bias into the output in a kernel of its own (BroadcastBiasKernel); left as MatMul + Add, the bias add
    # is cheaper: Flux 2+4 blocks at 1024² went from 17.84 to 17.06 ms, Wan 2.1 1.3B at 480x832x33f from
    # 163.8 to 157.8 ms (an H100, onnxruntime-gpu 1.31.1, benchmarks/diffusers_gpu.py --ort-disable).
    disabled_optimizers=("MatMulAddFusion",),
)
