"""kiln.optimizer.onnx_files: finding, loading (with its checks), hashing and saving ONNX models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.optimizer import onnx_files as models
from kiln.optimizer.errors import EXIT_BAD_INPUT, InputError

# A version ONNX Runtime runs, inside kiln's supported range.
OPSET = 17
IR_VERSION = 10
N = 32  # W is N x N float32: 4096 bytes, above onnx_ir's 1024-byte external-data threshold


def weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, N)).astype(np.float32), rng.standard_normal((N,)).astype(np.float32)


def make_model(
    w: np.ndarray | None = None,
    b: np.ndarray | None = None,
    act: str = "Relu",
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """y = act(x @ W + B), x of shape [batch, N]."""
    if w is None or b is None:
        w, b = weights()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
        helper.make_node("Add", ["h", "B"], ["z"], name="add"),
        helper.make_node(act, ["z"], ["y"], name="act"),
    ]
    graph = helper.make_graph(
        nodes, "g", [x], [y], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    return model


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(x @ w + b, 0)


def save_external(directory: Path, location: str = "weights.data") -> Path:
    """The model in directory/model.onnx with both weights in one external data file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save(make_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)  # fmt: skip
    return path


def set_location(path: Path, location: str) -> None:
    """Point every external tensor of the model file at location, leaving the data file alone."""
    proto = onnx.load(path, load_external_data=False)
    changed = 0
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
                changed += 1
    assert changed == 2
    path.write_bytes(proto.SerializeToString())


def load_error(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        models.load_model(path)
    assert info.value.exit_code == EXIT_BAD_INPUT == 2
    return info.value


# find_model


def test_find_model_missing_path(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(InputError) as info:
        models.find_model(missing)
    assert info.value.message == f"{missing}: no such file or directory"
    assert info.value.exit_code == 2


def test_find_model_directory_without_onnx(tmp_path):
    (tmp_path / "weights.data").write_bytes(b"\0" * 8)
    (tmp_path / "model.onnx.txt").write_text("not a model")
    with pytest.raises(InputError) as info:
        models.find_model(tmp_path)
    assert info.value.message == f"{tmp_path} is a directory with no model in it (no .onnx file)"
    assert info.value.exit_code == 2


def test_find_model_directory_with_several(tmp_path):
    for name in ("b.onnx", "a.onnx", "c.onnx"):
        onnx.save(make_model(), tmp_path / name)
    with pytest.raises(InputError) as info:
        models.find_model(tmp_path)
    assert info.value.message == f"{tmp_path} holds several models (a.onnx, b.onnx, c.onnx)"


def test_find_model_prefers_model_onnx(tmp_path):
    for name in ("a.onnx", "model.onnx", "z.onnx"):
        onnx.save(make_model(), tmp_path / name)
    assert models.find_model(tmp_path) == tmp_path / "model.onnx"


def test_find_model_single_onnx_in_directory_and_file_path(tmp_path):
    onnx.save(make_model(), tmp_path / "net.onnx")
    assert models.find_model(tmp_path) == tmp_path / "net.onnx"
    assert models.find_model(tmp_path / "net.onnx") == tmp_path / "net.onnx"


# load_model: broken files


def test_load_good_model(tmp_path):
    onnx.save(make_model(), tmp_path / "model.onnx")
    model = models.load_model(tmp_path)
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu"]
    assert sorted(model.graph.initializers) == ["B", "W"]
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), weights()[0])


def test_load_empty_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    err = load_error(path)
    assert err.message == f"{path} is empty (0 bytes)"


def test_load_truncated_model(tmp_path):
    data = make_model().SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    err = load_error(path)
    assert err.message == (
        f"{path} is not a readable ONNX model; it may be truncated or not ONNX at all (DecodeError)"
    )


def test_load_every_truncation_is_an_input_error(tmp_path):
    data = make_model().SerializeToString()
    path = tmp_path / "model.onnx"
    for cut in range(1, len(data), 97):
        path.write_bytes(data[:cut])
        err = load_error(path)
        assert err.message.startswith(f"{path} is not a readable ONNX model"), (cut, err.message)


