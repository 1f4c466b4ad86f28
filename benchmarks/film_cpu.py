"""FILM on the CPU: TensorFlow against kiln's ONNX Runtime CPU engine, default configuration, 256² and 512².

    python benchmarks/film_cpu.py [--runs 5]

Both run the same SavedModel (our film_net, seeded weights) in one process, alternating size by size;
the table gives median latency, the ratio, and kiln's max abs error against TensorFlow on `image`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from kiln.optimizer.bench import median_ms

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from kiln.optimizer.cli import main as kiln
    from kiln.optimizer.examples.film_net import FilmConfig, export_saved_model, load_saved_model, reference_interpolate
    from kiln.optimizer.run import open_engine as load_engine

    work = Path(tempfile.mkdtemp(prefix="kiln-film-cpu-"))
    saved = export_saved_model(work / "saved_model", FilmConfig(), seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        code = kiln(["optimize", str(saved), "-o", str(work / "kiln"), "--no-verify", "--bench-runs", "0",
                     "--shapes", "batch=1", "--shapes", "height=256..512", "--shapes", "width=256..512"])  # fmt: skip
    if code:
        raise SystemExit(f"kiln optimize failed with exit code {code}")
    engine = load_engine(work / "kiln")
    model = load_saved_model(saved)
    rng = np.random.default_rng(0)
    print(f"{'size':<6} {'TensorFlow ms':>14} {'kiln ORT CPU ms':>16} {'speed-up':>9} {'max abs err':>12}")
    for size in (256, 512):
        x0, x1 = (rng.uniform(0, 1, (1, size, size, 3)).astype(np.float32) for _ in range(2))
        time_ = np.full((1, 1), 0.5, np.float32)
        feeds = {"x0": x0, "x1": x1, "time": time_}
        want = reference_interpolate(saved, x0, x1, time_, model=model)["image"]
        got = engine.run(feeds)["image"]
        tf_ms = median_ms(lambda: reference_interpolate(saved, x0, x1, time_, model=model), args.runs)
        kiln_ms = median_ms(lambda: engine.run(feeds), args.runs)
        print(f"{size}²{'':<3} {tf_ms:>14.1f} {kiln_ms:>16.1f} {tf_ms / kiln_ms:>8.2f}x {np.abs(got - want).max():>12.2e}")


if __name__ == "__main__":
    main()
