"""Finding, loading, checking, hashing and saving ONNX models (through onnx-ir)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import onnx
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import DecodeError

from kiln.optimizer.errors import InputError, first_line
from kiln.passes.base import content_hash  # noqa: F401  (kiln's model hash; passes need it too)

MODEL_FILE = "model.onnx"
MIN_OPSET = 13
MIN_IR_VERSION = 7
# Older models are upgraded to this opset: one every ONNX Runtime kiln supports runs, with LayerNormalization.
UPGRADE_OPSET = 17
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


def load_model(path: Path, notes: list[str] | None = None) -> ir.Model:
    """Load and check an ONNX model; external data stays on disk until it is read. A model older than
    kiln supports is upgraded (see `upgrade`), and notes gets a line saying so."""
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
    proto = upgrade(proto, path, notes)
    try:
        model = ir.serde.deserialize_model(proto)
    except (ir.serde.SerdeError, ValueError, TypeError, KeyError) as exc:  # e.g. two nodes writing one value
        raise InputError(
            f"{path} is not a valid ONNX graph: {first_line(exc.__cause__ or exc)}",
            hint="re-export the model; onnx.checker.check_model names what is wrong",
        ) from None
    del proto
    base_dir = path.parent
    ir.external_data.set_base_dir(model.graph, base_dir)
    check_external_data(model, base_dir, path)
    return model


def _default_opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def check_versions(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse versions newer than this onnx knows; older ones are upgraded by `upgrade`."""
    max_ir = onnx.IR_VERSION
    if proto.ir_version > max_ir:
        raise InputError(
            f"{path} has IR version {proto.ir_version}; kiln supports {MIN_IR_VERSION}..{max_ir}",
            hint="re-export the model with an exporter that writes a supported IR version, or update kiln's onnx",
        )
    max_opset = onnx.defs.onnx_opset_version()
    opset = _default_opset(proto)
    if opset is not None and opset > max_opset:
        raise InputError(
            f"{path} uses ONNX opset {opset}; kiln supports opsets {MIN_OPSET}..{max_opset}",
            hint="re-export the model at a supported opset, or update kiln's onnx",
        )


def _tensors(graph: onnx.GraphProto):
    """Every tensor a graph holds: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else [])
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def hash_files(root: Path, files: list[Path]) -> str:
    """sha256 over each file's path relative to root and its bytes, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def hash_directory(directory: Path) -> str:
    """hash_files over every file under directory, in path order: a SavedModel's or a diffusers model's cache key."""
    return hash_files(directory, sorted(p for p in directory.rglob("*") if p.is_file()))


def model_files(path: Path) -> list[Path]:
    """The ONNX file and the external data files it names (that exist), or the file alone if it does not load."""
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # a damaged file: importing it says what is wrong
        return [path]
    names = {e.value for t in _tensors(proto.graph) for e in t.external_data if e.key == "location"}
    return [path, *sorted(p for name in names if (p := path.parent / name).is_file())]


def _converter_reason(exc: Exception, proto: onnx.ModelProto) -> str:
    """Why onnx's version converter failed, naming the op where its message (a C++ assertion) does."""
    text = first_line(exc)
    adapter = re.search(r"No Adapter (?:From|For) Version \$?(\d+) for (\w+)", text)
    if adapter:
        return f"it has no adapter for {adapter.group(2)} from opset {adapter.group(1)}"
    unknown = sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)})
    if unknown:
        return f"{', '.join(unknown)} {'is no' if len(unknown) == 1 else 'are no'} ONNX op (an experimental op since removed)"
    return re.sub(r"^.*?Assertion .*? failed: ", "", text)


def _interface(proto: onnx.ModelProto) -> dict[str, str]:
    """'input x' / 'output y' -> its type and shape as ONNX prints it, initializers aside."""
    initializers = {init.name for init in proto.graph.initializer}
    values = [("input", v) for v in proto.graph.input if v.name not in initializers] + [("output", v) for v in proto.graph.output]
    return {f"{kind} {v.name!r}": _describe(v.type) for kind, v in values}


def _describe(type_proto: onnx.TypeProto) -> str:
    if type_proto.WhichOneof("value") != "tensor_type":
        return type_proto.WhichOneof("value") or "untyped"
    tensor = type_proto.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tensor.shape.dim]
    return onnx.TensorProto.DataType.Name(tensor.elem_type).lower() + (str(dims) if tensor.HasField("shape") else "")