def test_load_random_bytes(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(1234).bytes(4096))
    err = load_error(path)
    assert err.message.startswith(f"{path} is not a readable ONNX model")


def test_load_model_without_graph(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=IR_VERSION).SerializeToString())
    err = load_error(path)
    assert err.message == f"{path} is not a readable ONNX model: it has no graph or no opset"


def test_load_newer_opset_refused(tmp_path):
    path = tmp_path / "model.onnx"
    top = onnx.defs.onnx_opset_version()
    onnx.save(make_model(opset=top + 1), path)
    err = load_error(path)
    assert err.message == f"{path} uses ONNX opset {top + 1}; kiln supports opsets 13..{top}"
    assert err.hint == "re-export the model at a supported opset, or update kiln's onnx"


def run_ort(model: onnx.ModelProto | Path, feeds: dict) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("opset", [7, 12])
def test_load_old_opset_upgrades_with_a_note(tmp_path, opset):
    path = tmp_path / "model.onnx"
    onnx.save(make_model(opset=opset), path)
    notes = []
    model = models.load_model(path, notes)
    assert model.opset_imports[""] == models.UPGRADE_OPSET == 17
    assert model.ir_version == IR_VERSION  # 10 already: kept
    assert notes == [f"the model (IR version {IR_VERSION}, ONNX opset {opset}) was upgraded to IR version {IR_VERSION}, "
                     "ONNX opset 17 with onnx's version converter; verification compares the engine with the original model"]  # fmt: skip


