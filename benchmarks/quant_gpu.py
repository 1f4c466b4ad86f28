"""FP8 on one GPU: how ONNX Runtime runs FP8 Q/DQ, and DiT-XL/2 in FP8 against fp16 and PyTorch, in one process.

    python benchmarks/quant_gpu.py [--runs 20] [--case "256² b8"] [--no-compile] [--profile]

Part 1, one linear layer (M×K×N = 2048×1152×4608, DiT-XL/2's MLP at 256² b8, and 8192³), device-resident
fp16 inputs, three graphs: an fp16 MatMul; the FP8 Q/DQ form kiln's quantize pass writes
(QuantizeLinear/DequantizeLinear E4M3 around the MatMul); and that form after kiln's lower-fp8-gemm pass
(com.microsoft.GemmFloat8). For each: the median, TFLOP/s, the op types in the model ONNX Runtime
optimizes it into, and the CUDA kernels that ran (torch's profiler sees ONNX Runtime's kernels).

Part 2, DiT-XL/2 (random weights at real size, as benchmarks/dit_gpu.py) at 256² b8 and 512² b2, static
shapes with CUDA graphs: kiln h100 fp16, kiln h100 FP8 (kiln's Q/DQ lowered to GemmFloat8, fp16
elsewhere; calibrated on 4 random samples of the case's shape), torch eager and torch.compile bf16, and
torchao's float8 dynamic-activation/float8-weight quantization (per-row) under torch.compile. The error
columns are against torch fp32 with TF32 off: max |err| / max |want| and ‖err‖ / ‖want‖.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_gpu import CASES, dit_xl_2, export_dit  # noqa: E402
from gpu_common import baseline_engine, kiln_engine, profile_kernels, rel_err  # noqa: E402
from kiln.optimizer.bench import median_ms  # noqa: E402

GEMMS = {"DiT MLP 2048×1152×4608": (2048, 1152, 4608), "8192³": (8192, 8192, 8192)}


def gemm_models(m: int, k: int, n: int):
    """(fp16 MatMul, FP8 Q/DQ MatMul, the Q/DQ one lowered) as onnx_ir models with X [m, k] fp16 in, Y out."""
    import ml_dtypes
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from kiln.passes import LowerFp8Gemm
    from kiln.passes.qdq import quantize_weight

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [m, k])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [m, n])
    fp16 = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fp16", [x_info], [y_info],
                                              [numpy_helper.from_array(w.astype(np.float16), "w")]),
                             opset_imports=[helper.make_opsetid("", 19)], ir_version=9)  # fmt: skip
    w8, ws = quantize_weight(w, "fp8", 1)
    w8_tensor = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, w8.shape, w8.view(np.uint8).tobytes(), raw=True)
    inits = [w8_tensor, numpy_helper.from_array(ws.astype(np.float16), "ws"),
             helper.make_tensor("wz", TensorProto.FLOAT8E4M3FN, [n], np.zeros(n, ml_dtypes.float8_e4m3fn).view(np.uint8).tobytes(), raw=True),
             numpy_helper.from_array(np.array(4.0 / 448, np.float16), "xs"),
             helper.make_tensor("xz", TensorProto.FLOAT8E4M3FN, [], np.zeros((), ml_dtypes.float8_e4m3fn).view(np.uint8).tobytes(), raw=True)]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w8", "ws", "wz"], ["wd"], axis=1), helper.make_node("MatMul", ["xd", "wd"], ["y"])]  # fmt: skip
    qdq = helper.make_model(helper.make_graph(nodes, "qdq", [x_info], [y_info], inits), opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(qdq)
    lowered = ir.serde.deserialize_model(qdq)
    LowerFp8Gemm()(lowered)
    return {"fp16 MatMul": ir.serde.deserialize_model(fp16), "FP8 Q/DQ MatMul": ir.serde.deserialize_model(qdq), "kiln GemmFloat8": lowered}


def part_gemm(work: Path, runs: int) -> list[tuple]:
    import onnx_ir as ir
    import onnxruntime as ort

    from kiln.passes import op_counts

    rows = []
    for label, (m, k, n) in GEMMS.items():
        x = (np.random.default_rng(1).standard_normal((m, k))).astype(np.float16)
        reference = None  # the fp16 MatMul's output
        for name, model in gemm_models(m, k, n).items():
            path, optimized = work / f"{name.replace(' ', '_').replace('/', '')}.onnx", work / "optimized.onnx"
            ir.save(model, path)
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(optimized)
            session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider"])
            ops = op_counts(ir.load(optimized))
            engine = baseline_engine(session)
            run = engine.device_runner({"x": x})
            ms = median_ms(run, runs)
            y = engine.run({"x": x})["y"].astype(np.float32)
            if reference is None:
                reference = y
            rows.append((label, name, ms, 2 * m * k * n / ms / 1e9, rel_err(y, reference), ", ".join(f"{k} {v}" for k, v in ops.items())))
            profile_kernels(f"{label}: {name}", run, runs=10)
    print("\n| GEMM | graph | median ms | TFLOP/s | max rel diff vs fp16 | ops after ORT's optimizer |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.0f} | {r[4]:.1e} | {r[5]} |")
    return rows


def calibration(batch: int, latent: int, samples: int = 4):
    from kiln.calibration import CalibrationSet, Sample

    rng = np.random.default_rng(0)
    made = [Sample(f"random {i}", {
        "hidden_states": rng.standard_normal((batch, 4, latent, latent)).astype(np.float32),
        "timestep": rng.integers(0, 1000, (batch,)).astype(np.int64),
        "class_labels": rng.integers(0, 1000, (batch,)).astype(np.int64)}) for i in range(samples)]  # fmt: skip
    return CalibrationSet(made, f"{samples} random samples")


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def part_dit(work: Path, args) -> list[tuple]:
    import onnx_ir as ir

    from kiln.targets import H100, DimRange

    model = dit_xl_2()
    raw, _ = export_dit(model, work)
    fp32 = model.cuda()
    rows = []
    for label, (batch, latent) in CASES.items():
        if args.case and label not in args.case:
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, 4, latent, latent, device="cuda", generator=g)
        t = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
        c = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
        feeds = {"hidden_states": x.cpu().numpy(), "timestep": t.cpu().numpy(), "class_labels": c.cpu().numpy()}
        with torch.no_grad():
            want = fp32(x, timestep=t, class_labels=c, return_dict=False)[0].cpu().numpy()

        static = {"batch": DimRange(batch, batch, batch), "height": DimRange(latent, latent, latent)}
        engines = {}
        variants = (("kiln h100 fp16 static", {}),
                    ("kiln h100 FP8 Q/DQ static (not lowered)", {"quantize": "fp8", "disable": ["lower-fp8-gemm"]}),
                    ("kiln h100 FP8 static (GemmFloat8)", {"quantize": "fp8"}))  # fmt: skip
        for i, (name, extra) in enumerate(variants):
            try:
                engines[name], records = kiln_engine(ir.load(raw), work / f"v{i}-{batch}", H100, "fp16", static,
                                                     calibration=calibration(batch, latent) if extra else None, **extra)  # fmt: skip
                for r in records:
                    if r.name in ("quantize", "lower-fp8-gemm"):
                        print(f"  {r.name}: {r.stats} {r.seconds:.0f} s; refused: {r.details.get('refused') or '-'}")
            except Exception as exc:
                print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:400]}")
        for name, engine in engines.items():
            try:
                out = engine.run(feeds)["sample"]
                rows.append((label, name, median_ms(engine.device_runner(feeds), args.runs), rel_err(out, want), rel_l2(out, want)))
                print(f"  {name}: CUDA graph {engine.config.cuda_graph}")
            except Exception as exc:
                print(f"  {name} failed at {label}: {type(exc).__name__}: {str(exc)[:300]}")
        if args.profile and label == "256² b8":
            for name, engine in engines.items():
                profile_kernels(f"{name}, {label}", engine.device_runner(feeds))

        bf16 = dit_xl_2().to("cuda", torch.bfloat16)
        bf16.load_state_dict(fp32.state_dict())
        runners = {"torch eager bf16": bf16}
        if not args.no_compile:
            runners["torch.compile bf16"] = torch.compile(bf16)
            try:
                from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

                f8 = dit_xl_2().to("cuda", torch.bfloat16)
                f8.load_state_dict(fp32.state_dict())
                quantize_(f8, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
                runners["torchao float8 (per-row) + torch.compile"] = torch.compile(f8)
            except Exception as exc:
                print(f"  torchao float8 not run: {type(exc).__name__}: {str(exc)[:300]}")
        with torch.no_grad():
            for name, module in runners.items():
                def call(module=module):
                    out = module(x.bfloat16(), timestep=t, class_labels=c, return_dict=False)[0]
                    torch.cuda.synchronize()
                    return out
                try:
                    start = time.perf_counter()
                    out = call()
                    print(f"{label}: {name} first run {time.perf_counter() - start:.0f} s")
                    got = out.float().cpu().numpy()
                    rows.append((label, name, median_ms(call, args.runs), rel_err(got, want), rel_l2(got, want)))
                except Exception as exc:
                    print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        del bf16, runners
        torch.cuda.empty_cache()
        _print(rows)
    return rows


def _print(rows: list[tuple]) -> None:
    print("\n| case | runner | median ms | vs torch.compile bf16 | vs kiln fp16 | max rel err | rel L2 err |\n|---|---|---|---|---|---|---|")
    for case in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == case]
        compiled = next((r[2] for r in mine if r[1] == "torch.compile bf16"), None)
        fp16 = next((r[2] for r in mine if r[1] == "kiln h100 fp16 static"), None)
        for _, runner, ms, err, l2 in mine:
            print(f"| {case} | {runner} | {ms:.2f} | {f'{compiled / ms:.2f}x' if compiled else '-'} | "
                  f"{f'{fp16 / ms:.2f}x' if fp16 else '-'} | {err:.1e} | {l2:.1e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--case", choices=list(CASES), action="append", help="DiT cases to run (default: all)")
    parser.add_argument("--part", choices=["gemm", "dit", "all"], default="all")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile and torchao")
    parser.add_argument("--profile", action="store_true", help="top CUDA kernels of kiln's engines at 256² b8")
    args = parser.parse_args()

    import onnxruntime as ort

    ort.preload_dlls()
    ort.set_default_logger_severity(3)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(tempfile.mkdtemp(prefix="kiln-quant-"))
    if args.part == "gemm" or (args.part == "all" and not args.case):
        part_gemm(work, args.runs)
    if args.part in ("dit", "all"):
        rows = part_dit(work, args)
        print("\nFinal table")
        _print(rows)


if __name__ == "__main__":
    main()
