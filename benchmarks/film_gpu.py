"""FILM on ONNX Runtime CUDA: the raw tf2onnx graph in fp32 against kiln's engines, at 1024² and 1080p.

Two steps, because the GPU machine has no TensorFlow:

    python benchmarks/film_gpu.py prepare .bench/film    # here: export FILM (default config), convert, kiln
    python benchmarks/film_gpu.py run .bench/film        # on the GPU: refill weights, build, time, print

`prepare` writes graphs without their weights (benchmarks/weights.py refills them with the same seeded
values on the other side): raw (tf2onnx's output as it is) and kiln (kiln's import with the warp
rewrite; kiln-nowarp, without it, is kept for comparisons). `run` builds kiln's h100 engines from the
kiln graph with kiln's own pass pipeline: fp16 with dynamic shapes, and fp16 frozen to each size as a
CUDA graph (with cuDNN's NHWC convolutions as a variant). Inputs and outputs stay on the device for
every runner. 1080p is padded to 1088×1920, FILM's alignment of 64, as kiln's engine does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weights import refill, strip  # noqa: E402

SIZES = {"1024²": (1024, 1024), "1080p": (1088, 1920)}


def prepare(out: Path) -> None:
    import onnx

    from kiln.optimizer.cli import main as kiln
    from kiln.optimizer.examples.film_net import FilmConfig, export_saved_model

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kiln-film-"))
    saved = export_saved_model(work / "saved_model", FilmConfig(), seed=0)
    raw = work / "raw.onnx"
    subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved), "--opset", "17",
                    "--output", str(raw)], check=True, capture_output=True)  # fmt: skip
    strip(onnx.load(raw), out / "raw.onnx")
    shapes = ["--shapes", "batch=1", "--shapes", "height=64..1088", "--shapes", "width=64..1920"]
    for name, extra in (("kiln-nowarp", ["--disable-pass", "warp-to-gridsample"]), ("kiln", [])):
        target = work / name
        code = kiln(["optimize", str(saved), "-o", str(target), "--no-verify", "--bench-runs", "0", "--json", *shapes, *extra])
        if code:
            raise SystemExit(f"kiln optimize failed ({code})")
        strip(onnx.load(target / "model.onnx"), out / f"{name}.onnx")
        report = json.loads((target / "report.json").read_text())
        print(f"{name}: {report['model']['nodes']} nodes, GridSample {report['model']['op_counts'].get('GridSample', 0)}")
    for p in out.glob("*.bin"):
        p.unlink()
    shutil.rmtree(work)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


def run(out: Path, runs: int, warmup: int, profile: bool = False) -> None:
    import onnx_ir as ir
    import onnxruntime as ort

    from gpu_common import baseline_engine, kiln_engine, print_table, profile_kernels, rel_err
    from kiln.optimizer.bench import median_ms
    from kiln.targets import H100, DimRange

    ort.preload_dlls()
    ort.set_default_logger_severity(3)
    work = Path(tempfile.mkdtemp(prefix="kiln-film-gpu-"))
    if profile:
        h, w = SIZES["1080p"]
        static = {"batch": DimRange(1, 1, 1), "height": DimRange(h, h, h), "width": DimRange(w, w, w)}
        engine, _ = kiln_engine(ir.from_proto(refill(out / "kiln.onnx")), work / "profile", H100, "fp16", static, cuda_graphs=False)
        rng = np.random.default_rng(0)
        feeds = {"x0": rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32), "x1": rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32),
                 "time": np.full((1, 1), 0.5, np.float32)}  # fmt: skip
        profile_kernels("kiln h100 fp16 static (graph off for the profiler), 1080p", engine.device_runner(feeds), runs)
        return
    sessions = {}
    for label, name, tf32 in (("raw fp32, TF32 off", "raw", "0"), ("raw fp32", "raw", "1"), ("kiln fp32 (warp rewrite)", "kiln", "1")):
        provider = ("CUDAExecutionProvider", {"use_tf32": tf32})  # "1" is ONNX Runtime's default
        sessions[label] = ort.InferenceSession(refill(out / f"{name}.onnx").SerializeToString(), providers=[provider])
    dynamic = {"batch": DimRange(1, 1, 1), "height": DimRange(64, 1024, 1088), "width": DimRange(64, 1024, 1920)}
    engines = {}
    engines["kiln h100 fp16 dynamic"], records = kiln_engine(ir.from_proto(refill(out / "kiln.onnx")), work / "dyn", H100, "fp16", dynamic)
    kept = next(r for r in records if r.name == "fp16")
    print(f"  fp16: {kept.stats}; kept in fp32: {sorted(set(kept.details['kept_fp32'].values()))}")
    rng = np.random.default_rng(0)
    rows = []
    for label, (h, w) in SIZES.items():
        feeds = {"x0": rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32),
                 "x1": rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32),
                 "time": np.full((1, 1), 0.5, np.float32)}  # fmt: skip
        images = {}
        for name, session in sessions.items():
            engine = baseline_engine(session)
            ms = median_ms(engine.device_runner(feeds), runs, warmup)
            images[name] = engine.run(feeds)["image"]
            rows.append([label, name, ms, images[name]])
        variants = dict(engines)
        static = {"batch": DimRange(1, 1, 1), "height": DimRange(h, h, h), "width": DimRange(w, w, w)}
        for name, changes in (("kiln h100 fp16 static (CUDA graph)", {}),
                              ("kiln h100 fp16 static, NHWC convs", {"provider_options": (*H100.provider_options, ("prefer_nhwc", "1"))})):  # fmt: skip
            try:
                variants[name], _ = kiln_engine(ir.from_proto(refill(out / "kiln.onnx")), work / f"{name}-{h}", H100, "fp16", static, **changes)
            except Exception as exc:
                print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        for name, engine in variants.items():
            try:
                ms = median_ms(engine.device_runner(feeds), runs, warmup)
                rows.append([label, name, ms, engine.run(feeds)["image"]])
            except Exception as exc:
                print(f"  {name} failed at {label}: {type(exc).__name__}: {str(exc)[:300]}")
        reference = images["raw fp32, TF32 off"]
        for row in rows:
            if row[0] == label:
                row[3] = rel_err(row[3], reference)
        print_table([tuple(r) for r in rows])
    print("\nFinal table (speed-up against the fastest raw tf2onnx runner; error against raw fp32 with TF32 off)")
    print_table([tuple(r) for r in rows], baseline_name="raw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="only print the top CUDA kernels of kiln's fp16 engine at 1080p")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.directory)
    else:
        run(args.directory, args.runs, args.warmup, args.profile)


if __name__ == "__main__":
    main()
