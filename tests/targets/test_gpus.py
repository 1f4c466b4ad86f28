"""The per-GPU targets: their entries, the table, `--target auto`, the FLOP count, the cost and roofline
arithmetic (against hand-computed values) and the refusal of an engine built on another GPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kiln import targets
from kiln.optimizer.cli import main
from kiln.targets import EngineError, load_engine
from kiln.targets.cost import RunWork, cost_rows, roofline_fraction, roofline_s, usd_per_1000
from kiln.targets.portability import differences
from kiln.targets.work import count_flops

NAMES = ["t4", "a10g", "l4", "l40s", "a100", "h100", "h200", "b200", "rtx-pro-6000"]


def test_every_gpu_entry_is_consistent_with_its_compute_capability():
    assert sorted(targets.GPUS) == sorted(NAMES)
    for gpu in targets.GPUS.values():
        cc = gpu.compute_capability
        assert ("bf16" in gpu.fast_precisions) == (cc >= (8, 0)), gpu.name
        assert ("fp8" in gpu.fast_precisions) == (cc >= (8, 9)) == ("fp8" in gpu.peak_tflops), gpu.name
        assert ("fp4" in gpu.fast_precisions) == (cc >= (10, 0)) == ("fp4" in gpu.peak_tflops), gpu.name
        assert gpu.peak_tflops["fp32"] < gpu.peak_tflops["fp16"] <= gpu.peak_tflops["int8"], gpu.name
        assert gpu.memory_gb > 0 and gpu.bandwidth_gb_s > 0
        assert gpu.price.usd_per_hour > 0 and "AWS" in gpu.price.source and gpu.price.date
    assert targets.GPUS["h100"].compute_capability == targets.GPUS["h200"].compute_capability == (9, 0)
    assert targets.GPUS["h200"].peak_flops("bf16") == targets.GPUS["h200"].peak_flops("fp16") == 989.5e12
    with pytest.raises(KeyError, match="NVIDIA A100 SXM4 80GB has no fp8 peak"):
        targets.GPUS["a100"].peak_flops("fp8")
    with pytest.raises(KeyError, match="NVIDIA T4 has no bf16 peak"):
        targets.GPUS["t4"].peak_flops("bf16")


@pytest.mark.parametrize(
    "device, name",
    [("Tesla T4", "t4"), ("NVIDIA A10G", "a10g"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L4", "l4"),
     ("NVIDIA L40S", "l40s"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA B200", "b200"),
     ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "rtx-pro-6000"), ("NVIDIA GeForce RTX 4090", None),
     # Cards of the same names with other peaks or bandwidths get the generic cuda target.
     ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA A100-SXM4-40GB", None),
     ("NVIDIA A100-PCIE-40GB", None), ("NVIDIA GB200", None)],
)  # fmt: skip
def test_a_cuda_device_name_finds_its_entry(device, name):
    from kiln.targets.gpus import gpu_named

    found = gpu_named(device)
    assert (found.name if found else None) == name


def test_a_gpu_target_runs_only_what_its_gpu_runs_fast():
    t4, a100, h200 = (targets.TARGETS[n] for n in ("t4", "a100", "h200"))
    assert t4.precisions == ("fp32", "fp16") and t4.quantize == ("int8",) and "fp8-gemm" not in t4.capabilities
    assert a100.precisions == ("fp32", "fp16", "bf16") and a100.quantize == ("int8",)
    assert h200.quantize == ("int8", "fp8") and "fp8-gemm" in h200.capabilities and h200.gpu is targets.GPUS["h200"]
    assert targets.H100 is targets.TARGETS["h100"]
    assert dict(h200.provider_options)["arena_extend_strategy"] == "kSameAsRequested"


def test_kiln_targets_shows_every_gpu_with_its_figures_and_whether_it_runs_here(capsys):
    assert main(["targets"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("this machine: no CUDA GPU") or "this machine: NVIDIA" in text.splitlines()[0]
    rows = {line.split()[0]: line for line in text.splitlines()[3:] if line and line.split()[0] in targets.TARGETS}
    assert sorted(rows) == sorted(targets.TARGETS)
    assert rows["h200"].split()[5:11] == ["9.0", "141", "4800", "989.5", "1979", "7.91"]
    assert " no: " in rows["h200"] or rows["h200"].rstrip().endswith("yes")
    assert main(["targets", "--json"]) == 0
    described = {t["name"]: t for t in json.loads(capsys.readouterr().out)["targets"]}
    assert described["l4"]["gpu"]["peak_tflops"]["fp8"] == 242.5
    assert described["l4"]["gpu"]["fast_precisions"] == ["fp16", "int8", "bf16", "fp8"]
    assert "g6.xlarge" in described["l4"]["gpu"]["price_source"]
    assert "gpu" not in described["cpu"]


def test_cost_and_roofline_arithmetic_against_hand_computed_values():
    gpus = targets.GPUS
    work = RunWork(flops=3.1e12, bytes=1.4e9, results=8, compute_format="fp16")
    # Compute-bound on the H200: 3.1e12 / 989.5e12 s against 1.4e9 / 4.8e12 s.
    assert roofline_s(work, gpus["h200"]) == (pytest.approx(3.1e12 / 989.5e12), "compute")
    # 7 ms a run, 125 runs for 1,000 results, at $7.912 an hour.
    assert usd_per_1000(7.0, gpus["h200"], 8) == pytest.approx(0.007 * 125 * 7.912 / 3600)
    assert roofline_fraction(work, 7.0, gpus["h200"]) == pytest.approx(3.1e12 / 0.007 / 989.5e12)
    rows = {r["target"]: r for r in cost_rows(work, 7.0, gpus["h200"], list(gpus.values()))}
    assert rows["h200"]["basis"] == "measured" and rows["h200"]["ms_per_run"] == 7.0
    assert rows["a100"]["basis"] == "estimated" and rows["a100"]["ms_per_run"] == pytest.approx(7.0 * 989.5 / 312)
    assert rows["a100"]["usd_per_1000_results"] == pytest.approx(7.0 * 989.5 / 312 / 1e3 * 125 * 3.431 / 3600)
    assert rows["a100"]["roofline_fraction"] is None  # an estimate has the measured fraction by construction
    assert rows["h100"]["ms_per_run"] == pytest.approx(7.0)  # the same tensor-core peak
    # Bandwidth-bound: 1 GFLOP and 1 GB a run; the L4 moves 300 GB/s against the H200's 4,800.
    light = RunWork(flops=1e9, bytes=1e9, results=1, compute_format="fp16")
    rows = {r["target"]: r for r in cost_rows(light, 0.5, gpus["h200"], list(gpus.values()))}
    assert rows["h200"]["bound"] == rows["l4"]["bound"] == "bandwidth"
    assert rows["l4"]["ms_per_run"] == pytest.approx(0.5 * 4800 / 300)
    # bf16 on a T4 (sm 7.5) is not estimated, FP8 on an A100 neither.
    bf16 = {r["target"]: r for r in cost_rows(RunWork(1e12, 1e9, 1, "bf16"), 1.0, gpus["h100"], list(gpus.values()))}
    assert bf16["t4"] == {"target": "t4", "gpu": "NVIDIA T4", "basis": "none", "reason": "it has no fast bf16 (sm 7.5)"}
    fp8 = {r["target"]: r for r in cost_rows(RunWork(1e12, 1e9, 1, "fp8"), 1.0, gpus["h100"], list(gpus.values()))}
    assert fp8["a100"]["basis"] == "none" and fp8["l40s"]["ms_per_run"] == pytest.approx(1979 / 733)


def _hand_model() -> ir.Model:
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[N,3,4] a, float[1,3,8,8] x, float[2,4] c, float[1,2,6,4] q, float[1,2,5,4] k, float[1,2,5,4] v, float[1,2,4,4] t)
        => (float[N,3,5] y, float[1,6,8,8] z, float[2,7] e, float[1,2,6,4] o, float[1,3,5,5] u, float[N,3,5] s) {
      y = MatMul(a, w)
      z = Conv <pads = [1,1,1,1]> (x, kw)
      e = Gemm <transB = 1> (c, gw)
      o = Attention(q, k, v)
      u = ConvTranspose(t, tw)
      flat = Flatten <axis = 0> (a)
      n = Shape(a)
      f = Slice(n, zero, one)
      r = Concat <axis = 0> (f, three, four)
      back = Reshape(flat, r)
      s = MatMul(back, w)
    }
    """  # back's shape is computed from N: ONNX shape inference alone loses it, the constant folding keeps it
    model = onnx.parser.parse_model(text)
    arrays = {"w": np.ones((4, 5)), "kw": np.ones((6, 3, 3, 3)), "gw": np.ones((7, 4)), "tw": np.ones((2, 3, 2, 2)),
              "zero": np.array([0]), "one": np.array([1]), "three": np.array([3]), "four": np.array([4])}  # fmt: skip
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(a.astype(np.float32 if a.dtype == np.float64 else np.int64), n) for n, a in arrays.items()
    )
    return ir.from_proto(model)


