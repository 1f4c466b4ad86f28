"""The quantize pass: which layers it takes and keeps, the Q/DQ graphs of each backend (kiln, ONNX
Runtime, ModelOpt) and their quality on ONNX Runtime's CPU, SmoothQuant, the statistics cache."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import check, dit_feeds, load, parse, run_ort

from kiln.calibration import CalibrationSet, Sample
from kiln.calibration.cache import StatsCache
from kiln.calibration.quality import rel_l2
from kiln.passes import Quantize, QuantConfig, op_counts
from kiln.passes.quantize import FIRST_LAST, find_layers
from kiln.passes.smoothquant import smooth


def _block_data(n: int = 8) -> CalibrationSet:
    rng = np.random.default_rng(5)
    return CalibrationSet([Sample(str(i), {"x": rng.standard_normal((2, 8, 64)).astype(np.float32)}) for i in range(n)], "normal")


def _quantized(model: ir.Model, feeds, **config) -> tuple[Quantize, float]:
    """Quantize model in place; (the pass, relative L2 error of its output on ORT CPU against the float model)."""
    want = run_ort(model, feeds)
    data = config.pop("data", None) or _block_data()
    pass_ = Quantize(QuantConfig(**config), data)
    assert pass_(model).modified
    check(model)
    got = run_ort(model, feeds)
    return pass_, max(rel_l2(got[k], want[k]) for k in want)


def test_block_layers_and_first_last_kept(block):
    layers = find_layers(block)
    assert [layer.node.op_type for layer in layers] == ["MatMul"] * 4  # q·kᵀ and probs·v have no constant weight
    pass_, _ = _quantized(block, {"x": np.ones((1, 4, 64), np.float32)}, format="int8")
    kept = {row["node"]: row["kept"] for row in pass_.details["layers"]}
    assert list(kept.values()) == [FIRST_LAST, None, None, FIRST_LAST]
    assert pass_.stats == {"layers": 4, "quantized": 2, "kept": 2, "smoothed": 0}


@pytest.mark.parametrize("fmt, bound", [("int8", 2e-2), ("fp8", 5e-2)])
def test_kiln_backend_op_counts_storage_and_quality(block, block_feeds, fmt, bound):
    before = op_counts(block)
    pass_, error = _quantized(block, block_feeds, format=fmt, backend="kiln")
    counts = op_counts(block)
    # One Q/DQ pair per quantized activation, one DequantizeLinear per stored weight.
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 4
    assert counts["MatMul"] == before["MatMul"]
    storage = ir.DataType.INT8 if fmt == "int8" else ir.DataType.FLOAT8E4M3FN
    stored = [v for v in block.graph.initializers.values() if v.dtype == storage and len(v.const_value.shape) == 2]
    assert sorted(tuple(v.const_value.shape) for v in stored) == [(64, 64), (64, 256)]
    assert error < bound, error
    rows = [r for r in pass_.details["layers"] if r["format"] == fmt]
    assert all(r["weight_scale"]["per_channel"] and r["activation_scale"] > 0 for r in rows)


def test_fp8_per_tensor_weights(block, block_feeds):
    _, error = _quantized(block, block_feeds, format="fp8", weights_per_channel=False)
    scales = [n.inputs[1].const_value.numpy() for n in block.graph if n.op_type == "DequantizeLinear"]
    assert all(s.size == 1 for s in scales)
    assert error < 6e-2


def test_ort_backend(block, block_feeds):
    pass_, error = _quantized(block, block_feeds, format="int8", backend="ort")
    counts = op_counts(block)
    assert counts["QuantizeLinear"] >= 2 and counts["DequantizeLinear"] >= 4
    quantized = [n for n in block.graph if n.op_type == "MatMul" and all(
        v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in n.inputs)]  # fmt: skip
    assert len(quantized) == 2
    # The LayerNorms' gammas (ln1_scale, ln2_scale) would have been read as ln1's and ln2's scales.
    assert pass_.details["renamed"] == ["ln1_scale", "ln2_scale"]
    assert error < 2e-2, error


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_modelopt_backend(block, block_feeds, fmt):
    pytest.importorskip("modelopt.onnx.quantization")
    _, error = _quantized(block, block_feeds, format=fmt, backend="modelopt")
    quantized = [n for n in block.graph if n.op_type == "MatMul" and all(
        v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in n.inputs)]  # fmt: skip
    assert len(quantized) == 2
    assert error < (2e-2 if fmt == "int8" else 5e-2), error


def test_dit_keeps_what_modelopts_recipe_keeps(dit_export):
    path, _ = dit_export
    model = load(path)
    feeds = dit_feeds()
    data = CalibrationSet([Sample(str(i), dit_feeds(seed=i)) for i in range(4)], "random")
    pass_, error = _quantized(model, feeds, format="int8", data=data)
    kept = {row["module"]: row["kept"] for row in pass_.details["layers"] if row["kept"]}
    assert sorted(kept) == sorted([
        "pos_embed.proj", "proj_out_1", "proj_out_2",
        *[f"transformer_blocks.{b}.norm1.emb.timestep_embedder.linear_{i}" for b in (0, 1) for i in (1, 2)],
        "transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear",
    ])  # fmt: skip
    assert kept["pos_embed.proj"].startswith("patch and positional embedding")
    assert kept["proj_out_2"].startswith("norm_out/proj_out")
    assert kept["transformer_blocks.1.norm1.linear"].startswith("adaLN modulation")
    assert pass_.stats["quantized"] == 12
    assert error < 2e-2, error


def test_keep_regex_and_idempotence(block, block_feeds):
    pass_ = Quantize(QuantConfig("int8", keep=("fc1",)), _block_data())
    pass_(block)
    kept = {r["node"]: r["kept"] for r in pass_.details["layers"]}
    assert kept["MatMul_fc1_mm"] == "--keep fc1" and pass_.stats["quantized"] == 1
    again = Quantize(QuantConfig("int8", keep=("fc1",)), _block_data())
    assert again(block).modified is False  # quantized layers have no float weight left; the rest are kept
    assert again.stats["quantized"] == 0


def test_keep_everything(block):
    pass_ = Quantize(QuantConfig("int8", keep=(".",)), _block_data())
    assert pass_(block).modified is False
    assert {r["kept"] for r in pass_.details["layers"]} == {"--keep ."}


def _outlier_model() -> ir.Model:
    """Four MatMuls; the second one's input has channel 3 at fifty times the others (the outliers
    SmoothQuant is for). The first and last are kept, so the second and third are quantized."""
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32) / 6
    gain = ", ".join(["1.0"] * 3 + ["50.0"] + ["1.0"] * 28)
    return parse(f"""
        g (float[N, 32] x) => (float[N, 32] y) <float[32] gain = {{{gain}}}, float[32, 32] w = {{{', '.join(map(str, w.ravel()))}}}>
        {{ h0 = MatMul(x, w)  a = Mul(h0, gain)  h1 = MatMul(a, w)  r = Relu(h1)  h2 = MatMul(r, w)  y = MatMul(h2, w) }}""")  # fmt: skip


def _outlier_data() -> CalibrationSet:
    rng = np.random.default_rng(1)
    return CalibrationSet([Sample(str(i), {"x": rng.standard_normal((64, 32)).astype(np.float32)}) for i in range(6)], "normal")


def test_smoothing_alone_keeps_the_outputs():
    model = _outlier_model()
    feeds = {"x": np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)}
    want = run_ort(model, feeds)
    layers = find_layers(model)[1:2]
    name = layers[0].activation.name
    amax = {name: np.full(32, 1.0, np.float32) * np.array([1] * 3 + [50] + [1] * 28)}
    summary = smooth(model, layers, amax, 0.5)
    assert op_counts(model)["Mul"] == 2 and summary[name]["factor_max"] > 4
    np.testing.assert_allclose(run_ort(model, feeds)["y"], want["y"], rtol=1e-4, atol=1e-4)


def test_smoothquant_reduces_int8_error_on_outliers():
    feeds = {"x": np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32)}
    errors = {}
    for alpha in (None, 0.5):
        model = _outlier_model()
        want = run_ort(model, feeds)["y"]
        pass_ = Quantize(QuantConfig("int8", method="max", smoothquant=alpha), _outlier_data())
        pass_(model)
        assert pass_.stats["quantized"] == 2 and pass_.stats["smoothed"] == (2 if alpha else 0)
        errors[alpha] = rel_l2(run_ort(model, feeds)["y"], want)
    assert errors[0.5] < 0.7 * errors[None], errors


def test_statistics_cache_hit_and_corrupt_entry(tmp_path, block_feeds):
    cache = StatsCache(tmp_path)

    def run(model_source) -> Quantize:
        model = model_source()
        pass_ = Quantize(QuantConfig("int8", method="entropy"), _block_data(), cache)
        pass_(model)
        return pass_

    from kiln.optimizer.examples import transformer_block

    make = lambda: ir.serde.deserialize_model(transformer_block(seed=0))  # noqa: E731
    first = run(make)
    assert first.details["cache"] == ["miss"]
    second = run(make)
    assert second.details["cache"] == ["hit"]
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    third = run(make)
    assert third.details["cache"][0].startswith(f"corrupt entry {entry.name} recomputed")
    assert [r["threshold"] for r in third.details["layers"]] == [r["threshold"] for r in first.details["layers"]]
    assert run(make).details["cache"] == ["hit"]  # the entry was written again
