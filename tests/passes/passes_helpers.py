"""Shared helpers for the pass tests: build small models, run them on ONNX Runtime CPU, compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from kiln.passes import op_counts
from kiln.passes.base import KilnPass

HEADER = '<ir_version: 9, opset_import: ["" : 17]>\n'


def parse(text: str, header: str = HEADER) -> ir.Model:
    """An onnx-ir model from ONNX text syntax (the standard opset-17 header is added unless given)."""
    proto = onnx.parser.parse_model(header + text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def serialize(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def check(model: ir.Model) -> None:
    """The ONNX checker with full shape and type checking, on a serialized copy of model."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def run_ort(model: ir.Model | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from an ONNX Runtime CPU session over the model as it is now."""
    data = model if isinstance(model, bytes) else serialize(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def random_feeds(model: ir.Model, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded standard-normal float inputs for every graph input; symbolic dims come from `dims`."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds = {}
    for value in model.graph.inputs:
        shape = [d if isinstance(d, int) else dims[str(d)] for d in value.shape]
        dtype = value.dtype.numpy()
        assert np.issubdtype(dtype, np.floating), f"random_feeds only makes float inputs, not {dtype} for {value.name}"
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_outputs_close(before: dict, after: dict, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    assert list(after) == list(before), "output names changed"
    for name, expected in before.items():
        actual = after[name]
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def assert_idempotent(pass_type: type[KilnPass], model: ir.Model) -> KilnPass:
    """Run a fresh pass_type once more: it must report modified=False and leave the model byte-identical."""
    counts, data = op_counts(model), serialize(model)
    pass_ = pass_type()
    result = pass_(model)
    assert result.modified is False, f"{pass_.name} modified the model again"
    assert result.model is model
    assert op_counts(model) == counts
    assert serialize(model) == data, f"{pass_.name} changed the serialized model on its second run"
    return pass_


def node_names(model: ir.Model) -> list[str]:
    return [node.name for node in model.graph]


def node(model: ir.Model, name: str) -> ir.Node:
    (found,) = [n for n in model.graph if n.name == name]
    return found


OPSET_18 = '<ir_version: 9, opset_import: ["" : 18]>\n'  # Split's num_outputs


def load(path) -> ir.Model:
    """An exported model with its external weights read into memory."""
    return ir.external_data.load_to_model(ir.load(path))


def with_weights(text: str, names: tuple[str, ...], seed: int = 0, header: str = OPSET_18) -> ir.Model:
    """Parse a graph whose listed inputs are weights, and make them seeded initializers ('var' positive)."""
    model = parse(text, header)
    rng = np.random.default_rng(seed)
    for value in [v for v in model.graph.inputs if v.name in names]:
        shape = value.shape.numpy()
        data = rng.uniform(0.5, 1.5, shape) if value.name == "var" else rng.standard_normal(shape)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(data.astype(np.float32), name=value.name)
        model.graph.register_initializer(value)
    return model


def dit_feeds(batch: int = 2, side: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for the tiny DiT export (latents, timesteps, class labels)."""
    rng = np.random.default_rng(seed)
    return {"hidden_states": rng.standard_normal((batch, 4, side, side)).astype(np.float32),
            "timestep": rng.integers(0, 1000, (batch,)), "class_labels": rng.integers(0, 10, (batch,))}  # fmt: skip


def fuse_and_check(model: ir.Model, pass_type: type[KilnPass], feeds, rtol: float = 1e-5, atol: float = 1e-5) -> KilnPass:
    """Run pass_type on model: it must modify it, keep ORT CPU parity, and be idempotent."""
    want = run_ort(model, feeds)
    pass_ = pass_type()
    assert pass_(model).modified
    assert_outputs_close(want, run_ort(model, feeds), rtol=rtol, atol=atol)
    assert_idempotent(pass_type, model)
    return pass_


def chunk_is_output_model() -> ir.Model:
    """An adaLN-like Split whose chunks are graph outputs: the rewrite must refuse it."""
    return with_weights("""
        g (float[2, 3] h, float[3, 8] w, float[8] bias) => (float[2, 1, 4] shift, float[2, 1, 4] scale)
          <int64[1] axes = {1}> {
            m = Gemm(h, w, bias)
            s0, s1 = Split <axis = 1, num_outputs = 2> (m)
            shift = Unsqueeze(s0, axes)
            scale = Unsqueeze(s1, axes)
        }""", ("w", "bias"))