def test_flops_are_counted_per_op_as_by_hand():
    shapes = {"a": (2, 3, 4), "x": (1, 3, 8, 8), "c": (2, 4), "q": (1, 2, 6, 4), "k": (1, 2, 5, 4), "v": (1, 2, 5, 4), "t": (1, 2, 4, 4)}
    work = count_flops(_hand_model(), shapes)
    matmul = 2 * (2 * 3 * 5) * 4
    conv = 2 * (1 * 6 * 8 * 8) * (3 * 3 * 3)
    gemm = 2 * (2 * 7) * 4
    attention = 2 * (1 * 2 * 6 * 4) * 5 + 2 * (1 * 2 * 6 * 4) * 5  # Q·Kᵀ over 5 keys, then weights·V
    conv_transpose = 2 * (1 * 2 * 4 * 4) * (3 * 2 * 2)
    assert work.flops == 2 * matmul + conv + gemm + attention + conv_transpose  # the reshaped MatMul counted too
    assert work.uncounted == {}
    bigger = count_flops(_hand_model(), {**shapes, "a": (5, 3, 4)})
    assert bigger.flops - work.flops == 2 * 2 * (3 * 3 * 5) * 4  # only the two MatMuls follow N


def test_flops_inside_functions_count_and_inside_subgraphs_are_reported():
    text = """
    <ir_version: 10, opset_import: ["" : 21, "local" : 1]>
    g (float[2,4] a, bool c) => (float[2,4] y, float[2,4] z) {
      y = local.square(a)
      z = If(c) <then_branch = t () => (float[2,4] o) { o = MatMul(a, a4) }, else_branch = e () => (float[2,4] o) { o = Identity(a) }>
    }
    <domain: "local", opset_import: ["" : 21]>
    square (x) => (out) { sq = Constant <value = float[4,4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> () \n out = MatMul(x, sq) }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "a4"))
    work = count_flops(ir.from_proto(model), {"a": (2, 4), "c": ()})
    assert work.flops == 2 * (2 * 4) * 4  # the function's MatMul
    assert work.uncounted == {"MatMul in a subgraph": 1}


def test_an_engine_from_another_gpu_is_refused_with_what_differs():
    h200 = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "onnxruntime": "1.31.1"}
    assert differences({"onnxruntime": "1.31.1"}, {}, one_model=False) == []  # a CPU engine loads anywhere
    assert differences(h200, dict(h200), one_model=True) == []
    assert differences(h200, {**h200, "onnxruntime": "1.32.0"}, one_model=True) == []  # a newer runtime is fine
    edited = {**h200, "compute_capability": "8.9"}
    assert differences(edited, h200, one_model=False) == [
        "it was built on NVIDIA H200 (compute capability 8.9), and this GPU is NVIDIA H200 (compute capability 9.0)"
    ]
    h100 = {**h200, "gpu": "NVIDIA H100 80GB HBM3"}
    assert differences(h200, h100, one_model=True) == ["it was built for NVIDIA H200, and this GPU is NVIDIA H100 80GB HBM3"]
    assert differences(h200, h100, one_model=False) == []  # the generic cuda target: same compute capability
    assert differences(h200, {"onnxruntime": "1.31.1"}, one_model=True) == [
        "it was built on NVIDIA H200 (compute capability 9.0), and this machine has no CUDA GPU"
    ]
    assert differences(h200, {**h200, "onnxruntime": "1.30.0"}, one_model=True) == [
        "it was built with onnxruntime 1.31.1, and onnxruntime here is the older 1.30.0"
    ]
    plan = {**h200, "tensorrt": "10.13.0"}
    assert differences(plan, {**h200, "tensorrt": "10.14.1"}, one_model=True) == [
        "it is a TensorRT 10.13.0 plan, and TensorRT here is 10.14.1"
    ]


def test_a_copied_engine_whose_manifest_names_another_gpu_is_refused_on_load(block_engine, tmp_path, capsys):
    copy = tmp_path / "copied"
    shutil.copytree(block_engine, copy)
    manifest = copy / "engine" / "engine.json"
    body = json.loads(manifest.read_text())
    body.update(target="h200", device="cuda", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    body["built_with"].update(gpu="NVIDIA H200", compute_capability="9.0")
    manifest.write_text(json.dumps(body))
    if targets.gpu_here()[0] is not None:
        pytest.skip("this machine has a GPU: the refusal below is for a machine without one")
    with pytest.raises(EngineError, match="this machine has no CUDA GPU") as info:
        load_engine(copy / "engine")
    assert info.value.message == (f"the engine in {copy / 'engine'} does not run on this machine: it was built on NVIDIA H200 "
                                  "(compute capability 9.0), and this machine has no CUDA GPU")  # fmt: skip
    assert "--target auto" in info.value.hint
    assert main(["bench", str(copy), "--runs", "1"]) == 2
    assert "does not run on this machine: it was built on NVIDIA H200" in capsys.readouterr().err


def test_target_auto_without_a_gpu_builds_for_the_cpu_and_reports_work_but_no_cost(tmp_path):
    if targets.gpu_here()[0] is not None:
        pytest.skip("this machine has a GPU")
    model = tmp_path / "mm.onnx"
    onnx.save(onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N,16] x) => (float[N,8] y) { y = MatMul(x, w) }
    """), model)  # fmt: skip
    proto = onnx.load(model)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((16, 8), np.float32), "w"))
    onnx.save(proto, model)
    out = tmp_path / "out"
    assert main(["optimize", str(model), "-o", str(out), "--target", "auto", "--shapes", "N=1..4..8", "--bench-runs", "2", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["name"] == "cpu"
    assert "target auto: no CUDA GPU here, so cpu" in report["notes"]
    assert {corner: w["flops"] for corner, w in report["work"].items()} == {"min": 2 * 8 * 16, "opt": 2 * 4 * 8 * 16, "max": 2 * 8 * 8 * 16}
    assert report["work"]["opt"]["weight_bytes"] == 16 * 8 * 4
    assert report["cost"] == {"measured_on": None, "reason": "no cost figures: it ran on the CPU", "rows": []}
    assert "## Cost per 1,000 results\n\nno cost figures: it ran on the CPU." in (out / "report.md").read_text()


def test_the_cost_section_of_a_run_measured_on_a_gpu_with_an_entry(block_engine, monkeypatch):
    """The section's arithmetic from a latency row as the GPU benchmark writes it (the GPU named, not run)."""
    from kiln.optimizer.bench import cost_section

    engine = load_engine(block_engine / "engine")  # x [batch 1..4, seq 1..64, 64]
    monkeypatch.setattr(targets, "gpu_here", lambda: ("NVIDIA H200", targets.GPUS["h200"]))
    work = {"opt": {"flops": 2e9, "weight_bytes": 1_000_000}}
    sizes = engine.profile.sizes("opt")
    latency = [{"corner": "opt", "io": "device", "median_ms": 0.5}]
    section = cost_section(work, latency, engine, "fp16")
    io_bytes = 2 * sizes["batch"] * sizes["seq"] * 64 * 4  # x in, y out, float32
    assert {k: v for k, v in section.items() if k != "rows"} == {
        "measured_on": "h200", "gpu": "NVIDIA H200", "shape": "opt", "results_per_run": sizes["batch"],
        "flops_per_run": 2e9, "bytes_per_run": 1_000_000 + io_bytes, "compute_format": "fp16"}  # fmt: skip
    rows = {r["target"]: r for r in section["rows"]}
    assert rows["h200"]["usd_per_1000_results"] == pytest.approx(0.5e-3 * (1000 / sizes["batch"]) * 7.912 / 3600)
    assert rows["h200"]["roofline_fraction"] == pytest.approx(2e9 / 0.5e-3 / 989.5e12)
    assert rows["l40s"]["ms_per_run"] == pytest.approx(0.5 * 989.5 / 362.05)  # compute-bound: 2 GFLOP against ~1 MB
    assert cost_section({}, latency, engine, "fp16")["reason"] == "no cost figures: the build counted no FLOPs (an older kiln, or a graph it could not count)"
    assert cost_section(None, latency, engine, "fp16")["reason"].startswith("no cost figures: the engine has no report.json beside it")
    monkeypatch.setattr(targets, "gpu_here", lambda: ("NVIDIA GeForce RTX 4090", None))
    assert cost_section(work, latency, engine, "fp16")["reason"] == "no cost figures: kiln has no price for NVIDIA GeForce RTX 4090"


def test_a_per_gpu_target_runs_only_on_its_own_gpu(monkeypatch):
    import kiln.targets.gpu as gpu_module

    assert targets.TARGETS["cuda"].other_gpu() is None and targets.CPU.other_gpu() is None
    monkeypatch.setattr(gpu_module, "device_name", lambda device=0: "NVIDIA H100 80GB HBM3")
    assert targets.TARGETS["h100"].other_gpu() is None
    assert targets.TARGETS["h100-ort-trt"].other_gpu() is None
    assert targets.TARGETS["h200"].other_gpu() == (
        "this machine's GPU is NVIDIA H100 80GB HBM3, not the NVIDIA H200 SXM 141GB (`--target auto` picks the one here)"
    )
    monkeypatch.setattr(gpu_module, "device_name", lambda device=0: None)
    assert targets.TARGETS["h100"].other_gpu() == "this machine has no CUDA GPU, and h100 is for the NVIDIA H100 SXM5 80GB"


def test_the_compute_format_is_what_the_engine_s_matrix_products_run_in():
    from kiln.optimizer.bench import compute_format

    cuda = {"target": {"family": "cuda"}, "precision": "fp16"}
    lowered = [{"name": "quantize", "modified": True}, {"name": "lower-fp8-gemm", "modified": True}]
    assert compute_format(cuda) == "fp16"
    assert compute_format({**cuda, "quantization": {"format": "fp8"}, "passes": lowered}) == "fp8"  # GemmFloat8
    assert compute_format({**cuda, "quantization": {"format": "fp8"}, "passes": lowered[:1]}) == "fp16"  # DQ + fp16 GEMM
    assert compute_format({**cuda, "quantization": {"format": "int8"}}) == "fp16"
    assert compute_format({"target": {"family": "cpu"}, "precision": "fp32", "quantization": {"format": "int8"}}) == "int8"


def test_kiln_bench_on_an_engine_whose_report_is_damaged_gives_no_cost_and_says_why(block_engine, tmp_path, capsys):
    copy = tmp_path / "damaged"
    shutil.copytree(block_engine, copy)
    report = json.loads((copy / "report.json").read_text())
    report.update(work="garbage", passes="x")
    (copy / "report.json").write_text(json.dumps(report))
    assert main(["bench", str(copy), "--runs", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cost"] == {
        "measured_on": None, "reason": "no cost figures: the engine's report.json is damaged", "rows": []}  # fmt: skip
