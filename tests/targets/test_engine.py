"""targets.engine and targets.manifest: an engine built by a target loads from its manifest alone, runs
through one binding (fixed buffers per shape, padding and cropping, the CUDA-graph rule) over host or
ONNX Runtime buffers, checks its feeds, and refuses a damaged or outdated engine directory."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln import targets
from kiln.targets import Alignment, DimRange, EngineError, HostBuffers, OrtDeviceBuffers, Profile, TensorSpec
from kiln.targets.manifest import write_manifest


def double_model(path, shape=("n", 3), opset=17):
    """y = relu(x) + relu(x) and z = x[:, :1] (an output whose shape differs from the input's)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "r"], ["y"]),
        helper.make_node("Slice", ["x", "zero", "one", "one"], ["z"]),
    ]
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("zero", 0), ("one", 1))]
    graph = helper.make_graph(
        nodes, "double", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape)), helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9), path)


@pytest.fixture
def built(tmp_path):
    double_model(tmp_path / "m.onnx")
    profile = Profile((TensorSpec("x", "float32", ("n", 3)),), {"n": DimRange(1, 2, 4)})
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    config = targets.CPU.build(tmp_path / "m.onnx", engine_dir, profile, "fp32")
    return engine_dir, config


def want(x):
    return {"y": 2 * np.maximum(x, 0), "z": x[:, :1]}


def test_build_writes_a_typed_manifest_and_load_reads_it(built):
    engine_dir, config = built
    manifest = json.loads((engine_dir / "engine.json").read_text())
    assert manifest["format"] == "kiln-engine" and manifest["version"] == 2
    assert manifest["target"] == "cpu" and manifest["precision"] == "fp32" and manifest["device"] == "cpu"
    assert manifest["providers"] == ["CPUExecutionProvider"] and manifest["provider_options"] == {}
    assert manifest["cuda_graph"] is False and manifest["tf32"] is False and manifest["alignment"] is None
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["n", 3]}]
    assert [o["name"] for o in manifest["outputs"]] == ["y", "z"]
    assert manifest["built_with"]["onnxruntime"] == __import__("onnxruntime").__version__
    assert "CPUExecutionProvider" in manifest["built_with"]["session_providers"]
    engine = targets.load_engine(engine_dir)
    assert engine.config == config == targets.read_manifest(engine_dir)
    assert engine.inputs == (TensorSpec("x", "float32", ("n", 3)),) and not engine.device_resident
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    for name, value in engine.run({"x": x}).items():
        np.testing.assert_array_equal(value, want(x)[name])


