"""The host-side work of calibration statistics (calibration/stats.py: each tensor's per-channel maximum,
then its histogram, as INT8's entropy method takes them) on one sample of activations the size of
DiT-XL/2's at 256² batch 8: histograms by numpy (one core) against torch (every core), side by side in
one process, and the per-channel maxima as collect takes them against |x| reduced (what it did before).

    python benchmarks/calib_stats.py [--blocks 28]

Per block, DiT-XL/2 quantizes the inputs of its attention projections (2048 tokens × 1152, read by
q, k and v), of the attention output, of the first MLP layer (× 1152) and of the second (× 4608):
16.5 million values a block, 462 million a sample at 28 blocks. On the H200 machine's host, numpy took
752 s for this work over a 128-sample INT8 calibration (from a `kiln compare` log); there, ONNX Runtime
runs the model itself on the GPU, so these reductions are what the calibration waits for.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=28)
    args = parser.parse_args()

    from kiln.calibration import stats

    rng = np.random.default_rng(0)
    block = [rng.standard_normal((8, 256, width)).astype(np.float32) for width in (1152, 1152, 1152, 4608)]
    values = sum(a.size for a in block) * args.blocks
    torch = stats._torch()
    print(f"{os.cpu_count()} cores; {args.blocks} blocks, {values / 1e6:.0f} million values a sample")
    start = time.perf_counter()
    for a in block:
        np.abs(a).reshape(-1, a.shape[-1]).max(axis=0)
    print(f"channel maxima of |x| reduced: {(time.perf_counter() - start) * args.blocks:.2f} s")
    print(f"{'histograms by':<24} {'channel max s':>14} {'histogram s':>12}")
    results = {}
    for name, backend in [("numpy", None)] + ([(f"torch ({torch.get_num_threads()} threads)", torch)] if torch else []):
        start = time.perf_counter()
        maxima = [stats._channel_amax(a) for a in block]
        middle = time.perf_counter()
        hists = [stats._histogram(a, float(m.max()), backend) for a, m in zip(block, maxima)]
        end = time.perf_counter()
        results[name] = hists
        print(f"{name:<24} {(middle - start) * args.blocks:>14.2f} {(end - middle) * args.blocks:>12.2f}")
    if len(results) == 2:
        a, b = results.values()
        print(f"histogram counts differ by at most {max(int(np.abs(x - y).sum()) for x, y in zip(a, b))} of "
              f"{min(a.size for a in block)} or more per tensor (values on a bin edge)")  # fmt: skip


if __name__ == "__main__":
    main()
