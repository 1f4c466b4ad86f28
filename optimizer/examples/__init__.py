"""Small models kiln can write itself, so every command runs without downloading anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.optimizer.examples.tiny_diffusers import write_dit, write_vae
from kiln.optimizer.errors import InputError
from kiln.optimizer.outdir import atomic_file, cannot_write

HIDDEN, HEADS, MLP = 64, 4, 256
BLOCK_SHAPES = "batch=1..2..4,seq=1..16..64"


def transformer_block(seed: int = 0) -> onnx.ModelProto:
    """A pre-norm transformer block: LayerNorm, 4-head self-attention, LayerNorm, GELU MLP, residuals.

    Input x and output y are float32 [batch, seq, 64]. It carries what exporters leave behind (an
    Identity, a constant subexpression, a dead node) so the cleanup passes have work to do.
    """
    rng = np.random.default_rng(seed)
    head = HIDDEN // HEADS

    def weight(name, *shape):
        fan_in = shape[0] if len(shape) > 1 else 1
        return numpy_helper.from_array(rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape).astype(np.float32), name)

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    def scalar(name, value):
        return numpy_helper.from_array(np.array(value, np.float32), name)

    inits = [
        weight("ln1_scale", HIDDEN), weight("ln1_bias", HIDDEN),
        weight("w_qkv", HIDDEN, 3 * HIDDEN), weight("b_qkv", 3 * HIDDEN),
        weight("w_out", HIDDEN, HIDDEN), weight("b_out", HIDDEN),
        weight("ln2_scale", HIDDEN), weight("ln2_bias", HIDDEN),
        weight("w_fc1", HIDDEN, MLP), weight("b_fc1", MLP),
        weight("w_fc2", MLP, HIDDEN), weight("b_fc2", HIDDEN),
        scalar("sqrt2", np.sqrt(2.0)), scalar("one", 1.0), scalar("half", 0.5),
        ints("split_qkv", [HIDDEN] * 3), ints("heads_shape", [0, 0, HEADS, head]), ints("merge_shape", [0, 0, HIDDEN]),
    ]  # fmt: skip
    n = helper.make_node
    nodes = [
        n("Identity", ["x"], ["x_in"]),
        n("LayerNormalization", ["x_in", "ln1_scale", "ln1_bias"], ["ln1"], axis=-1, epsilon=1e-5),
        n("MatMul", ["ln1", "w_qkv"], ["qkv_mm"]),
        n("Add", ["qkv_mm", "b_qkv"], ["qkv"]),
        n("Split", ["qkv", "split_qkv"], ["q", "k", "v"], axis=-1),
        n("Reshape", ["q", "heads_shape"], ["q_h"]),
        n("Reshape", ["k", "heads_shape"], ["k_h"]),
        n("Reshape", ["v", "heads_shape"], ["v_h"]),
        n("Transpose", ["q_h"], ["q_t"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k_h"], ["k_t"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v_h"], ["v_t"], perm=[0, 2, 1, 3]),
        n("MatMul", ["q_t", "k_t"], ["scores"]),
        # sqrt(head_dim) computed at run time, as traced exporters often leave it: constant folding's job.
        n("Constant", [], ["head_dim"], value=scalar("head_dim", head)),
        n("Sqrt", ["head_dim"], ["scale"]),
        n("Div", ["scores", "scale"], ["scores_scaled"]),
        n("Softmax", ["scores_scaled"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v_t"], ["ctx_h"]),
        n("Transpose", ["ctx_h"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "merge_shape"], ["ctx"]),
        n("MatMul", ["ctx", "w_out"], ["attn_mm"]),
        n("Add", ["attn_mm", "b_out"], ["attn"]),
        n("Add", ["x_in", "attn"], ["h"]),
        n("Mul", ["ln1", "ln1"], ["unused"]),  # dead: nothing reads it
        n("LayerNormalization", ["h", "ln2_scale", "ln2_bias"], ["ln2"], axis=-1, epsilon=1e-5),
        n("MatMul", ["ln2", "w_fc1"], ["fc1_mm"]),
        n("Add", ["fc1_mm", "b_fc1"], ["fc1"]),
        # Exact GELU as exporters write it: 0.5 * x * (1 + erf(x / sqrt(2))).
        n("Div", ["fc1", "sqrt2"], ["fc1_s"]),
        n("Erf", ["fc1_s"], ["erf"]),
        n("Add", ["erf", "one"], ["erf_1"]),
        n("Mul", ["fc1", "erf_1"], ["gelu_2"]),
        n("Mul", ["gelu_2", "half"], ["gelu"]),
        n("MatMul", ["gelu", "w_fc2"], ["fc2_mm"]),
        n("Add", ["fc2_mm", "b_fc2"], ["fc2"]),
        n("Add", ["h", "fc2"], ["y_pre"]),
        n("Identity", ["y_pre"], ["y"]),
    ]
    shape = ["batch", "seq", HIDDEN]
    graph = helper.make_graph(
        nodes,
        "transformer_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=9,
        producer_name="kiln example block",
    )
    helper.set_model_props(model, {"kiln.shapes": BLOCK_SHAPES})
    onnx.checker.check_model(model)
    return model


def write_block(directory: Path, seed: int = 0) -> Path:
    path = directory / "model.onnx"
    with atomic_file(path) as tmp:
        onnx.save(transformer_block(seed), tmp)
    return path


def write_film(directory: Path, seed: int = 0) -> Path:
    from kiln.optimizer.lazy import check_installed

    check_installed(["tensorflow"], "tf", "the film example")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from kiln.optimizer.examples.film_net import FilmConfig, export_saved_model

    return export_saved_model(directory, FilmConfig.small(), seed)


# name -> (writer, description, the path it writes relative to DIR)
EXAMPLES = {
    "block": (write_block, "a small transformer block (dynamic batch and sequence), as ONNX", "model.onnx"),
    "film": (write_film, "a small FILM frame interpolator (seeded weights), as a TensorFlow SavedModel", "."),
    "dit": (write_dit, "a tiny class-conditional DiT (diffusers save_pretrained, seeded weights)", "."),
    "vae": (write_vae, "a tiny AutoencoderKL (diffusers save_pretrained); kiln imports its decoder", "."),
    "dit-trained": (lambda d, progress=None: _trained(d, progress), "a small DiT kiln trained on drawn shapes, for quantization quality "
                    "(the shipped weights)", "."),
}


def _trained(directory: Path, progress=None) -> Path:
    from kiln.optimizer.examples.trained_dit import write_trained_dit

    return write_trained_dit(directory, progress)


def write_example(name: str, directory: Path, force: bool = False, progress=None) -> Path:
    if name not in EXAMPLES:
        raise InputError(f"unknown example {name!r}", hint=f"examples: {', '.join(sorted(EXAMPLES))}")
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory")
    writer, _, relative = EXAMPLES[name]
    target = directory / relative
    if target.exists() and (target.is_file() or any(target.iterdir())) and not force:
        raise InputError(f"{target} already exists", hint="choose another directory, or pass --force to replace it")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(directory, exc) from None
    try:
        return writer(directory, progress) if name == "dit-trained" else writer(directory)
    except BaseException:
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()  # a failed example (e.g. TensorFlow missing) leaves no empty DIR behind
        raise
