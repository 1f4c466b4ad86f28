"""freeze-shapes, and the precision passes' float32 regions on a real DiT export: phases stay float32
with their reasons, bf16 keeps the ops ONNX gives no bfloat16 form, and the results stay close."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from passes_helpers import assert_outputs_close, run_ort, serialize

from optimizer.config import TOLERANCES
from passes import ConvertPrecision, FreezeShapes, PassManager, cleanup_passes, op_counts

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from optimizer.diffusion_examples import tiny_model  # noqa: E402
from optimizer.importers.diffusers import export  # noqa: E402
from optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges  # noqa: E402

F32 = ir.DataType.FLOAT


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory):
    model = tiny_model("DiTTransformer2DModel")
    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [])
    path = tmp_path_factory.mktemp("dit") / "dit.onnx"
    export(model, adapter, ranges, path)
    return path


def _load(path) -> ir.Model:
    return ir.external_data.load_to_model(ir.load(path))


def _feeds(batch=2, side=16):
    rng = np.random.default_rng(0)
    return {"hidden_states": rng.standard_normal((batch, 4, side, side)).astype(np.float32),
            "timestep": rng.integers(0, 1000, (batch,)), "class_labels": rng.integers(0, 10, (batch,))}  # fmt: skip


def test_freeze_shapes_removes_the_shape_arithmetic(dit_path):
    model = _load(dit_path)
    want = run_ort(model, _feeds())
    assert op_counts(model)["Shape"] > 0
    pass_ = FreezeShapes({"batch": 2, "height": 16})
    assert pass_(model).modified
    assert "Shape" not in op_counts(model)
    assert [list(v.shape) for v in model.graph.inputs] == [[2, 4, 16, 16], [2], [2]]
    assert list(model.graph.outputs[0].shape) == [2, 4, 16, 16]
    assert pass_.stats["inputs_frozen"] == 3 and pass_.stats["nodes_removed"] > 0
    assert_outputs_close(want, run_ort(model, _feeds()), rtol=1e-5, atol=1e-5)
    again = FreezeShapes({"batch": 2, "height": 16})
    assert not again(model).modified


def test_freeze_shapes_needs_every_dim(dit_path):
    with pytest.raises(ir.passes.PreconditionError, match="no size for dynamic dim"):
        FreezeShapes({"batch": 2})(_load(dit_path))


def test_fp16_keeps_timestep_phases_in_float32(dit_path):
    model = _load(dit_path)
    want = run_ort(model, _feeds())
    model, records = PassManager([*cleanup_passes(), ConvertPrecision("fp16")]).run(model)
    kept = records[-1].details["kept_fp32"]
    phases = {n.name for n in model.graph if n.op_type in ("Sin", "Cos")}
    assert phases and phases <= set(kept)
    # The timestep's scaling into a phase stays float32 too, back to the Cast from int64.
    chain = [name for name, reason in kept.items() if reason.startswith("feeds Sin") or reason.startswith("feeds Cos")]
    assert chain and all(n.outputs[0].dtype in (F32, ir.DataType.DOUBLE) for n in model.graph if n.name in chain)
    assert_outputs_close(want, run_ort(model, _feeds()), **TOLERANCES["fp16"])


def test_bf16_keeps_ops_without_a_bfloat16_form(dit_path):
    model = _load(dit_path)
    want = run_ort(model, _feeds())
    model, records = PassManager([*cleanup_passes(), ConvertPrecision("bf16")]).run(model)
    kept = records[-1].details["kept_fp32"]
    opset = model.opset_imports[""]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert kept[conv.name] == f"ONNX Conv (opset {opset}) has no bfloat16 form"
    assert any(n.op_type == "MatMul" and n.outputs[0].dtype == ir.DataType.BFLOAT16 for n in model.graph)
    # ONNX Runtime's CPU provider has few bfloat16 kernels; ONNX's reference evaluator runs them all.
    got = ReferenceEvaluator(ir.to_proto(model)).run(None, _feeds())[0]
    assert_outputs_close(want, {"sample": got}, **TOLERANCES["bf16"])


def test_fp16_io_makes_float16_inputs_and_outputs(dit_path):
    model = _load(dit_path)
    model, _ = PassManager([*cleanup_passes(), ConvertPrecision("fp16", io_float32=False)]).run(model)
    assert [v.dtype for v in model.graph.inputs] == [ir.DataType.FLOAT16, ir.DataType.INT64, ir.DataType.INT64]
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    feeds = _feeds()
    got = run_ort(serialize(model), {**feeds, "hidden_states": feeds["hidden_states"].astype(np.float16)})
    assert got["sample"].dtype == np.float16
