"""`kiln compare` on DiT-XL/2 (random weights at real size, as benchmarks/dit_gpu.py) at 256² batch 8 on
one GPU, timed end to end, then the same command again (which must build nothing).

    python benchmarks/compare_gpu.py WORK [--runs 50] [--target auto] [--small] [--grid OPTION=V1,V2] [--no-cross-check]

The grid: fp16 and bf16; INT8 and FP8 (fp16 elsewhere) calibrated on 32 and 128 samples; and FP8 left
as Q/DQ (without the GemmFloat8 lowering), as benchmarks/quant_gpu.py measured it. Baselines: PyTorch
eager and torch.compile in bf16, the latter with and without CUDA graphs. --small runs the tiny example DiT on the cpu target instead (to try
the script anywhere).

Then a cross-check of compare's latencies: `kiln bench` in a fresh process on the points built from 32
calibration samples (or none). benchmarks/baseline_state.py times the compiled baselines as the
process's state changes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GRID = ["--grid", "precision=fp16,bf16",
        "--or", "--grid", "precision=fp16", "--grid", "quantize=int8,fp8", "--grid", "calib-samples=32,128",
        "--or", "--grid", "precision=fp16", "--grid", "quantize=fp8", "--grid", "calib-samples=32",
        "--grid", "disable-pass=lower-fp8-gemm"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--target", default="auto")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--grid", help="one compare --grid OPTION=V1,V2 in place of the full grid")
    parser.add_argument("--no-cross-check", action="store_true")
    args = parser.parse_args()

    from kiln.optimizer.cli import main as kiln

    model_dir = args.work / ("dit-small" if args.small else "dit-xl-2")
    if not (model_dir / "config.json").exists():
        if args.small:
            assert kiln(["example", "dit", str(model_dir), "-q"]) == 0
        else:
            from dit_gpu import dit_xl_2

            dit_xl_2().save_pretrained(model_dir, safe_serialization=True)
    shapes = ["--shapes", "batch=2", "--shapes", "height=16"] if args.small else ["--shapes", "batch=8", "--shapes", "height=32"]
    target = "cpu" if args.small else args.target
    command = ["compare", str(model_dir), "-o", str(args.work / "compare"), "--target", target, *shapes,
               "--bench-runs", str(args.runs), *(GRID if args.grid is None else ["--grid", args.grid])]  # fmt: skip
    rows = []
    for run in ("first run", "second run"):
        started = time.perf_counter()
        code = kiln(command)
        rows.append((run, code, time.perf_counter() - started))
    result = json.loads((args.work / "compare" / "compare.json").read_text())
    print((args.work / "compare" / "compare.md").read_text())
    print(f"{'run':<12} {'exit':>4} {'seconds':>9}")
    for run, code, seconds in rows:
        print(f"{run:<12} {code:>4} {seconds:>9.1f}")
    print("second run:", result["counts"])
    print(f"{'point':<60} {'status':<20} {'seconds':>8}")
    for row in result["points"]:
        print(f"{row['label']:<60} {row['status']:<20} {row.get('seconds', 0):>8.1f}")
    if not args.no_cross_check:
        cross_check(result, args.work, args.runs)


def cross_check(result: dict, work: Path, runs: int) -> None:
    kiln = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]
    print(f"\n{'cross-check: fresh process':<60} {'compare ms':>10} {'fresh ms':>9} {'ratio':>6}")
    for row in result["points"]:
        if row["kind"] != "engine" or row["status"] != "ok" or row["settings"].get("calib-samples", "32") != "32":
            continue
        done = subprocess.run([*kiln, "bench", str(work / "compare" / row["dir"]), "--json", "-q", "--runs", str(runs)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            print(f"{row['label']:<60} kiln bench failed: {done.stderr.strip()[-300:]}")
            continue
        fresh = json.loads(done.stdout)["results"][0]["median_ms"]
        ours = row["latency"]["median_ms"]
        print(f"{row['label']:<60} {ours:>10.3f} {fresh:>9.3f} {ours / fresh:>6.2f}")


if __name__ == "__main__":
    main()
