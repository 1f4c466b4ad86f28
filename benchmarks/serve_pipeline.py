"""The frame pipeline, serial against overlapped, on one job: the metrics issue 6 asks for.

    python benchmarks/serve_pipeline.py interpolate ENGINE_DIR FRAMES_DIR [--factor 2] [--format png]
    python benchmarks/serve_pipeline.py decode ENGINE_DIR LATENTS.npy [--chunk 8] [--format png]

Runs the job twice into temporary folders, serially and overlapped, with the same worker count, and
prints one table: wall time, frames per second, time per stage, the compute stage's busy fraction, the
copy rate, and overlap efficiency = (T_serial - T_async) / (T_serial - T_slowest_stage), where a
stage's time is its serial total (post-processing divided by the workers).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["interpolate", "decode"])
    parser.add_argument("engine", type=Path)
    parser.add_argument("source", type=Path)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--format", choices=["png", "jpg"], default="png")
    parser.add_argument("--workers", type=int, help="default: chosen from the measured encode cost, as kiln does")
    args = parser.parse_args()

    from optimizer.runner import load_engine
    from optimizer.serve.jobs import decode, interpolate

    engine = load_engine(args.engine)
    work = Path(tempfile.mkdtemp(prefix="kiln-serve-"))
    results, workers = {}, args.workers
    for serial in (False, True):  # overlapped first: it picks the worker count the serial run reuses
        output = work / ("serial" if serial else "async")
        if args.job == "interpolate":
            result = interpolate(engine, args.source, output, args.factor, workers, serial, args.format)
        else:
            result = decode(engine, args.source, output, args.chunk, workers, serial, args.format)
        workers = result["workers"]
        results["serial" if serial else "async"] = result
    serial, overlapped = results["serial"], results["async"]
    slowest = max(serial["compute_s"], serial["copy_s"], serial["post_s"] / workers)
    efficiency = (serial["wall_s"] - overlapped["wall_s"]) / max(serial["wall_s"] - slowest, 1e-9)
    print(f"\n{args.job}, {serial['frames']} frames, {workers} post-processing worker(s), {args.format}")
    print("\n| mode | wall s | fps | compute s | copy s | post s (all workers) | compute busy | copy GB/s |\n|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['wall_s']:.2f} | {r['fps']:.1f} | {r['compute_s']:.2f} | {r['copy_s']:.3f} | {r['post_s']:.2f} | "
              f"{r['compute_busy']:.0%} | {r['copy_gb_per_s']:.1f} |")  # fmt: skip
    print(f"\nspeed-up {serial['wall_s'] / overlapped['wall_s']:.2f}x; overlap efficiency {efficiency:.0%} "
          f"(slowest stage {slowest:.2f} s)")


if __name__ == "__main__":
    main()
