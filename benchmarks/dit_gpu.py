"""DiT-XL/2 on one GPU: torch eager bf16, torch.compile bf16, ONNX Runtime CUDA fp32 on kiln's export, and
kiln's h100 target in fp16 (cleanup, ONNX Runtime fusions, fp16 conversion).

    python benchmarks/dit_gpu.py [--runs 20]

Random weights at real size (28 layers, hidden 1152, 16 heads, patch 2; 675M parameters), 256² batch 8
(latent 32) and 512² batch 2 (latent 64). kiln exports once through its diffusers importer with dynamic
batch and latent size, and the same ONNX file serves both shapes. Every runner gets device-resident
inputs; the table gives the median and the max relative error of each runner's output against torch fp32
(TF32 off). ORT runs with its CUDA EP defaults (TF32 allowed for fp32 matmuls, as cuBLAS does).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASES = {"256² b8": (8, 32), "512² b2": (2, 64)}


def dit_xl_2():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip


def cuda_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return float(np.median(samples))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    import onnxruntime as ort

    import onnx_ir as ir

    from optimizer.importers.diffusers import export
    from optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges
    from passes import ConvertToFloat16, FuseForOnnxRuntime, PassManager, cleanup_passes
    from targets import H100

    ort.preload_dlls()
    ort.set_default_logger_severity(3)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    model = dit_xl_2()
    print(f"DiT-XL/2: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [("bench", "batch=1..2..8"), ("bench", "height=32..64")])
    onnx_path = Path(tempfile.mkdtemp(prefix="kiln-dit-")) / "dit.onnx"
    start = time.perf_counter()
    record = export(model, adapter, ranges, onnx_path)
    print(f"kiln export: {record['exporter']} exporter, {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    sessions = {"ORT CUDA fp32 (kiln export)": ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])}
    print(f"ORT CUDA session: {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    fp16_path = onnx_path.with_name("dit_fp16.onnx")
    model_ir, records = PassManager([*cleanup_passes(), FuseForOnnxRuntime(), ConvertToFloat16()]).run(ir.load(onnx_path))
    ir.save(model_ir, fp16_path, external_data=fp16_path.name + ".data")
    del model_ir
    fused = next(r for r in records if r.name == "ort-fusions").stats
    sessions["kiln h100 fp16"] = ort.InferenceSession(str(fp16_path), providers=H100.session_providers())
    print(f"kiln passes (fusions {fused}) and fp16 session: {time.perf_counter() - start:.0f} s")

    fp32 = model.cuda()
    rows = []
    for label, (batch, latent) in CASES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, 4, latent, latent, device="cuda", generator=g)
        t = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
        c = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
        with torch.no_grad():
            want = fp32(x, timestep=t, class_labels=c, return_dict=False)[0]
        results = {}
        bf16 = dit_xl_2().to("cuda", torch.bfloat16)
        bf16.load_state_dict(fp32.state_dict())
        with torch.no_grad():
            eager = lambda: bf16(x.bfloat16(), timestep=t, class_labels=c, return_dict=False)[0]  # noqa: E731
            results["torch eager bf16"] = (cuda_ms(eager, args.runs), rel_err(eager(), want))
            compiled_model = torch.compile(bf16)
            compiled = lambda: compiled_model(x.bfloat16(), timestep=t, class_labels=c, return_dict=False)[0]  # noqa: E731
            start = time.perf_counter()
            compiled()
            print(f"{label}: torch.compile took {time.perf_counter() - start:.0f} s")
            results["torch.compile bf16"] = (cuda_ms(compiled, args.runs), rel_err(compiled(), want))
        del bf16, compiled_model
        torch.cuda.empty_cache()

        for name, session in sessions.items():
            binding = session.io_binding()
            for input_name, tensor in (("hidden_states", x), ("timestep", t), ("class_labels", c)):
                tensor = tensor.contiguous()
                binding.bind_input(input_name, "cuda", 0, {torch.float32: np.float32, torch.int64: np.int64}[tensor.dtype],
                                   list(tensor.shape), tensor.data_ptr())  # fmt: skip
            out = torch.empty_like(want)
            binding.bind_output("sample", "cuda", 0, np.float32, list(out.shape), out.data_ptr())
            ms = cuda_ms(lambda: session.run_with_iobinding(binding), args.runs)  # noqa: B023
            session.run_with_iobinding(binding)
            torch.cuda.synchronize()
            results[name] = (ms, rel_err(out, want))
        fastest = min(ms for ms, _ in results.values())
        rows += [(label, name, ms, ms / fastest, err) for name, (ms, err) in results.items()]

    print("\n| case | runner | median ms | vs fastest | max rel err vs torch fp32 |\n|---|---|---|---|---|")
    for label, name, ms, ratio, err in rows:
        print(f"| {label} | {name} | {ms:.2f} | {ratio:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
