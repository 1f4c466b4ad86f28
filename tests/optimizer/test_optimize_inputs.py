"""`kiln optimize` on models whose inputs random data does not suit (found by ONNX's backend node tests):
--verify-inputs, --int-range, no benchmark after a failed verification, models ONNX Runtime or kiln's
engines cannot take, and old models upgraded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.optimizer.cli import main


def save(tmp_path, text: str, opset: int = 17, name: str = "model.onnx"):
    path = tmp_path / name
    onnx.save(onnx.parser.parse_model(f'<ir_version: 9, opset_import: ["" : {opset}]>\n' + text), path)
    return path


def kiln(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args] + ["-q"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


def report(outdir) -> dict:
    return json.loads((outdir / "report.json").read_text())


RESIZE = "g (float[1,1,2,2] X, float[4] scales) => (float[1,1,4,4] Y) { Y = Resize <mode = \"nearest\"> (X, roi, scales) } "
RESIZE_ROI = RESIZE.replace("=> (float[1,1,4,4] Y)", "=> (float[1,1,4,4] Y) <float[0] roi = {}>")


def resize_sample(tmp_path) -> str:
    path = tmp_path / "sample.npz"
    np.savez(path, X=np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2), scales=np.array([1, 1, 2, 2], np.float32))
    return str(path)


def test_no_benchmark_after_verification_failed(capsys, tmp_path):
    """Random scales give the original model itself an output size it says it never has: verification
    fails (exit 3), the hint points at sample inputs, and the benchmark, which would fail too, does not run."""
    model = save(tmp_path, RESIZE_ROI, opset=19)
    code, err = kiln(capsys, "optimize", model, "-o", tmp_path / "out")
    assert code == 3
    assert "verification failed at 1 of 1 shape(s); first at the static shape" in err
    assert "the original model gave output 'Y' of shape [0, 0, 0, 0], not the [1, 1, 4, 4] it declares" in err
    assert "hint: see " in err and "give the model inputs it takes with --verify-inputs SAMPLE.npz" in err
    written = report(tmp_path / "out")
    assert written["latency"] == [] and written["status"] == "verification-failed"
    assert written["notes"] == ["the benchmark was not run: verification failed"]


def test_verify_inputs_checks_the_engine_on_sample_data(capsys, tmp_path):
    model = save(tmp_path, RESIZE_ROI, opset=19)
    code, _ = kiln(capsys, "optimize", model, "-o", tmp_path / "out", "--verify-inputs", resize_sample(tmp_path))
    assert code == 0
    written = report(tmp_path / "out")
    assert [(c["corner"], c["passed"]) for c in written["verification"]["shapes"]] == [("sample sample.npz", True)]
    notes = written["notes"]
    assert notes[0].startswith("the original model cannot run on random inputs at the static shape, so the engine was "
                               "verified on the --verify-inputs samples only there: the original model gave output 'Y'")  # fmt: skip
    assert notes[1].startswith("the benchmark was not run: the engine fails on random inputs")
    assert written["latency"] == []


def test_verify_inputs_that_do_not_fit_the_model_are_bad_input(capsys, tmp_path):
    model = save(tmp_path, RESIZE_ROI, opset=19)
    missing = tmp_path / "missing.npz"
    np.savez(missing, X=np.zeros((1, 1, 2, 2), np.float32))
    code, err = kiln(capsys, "optimize", model, "-o", tmp_path / "out", "--verify-inputs", missing)
    assert code == 2
    assert f"kiln: error: --verify-inputs {missing}: missing ['scales']" in err
    assert "hint: the model takes X float32 [1, 1, 2, 2], scales float32 [4]" in err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, X=np.zeros((1, 1, 2, 2)), scales=np.ones(4, np.float32))
    code, err = kiln(capsys, "optimize", model, "-o", tmp_path / "out", "--verify-inputs", wrong)
    assert code == 2
    assert f"--verify-inputs {wrong}: input 'X' is float64 [1, 1, 2, 2], the model takes float32 [1, 1, 2, 2]" in err
    assert not (tmp_path / "out").exists()


GATHER = "g (float[5,3] data, int64[4] idx) => (float[4,3] y) { y = Gather <axis = 0> (data, idx) }"


def test_int_range_sets_the_values_of_an_integer_input(capsys, tmp_path):
    model = save(tmp_path, GATHER)
    code, err = kiln(capsys, "optimize", model, "-o", tmp_path / "bad", "--bench-runs", "0")
    assert code == 3 and "indices element out of data bounds" in err  # the default 1..7 reaches past 5 rows
    code, _ = kiln(capsys, "optimize", model, "-o", tmp_path / "out", "--int-range", "idx=0..4")
    assert code == 0
    written = report(tmp_path / "out")
    assert written["profile"]["int_ranges"] == {"idx": [0, 5]}
    assert written["latency"]  # the benchmark ran on valid indices too
    code, err = kiln(capsys, "optimize", model, "-o", tmp_path / "out2", "--int-range", "data=0..4")
    assert code == 2
    assert "kiln: error: --int-range 'data=0..4': 'data' is not an integer input of the model\n  hint: integer inputs: idx" in err


STFT = """g (float[1,128,1] signal, int64 frame_step, int64 frame_length) => (float[1,frames,bins,2] out) {
  out = STFT(signal, frame_step, , frame_length)
}"""


def test_an_integer_input_drawn_as_zero_does_not_kill_kiln(tmp_path):
    """With the old default range [0, 8), seed 0 drew STFT's frame_length as 0 and ONNX Runtime died of
    SIGFPE, taking kiln with it, without a message. Run in a child process, as that would kill pytest."""
    model = save(tmp_path, STFT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "kiln.optimizer.cli", "optimize", str(model), "-o", str(tmp_path / "out"), "--bench-runs", "0", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_outputs_whose_size_depends_on_values_need_sample_inputs(capsys, tmp_path):
    """ConstantOfShape makes the shape its input says; random values give one the model says it never has."""
    model = save(tmp_path, "g (int64[2] shape) => (float[2,3] y) { y = ConstantOfShape <value = float[1] {1.5}> (shape) }")
    code, err = kiln(capsys, "optimize", model, "-o", tmp_path / "bad", "--bench-runs", "0")
    assert code == 3
    assert "the original model gave output 'y' of shape" in err and "not the [2, 3] it declares" in err
    assert "on random inputs; they are not values it takes" in err
    sample = tmp_path / "shape.npz"
    np.savez(sample, shape=np.array([2, 3]))
    code, _ = kiln(capsys, "optimize", model, "-o", tmp_path / "out", "--bench-runs", "0", "--verify-inputs", sample)
    assert code == 0


def test_a_model_onnx_runtime_cannot_load_is_bad_input(capsys, tmp_path):
    path = tmp_path / "model.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="my.ops")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]), path)
    code, err = kiln(capsys, "optimize", path, "-o", tmp_path / "out")
    assert code == 2
    assert err.startswith(f"kiln: error: {path}: ONNX Runtime ") and "cannot load it on its CPU provider:" in err
    assert "my.ops:Frobnicate(-1) is not a registered function/op" in err
    assert "hint: kiln builds ONNX Runtime engines; replace the op or type it names" in err


def test_a_sequence_input_is_bad_input(capsys, tmp_path):
    model = save(tmp_path, "g (seq(float[2]) s) => (float[2] y) <int64 zero = {0}> { y = SequenceAt(s, zero) }")
    code, err = kiln(capsys, "optimize", model, "-o", tmp_path / "out")
    assert code == 2
    assert "kiln: error: input 's' is a sequence, not a tensor; kiln's engines take and return tensors" in err


def test_an_ir3_opset9_model_is_upgraded_and_verified_against_the_original(capsys, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Relu", ["s"], ["y"])], "g",
                              [x, w_in], [y], [numpy_helper.from_array(np.array([1, -1, 2, -2], np.float32), "w")])  # fmt: skip
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3), path)
    code, _ = kiln(capsys, "optimize", path, "-o", tmp_path / "out", "--bench-runs", "0")
    assert code == 0
    written = report(tmp_path / "out")
    assert written["notes"][0] == ("the model (IR version 3, ONNX opset 9) was upgraded to IR version 8, ONNX opset 17 with "
                                   "onnx's version converter; verification compares the engine with the original model")  # fmt: skip
    assert [i["name"] for i in written["inputs"]] == ["x"]
    assert written["verification"]["passed"] is True


def _block_with(tmp_path, edit) -> str:
    from kiln.optimizer.examples import transformer_block

    model = transformer_block(0)
    edit(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return str(path)


def _no_outputs(m):
    del m.graph.output[:]


def _undefined_input(m):
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED


def _negative_dim(m):
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -3


def _string_weight(m):
    max(m.graph.initializer, key=lambda t: len(t.raw_data)).data_type = TensorProto.STRING


@pytest.mark.parametrize(("edit", "message"), [
    (_no_outputs, "kiln: error: the model has no outputs"),
    (_undefined_input, "kiln: error: input 'x' is undefined; kiln's engines take and return"),
    (_negative_dim, "kiln: error: input 'x' has shape ['batch', 'seq', -3]; a size cannot be negative"),
    (_string_weight, "Type 'tensor(string)' of input parameter (w_fc1) of operator (MatMul) in node () is invalid"),
])  # fmt: skip
def test_models_the_fuzzer_found_are_bad_input(capsys, tmp_path, edit, message):
    """Each was an internal error: ONNX Runtime failing to initialize a session with no outputs, numpy
    without a dtype for UNDEFINED, a negative size, and hashing a string tensor's raw bytes."""
    code, err = kiln(capsys, "optimize", _block_with(tmp_path, edit), "-o", tmp_path / "out")
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()
