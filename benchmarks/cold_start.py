"""Cold start of an engine: the time from a fresh process to its first result, split into its parts.

    python benchmarks/cold_start.py ENGINE_DIR [ENGINE_DIR ...] [--runs 3] [--cold]

Each run is a new Python process that opens the engine the way a `kiln serve` replica does
(`kiln.targets.load_engine`, then one run at the opt shape, inputs and outputs on the host). The parts:

  python + imports    interpreter start, numpy, onnxruntime, kiln
  CUDA context        the driver's context (a cudaFree(0) after ONNX Runtime's CUDA libraries load)
  open, before ORT    the manifest, the machine check, loading the CUDA libraries
  read the model      ONNX Runtime's log: session start to "Initializing session" (reading and parsing
                      the model and its external weights, creating the providers)
  optimize            "Initializing session" to "Saving initialized tensors" (graph optimization,
                      partitioning to the providers)
  weights to device   "Saving initialized tensors" to "Done saving initialized tensors"
  finish session      to "Session successfully initialized" (kernels, memory plan)
  first run           warm-up: cuDNN and cuBLAS set-up, the CUDA graph's capture
  a later run         the median of 10 after the first, host arrays in and out

Ways of loading, each in its own processes: `reoptimize`, ONNX Runtime's graph optimizer run again at
load (how kiln loaded every engine before), `as built`, the engine's manifest's own setting (a GPU
engine's model is the optimized graph ONNX Runtime wrote at build, so it loads with the optimizer off),
and with --exhaustive, `exhaustive conv search`: as built, with cuDNN's exhaustive search (timing every
convolution algorithm on the first run) in place of the cuda targets' heuristic choice. --cold first
drops the engine's files from the page cache (posix_fadvise DONTNEED, and /proc/sys/vm/drop_caches
where writable), and says which worked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t_python = time.time()
from pathlib import Path
import numpy as np
import onnxruntime as ort
from kiln.targets import engine as E
from kiln.targets import read_manifest
t_imports = time.time()
directory, how = Path(sys.argv[2]), sys.argv[3]
config = read_manifest(directory)
made = E.session_options
def verbose(level, log_level=3):  # ONNX Runtime's own log marks the session's phases
    return made(ort.GraphOptimizationLevel.ORT_ENABLE_ALL if how == "reoptimize" else level, 0)
E.session_options = verbose
if how == "exhaustive conv search":  # every cuDNN convolution algorithm timed on the first run (kiln's choice before)
    import dataclasses
    read = E.read_manifest
    def exhaustive(directory):
        config = read(directory)
        return dataclasses.replace(config, provider_options={**config.provider_options, "cudnn_conv_algo_search": "EXHAUSTIVE"})
    E.read_manifest = exhaustive
context = None
if config.device == "cuda":
    import ctypes
    E.preload_cuda()
    start = time.time()
    ctypes.CDLL("libcudart.so.13").cudaFree(None)
    context = time.time() - start
t_open = time.time()
engine = E.load_engine(directory)
t_session = time.time()
profile = engine.profile
shapes = profile.shapes(profile.sizes("opt"))
feeds = {s.name: np.zeros(shapes[s.name], s.dtype) for s in engine.inputs}
engine.run(feeds)
t_first = time.time()
steady = []
for _ in range(10):
    start = time.time()
    engine.run(feeds)
    steady.append(time.time() - start)
print(json.dumps({"python": t_python, "imports": t_imports, "context_s": context, "open": t_open, "session": t_session,
                  "first": t_first, "steady": sorted(steady)[5]}))
"""

MARKS = {"start": "Session Options", "read": "Initializing session.", "saving": "Saving initialized tensors.",
         "saved": "Done saving initialized tensors", "ready": "Session successfully initialized."}  # fmt: skip
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})\d* \[\w:onnxruntime:")


def drop_cache(directory: Path) -> list[str]:
    """Ask the kernel to forget the engine's files; return which ways were taken."""
    ways = []
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    ways.append("posix_fadvise")
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        ways.append("drop_caches")
    except OSError:
        pass
    return ways


def log_marks(stderr: str) -> dict[str, float]:
    """Epoch seconds of each phase mark, from the first session's log (ONNX Runtime writes local time)."""
    marks: dict[str, float] = {}
    for line in stderr.splitlines():
        if match := LOG_LINE.match(line):
            for key, text in MARKS.items():
                if key not in marks and text in line:
                    marks[key] = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return marks


def one_run(directory: Path, how: str, cold: bool) -> dict:
    ways = drop_cache(directory) if cold else []
    started = time.time()
    done = subprocess.run([sys.executable, "-c", CHILD, str(started), str(directory), how], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the engine did not start ({how}):\n{done.stderr[-3000:]}")
    t = json.loads(done.stdout.strip().splitlines()[-1])
    m = log_marks(done.stderr)
    if set(m) != set(MARKS):
        raise SystemExit(f"ONNX Runtime's log lacks {sorted(set(MARKS) - set(m))}; its version may word them otherwise")
    return {
        "python + imports": t["imports"] - started, "CUDA context": t["context_s"] or 0.0,
        "open, before ORT": m["start"] - t["open"], "read the model": m["read"] - m["start"],
        "optimize": m["saving"] - m["read"], "weights to device": m["saved"] - m["saving"],
        "finish session": m["ready"] - m["saved"], "after the session": t["session"] - m["ready"],
        "first run": t["first"] - t["session"], "to first result": t["first"] - started,
        "a later run (median of 10)": t["steady"], "cache dropped by": "+".join(ways) or "-",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", type=Path, nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also runs with the engine's files dropped from the page cache")
    parser.add_argument("--exhaustive", action="store_true", help="also load with cuDNN's exhaustive convolution search")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args()
    rows, everything = {}, {}
    for path in args.engines:
        directory = path / "engine" if (path / "engine").is_dir() else path
        for how in ("reoptimize", "as built", *(("exhaustive conv search",) if args.exhaustive else ())):
            for cache in ("warm", "cold") if args.cold else ("warm",):
                one_run(directory, how, cold=False)  # fills the page cache (and any cache of the driver's)
                runs = [one_run(directory, how, cold=cache == "cold") for _ in range(args.runs)]
                label = f"{path.name}, {how}, {cache}"
                everything[label] = runs
                rows[label] = {k: statistics.median(r[k] for r in runs) if k != "cache dropped by" else runs[0][k] for k in runs[0]}
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))
    keys = list(next(iter(rows.values())))
    print(f"\nmedian of {args.runs} fresh processes each, seconds\n")
    print("| part | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        print(f"| {key} | " + " | ".join(v[key] if isinstance(v[key], str) else f"{v[key]:.3f}" for v in rows.values()) + " |")


if __name__ == "__main__":
    main()