def upsample_model(ir_version: int) -> onnx.ModelProto:
    """Opset 9: y = Upsample(x * w) with nearest scales (1, 1, 2, 2); w is an initializer and, as IR 3
    requires, a graph input too."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 3])
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 6])
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Upsample", ["xw", "scales"], ["y"], mode="nearest")]
    inits = [numpy_helper.from_array(np.array([1.5], np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]  # fmt: skip
    scales_in = helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4])
    graph = helper.make_graph(nodes, "g", [x, w_in, scales_in], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=ir_version)


def test_load_ir3_opset9_model_upgrades_ops_and_keeps_weights_out_of_the_inputs(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(upsample_model(ir_version=3), path)
    notes = []
    model = models.load_model(path, notes)
    assert (model.ir_version, model.opset_imports[""]) == (8, 17)
    assert [n.op_type for n in model.graph] == ["Mul", "Constant", "Resize"]  # Upsample is gone after opset 9; roi is a Constant
    assert [v.name for v in model.graph.inputs] == ["x"]  # w and scales are weights, as IR 3 meant them
    assert notes[0].startswith("the model (IR version 3, ONNX opset 9) was upgraded to IR version 8, ONNX opset 17")
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    upgraded = tmp_path / "upgraded.onnx"
    ir.save(model, upgraded)
    np.testing.assert_array_equal(run_ort(upgraded, {"x": x})[0], run_ort(path, {"x": x})[0])


def test_load_old_opset_the_converter_cannot_take_is_refused_naming_the_op(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("ImageScaler", ["x"], ["y"], scale=2.0)], "g", [x], [y])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3), path)
    err = load_error(path)
    assert err.message == (f"{path} uses ONNX opset 6, below kiln's 13, and onnx's version converter cannot upgrade it to "
                           "opset 17: ImageScaler is no ONNX op (an experimental op since removed)")  # fmt: skip
    assert err.hint == "convert it with onnx.version_converter.convert_version, or re-export at opset 13 or newer"


def test_load_old_model_with_external_data_is_refused(tmp_path):
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    onnx.save(make_model(opset=12), path, save_as_external_data=True, location="weights.data", size_threshold=0)
    err = load_error(path)
    assert err.message == (f"{path} (IR version {IR_VERSION}, ONNX opset 12) is older than kiln supports (IR 7, opset 13) "
                           "and keeps its weights in external data, which kiln does not upgrade")  # fmt: skip


@pytest.mark.parametrize("opset", [13, onnx.defs.onnx_opset_version()])
def test_load_opset_bounds_accepted(tmp_path, opset):
    path = tmp_path / "model.onnx"
    onnx.save(make_model(opset=opset), path)
    assert models.load_model(path).opset_imports[""] == opset


def test_load_newer_ir_version_refused(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(make_model(ir_version=onnx.IR_VERSION + 1), path)
    err = load_error(path)
    assert err.message == f"{path} has IR version {onnx.IR_VERSION + 1}; kiln supports 7..{onnx.IR_VERSION}"


@pytest.mark.parametrize("ir_version", [3, 6])
def test_load_old_ir_version_upgrades(tmp_path, ir_version):
    path = tmp_path / "model.onnx"
    onnx.save(make_model(ir_version=ir_version), path)
    notes = []
    model = models.load_model(path, notes)
    assert (model.ir_version, model.opset_imports[""]) == (8, OPSET)  # opset 17 needs IR 8
    assert notes == [f"the model (IR version {ir_version}, ONNX opset {OPSET}) was upgraded to IR version 8, ONNX opset "
                     f"{OPSET} with onnx's version converter; verification compares the engine with the original model"]  # fmt: skip


# load_model: external data


def test_external_data_with_dotdot(tmp_path):
    path = save_external(tmp_path / "m")
    os.replace(tmp_path / "m" / "weights.data", tmp_path / "weights.data")
    set_location(path, "../weights.data")
    err = load_error(path)
    assert err.message == (
        f"{path}: tensor 'W' has external data location '../weights.data', "
        "which uses '..' to leave the model's directory"
    )


def test_external_data_with_dotdot_inside(tmp_path):
    path = save_external(tmp_path / "m")
    (tmp_path / "m" / "sub").mkdir()
    set_location(path, "sub/../weights.data")  # would resolve inside, but '..' is refused outright
    err = load_error(path)
    assert "which uses '..' to leave the model's directory" in err.message
    assert err.message.startswith(f"{path}: tensor 'W' has external data location 'sub/../weights.data'")


def test_external_data_absolute_location(tmp_path):
    path = save_external(tmp_path / "m")
    absolute = os.fspath(tmp_path / "m" / "weights.data")  # exists, but absolute paths are refused
    set_location(path, absolute)
    err = load_error(path)
    assert err.message == f"{path}: tensor 'W' has external data location {absolute!r}, an absolute path"


def test_external_data_symlink_leaving_directory(tmp_path):
    path = save_external(tmp_path / "m")
    outside = tmp_path / "outside.data"
    os.replace(tmp_path / "m" / "weights.data", outside)
    os.symlink(outside, tmp_path / "m" / "weights.data")
    err = load_error(path)
    assert err.message == (
        f"{path}: tensor 'W' has external data location 'weights.data', "
        f"which resolves outside the model's directory (to {outside.resolve()})"
    )


def test_external_data_symlink_inside_directory_is_fine(tmp_path):
    path = save_external(tmp_path / "m")
    os.replace(tmp_path / "m" / "weights.data", tmp_path / "m" / "real.data")
    os.symlink("real.data", tmp_path / "m" / "weights.data")
    model = models.load_model(path)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), weights()[0])


def test_external_data_hardlink_is_refused(tmp_path):
    """A hard link looks like a file of the directory, but may be the same file as one anywhere else."""
    path = save_external(tmp_path / "m")
    outside = tmp_path / "outside.data"
    os.replace(tmp_path / "m" / "weights.data", outside)
    os.link(outside, tmp_path / "m" / "weights.data")
    err = load_error(path)
    assert err.message == f"{path}: tensor 'W' has external data location 'weights.data', a file with 2 hard links"
    assert err.hint == "copy the data file instead of linking it"


@pytest.mark.parametrize("location", ["..\\weights.data", "sub\\weights.data"])
def test_external_data_with_backslashes_is_refused(tmp_path, location):
    path = save_external(tmp_path / "m")
    set_location(path, location)
    err = load_error(path)
    assert err.message == f"{path}: tensor 'W' has external data location {location!r}, which holds a backslash"


@pytest.mark.parametrize("location", ["file:///etc/passwd", "https://example.com/w.data", "C:weights.data", "s3://b/w"])
def test_external_data_url_or_drive_is_refused(tmp_path, location):
    path = save_external(tmp_path / "m")
    set_location(path, location)
    err = load_error(path)
    assert err.message == (f"{path}: tensor 'W' has external data location {location!r}, "
                           "a URL or drive; kiln reads only files beside the model")  # fmt: skip


def test_duplicate_value_names_are_bad_input(tmp_path):
    """Two nodes writing one value: onnx loads it, onnx-ir refuses it (SerdeError), kiln says so."""
    model = onnx.parser.parse_model('''<ir_version: 9, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu(x)  y = Neg(x) }''')
    path = tmp_path / "dup.onnx"
    onnx.save(model, path)
    err = load_error(path)
    assert err.message.startswith(f"{path} is not a valid ONNX graph: Output 'y' is redeclared in the current graph scope")
    assert err.hint == "re-export the model; onnx.checker.check_model names what is wrong"


def test_external_data_missing_file(tmp_path):
    path = save_external(tmp_path / "m")
    (tmp_path / "m" / "weights.data").unlink()
    err = load_error(path)
    assert err.message == f"{path}: tensor 'W' has external data location 'weights.data', which does not exist"
    assert err.hint == "copy the data file next to the model"


def test_external_data_past_end_of_file(tmp_path):
    path = save_external(tmp_path / "m")
    data = tmp_path / "m" / "weights.data"
    w_bytes, b_bytes = N * N * 4, N * 4
    proto = onnx.load(path, load_external_data=False)
    layout = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer}
    # onnx writes tensors in initializer order: W at 0, then B (aligned).
    assert layout["W"]["offset"] == "0" and layout["W"]["length"] == str(w_bytes)
    b_offset = int(layout["B"]["offset"])
    assert b_offset >= w_bytes and data.stat().st_size == b_offset + b_bytes
    os.truncate(data, b_offset + b_bytes - 1)
    err = load_error(path)
    assert err.message == (
        f"{path}: tensor 'B' has external data location 'weights.data': "
        f"bytes {b_offset}..{b_offset + b_bytes} are past the end of the file ({b_offset + b_bytes - 1} bytes)"
    )


def test_external_data_truncated_mid_first_tensor(tmp_path):
    path = save_external(tmp_path / "m")
    os.truncate(tmp_path / "m" / "weights.data", 100)
    err = load_error(path)
    # Initializers are checked in graph order, so W (bytes 0..4096) is the one reported.
    assert err.message == (
        f"{path}: tensor 'W' has external data location 'weights.data': "
        f"bytes 0..{N * N * 4} are past the end of the file (100 bytes)"
    )


def test_external_data_loads_lazily_and_runs(tmp_path):
    path = save_external(tmp_path / "m")
    model = models.load_model(tmp_path / "m")
    w, b = weights()
    for name, want in (("W", w), ("B", b)):
        tensor = model.graph.initializers[name].const_value
        assert isinstance(tensor, ir.ExternalTensor)
        assert tensor.location == "weights.data"
        assert Path(tensor.base_dir) == path.parent
        np.testing.assert_array_equal(tensor.numpy(), want)
    # Serialized, the weights still point at the side file; ORT resolves it beside the model.
    proto = ir.serde.serialize_model(model)
    assert {t.name: t.data_location for t in proto.graph.initializer} == {
        "W": TensorProto.EXTERNAL,
        "B": TensorProto.EXTERNAL,
    }
    run_path = path.parent / "run.onnx"
    run_path.write_bytes(proto.SerializeToString())
    session = ort.InferenceSession(os.fspath(run_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).standard_normal((3, N)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, reference(x, w, b), rtol=1e-5, atol=1e-5)


# content_hash


def hash_of(tmp_path: Path, name: str, proto: onnx.ModelProto) -> str:
    path = tmp_path / name / "model.onnx"
    path.parent.mkdir()
    onnx.save(proto, path)
    return models.content_hash(models.load_model(path))


def test_content_hash_deterministic(tmp_path):
    onnx.save(make_model(), tmp_path / "model.onnx")
    first = models.content_hash(models.load_model(tmp_path))
    second = models.content_hash(models.load_model(tmp_path))
    assert first == second
    assert len(first) == 64 and int(first, 16) >= 0
    # Equal also for a model built in memory, never saved.
    assert models.content_hash(ir.serde.deserialize_model(make_model())) == first


def test_content_hash_same_with_and_without_external_data(tmp_path):
    inline = hash_of(tmp_path, "inline", make_model())
    path = save_external(tmp_path / "external")
    model = models.load_model(path)
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    assert models.content_hash(model) == inline


def test_content_hash_changes_with_one_weight(tmp_path):
    w, b = weights()
    w2 = w.copy()
    w2[5, 7] += 1.0
    assert hash_of(tmp_path, "a", make_model(w, b)) != hash_of(tmp_path, "b", make_model(w2, b))


def test_content_hash_changes_with_one_node(tmp_path):
    assert hash_of(tmp_path, "relu", make_model(act="Relu")) != hash_of(tmp_path, "sigmoid", make_model(act="Sigmoid"))


def test_content_hash_changes_with_opset(tmp_path):
    assert hash_of(tmp_path, "a", make_model(opset=17)) != hash_of(tmp_path, "b", make_model(opset=18))


# save_model


def test_save_small_model_as_one_file(tmp_path):
    onnx.save(make_model(), tmp_path / "model.onnx")
    model = models.load_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert models.save_model(model, out / "model.onnx") == ["model.onnx"]
    assert sorted(os.listdir(out)) == ["model.onnx"]
    again = models.load_model(out)
    assert models.content_hash(again) == models.content_hash(model)
    assert [n.op_type for n in again.graph] == ["MatMul", "Add", "Relu"]
    for name in ("W", "B"):
        np.testing.assert_array_equal(
            again.graph.initializers[name].const_value.numpy(), model.graph.initializers[name].const_value.numpy()
        )


def test_save_small_model_with_external_data_self_contained(tmp_path):
    path = save_external(tmp_path / "m")
    model = models.load_model(path)
    out = tmp_path / "out"
    out.mkdir()
    assert models.save_model(model, out / "model.onnx") == ["model.onnx"]
    assert sorted(os.listdir(out)) == ["model.onnx"]
    # The copy needs nothing from the source directory.
    for child in path.parent.iterdir():
        child.unlink()
    again = models.load_model(out)
    assert not any(isinstance(i.const_value, ir.ExternalTensor) for i in again.graph.initializers.values())
    np.testing.assert_array_equal(again.graph.initializers["W"].const_value.numpy(), weights()[0])


def test_save_large_model_writes_side_file(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "EXTERNAL_DATA_THRESHOLD", 1000)
    onnx.save(make_model(), tmp_path / "model.onnx")
    model = models.load_model(tmp_path)
    assert models.weights_bytes(model) == N * N * 4 + N * 4
    out = tmp_path / "out"
    out.mkdir()
    assert models.save_model(model, out / "net.onnx") == ["net.onnx", "net.onnx.data"]
    assert sorted(os.listdir(out)) == ["net.onnx", "net.onnx.data"]
    # W (4096 bytes) goes to the side file; B (128 bytes) is under onnx-ir's 1024-byte cut and stays inline.
    assert (out / "net.onnx.data").stat().st_size == N * N * 4
    again = models.load_model(out / "net.onnx")
    w, b = weights()
    stored_w = again.graph.initializers["W"].const_value
    assert isinstance(stored_w, ir.ExternalTensor) and stored_w.location == "net.onnx.data"
    assert not isinstance(again.graph.initializers["B"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(stored_w.numpy(), w)
    np.testing.assert_array_equal(again.graph.initializers["B"].const_value.numpy(), b)
    assert models.content_hash(again) == models.content_hash(ir.serde.deserialize_model(make_model()))


def test_save_below_threshold_writes_no_side_file(tmp_path, monkeypatch):
    onnx.save(make_model(), tmp_path / "model.onnx")
    model = models.load_model(tmp_path)
    monkeypatch.setattr(models, "EXTERNAL_DATA_THRESHOLD", models.weights_bytes(model))  # not above it
    out = tmp_path / "out"
    out.mkdir()
    assert models.save_model(model, out / "model.onnx") == ["model.onnx"]
    assert sorted(os.listdir(out)) == ["model.onnx"]
