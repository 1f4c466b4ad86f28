"""lower-fp8-gemm: FP8 Q/DQ products into com.microsoft.GemmFloat8. ONNX Runtime runs GemmFloat8 on
CUDA only, so the lowered graph is checked here with onnx's reference evaluator and a reference
GemmFloat8 written from the op's definition (Y = alpha * A' B' * scaleA * scaleB)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from passes_helpers import check, dit_feeds, load, parse

from kiln.calibration import CalibrationSet, Sample
from kiln.passes import ConvertPrecision, FuseForOnnxRuntime, InferShapes, LowerFp8Gemm, Quantize, QuantConfig, op_counts
from kiln.passes.qdq import insert_qdq
from kiln.passes.quantize import find_layers


class GemmFloat8(OpRun):
    op_domain = "com.microsoft"

    def _run(self, A, B, C=None, scaleA=None, scaleB=None, scaleY=None, transA=0, transB=0, alpha=1.0, beta=0.0, dtype=1, activation=None):  # noqa: N803
        a = A.astype(np.float32).T if transA else A.astype(np.float32)
        b = B.astype(np.float32).T if transB else B.astype(np.float32)
        y = alpha * (a @ b) * np.float32(scaleA) * np.float32(scaleB)
        return (y.astype(np.float16 if dtype == 10 else np.float32),)


def _evaluate(model: ir.Model, feeds) -> np.ndarray:
    return ReferenceEvaluator(ir.to_proto(model), new_ops=[GemmFloat8]).run(None, feeds)[0]


def _data(n: int = 4) -> CalibrationSet:
    rng = np.random.default_rng(0)
    return CalibrationSet([Sample(str(i), {"x": rng.standard_normal((2, 8, 64)).astype(np.float32)}) for i in range(n)], "normal")


@pytest.mark.parametrize("per_channel", [True, False])
def test_lowered_block_computes_what_its_qdq_form_computes(block, block_feeds, per_channel):
    InferShapes()(block)  # as kiln's cleanup does before: the lowering reshapes by the activation's rank
    Quantize(QuantConfig("fp8", weights_per_channel=per_channel), _data())(block)
    want = _evaluate(block, block_feeds)
    lower = LowerFp8Gemm()
    assert lower(block).modified
    check(block)
    counts = op_counts(block)
    assert counts["com.microsoft::GemmFloat8"] == 2 and "DequantizeLinear" not in counts
    assert counts.get("Mul", 0) == 2 + (2 if per_channel else 0)  # the block's own two, then the weight scales
    assert lower.stats == {"lowered": 2} and lower.details["refused"] == {}
    gemms = [n for n in block.graph if n.op_type == "GemmFloat8"]
    assert all(n.attributes["transB"].as_int() == 1 for n in gemms)
    assert sorted(tuple(n.inputs[1].const_value.shape) for n in gemms) == [(64, 64), (256, 64)]  # fc1's [64, 256] stored [N, K]
    np.testing.assert_allclose(_evaluate(block, block_feeds), want, rtol=1e-4, atol=1e-4)
    assert LowerFp8Gemm()(block).modified is False


def test_modelopts_fp8_graph_is_lowered_too(block, block_feeds):
    pytest.importorskip("modelopt.onnx.quantization")
    InferShapes()(block)
    Quantize(QuantConfig("fp8", backend="modelopt"), _data())(block)
    InferShapes()(block)
    want = _evaluate(block, block_feeds)
    lower = LowerFp8Gemm()
    lower(block)
    check(block)
    assert lower.stats == {"lowered": 2} and "DequantizeLinear" not in op_counts(block)
    # ModelOpt quantizes the weights in the graph (QuantizeLinear of the float weight): folded here.
    assert not any(n.op_type == "QuantizeLinear" and n.inputs[0].const_value is not None for n in block.graph)
    np.testing.assert_allclose(_evaluate(block, block_feeds), want, rtol=1e-3, atol=1e-3)


def test_shared_activation_is_quantized_once(dit_export):
    model = load(dit_export[0])
    FuseForOnnxRuntime(pack_qkv=False)(model)
    data = CalibrationSet([Sample(str(i), dit_feeds(seed=i)) for i in range(2)], "random")
    Quantize(QuantConfig("fp8"), data)(model)
    ConvertPrecision("fp16")(model)
    quantize_before = op_counts(model)["QuantizeLinear"]
    lower = LowerFp8Gemm()
    lower(model)
    check(model)
    counts = op_counts(model)
    assert lower.stats == {"lowered": 12} and counts["com.microsoft::GemmFloat8"] == 12  # adaLN modulation stays fp16
    assert counts["com.microsoft::MultiHeadAttention"] == 2  # Q, K and V stay three products feeding it
    assert counts["QuantizeLinear"] == quantize_before  # q, k and v read one quantized activation
    assert "DequantizeLinear" not in counts
    assert all(n.attributes["dtype"].as_int() == int(ir.DataType.FLOAT16) for n in model.graph if n.op_type == "GemmFloat8")


def test_products_it_cannot_lower_keep_their_qdq_form_with_the_reason():
    w = np.random.default_rng(0).standard_normal((24, 32)).astype(np.float32)
    model = parse(f"""
        g (float[N, 24] x) => (float[N, 32] y) <float[24, 32] w = {{{', '.join(map(str, w.ravel()))}}}>
        {{ h = MatMul(x, w)  y = Relu(h) }}""")  # fmt: skip
    InferShapes()(model)
    layers = find_layers(model)
    insert_qdq(model, layers, {"x": 3.0}, "fp8")
    lower = LowerFp8Gemm()
    assert lower(model).modified is False
    assert lower.details["refused"] == {layers[0].node.name: "K=24 and N=32 must be multiples of 16 for cuBLASLt's FP8 GEMM"}
    int8 = parse(f"""
        g (float[N, 32] x) => (float[N, 32] y) <float[32, 32] w = {{{', '.join(map(str, np.ones(1024)))}}}>
        {{ y = MatMul(x, w) }}""")  # fmt: skip
    insert_qdq(int8, find_layers(int8), {"x": 1.0}, "int8")
    assert LowerFp8Gemm()(int8).modified is False  # INT8 Q/DQ is not FP8's to lower
