"""Blackwell: the B200 (sm 10.0) and the RTX PRO 6000 Blackwell Server Edition (sm 12.0), the first
with FP4 tensor cores. Dense figures.

- B200, per GPU of an HGX B200: NVIDIA's HGX page (nvidia.com/en-us/data-center/hgx/) gives 8 GPUs
  "FP16/BF16 Tensor Core* 36 PFLOPS", "FP8 Tensor Core* 72 PFLOPS", "FP4 Tensor Core 144 | 72 PFLOPS"
  (* sparse) and "1.4TB" of memory; NVIDIA's exemplar-performance README lists B200's non-sparse peaks
  as "BF16 2250 | FP8 4500 | NVFP4 9000" and its reference architecture 180 GB and 7.7 TB/s per GPU.
  FP32 (75 TFLOPS) is the HGX figure / 8.
- RTX PRO 6000 Blackwell Server Edition: its datasheet (nvidia.com/en-us/data-center/rtx-pro-6000-
  blackwell-server-edition/) gives "96 GB GDDR7", "1597 GB/s" and 120 FP32 TFLOPS; its tensor figures
  (about 1 PFLOPS FP16, 2 FP8, 4 FP4) are sparse, so these are half of them, derived, not printed.
Prices: AWS on-demand, Linux, us-east-1, via SkyPilot's catalog (see turing.py).
"""

from kiln.targets.hardware import GPU, Price

B200 = GPU(
    name="b200", label="NVIDIA B200", architecture="Blackwell", device_pattern=r"\bB200\b", compute_capability=(10, 0),
    memory_gb=180, bandwidth_gb_s=7700,
    peak_tflops={"fp32": 75, "fp16": 2250, "bf16": 2250, "int8": 4500, "fp8": 4500, "fp4": 9000},
    price=Price(14.2416, "AWS p6-b200.48xlarge (8 GPUs) $113.93 / 8, on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

RTX_PRO_6000 = GPU(
    name="rtx-pro-6000", label="NVIDIA RTX PRO 6000 Blackwell Server Edition", architecture="Blackwell",
    device_pattern=r"RTX PRO 6000 Blackwell Server Edition", compute_capability=(12, 0), memory_gb=96, bandwidth_gb_s=1597,
    peak_tflops={"fp32": 120, "fp16": 500, "bf16": 500, "int8": 1000, "fp8": 1000, "fp4": 2000},
    price=Price(3.363, "AWS g7e.2xlarge (1 GPU), on demand, us-east-1, via SkyPilot's catalog", "2026"),
)  # fmt: skip

GPUS = (B200, RTX_PRO_6000)
