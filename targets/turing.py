"""Turing (sm 7.5): the T4. Figures from NVIDIA's "T4 Tensor Core GPU" datasheet
(nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf):
"Mixed-Precision (FP16/FP32) 65 TFLOPS", "INT8 130 TOPS", "Single-Precision 8.1 TFLOPS", "16 GB GDDR6",
"300 GB/sec". Turing has no sparsity, so these are dense. No bf16, no FP8.
Prices: AWS on-demand, Linux, us-east-1, as copied by SkyPilot's catalog (skypilot-org/skypilot-catalog,
catalogs/v8/aws/vms.csv, a 2026 snapshot: it lists g7e and has AWS's June 2025 P4/P5 price cut).
"""

from kiln.targets.hardware import GPU, Price

T4 = GPU(
    name="t4", label="NVIDIA T4", architecture="Turing", device_pattern=r"\bT4\b", compute_capability=(7, 5),
    memory_gb=16, bandwidth_gb_s=300, peak_tflops={"fp32": 8.1, "fp16": 65, "int8": 130},
    price=Price(0.526, "AWS g4dn.xlarge (1 GPU), on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

GPUS = (T4,)
