"""TensorFlow SavedModel -> ONNX through tf2onnx, run in a subprocess with a time limit, so a broken or
hostile SavedModel cannot take kiln down; then output pruning, dim naming, layout and alignment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common

from kiln.targets.align import METADATA_KEY as ALIGN_KEY
from kiln.targets.align import Alignment
from kiln.optimizer.errors import InputError
from kiln.optimizer.lazy import check_installed
from kiln.optimizer.onnx_files import hash_directory, load_model, save_model
from kiln.optimizer.shapes import SHAPES_METADATA_KEY

# FILM's signature; the authors' tools pad H and W to multiples of 64 (2^(7-1) for the released 7 levels).
FILM_INPUTS = {"x0", "x1", "time"}
FILM_ALIGN = 64


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt"))


def convert(directory: Path, output: Path, signature: str, opset: int, timeout: float) -> None:
    """Run tf2onnx on the SavedModel in a child process; its failure becomes one InputError."""
    check_installed(["tensorflow", "tf2onnx"], "tf", f"importing the SavedModel {directory}")
    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(directory),
               "--signature_def", signature, "--opset", str(opset), "--output", str(output)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise InputError(
            f"converting the SavedModel {directory} with tf2onnx took longer than {timeout:g} s and was stopped",
            hint="raise the limit with --import-timeout, or check that the SavedModel is what you expect",
        ) from None
    if result.returncode != 0 or not output.is_file():
        raise InputError(
            f"tf2onnx could not convert the SavedModel {directory}: {_last_error(result.stderr)}",
            hint="check the SavedModel loads in TensorFlow (tf.saved_model.load) and the signature name (--signature)",
        )


def _last_error(log: str) -> str:
    errors = re.findall(r"^\w*(?:Error|Exception): (.+)$", log, re.MULTILINE)
    if errors:
        return errors[-1].replace("make_sure failure: ", "")
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "it exited with no message"


def prune_outputs(model: ir.Model, keep: list[str] | None) -> list[str]:
    """Keep the named outputs (default: 'image' if there is one, else all); drop what feeds only the rest."""
    names = [v.name for v in model.graph.outputs]
    if keep is None:
        keep = ["image"] if "image" in names else names
    unknown = [n for n in keep if n not in names]
    if unknown:
        raise InputError(f"the signature has no output(s) {', '.join(unknown)}", hint=f"its outputs: {', '.join(names)}")
    kept = [v for v in model.graph.outputs if v.name in keep]
    model.graph.outputs.clear()
    model.graph.outputs.extend(kept)
    common.RemoveUnusedNodesPass()(model)
    return keep


def name_dims(model: ir.Model) -> None:
    """tf2onnx names unknown dims unk__N, different per input; give the signature's dims shared names."""
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        dims = list(value.shape)
        names = ["batch", "height", "width"] if len(dims) == 4 else ["batch"]
        for axis, name in enumerate(names):
            if not isinstance(dims[axis], int):
                dims[axis] = ir.SymbolicDim(name)
        value.shape = ir.Shape(dims)


def images(model: ir.Model) -> list[ir.Value]:
    """Rank-4 float inputs: the image-like tensors of an NHWC signature (FILM: x0 and x1)."""
    return [v for v in model.graph.inputs if v.shape is not None and len(v.shape) == 4 and v.dtype == ir.DataType.FLOAT]


def to_nchw(model: ir.Model) -> None:
    """Add Transposes at the boundary so image inputs and outputs are NCHW; the graph inside stays NHWC."""
    graph = model.graph
    for value in images(model):
        n, h, w, c = value.shape
        uses = list(value.uses())  # before the Transpose below becomes a use too (rewiring it would make a cycle)
        inner = ir.node("Transpose", [value], {"perm": [0, 2, 3, 1]}, name=f"{value.name}_to_nhwc")
        for use in uses:
            use.node.replace_input_with(use.idx, inner.outputs[0])
        inner.outputs[0].name = f"{value.name}_nhwc"
        graph.insert_before(next(iter(graph)), inner)
        value.shape = ir.Shape([n, c, h, w])
    for i, value in enumerate(list(graph.outputs)):
        if value.shape is not None and len(value.shape) == 4:
            name = value.name
            value.name = f"{name}_nhwc"
            outer = ir.node("Transpose", [value], {"perm": [0, 3, 1, 2]}, name=f"{name}_to_nchw")
            outer.outputs[0].name = name
            # Typed and shaped like the output it replaces, so the alignment finds it (and crops it back).
            n, h, w, c = value.shape
            outer.outputs[0].shape, outer.outputs[0].type = ir.Shape([n, c, h, w]), value.type
            graph.append(outer)
            graph.outputs[i] = outer.outputs[0]


def import_saved_model(directory: Path, workdir: Path, options) -> tuple[Path, dict, list[str]]:
    """Convert, prune and annotate; returns the ONNX path, the source description, and notes for the report."""
    raw = workdir / "tf2onnx.onnx"
    convert(directory, raw, options.signature, options.opset, options.import_timeout)
    model = load_model(raw)
    converted_nodes = sum(1 for _ in model.graph)
    input_names = {v.name for v in model.graph.inputs}
    kept = prune_outputs(model, options.outputs)
    name_dims(model)
    layout_axes = (2, 3) if options.layout == "nchw" else (1, 2)
    if options.layout == "nchw":
        to_nchw(model)
    notes = []
    align = options.align if options.align is not None else (FILM_ALIGN if FILM_INPUTS <= input_names else None)
    if align and align > 1:
        alignment = Alignment(
            align,
            {v.name: layout_axes for v in images(model)},
            {v.name: layout_axes for v in model.graph.outputs if v.shape is not None and len(v.shape) == 4},
        )
        model.metadata_props[ALIGN_KEY] = json.dumps(alignment.to_json(), sort_keys=True)
        notes.append(f"alignment: {alignment.rule()}")
        dims = {"batch": "1..1..2", "height": f"{align}..{4 * align}..{16 * align}", "width": f"{align}..{4 * align}..{16 * align}"}
        model.metadata_props[SHAPES_METADATA_KEY] = ",".join(f"{k}={v}" for k, v in dims.items())
    model.metadata_props["kiln.source"] = "tf-savedmodel"
    path = workdir / "imported.onnx"
    save_model(model, path)
    source = {
        "path": str(directory),
        "format": "tf-savedmodel",
        "hash": hash_directory(directory),
        "signature": options.signature,
        "outputs_kept": kept,
        "opset": options.opset,
        "layout": options.layout,
        "converter": "tf2onnx (subprocess)",
        "converted_nodes": converted_nodes,
    }
    return path, source, notes
