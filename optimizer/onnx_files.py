"""Finding, loading, checking, hashing and saving ONNX models (through onnx-ir)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from kiln.optimizer.errors import InputError

MODEL_FILE = "model.onnx"
MIN_OPSET = 13
MIN_IR_VERSION = 7
# ONNX protobuf files cannot exceed 2 GB; above this, weights go to a side file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


def find_model(path: Path) -> Path:
    """The .onnx file that path names or, for a directory, holds."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory", hint="check the path to the model")
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise InputError(
                f"{path} is a directory with no model in it (no .onnx file)",
                hint="pass the .onnx file itself, or a directory holding one",
            )
        names = ", ".join(c.name for c in candidates)
        raise InputError(f"{path} holds several models ({names})", hint="pass the .onnx file you mean")
    return path


def load_model(path: Path) -> ir.Model:
    """Load and check an ONNX model; external data stays on disk until it is read."""
    path = find_model(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)", hint="re-export or re-download the model")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path} is not a readable ONNX model; it may be truncated or not ONNX at all ({exc.__class__.__name__})",
            hint="re-export or re-download the model, and check the file is complete",
        ) from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise InputError(
            f"{path} is not a readable ONNX model: it has no graph or no opset",
            hint="re-export or re-download the model, and check the file is complete",
        )
    check_versions(proto, path)
    model = ir.serde.deserialize_model(proto)
    del proto
    base_dir = path.parent
    ir.external_data.set_base_dir(model.graph, base_dir)
    check_external_data(model, base_dir, path)
    return model


def check_versions(proto: onnx.ModelProto, path: Path) -> None:
    max_ir = onnx.IR_VERSION
    if not MIN_IR_VERSION <= proto.ir_version <= max_ir:
        raise InputError(
            f"{path} has IR version {proto.ir_version}; kiln supports {MIN_IR_VERSION}..{max_ir}",
            hint="re-export the model with a current exporter",
        )
    max_opset = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not MIN_OPSET <= opset.version <= max_opset:
            raise InputError(
                f"{path} uses ONNX opset {opset.version}; kiln supports opsets {MIN_OPSET}..{max_opset}",
                hint="convert it with onnx.version_converter.convert_version, or re-export at a supported opset",
            )


def _external_tensors(model: ir.Model):
    for init in model.graph.initializers.values():
        if isinstance(init.const_value, ir.ExternalTensor):
            yield init.name, init.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                yield f"{node.name}.{attr.name}", attr.value


def check_external_data(model: ir.Model, base_dir: Path, model_path: Path) -> None:
    """Every external-data location must resolve to a file inside base_dir, with the bytes it claims."""
    root = base_dir.resolve()
    hint = "keep external data files beside the model, referenced by relative paths inside its directory"
    for name, tensor in _external_tensors(model):
        location = os.fspath(tensor.location)
        where = f"{model_path}: tensor {name!r} has external data location {location!r}"
        if os.path.isabs(location) or Path(location).drive:
            raise InputError(f"{where}, an absolute path", hint=hint)
        if ".." in Path(location).parts:
            raise InputError(f"{where}, which uses '..' to leave the model's directory", hint=hint)
        resolved = (root / location).resolve()
        if not resolved.is_relative_to(root):
            raise InputError(f"{where}, which resolves outside the model's directory (to {resolved})", hint=hint)
        if not resolved.is_file():
            raise InputError(f"{where}, which does not exist", hint="copy the data file next to the model")
        size = resolved.stat().st_size
        offset = tensor.offset or 0
        length = tensor.length if tensor.length is not None else tensor.nbytes
        if offset + length > size:
            raise InputError(
                f"{where}: bytes {offset}..{offset + length} are past the end of the file ({size} bytes)",
                hint="the data file is truncated or belongs to another model; re-export the model",
            )


def content_hash(model: ir.Model) -> str:
    """sha256 over the graph and the weights' bytes, independent of how the weights are stored on disk."""
    digest = hashlib.sha256()
    for name, init in sorted(model.graph.initializers.items()):
        digest.update(f"{name}:{init.dtype}:{init.shape}\n".encode())
        if init.const_value is not None:
            digest.update(init.const_value.tobytes())
    graph = model.graph
    # A view without initializers: their bytes were hashed above, whatever their storage.
    view = ir.GraphView(graph.inputs, graph.outputs, nodes=list(graph), name=graph.name)
    digest.update(ir.serde.serialize_graph(view).SerializeToString(deterministic=True))
    digest.update(repr(sorted(graph.opset_imports.items())).encode())
    return digest.hexdigest()


def weights_bytes(model: ir.Model) -> int:
    return sum(init.const_value.nbytes for init in model.graph.initializers.values() if init.const_value is not None)


def save_model(model: ir.Model, path: Path) -> list[str]:
    """Save model to path, weights in a side file when the model would pass protobuf's 2 GB limit.

    Returns the names of the files written.
    """
    if weights_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        ir.save(model, path, external_data=data, size_threshold_bytes=1024)
        return [path.name, data]
    _load_external_tensors(model)
    ir.save(model, path)
    return [path.name]


def _load_external_tensors(model: ir.Model) -> None:
    # A small model that came with a side file is saved self-contained: read its weights in.
    for init in model.graph.initializers.values():
        if isinstance(init.const_value, ir.ExternalTensor):
            init.const_value = ir.tensor(init.const_value.numpy(), name=init.name)