def _changed_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> str | None:
    """How the converter changed the model's inputs or outputs (Scan 8 to 9 drops a batch axis), if it did."""
    old, new = _interface(before), _interface(after)
    for key in old.keys() | new.keys():
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key, 'none')} becomes {new.get(key, 'none')}"
    return None


def upgrade(proto: onnx.ModelProto, path: Path, notes: list[str] | None = None) -> onnx.ModelProto:
    """proto itself if its IR version and opset are ones kiln supports; else the model upgraded to
    opset UPGRADE_OPSET (and its IR version) by onnx's version converter, with a note in notes.

    Refuses (InputError) what the converter cannot convert, and models with external data, whose
    tensors the converter does not carry over."""
    opset = _default_opset(proto)
    old_opset = opset is not None and opset < MIN_OPSET
    if not old_opset and proto.ir_version >= MIN_IR_VERSION:
        return proto
    was = f"IR version {proto.ir_version}" + (f", ONNX opset {opset}" if opset is not None else "")
    convert_hint = "convert it with onnx.version_converter.convert_version, or re-export at opset 13 or newer"
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto.graph)):
        raise InputError(
            f"{path} ({was}) is older than kiln supports (IR {MIN_IR_VERSION}, opset {MIN_OPSET}) and keeps its weights "
            "in external data, which kiln does not upgrade",
            hint=convert_hint,
        )
    if old_opset:
        try:
            converted = onnx.version_converter.convert_version(proto, UPGRADE_OPSET)
        except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
            reason = _converter_reason(exc, proto)
            raise InputError(
                f"{path} uses ONNX opset {opset}, below kiln's {MIN_OPSET}, and onnx's version converter cannot "
                f"upgrade it to opset {UPGRADE_OPSET}: {reason}",
                hint=convert_hint,
            ) from None
        changed = _changed_interface(proto, converted)
        if changed:
            raise InputError(
                f"{path} uses ONNX opset {opset}, below kiln's {MIN_OPSET}, and onnx's version converter changes its "
                f"interface when upgrading it to opset {UPGRADE_OPSET} ({changed})",
                hint=convert_hint,
            )
    else:
        converted = onnx.ModelProto()
        converted.CopyFrom(proto)
    if converted.ir_version < 4:
        # Before IR 4 every initializer had to be listed as an input; they are weights, not inputs.
        initializers = {init.name for init in converted.graph.initializer}
        kept = [i for i in converted.graph.input if i.name not in initializers]
        del converted.graph.input[:]
        converted.graph.input.extend(kept)
    converted.ir_version = max(converted.ir_version, MIN_IR_VERSION, onnx.helper.find_min_ir_version_for(list(converted.opset_import)))
    now = f"IR version {converted.ir_version}" + (f", ONNX opset {_default_opset(converted)}" if opset is not None else "")
    if notes is not None:
        notes.append(f"the model ({was}) was upgraded to {now} with onnx's version converter; verification compares "
                     "the engine with the original model")  # fmt: skip
    return converted


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
        if "://" in location or re.match(r"^[a-zA-Z][\w+.-]*:", location):
            raise InputError(f"{where}, a URL or drive; kiln reads only files beside the model", hint=hint)
        if "\\" in location:
            # A Windows separator: on POSIX a file name, elsewhere a path that may leave the directory.
            raise InputError(f"{where}, which holds a backslash", hint=hint + ", with '/' between folders")
        if os.path.isabs(location) or Path(location).drive:
            raise InputError(f"{where}, an absolute path", hint=hint)
        if ".." in Path(location).parts:
            raise InputError(f"{where}, which uses '..' to leave the model's directory", hint=hint)
        resolved = (root / location).resolve()
        if not resolved.is_relative_to(root):
            raise InputError(f"{where}, which resolves outside the model's directory (to {resolved})", hint=hint)
        if not resolved.is_file():
            raise InputError(f"{where}, which does not exist", hint="copy the data file next to the model")
        stat = resolved.stat()
        if stat.st_nlink > 1:
            # A hard link may be one to a file outside the directory that no path check can see.
            raise InputError(f"{where}, a file with {stat.st_nlink} hard links", hint="copy the data file instead of linking it")
        size = stat.st_size
        offset = tensor.offset or 0
        length = tensor.length if tensor.length is not None else tensor.nbytes
        if offset + length > size:
            raise InputError(
                f"{where}: bytes {offset}..{offset + length} are past the end of the file ({size} bytes)",
                hint="the data file is truncated or belongs to another model; re-export the model",
            )


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

