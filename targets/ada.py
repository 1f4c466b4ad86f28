"""Ada Lovelace (sm 8.9): the L4 and the L40S, the first with FP8 tensor cores. Dense figures: NVIDIA's
tables give sparse ones (marked *), twice these.

- L4: "NVIDIA L4 Tensor Core GPU" datasheet (nvidia.com/en-us/data-center/l4/): "FP16 Tensor Core 242
  teraFLOPS*", "FP8 Tensor Core 485 teraFLOPS*", "INT8 485 TOPS*", "FP32 30.3 teraFLOPS", "24GB",
  "300GB/s" ("*Shown with sparsity. Specifications are one-half lower without sparsity").
- L40S: "NVIDIA L40S" datasheet (nvidia.com/en-us/data-center/l40s/): "FP16 Tensor Core 362.05 | 733*",
  "FP8 Tensor Core 733 | 1,466*", "INT8 733 | 1,466*", "FP32 91.6 TFLOPS", "48 GB GDDR6", "864GB/s".
Prices: AWS on-demand, Linux, us-east-1, via SkyPilot's catalog (see turing.py).
"""

from kiln.targets.hardware import GPU, Price

L4 = GPU(
    name="l4", label="NVIDIA L4", architecture="Ada Lovelace", device_pattern=r"\bL4\b", compute_capability=(8, 9),
    memory_gb=24, bandwidth_gb_s=300, peak_tflops={"fp32": 30.3, "fp16": 121, "bf16": 121, "int8": 242.5, "fp8": 242.5},
    price=Price(0.8048, "AWS g6.xlarge (1 GPU), on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

L40S = GPU(
    name="l40s", label="NVIDIA L40S", architecture="Ada Lovelace", device_pattern=r"\bL40S\b", compute_capability=(8, 9),
    memory_gb=48, bandwidth_gb_s=864, peak_tflops={"fp32": 91.6, "fp16": 362.05, "bf16": 362.05, "int8": 733, "fp8": 733},
    price=Price(1.861, "AWS g6e.xlarge (1 GPU), on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

GPUS = (L4, L40S)
