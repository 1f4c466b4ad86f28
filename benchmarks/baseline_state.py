"""Why `kiln compare`'s torch.compile row can be slower than the same model in a fresh process: DiT-XL/2
bf16 at 256² batch 8 (random weights), torch.compile'd, timed in one process as its state changes.

    python benchmarks/baseline_state.py WORK [--runs 50]

Rows: the model called as benchmarks/quant_gpu.py calls it, and through kiln's baseline runner
(optimizer/baselines.py); then the same after ONNX Runtime sessions (CPU and CUDA) have run in the
process, after they are closed, with a large heap of Python objects (a sweep holds its models), and with
that heap frozen out of the garbage collector (gc.freeze).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _matmul_model(path: Path, n: int = 1024) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [w])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from diffusers import DiTTransformer2DModel
    from dit_gpu import dit_xl_2

    from kiln.optimizer.baselines import _torch
    from kiln.optimizer.bench import samples_ms

    model_dir = args.work / "dit-xl-2"
    if not (model_dir / "config.json").exists():
        dit_xl_2().save_pretrained(model_dir, safe_serialization=True)
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((8, 4, 32, 32)).astype(np.float32),
             "timestep": rng.integers(0, 1000, 8), "class_labels": rng.integers(0, 1000, 8)}  # fmt: skip

    bf16 = DiTTransformer2DModel.from_pretrained(model_dir).to("cuda", torch.bfloat16).eval()
    x, t, c = (torch.from_numpy(feeds[k]).cuda() for k in ("hidden_states", "timestep", "class_labels"))
    x = x.bfloat16()

    def direct(module):
        def run():
            with torch.no_grad():
                module(x, timestep=t, class_labels=c, return_dict=False)
            torch.cuda.synchronize()

        return run

    kiln = _torch("torch.compile bf16", model_dir, gpu=True, compiled=True)
    runners = {"as quant_gpu.py calls it": direct(torch.compile(bf16)), "kiln's baseline runner": kiln.timer(feeds),
               "mode=reduce-overhead (CUDA graphs)": direct(torch.compile(bf16, mode="reduce-overhead"))}  # fmt: skip
    rows = []

    def measure(state: str) -> None:
        for name, run in runners.items():
            times = samples_ms(run, args.runs, 5)
            rows.append((state, name, float(np.median(times)), float(np.percentile(times, 90))))
            print(f"{state}: {name} {rows[-1][2]:.3f} ms", flush=True)

    measure("fresh process")
    measure("fresh process, again")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mm.onnx"
        _matmul_model(path)
        ort.preload_dlls()
        sessions = [ort.InferenceSession(str(path), providers=p) for p in (["CPUExecutionProvider"], ["CUDAExecutionProvider"])]
        data = {"x": np.ones((1024, 1024), np.float32)}
        for session in sessions:
            for _ in range(5):
                session.run(None, data)
        measure("ONNX Runtime CPU and CUDA sessions open")
        del sessions
        gc.collect()
    measure("sessions closed")
    heap = [{"i": i, "name": str(i)} for i in range(3_000_000)]  # a sweep's models: many small objects
    measure("3 million Python objects held")
    gc.freeze()
    measure("the same, frozen out of the collector")
    del heap

    print(f"\n| state | runner | median ms | p90 ms |\n|---|---|---|---|")
    for state, name, median, p90 in rows:
        print(f"| {state} | {name} | {median:.3f} | {p90:.3f} |")


if __name__ == "__main__":
    main()
