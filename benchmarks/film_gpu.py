"""FILM on ONNX Runtime CUDA: the raw tf2onnx graph against kiln's graphs, fp32, at 512², 1024², 1080p.

Two steps, because the GPU machine has no TensorFlow:

    python benchmarks/film_gpu.py prepare .bench/film    # here: export FILM (default config), convert, kiln
    python benchmarks/film_gpu.py run .bench/film        # on the GPU: refill weights, time, print a table

`prepare` writes three graphs without their weights (benchmarks/weights.py refills them with the same
seeded values on the other side):
- raw:        tf2onnx's output as it is (all signature outputs);
- kiln-nowarp: kiln's import and cleanup with the warp rewrite disabled (the `image` output only);
- kiln:        kiln's graph with each warp rewritten into one GridSample.
Inputs and outputs stay on the device (IO binding), the same for every runner. 1080p is padded to
1088×1920, FILM's alignment of 64, as kiln's engine does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weights import refill, strip  # noqa: E402

SIZES = {"512²": (512, 512), "1024²": (1024, 1024), "1080p": (1088, 1920)}
RUNNERS = ("raw", "kiln-nowarp", "kiln")


def prepare(out: Path) -> None:
    import onnx

    from optimizer.cli import main as kiln
    from optimizer.film_net import FilmConfig, export_saved_model

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


def run(out: Path, runs: int, warmup: int, tf32: bool) -> None:
    import onnxruntime as ort

    ort.preload_dlls()
    ort.set_default_logger_severity(3)
    sessions = {}
    for name in RUNNERS:
        model = refill(out / f"{name}.onnx")
        start = time.perf_counter()
        # use_tf32=0 keeps convolutions in true fp32, for both runners alike.
        provider = ("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"})
        sessions[name] = ort.InferenceSession(model.SerializeToString(), providers=[provider])
        print(f"{name}: session in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(0)
    rows = []
    for label, (h, w) in SIZES.items():
        feeds = {"x0": rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32),
                 "x1": rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32),
                 "time": np.full((1, 1), 0.5, np.float32)}  # fmt: skip
        images, times = {}, {}
        for name, session in sessions.items():
            binding = session.io_binding()
            for key, value in feeds.items():
                binding.bind_ortvalue_input(key, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            binding.bind_output("image", "cuda", 0)
            for _ in range(warmup):
                session.run_with_iobinding(binding)
            samples = []
            for _ in range(runs):
                binding.synchronize_inputs()
                start = time.perf_counter()
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()
                samples.append((time.perf_counter() - start) * 1e3)
            times[name] = float(np.median(samples))
            images[name] = binding.copy_outputs_to_cpu()[0]
        ref = images["raw"]
        for name in RUNNERS:
            err = float(np.abs(images[name] - ref).max() / max(1e-12, np.abs(ref).max()))
            rows.append((label, name, times[name], times["raw"] / times[name], err))
    print(f"\nTF32 {'on' if tf32 else 'off'}")
    print(f"\n| size | runner | median ms | speed-up vs raw | max rel err vs raw |\n|---|---|---|---|---|")
    for label, name, ms, ratio, err in rows:
        print(f"| {label} | {name} | {ms:.2f} | {ratio:.2f}x | {err:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tf32", action="store_true", help="let cuDNN use TF32 for fp32 convolutions")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.directory)
    else:
        run(args.directory, args.runs, args.warmup, args.tf32)


if __name__ == "__main__":
    main()
