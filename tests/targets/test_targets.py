"""Targets: the registry, the ONNX Runtime engine's build/load round trip, and its manifest errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import targets
from targets import DimRange, EngineError, Profile, TensorSpec


def tiny_model(path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "r"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return Profile((TensorSpec("x", "float32", ("n", 3)),), {"n": DimRange(1, 2, 4)})


def test_registry_and_description():
    assert targets.get_target("cpu") is targets.CPU
    with pytest.raises(KeyError, match="unknown target 'tpu'; known targets: cpu"):
        targets.get_target("tpu")
    described = targets.CPU.describe()
    assert described["available"] and described["unavailable_reason"] is None
    assert described["precisions"] == ["fp32", "fp16"]


def test_build_then_load_runs_the_model(tmp_path):
    profile = tiny_model(tmp_path / "m.onnx")
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    manifest = targets.CPU.build(tmp_path / "m.onnx", engine_dir, profile)
    assert manifest["target"] == "cpu" and (engine_dir / manifest["model"]).is_file()
    engine = targets.CPU.load(engine_dir)
    assert engine.profile == profile
    assert engine.inputs == (TensorSpec("x", "float32", ("n", 3)),)
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    np.testing.assert_array_equal(engine.run({"x": x})["y"], [[0.0, 1.0, 4.0]])


def test_manifest_errors(tmp_path):
    with pytest.raises(EngineError, match="engine.json is missing"):
        targets.CPU.load(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(EngineError, match="is not valid JSON"):
        targets.read_manifest(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(EngineError, match="is not a kiln engine manifest"):
        targets.read_manifest(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"format": "kiln-engine", "version": 99}))
    with pytest.raises(EngineError, match="has engine format version 99, this kiln reads version 1"):
        targets.read_manifest(tmp_path)
    profile = tiny_model(tmp_path / "m.onnx")
    targets.CPU.build(tmp_path / "m.onnx", tmp_path, profile)
    (tmp_path / "model.ort.onnx").unlink()
    with pytest.raises(EngineError, match="model.ort.onnx is missing; rebuild the engine"):
        targets.CPU.load(tmp_path)


def test_profile_corners_contains_and_json_round_trip():
    profile = Profile(
        (TensorSpec("a", "float32", ("b", "s", 8)), TensorSpec("m", "int64", ("b", 1))),
        {"b": DimRange(1, 2, 4), "s": DimRange(16, 16, 64)},
    )
    assert profile.corners() == [
        ("min", {"a": (1, 16, 8), "m": (1, 1)}),
        ("opt", {"a": (2, 16, 8), "m": (2, 1)}),
        ("max", {"a": (4, 64, 8), "m": (4, 1)}),
    ]
    assert profile.contains({"a": (3, 20, 8), "m": (3, 1)}) is None
    assert profile.contains({"a": (5, 20, 8), "m": (5, 1)}) == "a axis 0 (b) is 5, outside the profile 1..4"
    assert Profile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    static = Profile((TensorSpec("a", "float32", (2, 3)),), {})
    assert static.corners() == [("static", {"a": (2, 3)})]
    with pytest.raises(ValueError, match="do not match the inputs' dims"):
        Profile((TensorSpec("a", "float32", ("b",)),), {})
    with pytest.raises(ValueError, match="need 1 <= min <= opt <= max"):
        DimRange(4, 2, 8)


def test_random_inputs_are_seeded_and_typed():
    specs = (TensorSpec("f", "float32", ("n",)), TensorSpec("i", "int64", ("n",)), TensorSpec("b", "bool", (2,)))
    profile = Profile(specs, {"n": DimRange(1, 2, 5)}, {"i": (10, 12)})
    shapes = {"f": (5,), "i": (5,), "b": (2,)}
    first = profile.random_inputs(shapes, seed=3)
    second = profile.random_inputs(shapes, seed=3)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert first["f"].dtype == np.float32 and np.all(np.abs(first["f"]) <= 1)
    assert first["i"].dtype == np.int64 and set(first["i"]) <= {10, 11}
    assert first["b"].dtype == bool


def test_cuda_targets_say_why_they_are_unavailable_and_carry_their_settings():
    import onnxruntime as ort

    from optimizer.config import Options
    from optimizer.pipeline import pass_pipeline

    for target in (targets.CUDA, targets.H100):
        assert target.family == "cuda"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert target.available() == f"onnxruntime {ort.__version__} here lacks CUDAExecutionProvider"
    assert targets.CUDA.session_providers() == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
        "CPUExecutionProvider",
    ]
    # fp32 engines run without TF32 (verified to fp32's tolerance); fp16 ones keep it (tensor-core convolutions).
    assert targets.H100.session_providers(precision="fp32")[0][1]["use_tf32"] == "0"
    assert "use_tf32" not in targets.H100.session_providers(precision="fp16")[0][1]
    assert targets.CPU.session_providers(precision="fp32", cuda_stream=1234) == [("CPUExecutionProvider", {})]
    assert targets.H100.session_providers(cuda_stream=1234)[0][1]["user_compute_stream"] == "1234"
    assert dict(targets.H100.provider_options)["arena_extend_strategy"] == "kSameAsRequested"
    assert "ort-fusions" in [p.name for p in pass_pipeline(Options(), targets.H100)]
    assert "ort-fusions" not in [p.name for p in pass_pipeline(Options(), targets.CPU)]


def _bound_engine(static: bool):
    import onnxruntime as ort

    from optimizer.examples import transformer_block
    from targets.ort import BoundEngine

    session = ort.InferenceSession(transformer_block(seed=0).SerializeToString(), providers=["CPUExecutionProvider"])
    spec = targets.TensorSpec("x", "float32", ("batch", "seq", 64))
    profile = targets.Profile((spec,), {"batch": targets.DimRange(2, 2, 2), "seq": targets.DimRange(8, 8, 8)})
    return session, BoundEngine(session, profile, "cpu", static=static)


def test_bound_engine_refills_its_buffers_in_place():
    session, engine = _bound_engine(static=True)
    rng = np.random.default_rng(0)
    for _ in range(2):  # the second run reuses the first run's buffers
        x = rng.standard_normal((2, 8, 64)).astype(np.float32)
        np.testing.assert_allclose(engine.run({"x": x})["y"], session.run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)
    run = engine.device_runner({"x": x})
    run()
    with pytest.raises(targets.EngineError, match=r"this engine runs one shape, \{'x': \(2, 8, 64\)\}, captured as a CUDA graph"):
        engine.run({"x": np.zeros((1, 8, 64), np.float32)})


def test_dynamic_bound_engine_rebinds_for_a_new_shape():
    session, engine = _bound_engine(static=False)
    for shape in ((2, 8, 64), (1, 3, 64)):
        x = np.ones(shape, np.float32)
        np.testing.assert_allclose(engine.run({"x": x})["y"], session.run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_cuda_graphs_only_for_static_profiles():
    spec = targets.TensorSpec("x", "float32", ("batch",))
    static = targets.Profile((spec,), {"batch": targets.DimRange(4, 4, 4)})
    dynamic = targets.Profile((spec,), {"batch": targets.DimRange(1, 2, 4)})
    assert targets.H100.session_providers(static)[0][1]["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in targets.H100.session_providers(dynamic)[0][1]
    assert not targets.CPU.uses_cuda_graph(static)
