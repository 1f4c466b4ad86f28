"""Where an ONNX Runtime CUDA engine spends its time: kernel time per op type, and nodes not on the GPU.

    python benchmarks/ort_profile.py dit [--batch 8 --latent 32]

Builds DiT-XL/2 (random weights) through kiln's diffusers export and the h100 target's passes (cleanup,
ONNX Runtime fusions, fp16), runs it with ONNX Runtime's profiler on, and prints the top op types by
total kernel time, so the gap to a goal can be read off.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_dit(work: Path) -> Path:
    import onnx_ir as ir

    from dit_gpu import dit_xl_2
    from kiln.optimizer.importers.diffusers import export
    from kiln.optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges
    from kiln.optimizer.build import select_passes
    from kiln.optimizer.config import Options
    from kiln.passes import PassManager
    from kiln.targets import H100

    model = dit_xl_2()
    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [("bench", "batch=1..2..8"), ("bench", "height=32..64")])
    raw = work / "dit.onnx"
    export(model, adapter, ranges, raw)
    del model
    optimized, _ = PassManager(select_passes(Options(precision="fp16"), H100)).run(ir.load(raw))
    path = work / "dit_fp16.onnx"
    ir.save(optimized, path, external_data=path.name + ".data")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["dit"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    import onnxruntime as ort

    from kiln.targets import H100

    ort.preload_dlls()
    work = Path(tempfile.mkdtemp(prefix="kiln-profile-"))
    path = build_dit(work)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "ort")
    options.log_severity_level = 2  # warnings name nodes that fall back to the CPU
    # The session settings of kiln's dynamic fp16 h100 engine (no CUDA graph: the profiler needs kernels).
    providers = [("CUDAExecutionProvider", dict(H100.provider_options)), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (args.batch,)), "class_labels": rng.integers(0, 1000, (args.batch,))}  # fmt: skip
    for _ in range(3):
        session.run(None, feeds)
    for _ in range(args.runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op, providers = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            provider = event["args"].get("provider", "?")
            per_op[f"{op} ({provider})"] += event["dur"]
            providers[provider] += event["dur"]
    total = sum(per_op.values())
    runs = args.runs + 3
    print(f"\nkernel time per run: {total / runs / 1e3:.2f} ms (batch {args.batch}, latent {args.latent})")
    print("by provider:", {p: f"{d / runs / 1e3:.2f} ms" for p, d in providers.items()})
    print("\n| op (provider) | ms per run | share |\n|---|---|---|")
    for op, dur in per_op.most_common(15):
        print(f"| {op} | {dur / runs / 1e3:.3f} | {dur / total:.1%} |")


if __name__ == "__main__":
    main()
