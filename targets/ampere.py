"""Ampere: the A10G (sm 8.6) and the A100 (sm 8.0). Datasheet figures are dense (NVIDIA marks the
sparse ones with *, twice these).

- A100 SXM4 80GB: "NVIDIA A100 Tensor Core GPU" datasheet (nvidia.com/content/dam/en-zz/Solutions/
  Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): "FP16 Tensor Core 312 TFLOPS |
  624 TFLOPS*", "BFLOAT16 Tensor Core 312 TFLOPS", "INT8 Tensor Core 624 TOPS", "FP32 19.5 TFLOPS",
  "80GB HBM2e", "2,039GB/s".
- A10G: NVIDIA publishes no A10G datasheet. These are the A10's ("NVIDIA A10 Tensor Core GPU" datasheet,
  nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf: "FP16 Tensor Core 125 TF",
  "INT8 Tensor Core 250 TOPS", "FP32 31.2 TF", "24 GB GDDR6", "600 GB/s"); the A10G shares its memory
  and bandwidth (AWS; Baseten's "NVIDIA A10 vs A10G"), but third parties put its tensor rate nearer
  70 TFLOP/s, so compute-bound estimates for it are optimistic.
The A100 40GB and the PCIe cards have other bandwidths: no entry matches them (the generic cuda target).
Prices: AWS on-demand, Linux, us-east-1, via SkyPilot's catalog (see turing.py); per GPU = instance / GPUs.
"""

from kiln.targets.hardware import GPU, Price

A10G = GPU(
    name="a10g", label="NVIDIA A10G", architecture="Ampere", device_pattern=r"\bA10G\b", compute_capability=(8, 6),
    memory_gb=24, bandwidth_gb_s=600, peak_tflops={"fp32": 31.2, "fp16": 125, "bf16": 125, "int8": 250},
    price=Price(1.006, "AWS g5.xlarge (1 GPU), on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

A100 = GPU(
    name="a100", label="NVIDIA A100 SXM4 80GB", architecture="Ampere", device_pattern=r"\bA100-SXM4-80GB\b", compute_capability=(8, 0),
    memory_gb=80, bandwidth_gb_s=2039, peak_tflops={"fp32": 19.5, "fp16": 312, "bf16": 312, "int8": 624},
    price=Price(3.431, "AWS p4de.24xlarge (8 GPUs, 80 GB) $27.447 / 8, on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

GPUS = (A10G, A100)
