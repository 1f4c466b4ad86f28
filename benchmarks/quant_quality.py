"""Quantization on the CPU: quality on the trained example DiT and on random weights, and INT8 speed.

    python benchmarks/quant_quality.py [--speed-runs 20] [--skip-speed]

Quality: the dit-trained example (trained by kiln, shipped: `kiln example dit-trained`) and the same architecture
with seeded random weights, each imported by kiln and built for the cpu target at 2x4x16x16 through
build_engine (as `kiln optimize` builds), calibrated along sampling loops. For every setting, the final
latents of 16 seeded samples (8 DDIM steps; the same noise and labels for every engine) against the fp32
model and against kiln's fp16 engine: PSNR, SSIM, relative L2. FP8 runs here as its Q/DQ graph
(E4M3 storage, dequantized before fp32 arithmetic): the same numbers an FP8 GEMM gives up to
accumulation order; kiln's own cpu target refuses FP8 because it would gain nothing.

Speed: DiT-S/2 (12 layers, width 384, random weights) at 256² batch 1 (latents 4x32x32), kiln's fp32
engine against its INT8 engines (ONNX Runtime's and kiln's Q/DQ), median of --speed-runs, side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kiln.calibration import quality
from kiln.optimizer.build import build_engine
from kiln.optimizer.calibrate import calibration_set
from kiln.optimizer.quality import QUALITY_SEED_OFFSET
from kiln.optimizer.sampling import quality_loops, sample_loop, timestep_dtype
from kiln.optimizer.config import Options
from kiln.optimizer.importers import import_model
from kiln.optimizer.onnx_files import load_model
from kiln.optimizer.shapes import input_specs
from kiln.optimizer.verify import reference_session, run_session
from kiln.targets import CPU, DimRange, Profile

SETTINGS = {
    "INT8 (ort, entropy)": dict(quantize="int8"),
    "INT8 + SmoothQuant 0.5": dict(quantize="int8", smoothquant=0.5),
    "INT8 + --quality psnr>=35": dict(quantize="int8", quality="psnr>=35"),
    "FP8 (kiln Q/DQ, per-channel weights)": dict(quantize="fp8", quant_backend="kiln"),
    "FP8 + --quality psnr>=30": dict(quantize="fp8", quant_backend="kiln", quality="psnr>=30"),
}


def imported(directory: Path, work: Path) -> tuple[Path, dict]:
    work.mkdir(parents=True, exist_ok=True)
    path, source, _ = import_model(directory, work, Options(shapes=[("bench", "batch=2"), ("bench", "height=16")]))
    return path, source


def build(model_path: Path, work: Path, source: dict, **changes):
    options = Options(bench_runs=0, **{"precision": "fp32", **changes})
    model = load_model(model_path, [])
    profile = Profile(input_specs(model), {"batch": DimRange(2, 2, 2), "height": DimRange(16, 16, 16)},
                      {"timestep": (0, 1000), "class_labels": (0, 10)})  # fmt: skip
    calibration = calibration_set(options, profile, model_path, source)[0] if options.quantize else None
    work.mkdir(parents=True)
    built = build_engine(model, work, CPU, options, profile, calibration=calibration, source=source)
    return built, profile


def quality_table(name: str, directory: Path, work: Path) -> list[list]:
    model_path, source = imported(directory, work / "import")
    fp16, profile = build(model_path, work / "fp16", source, precision="fp16")
    reference = reference_session(model_path)
    output = reference.get_outputs()[0].name
    loops = quality_loops(profile, QUALITY_SEED_OFFSET)
    fp32_final = [sample_loop(lambda f: run_session(reference, f)[output], feeds, timestep_dtype(profile)) for feeds in loops]

    def finals(engine):
        return [sample_loop(lambda f: engine.run(engine.as_input_types(f))[output], feeds, timestep_dtype(profile)) for feeds in loops]

    def scores(got, want) -> tuple[float, float, float]:
        rows = [quality.compare_outputs({"x": g}, {"x": w})["x"] for g, w in zip(got, want)]
        return tuple(float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "rel_l2"))

    fp16_final = finals(fp16.engine)
    rows = [[name, "fp16", "-", *scores(fp16_final, fp32_final), "-", "-"]]
    for i, (label, changes) in enumerate(SETTINGS.items()):
        start = time.perf_counter()
        built, _ = build(model_path, work / f"q{i}", source, **changes)
        got = finals(built.engine)
        kept = f"{len(built.fallback.kept)} of {len(built.fallback.candidates)}" if built.fallback else "-"
        quantized = next(r.stats for r in built.records if r.name == "quantize")
        p32, s32, l32 = scores(got, fp32_final)
        p16, s16, _ = scores(got, fp16_final)
        rows.append([name, label, f"{quantized['quantized']}/{quantized['layers']}", p32, s32, l32, f"{p16:.2f} dB, SSIM {s16:.4f}", kept])
        print(f"  {name} {label}: {time.perf_counter() - start:.0f} s")
    return rows


def speed(work: Path, runs: int) -> None:
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()  # fmt: skip
    model.save_pretrained(work / "dit-s")
    model_path, source = imported_at(work / "dit-s", work / "s-import")
    from kiln.optimizer.bench import median_ms

    profile_dims = {"batch": DimRange(1, 1, 1), "height": DimRange(32, 32, 32)}
    feeds = None
    rows = []
    variants = (("fp32", {}), ("INT8 (ort Q/DQ)", {"quantize": "int8"}), ("INT8 (kiln Q/DQ)", {"quantize": "int8", "quant_backend": "kiln"}))
    for i, (label, changes) in enumerate(variants):
        options = Options(bench_runs=0, **changes)
        model_ir = load_model(model_path, [])
        profile = Profile(input_specs(model_ir), profile_dims, {"timestep": (0, 1000), "class_labels": (0, 1000)})
        calibration = calibration_set(options, profile, model_path, source)[0] if options.quantize else None
        (work / f"speed-{i}").mkdir()
        built = build_engine(model_ir, work / f"speed-{i}", CPU, options, profile, calibration=calibration, source=source)
        feeds = feeds or profile.random_inputs(profile.shapes(profile.sizes("opt")), 1)
        out = built.engine.run(feeds)["sample"]
        rows.append((label, median_ms(lambda: built.engine.run(feeds), runs, 3), out))
    base = rows[0]
    print("\n| DiT-S/2 256² b1, cpu | median ms | speed-up vs fp32 | rel L2 vs fp32 engine |\n|---|---|---|---|")
    for label, ms, out in rows:
        print(f"| {label} | {ms:.1f} | {base[1] / ms:.2f}x | {quality.rel_l2(out, base[2]):.2e} |")


def imported_at(directory: Path, work: Path) -> tuple[Path, dict]:
    work.mkdir(parents=True, exist_ok=True)
    path, source, _ = import_model(directory, work, Options(shapes=[("bench", "batch=1"), ("bench", "height=32")]))
    return path, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed-runs", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-quant-quality-"))
    if not args.skip_quality:
        from kiln.optimizer.examples.tiny_diffusers import tiny_model
        from kiln.optimizer.examples.trained_dit import CONFIG, trained_dir

        random = work / "random"  # the trained model's architecture, seeded random weights (none zero)
        tiny_model("DiTTransformer2DModel", 0, **CONFIG).save_pretrained(random)
        rows = quality_table("trained", trained_dir(), work / "trained") + quality_table("random", random, work / "rand")
        print("\n| weights | setting | layers quantized | PSNR vs fp32 dB | SSIM vs fp32 | rel L2 vs fp32 | vs fp16 engine | fallback kept |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.4f} | {r[5]:.2e} | {r[6]} | {r[7]} |")
    if not args.skip_speed:
        speed(work, args.speed_runs)


if __name__ == "__main__":
    main()
