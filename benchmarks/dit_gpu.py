"""DiT-XL/2 on one GPU, every runner side by side in one process.

    python benchmarks/dit_gpu.py [--runs 20] [--profile]

Runners: torch eager bf16, torch.compile bf16, ONNX Runtime CUDA fp32 on kiln's export, ONNX Runtime's
transformers optimizer (model_type "mmdit", fp16), and kiln's h100 target in fp16 and bf16: dynamic
shapes (one engine for both cases) and static (shapes frozen per case, run as one CUDA graph).

Random weights at real size (28 layers, hidden 1152, 16 heads, patch 2), 256² batch 8 (latent 32) and
512² batch 2 (latent 64). Every runner reads device-resident inputs and writes device-resident outputs.
The table gives the median, the speed-up against the fastest baseline (non-kiln runner) of the case, and
the max relative error against torch fp32 with TF32 off. --profile adds the top CUDA kernels of kiln's
dynamic fp16 engine at 256² b8 (torch's profiler sees ONNX Runtime's kernels too).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import baseline_engine, kiln_engine, print_table, profile_kernels, rel_err  # noqa: E402
from kiln.optimizer.bench import median_ms  # noqa: E402

CASES = {"256² b8": (8, 32), "512² b2": (2, 64)}


def dit_xl_2():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip


def export_dit(model, work: Path):
    """kiln's diffusers export with dynamic batch and latent size; returns (path, dim ranges)."""
    from kiln.optimizer.importers.diffusers import export
    from kiln.optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges

    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [("bench", "batch=1..2..8"), ("bench", "height=32..64")])
    path = work / "dit.onnx"
    start = time.perf_counter()
    record = export(model, adapter, ranges, path)
    print(f"kiln export: {record['exporter']} exporter, {time.perf_counter() - start:.0f} s")
    return path, ranges


def ort_transformers_fp16(raw: Path, work: Path) -> Path:
    """ONNX Runtime's own transformers optimizer, as its docs run it for MMDiT models, then fp16."""
    from onnxruntime.transformers.optimizer import optimize_model

    start = time.perf_counter()
    optimized = optimize_model(str(raw), model_type="mmdit", num_heads=16, hidden_size=1152, opt_level=0, use_gpu=True)
    optimized.convert_float_to_float16(keep_io_types=True)
    path = work / "ort_transformers_fp16.onnx"
    optimized.save_model_to_file(str(path), use_external_data_format=True)
    print(f"ORT transformers optimizer: {time.perf_counter() - start:.0f} s, ops {optimized.get_operator_statistics()}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of kiln's fp16 engine")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (about a minute per case)")
    parser.add_argument("--case", choices=list(CASES), action="append", help="run only these cases (default: all)")
    parser.add_argument("--precisions", default="fp16,bf16", help="kiln precisions to build (default fp16,bf16)")
    parser.add_argument("--kiln-only", action="store_true", help="skip the torch and ONNX Runtime baselines")
    args = parser.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort

    from kiln.targets import H100, DimRange

    ort.preload_dlls()
    ort.set_default_logger_severity(3)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(tempfile.mkdtemp(prefix="kiln-dit-"))

    model = dit_xl_2()
    print(f"DiT-XL/2: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    raw, ranges = export_dit(model, work)
    sessions = {} if args.kiln_only else {
        "ORT CUDA fp32 (kiln export)": ort.InferenceSession(str(raw), providers=["CUDAExecutionProvider"]),
        "ORT transformers optimizer fp16": ort.InferenceSession(str(ort_transformers_fp16(raw, work)), providers=["CUDAExecutionProvider"]),
    }  # fmt: skip
    engines = {}
    precisions = args.precisions.split(",")
    for precision in precisions:
        try:
            engines[f"kiln h100 {precision} dynamic"], records = kiln_engine(ir.load(raw), work / f"dyn-{precision}", H100, precision, ranges)
            print(f"  fusions: {next(r.stats for r in records if r.name == 'ort-fusions')}")
        except Exception as exc:  # report a precision ORT cannot run, and go on
            print(f"  kiln h100 {precision} dynamic failed: {type(exc).__name__}: {str(exc)[:300]}")

    fp32 = model.cuda()
    rows = []
    for label, (batch, latent) in CASES.items():
        if args.case and label not in args.case:
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, 4, latent, latent, device="cuda", generator=g)
        t = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
        c = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
        feeds = {"hidden_states": x.cpu().numpy(), "timestep": t.cpu().numpy(), "class_labels": c.cpu().numpy()}
        with torch.no_grad():
            want = fp32(x, timestep=t, class_labels=c, return_dict=False)[0].cpu().numpy()

        bf16 = dit_xl_2().to("cuda", torch.bfloat16)
        bf16.load_state_dict(fp32.state_dict())
        with torch.no_grad():
            torch_runners = {} if args.kiln_only else {"torch eager bf16": bf16}
            if not (args.no_compile or args.kiln_only):
                torch_runners["torch.compile bf16"] = torch.compile(bf16)
            for name, module in torch_runners.items():
                def call(module=module):
                    out = module(x.bfloat16(), timestep=t, class_labels=c, return_dict=False)[0]
                    torch.cuda.synchronize()
                    return out
                start = time.perf_counter()
                out = call()
                print(f"{label}: {name} first run {time.perf_counter() - start:.0f} s")
                rows.append((label, name, median_ms(call, args.runs), rel_err(out.float().cpu().numpy(), want)))
        del bf16, torch_runners
        torch.cuda.empty_cache()

        for name, session in sessions.items():
            engine = baseline_engine(session)
            rows.append((label, name, median_ms(engine.device_runner(feeds), args.runs), rel_err(engine.run(feeds)["sample"], want)))
        variants = dict(engines)
        for precision in precisions:
            static = {"batch": DimRange(batch, batch, batch), "height": DimRange(latent, latent, latent)}
            try:
                variants[f"kiln h100 {precision} static (CUDA graph)"], _ = kiln_engine(
                    ir.load(raw), work / f"static-{precision}-{batch}", H100, precision, static)
            except Exception as exc:
                print(f"  kiln h100 {precision} static failed: {type(exc).__name__}: {str(exc)[:300]}")
        for name, engine in variants.items():
            try:
                rows.append((label, name, median_ms(engine.device_runner(feeds), args.runs), rel_err(engine.run(feeds)["sample"], want)))
            except Exception as exc:
                print(f"  {name} failed at {label}: {type(exc).__name__}: {str(exc)[:300]}")
        if args.profile and label == "256² b8" and "kiln h100 fp16 dynamic" in engines:
            profile_kernels("kiln dynamic fp16, 256² b8", engines["kiln h100 fp16 dynamic"].device_runner(feeds))
        print_table(rows)  # so far, in case a later case fails
    print("\nFinal table")
    print_table(rows)


if __name__ == "__main__":
    main()