def test_an_optimizer_the_target_leaves_out_stays_out_at_build_and_load(tmp_path, monkeypatch):
    """A 3-D MatMul + Add: ONNX Runtime's MatMulAddFusion makes it a Gemm between Reshapes; a target that leaves
    the fusion out (as the CUDA targets do) keeps MatMul and Add in its engine, and records that in the manifest."""
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((8, 4), np.float32), rng.standard_normal(4, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx")
    profile = Profile((TensorSpec("x", "float32", (2, 3, 8)),), {})
    ops = {}
    for target in (targets.CPU, dataclasses.replace(targets.CPU, disabled_optimizers=("MatMulAddFusion",))):
        engine_dir = tmp_path / str(len(ops))
        engine_dir.mkdir()
        config = target.build(tmp_path / "m.onnx", engine_dir, profile, "fp32")
        ops[target.disabled_optimizers] = {n.op_type for n in onnx.load(engine_dir / config.model).graph.node}
        assert json.loads((engine_dir / "engine.json").read_text())["disabled_optimizers"] == list(target.disabled_optimizers)
        made = []
        original = targets.engine.ort.InferenceSession
        monkeypatch.setattr(targets.engine.ort, "InferenceSession", lambda *a, **k: made.append(k) or original(*a, **k))
        engine = targets.load_engine(engine_dir)
        monkeypatch.undo()
        assert made[0].get("disabled_optimizers", []) == list(target.disabled_optimizers)
        x = rng.standard_normal((2, 3, 8), np.float32)
        np.testing.assert_allclose(engine.run({"x": x})["y"], x @ weight + bias, rtol=1e-5, atol=1e-5)
    assert "Gemm" in ops[()] and "MatMul" not in ops[()]
    assert ops[("MatMulAddFusion",)] == {"MatMul", "Add"}
    assert targets.CUDA.disabled_optimizers == targets.H100.disabled_optimizers == ("MatMulAddFusion",)


@pytest.mark.parametrize("buffers", [HostBuffers(), OrtDeviceBuffers("cpu")], ids=["host", "ort"])
def test_binding_keeps_buffers_per_shape_and_rebinds_for_a_new_one(built, buffers):
    engine = targets.load_engine(built[0])
    binding = engine.bind(buffers)
    rng = np.random.default_rng(0)
    addresses = None
    for shape in ((2, 3), (2, 3), (4, 3), (1, 3)):
        x = rng.standard_normal(shape).astype(np.float32)
        out = binding.run({"x": x})
        for name, value in out.items():
            np.testing.assert_array_equal(value, want(x)[name])
        if shape == (2, 3):  # the same shape refills the same input buffer
            now = buffers.address(binding.bound["x"])
            assert addresses in (None, now)
            addresses = now
    assert binding.shapes == {"x": (1, 3)}


class FixedOutputBuffers(HostBuffers):
    """Host buffers that, like torch tensors, cannot hand out ONNX Runtime's own outputs."""

    takes_ort_outputs = False


def test_binding_learns_dynamic_output_shapes_for_buffers_that_need_them(built):
    binding = targets.load_engine(built[0]).bind(FixedOutputBuffers())
    x = np.arange(12, dtype=np.float32).reshape(4, 3) - 6
    out = binding.run({"x": x})
    assert binding.outputs_bound and binding.bound["z"].shape == (4, 1)
    np.testing.assert_array_equal(out["z"], x[:, :1])
    out["y"][:] = 0  # results are copies: the next run cannot change them, nor they the buffers
    np.testing.assert_array_equal(binding.run({"x": x})["y"], want(x)["y"])


def test_a_cuda_graph_engine_runs_one_shape_through_one_binding(built):
    engine = targets.load_engine(built[0])
    engine.config = dataclasses.replace(engine.config, cuda_graph=True)  # the rule, on the CPU
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(engine.run({"x": x})["y"], 2 * x)
    with pytest.raises(EngineError, match=r"this engine runs one shape, \{'x': \(2, 3\)\}, captured as a CUDA graph; got \{'x': \(1, 3\)\}"):
        engine.run({"x": np.ones((1, 3), np.float32)})
    with pytest.raises(EngineError, match="runs through one binding"):
        engine.bind(HostBuffers())


def test_device_runner_runs_on_staged_inputs(built):
    engine = targets.load_engine(built[0])
    x = np.ones((3, 3), np.float32)
    run = engine.device_runner({"x": x})
    run()
    np.testing.assert_array_equal(engine.run({"x": x})["y"], 2 * x)


def test_an_aligned_engine_pads_and_crops(tmp_path):
    double_model(tmp_path / "m.onnx", shape=("b", "h", "w", 3))
    alignment = Alignment(8, {"x": (1, 2)}, {"y": (1, 2)})
    profile = Profile((TensorSpec("x", "float32", ("b", "h", "w", 3)),), {"b": DimRange(1, 1, 2), "h": DimRange(8, 8, 16), "w": DimRange(8, 8, 16)})
    (tmp_path / "e").mkdir()
    config = targets.CPU.build(tmp_path / "m.onnx", tmp_path / "e", profile, alignment=alignment)
    assert config.alignment == alignment
    engine = targets.load_engine(tmp_path / "e")
    x = np.random.default_rng(1).standard_normal((1, 5, 13, 3)).astype(np.float32)
    out = engine.run({"x": x})
    np.testing.assert_array_equal(out["y"], 2 * np.maximum(x, 0))
    assert engine._host.shapes == {"x": (1, 8, 16, 3)}  # it ran at the padded size
    assert engine.check_feeds({"x": x}, "in.npz") == []
    assert engine.check_feeds({"x": np.zeros((1, 17, 8, 3), np.float32)}, "in.npz") == [
        "x axis 1 (h) is 24, outside the profile 8..16; the engine was not verified at this shape"  # checked at the padded size
    ]


def test_check_feeds_names_what_is_wrong(built):
    engine = targets.load_engine(built[0])
    with pytest.raises(EngineError, match=r"in.npz: missing \['x'\]; unexpected \['q'\]") as info:
        engine.check_feeds({"q": np.zeros((1, 3), np.float32)}, "in.npz")
    assert info.value.hint == "the engine takes x float32 ['n', 3]"
    with pytest.raises(EngineError, match="in.npz: input 'x' is float64, the engine takes float32"):
        engine.check_feeds({"x": np.zeros((1, 3))}, "in.npz")
    with pytest.raises(EngineError, match=r"in.npz: input 'x' has shape \[1, 4\], the engine takes \['n', 3\]"):
        engine.check_feeds({"x": np.zeros((1, 4), np.float32)}, "in.npz")
    assert engine.check_feeds({"x": np.zeros((5, 3), np.float32)}, "in.npz") == [
        "x axis 0 (n) is 5, outside the profile 1..4; the engine was not verified at this shape"
    ]


def test_check_feeds_holds_a_derived_axis_to_its_dim(tmp_path):
    """z's rows are half x's (GLM-Image's prior tokens per 2x2 patch): another count is refused by name."""
    x, z = (helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in (("x", ["n", 3]), ("z", ["n/2", 3])))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["z"], ["w"])], "halves",
                              [x, z], [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "w")])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx")
    specs = (TensorSpec("x", "float32", ("n", 3)), TensorSpec("z", "float32", ("n/2", 3)))
    (tmp_path / "e").mkdir()
    targets.CPU.build(tmp_path / "m.onnx", tmp_path / "e", Profile(specs, {"n": DimRange(2, 4, 8)}))
    engine = targets.load_engine(tmp_path / "e")
    assert engine.check_feeds({"x": np.zeros((6, 3), np.float32), "z": np.zeros((3, 3), np.float32)}, "in.npz") == []
    with pytest.raises(EngineError, match=r"in.npz: input 'z' axis 0 \(n/2\) is 4, but n is 6, so it must be 3"):
        engine.check_feeds({"x": np.zeros((6, 3), np.float32), "z": np.zeros((4, 3), np.float32)}, "in.npz")


