"""The GPU targets' passes on the small FILM graph: its Conv+LeakyRelu pairs are refused with the reason
(cuDNN has no LeakyRelu), and fp16 keeps the warp coordinates and GridSample in float32 and stays close."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import assert_idempotent, assert_outputs_close, run_ort

from kiln.optimizer.config import TOLERANCES
from kiln.passes import ConvertPrecision, FuseForOnnxRuntime, PassManager, WarpToGridSample, cleanup_passes, op_counts

F32 = ir.DataType.FLOAT


@pytest.fixture(scope="module")
def kiln_film(film) -> ir.Model:
    """The converted FILM after kiln's warp rewrite and cleanup, with the image output only."""
    model = ir.load(os.fspath(film["onnx"]))
    model.graph.outputs[:] = [v for v in model.graph.outputs if v.name == "image"]
    model, _ = PassManager([WarpToGridSample(), *cleanup_passes()]).run(model)
    return model


def _frames(height=64, width=96):
    rng = np.random.default_rng(0)
    return {"x0": rng.uniform(0, 1, (1, height, width, 3)).astype(np.float32),
            "x1": rng.uniform(0, 1, (1, height, width, 3)).astype(np.float32), "time": np.full((1, 1), 0.5, np.float32)}  # fmt: skip


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def test_ort_fusions_refuse_conv_leaky_relu_with_the_reason(kiln_film):
    model = _copy(kiln_film)
    want = run_ort(model, _frames())
    leaky = op_counts(model)["LeakyRelu"]
    pass_ = FuseForOnnxRuntime()
    pass_(model)
    assert op_counts(model)["LeakyRelu"] == leaky
    assert pass_.details["refused"]["conv-leakyrelu"] == {"cuDNN's fused convolution has no LeakyRelu; TensorRT fuses it itself": leaky}
    assert_outputs_close(want, run_ort(model, _frames()), rtol=1e-5, atol=1e-5)
    assert_idempotent(FuseForOnnxRuntime, model)


def test_fp16_keeps_warp_coordinates_in_float32(kiln_film):
    model = _copy(kiln_film)
    want = run_ort(model, _frames())
    pass_ = ConvertPrecision("fp16")
    pass_(model)
    samplers = [n for n in model.graph if n.op_type == "GridSample"]
    assert samplers and all(n.outputs[0].dtype == F32 and n.inputs[1].dtype == F32 for n in samplers)
    kept = pass_.details["kept_fp32"]
    assert all(kept[n.name].startswith("warp coordinates") for n in samplers)
    # The arithmetic that turns the flow into coordinates stays float32 too; the convolutions do not.
    chain = [name for name, reason in kept.items() if reason.startswith("feeds GridSample")]
    assert chain
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in model.graph if n.op_type == "Conv")
    assert_outputs_close(want, run_ort(model, _frames()), **TOLERANCES["fp16"])
