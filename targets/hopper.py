"""Hopper (sm 9.0): the H100 and the H200, one chip with the same tensor-core peak; the H200 has 141 GB
of faster memory. Dense figures: NVIDIA's tables give sparse ones (*), twice these.

- H100 SXM5: "NVIDIA H100 Tensor Core GPU" datasheet (resources.nvidia.com/en-us-tensor-core/
  nvidia-tensor-core-gpu-datasheet): "FP16 Tensor Core* 1,979 teraFLOPS", "FP8 Tensor Core* 3,958",
  "INT8 Tensor Core* 3,958 TOPS", "FP32 67 teraFLOPS", "80GB", "3.35TB/s".
- H200 SXM: NVIDIA's H200 page (nvidia.com/en-us/data-center/h200/): "FP16 Tensor Core 1,979 TFLOPS²",
  "FP8 Tensor Core 3,958 TFLOPS²" (² with sparsity), "FP32 67 TFLOPS", "141GB", "4.8TB/s".
The H100 PCIe and NVL and the H200 NVL have other peaks and bandwidths: no entry matches them, so they get
the generic cuda target and no cost figures.
Prices: AWS on-demand, Linux, us-east-1, via SkyPilot's catalog (see turing.py), after AWS's June 2025 cut.
"""

from kiln.targets.hardware import GPU, Price

H100 = GPU(
    name="h100", label="NVIDIA H100 SXM5 80GB", architecture="Hopper", device_pattern=r"\bH100\b(?!.*\b(PCIe|NVL)\b)", compute_capability=(9, 0),
    memory_gb=80, bandwidth_gb_s=3350, peak_tflops={"fp32": 67, "fp16": 989.5, "bf16": 989.5, "int8": 1979, "fp8": 1979},
    price=Price(6.88, "AWS p5.48xlarge (8 GPUs) $55.04 / 8, on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

H200 = GPU(
    name="h200", label="NVIDIA H200 SXM 141GB", architecture="Hopper", device_pattern=r"\bH200\b(?!.*\bNVL\b)", compute_capability=(9, 0),
    memory_gb=141, bandwidth_gb_s=4800, peak_tflops={"fp32": 67, "fp16": 989.5, "bf16": 989.5, "int8": 1979, "fp8": 1979},
    price=Price(7.912, "AWS p5en.48xlarge (8 GPUs) $63.296 / 8, on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

GPUS = (H100, H200)