def test_damaged_or_outdated_engines_are_refused(built, tmp_path):
    engine_dir, config = built
    with pytest.raises(EngineError, match="engine.json is missing"):
        targets.load_engine(tmp_path)
    manifest = engine_dir / "engine.json"
    good = manifest.read_text()
    for text, message in (
        ("{not json", "is not valid JSON"),
        (json.dumps({"format": "other"}), "is not a kiln engine manifest"),
        (json.dumps({"format": "kiln-engine", "version": 1}), "has engine format version 1, this kiln reads versions 2 and 3"),
        (json.dumps({"format": "kiln-engine", "version": 2, "target": "cpu"}), "is incomplete or damaged (KeyError: 'model')"),
    ):
        manifest.write_text(text)
        with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            targets.load_engine(engine_dir)
        assert info.value.hint
    manifest.write_text(good)
    model = engine_dir / "model.ort.onnx"
    model.write_bytes(model.read_bytes()[:40])  # truncated
    with pytest.raises(EngineError, match="ONNX Runtime cannot load .*model.ort.onnx") as info:
        targets.load_engine(engine_dir)
    assert info.value.hint == "the engine is damaged; rebuild it with `kiln optimize`"
    model.unlink()
    with pytest.raises(EngineError, match="model.ort.onnx is missing"):
        targets.load_engine(engine_dir)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(model="../../outside.onnx"), "names the engine model '../../outside.onnx', which is not a file of"),
    (lambda m: m.update(model="/etc/passwd"), "names the engine model '/etc/passwd', which is not a file of"),
    (lambda m: m.update(outputs=[]), "is damaged: it lists no outputs"),
    (lambda m: m.update(device={}), "is damaged: device is {}, not a name"),
    (lambda m: m.update(inputs=[]), "is damaged: its inputs [] and its profile's ['x'] differ"),
    (lambda m: m["inputs"][0].update(dtype="float99"), "is damaged: 'x' has dtype 'float99', which is no numpy dtype"),
    (lambda m: m["inputs"][0].update(shape=[1, -4]), "is damaged: 'x' has shape [1, -4]; dims are sizes or names"),
    (lambda m: m["inputs"][0].update(name=""), "is damaged: '' has no name"),
    (lambda m: m.update(profiles=[{"inputs": [], "dims": {}}]), "is damaged: its inputs ['x'] and its profile's [] differ"),
])  # fmt: skip
def test_a_manifest_that_would_mislead_loading_is_refused(built, edit, message):
    """Found by the fuzzing harness: each reached ONNX Runtime or numpy as an internal error."""
    engine_dir, _ = built
    manifest = engine_dir / "engine.json"
    good = manifest.read_text()
    data = json.loads(good)
    edit(data)
    manifest.write_text(json.dumps(data))
    try:
        with pytest.raises(EngineError) as info:
            targets.load_engine(engine_dir)
        assert message in info.value.message
        assert info.value.hint == "rebuild the engine with this kiln (`kiln optimize`)"
    finally:
        manifest.write_text(good)


def test_an_engine_for_a_provider_this_runtime_lacks_is_refused(built):
    engine_dir, config = built
    write_manifest(engine_dir, dataclasses.replace(config, target="cuda", providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this runtime has CUDA")
    with pytest.raises(EngineError, match="was built for target 'cuda', which needs CUDAExecutionProvider"):
        targets.load_engine(engine_dir)


def test_kiln_threads_caps_every_session(monkeypatch):
    import onnxruntime as ort

    from kiln.targets.engine import session_options

    monkeypatch.setenv("KILN_THREADS", "3")
    options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    monkeypatch.delenv("KILN_THREADS")
    assert session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL).intra_op_num_threads == 0  # ORT's default


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_a_bad_kiln_threads_is_refused_before_any_work(monkeypatch, tmp_path, capsys, value):
    from kiln.optimizer.cli import main

    monkeypatch.setenv("KILN_THREADS", value)
    assert main(["example", "block", str(tmp_path / "ex")]) == 2
    assert f"error: KILN_THREADS={value!r} is not a positive whole number" in capsys.readouterr().err
    assert not (tmp_path / "ex").exists()
