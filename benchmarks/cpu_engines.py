"""Side by side on the CPU: ONNX Runtime on the raw model against kiln's fp32 and fp16 engines.

    python benchmarks/cpu_engines.py [MODEL.onnx] [--runs 50]

Without MODEL it uses kiln's example block. Runners alternate shape by shape in one process, so the
ratios compare like with like; absolute CPU times say little about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import onnxruntime as ort

from kiln.optimizer.bench import measure
from kiln.optimizer.cli import main as kiln
from kiln.optimizer.run import open_engine as load_engine
from kiln.targets import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    model = args.model
    if model is None:
        with contextlib.redirect_stdout(io.StringIO()):
            kiln(["example", "block", str(work / "ex")])
        model = work / "ex" / "model.onnx"
    # The baseline: ONNX Runtime with its default settings on the unoptimized model.
    raw = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    runners = {"ort raw fp32": Engine.from_session(raw)}
    for precision in ("fp32", "fp16"):
        out = work / precision
        with contextlib.redirect_stdout(io.StringIO()):
            code = kiln(["optimize", str(model), "-o", str(out), "--precision", precision, "--bench-runs", "0"])
        if code != 0:
            raise SystemExit(f"kiln optimize --precision {precision} failed with exit code {code}")
        runners[f"kiln cpu {precision}"] = load_engine(out)
    profile = runners["kiln cpu fp32"].profile
    print(f"\n{'corner':<7} {'runner':<15} {'median ms':>10} {'p90 ms':>9} {'vs raw':>7}")
    for corner, shapes in profile.corners():
        feeds = profile.random_inputs(shapes, seed=0)
        base = None
        for name, runner in runners.items():
            stats = measure(runner, feeds, args.runs, warmup=5)
            base = base or stats["median_ms"]
            print(f"{corner:<7} {name:<15} {stats['median_ms']:>10.3f} {stats['p90_ms']:>9.3f} {base / stats['median_ms']:>6.2f}x")


if __name__ == "__main__":
    main()
