"""The pieces of `kiln optimize` called directly: choosing the target, the pass list, checking a profile
against a model's alignment, and build_engine on the seeded block example. (The whole command is in test_cli.)"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln import targets
from kiln.optimizer.build import Built, build_engine, select_passes
from kiln.optimizer.config import Options
from kiln.optimizer.errors import InputError
from kiln.optimizer.examples import transformer_block
from kiln.optimizer.optimize import _aligned, choose_target
from kiln.optimizer.shapes import input_specs
from kiln.targets import DimRange, Profile
from kiln.targets.align import METADATA_KEY as ALIGN_KEY

CLEANUP = ["warp-to-gridsample", "infer-shapes", "lift-constants", "fold-constants", "remove-identity", "cse",
           "dedupe-initializers", "remove-dead-nodes", "topological-sort"]  # fmt: skip


def names(chosen) -> list[str]:
    return [p.name for p in chosen]


def refusal(call, *args) -> InputError:
    with pytest.raises(InputError) as info:  # InputError: the CLI exits 2 with the message, no traceback
        call(*args)
    return info.value


# --- choose_target -----------------------------------------------------------------------------------


def test_choose_target():
    assert choose_target(Options()) is targets.CPU
    error = refusal(choose_target, Options(target="tpu"))
    assert (error.message, error.hint) == ("unknown target 'tpu'; known targets: auto, cpu, cuda, t4, a10g, a100, l4, l40s, h100, h200, b200, rtx-pro-6000, and each GPU's NAME-trt and NAME-ort-trt", "`kiln targets` lists them")
    error = refusal(choose_target, Options(precision="bf16"))
    assert (error.message, error.hint) == ("target 'cpu' does not support bf16", "it supports fp32, fp16")
    assert error.exit_code == 2


def test_unavailable_target_is_refused(monkeypatch):
    # A target whose provider no onnxruntime has, so the result is the same on CPU and GPU machines.
    missing = dataclasses.replace(targets.CPU, name="nowhere", providers=("NowhereExecutionProvider",))
    monkeypatch.setitem(targets.TARGETS, "nowhere", missing)
    error = refusal(choose_target, Options(target="nowhere"))
    assert error.message == f"target 'nowhere' is not available here: onnxruntime {ort.__version__} here lacks NowhereExecutionProvider"  # fmt: skip
    assert error.hint.startswith("`kiln targets` shows what is")


# --- select_passes -----------------------------------------------------------------------------------


def test_pass_order_per_target_and_precision():
    assert names(select_passes(Options(), targets.CPU)) == [*CLEANUP, "fusions"]
    assert names(select_passes(Options(), targets.CUDA)) == [*CLEANUP, "ort-fusions"]  # CUDA has ort-fusions
    assert names(select_passes(Options(precision="fp16"), targets.CPU)) == [*CLEANUP, "fusions", "fp16"]
    assert names(select_passes(Options(precision="bf16"), targets.CUDA)) == [*CLEANUP, "ort-fusions", "bf16"]
    # One size per dim: freeze the input shapes before anything else, so every later pass sees them static.
    chosen = select_passes(Options(), targets.CPU, {"batch": 2, "seq": 8})
    assert names(chosen) == ["freeze-shapes", *CLEANUP, "fusions"]
    assert chosen[0].sizes == {"batch": 2, "seq": 8}


def test_disabled_passes_are_removed():
    options = Options(precision="fp16", disable_passes=["cse", "fp16", "freeze-shapes"])
    assert names(select_passes(options, targets.CPU, {"batch": 2})) == [
        *(n for n in CLEANUP if n != "cse"), "fusions",
    ]  # fmt: skip


def test_unknown_pass_name_is_refused_listing_the_known_ones():
    error = refusal(select_passes, Options(disable_passes=["zap", "cse", "nope"]), targets.CPU)
    assert error.message == "cannot disable unknown pass(es) 'nope', 'zap'"
    assert error.hint == ("passes: bf16, cse, dedupe-initializers, fold-constants, fp16, freeze-shapes, fusions, infer-shapes, "
                          "lift-constants, lower-fp8-gemm, ort-fusions, quantize, remove-dead-nodes, remove-identity, topological-sort, "
                          "warp-to-gridsample")  # fmt: skip


def test_a_pass_of_another_target_or_precision_may_be_disabled():
    # One recipe serves every target: disabling ort-fusions on the CPU, or fp16 at fp32, changes nothing.
    options = Options(disable_passes=["ort-fusions", "fp16"])
    assert names(select_passes(options, targets.CPU)) == names(select_passes(Options(), targets.CPU))


# --- _aligned ----------------------------------------------------------------------------------------


def aligned_model(multiple: int) -> ir.Model:
    """img [batch, 3, h, w] -> Relu, whose height and width must be multiples of `multiple` (as FILM's)."""
    img = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Relu", ["img"], ["out"])], "g", [img], [out])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    rule = {"multiple": multiple, "inputs": {"img": [2, 3]}, "outputs": {"out": [2, 3]}}
    helper.set_model_props(proto, {ALIGN_KEY: json.dumps(rule)})
    return ir.serde.deserialize_model(proto)


def profile_of(model: ir.Model, **dims: DimRange) -> Profile:
    return Profile(input_specs(model), dims)


def test_aligned_rounds_opt_down_to_a_multiple():
    model = aligned_model(64)
    profile = profile_of(model, batch=DimRange(1, 3, 4), h=DimRange(64, 100, 256), w=DimRange(64, 64, 128))
    alignment, checked = _aligned(model, profile)
    assert alignment.multiple == 64 and alignment.inputs == {"img": (2, 3)}
    # h's opt 100 becomes 64, the aligned size below it; batch is not spatial and keeps its opt.
    assert checked.dims == {"batch": DimRange(1, 3, 4), "h": DimRange(64, 64, 256), "w": DimRange(64, 64, 128)}
    assert checked.inputs == profile.inputs


def test_model_without_alignment_keeps_its_profile():
    model = ir.serde.deserialize_model(transformer_block(seed=0))
    profile = profile_of(model, batch=DimRange(1, 3, 4), seq=DimRange(1, 7, 9))
    assert _aligned(model, profile) == (None, profile)


# --- build_engine on the block example ----------------------------------------------------------------


def reference(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def feeds_at(shape: tuple[int, ...], seed: int) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def build_block(directory, dims: dict[str, DimRange]) -> tuple[onnx.ModelProto, Built]:
    proto = transformer_block(seed=0)
    model = ir.serde.deserialize_model(proto)  # build_engine changes it in place: a copy of its own
    profile = profile_of(model, **dims)
    return proto, build_engine(model, directory, targets.CPU, Options(), profile)


def test_build_engine_writes_runs_and_matches_onnxruntime(tmp_path):
    proto, built = build_block(tmp_path, {"batch": DimRange(1, 2, 4), "seq": DimRange(1, 16, 64)})
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "engine" / "engine.json").is_file()
    assert built.model_files == ["model.onnx"]
    assert built.config.target == "cpu" and built.config.precision == "fp32" and not built.config.cuda_graph
    # A record per pass, in the order select_passes gives; the block loses an Identity pair, a folded
    # constant and a dead node: 35 -> 30.
    assert [r.name for r in built.records] == [*CLEANUP, "fusions"]
    assert built.records[0].nodes_before == 35 and built.records[-1].nodes_after == 30
    assert all(a.nodes_after == b.nodes_before for a, b in zip(built.records, built.records[1:]))
    assert len(built.model.graph) == 30 and len(onnx.load(tmp_path / "model.onnx").graph.node) == 30
    assert [s.shape for s in built.engine.inputs] == [("batch", "seq", 64)]
    for seed, shape in enumerate([(1, 1, 64), (3, 7, 64), (4, 64, 64)]):  # the corners and one between
        feeds = feeds_at(shape, seed)
        got = built.engine.run(feeds)["y"]
        np.testing.assert_allclose(got, reference(proto, feeds), rtol=0, atol=1e-4)


def test_static_profile_freezes_shapes_first(tmp_path):
    proto, built = build_block(tmp_path, {"batch": DimRange(2, 2, 2), "seq": DimRange(8, 8, 8)})
    assert [r.name for r in built.records] == ["freeze-shapes", *CLEANUP, "fusions"]
    assert built.records[0].stats["inputs_frozen"] == 1
    assert [s.shape for s in built.engine.inputs] == [(2, 8, 64)]
    assert [s.shape for s in built.engine.outputs] == [(2, 8, 64)]
    feeds = feeds_at((2, 8, 64), seed=0)
    np.testing.assert_allclose(built.engine.run(feeds)["y"], reference(proto, feeds), rtol=0, atol=1e-4)


def test_static_profile_of_an_unnamed_dim(tmp_path):
    """A dim with no name is INPUT:AXIS to kiln (--shapes x:0=2); freezing it must find its size."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    profile = profile_of(model, **{"x:0": DimRange(2, 2, 2)})
    built = build_engine(model, tmp_path, targets.CPU, Options(), profile)
    assert [s.shape for s in built.engine.inputs] == [(2, 4)]
