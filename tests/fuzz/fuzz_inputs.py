"""Seeded bad inputs: damaged models, external data that escapes, damaged engines, arrays and frames.

Each function takes a numpy Generator and writes into a sandbox; none downloads anything.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.optimizer.examples import transformer_block


# ---------------------------------------------------------------------------------------- models
def model_bytes() -> bytes:
    return transformer_block(0).SerializeToString()


def truncated(rng, data: bytes) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def random_bytes(rng, data: bytes) -> bytes:
    return rng.bytes(int(rng.integers(1, 4096)))


def flipped_bytes(rng, data: bytes) -> bytes:
    """A few bytes changed anywhere: protobuf tags, lengths and values all at once."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 8))):
        out[int(rng.integers(0, len(out)))] = int(rng.integers(0, 256))
    return bytes(out)


def _node(rng, graph) -> onnx.NodeProto:
    return graph.node[int(rng.integers(0, len(graph.node)))]


def _mutations():
    """Edits of a parsed model, each a different way a file can be well-formed protobuf and wrong ONNX."""

    def unknown_op(rng, m):
        _node(rng, m.graph).op_type = str(rng.choice(["Frobnicate", "", "conv", "Add ", "Attention"]))

    def op_of_another_arity(rng, m):
        _node(rng, m.graph).op_type = str(rng.choice(["Relu", "Gemm", "Concat", "Split", "Loop", "If", "Conv"]))

    def dangling_input(rng, m):
        node = _node(rng, m.graph)
        if node.input:
            node.input[int(rng.integers(0, len(node.input)))] = str(rng.choice(["nowhere", "", "x"]))

    def duplicate_output(rng, m):
        a, b = _node(rng, m.graph), _node(rng, m.graph)
        b.output[0] = a.output[0]

    def deleted_node(rng, m):
        del m.graph.node[int(rng.integers(0, len(m.graph.node)))]

    def cycle(rng, m):
        i, j = sorted(rng.choice(len(m.graph.node), 2, replace=False))
        a, b = m.graph.node[int(i)], m.graph.node[int(j)]
        if a.input:
            a.input[0] = b.output[0]  # a reads what b computes, and b (later) depends on a

    def bad_attribute(rng, m):
        for node in m.graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.INT:
                    attr.i = int(rng.choice([-(2**40), -1, 0, 2**40]))
                    return
                if attr.type == onnx.AttributeProto.FLOAT:
                    attr.f = float(rng.choice([np.nan, np.inf, -1e30]))
                    return
                if attr.type == onnx.AttributeProto.INTS and attr.ints:
                    attr.ints[0] = int(rng.choice([-(2**40), 99, 2**40]))
                    return

    def input_type(rng, m):
        m.graph.input[0].type.tensor_type.elem_type = int(rng.choice([0, 8, 16, 17, 23, 99]))

    def huge_dim(rng, m):
        dim = m.graph.input[0].type.tensor_type.shape.dim[-1]
        dim.dim_value = int(rng.choice([2**31, 2**40, 2**62]))

    def odd_dim(rng, m):
        dim = m.graph.input[0].type.tensor_type.shape.dim[int(rng.integers(0, 3))]
        choice = int(rng.integers(0, 3))
        if choice == 0:
            dim.dim_value = 0
        elif choice == 1:
            dim.dim_value = -3
        else:
            dim.dim_param = str(rng.choice(["", "a b", "batch", "x:0"]))

    def no_shape(rng, m):
        m.graph.input[0].type.tensor_type.ClearField("shape")

    def wrong_opset(rng, m):
        m.opset_import[0].version = int(rng.choice([1, 6, 99, 10000]))

    def unknown_domain(rng, m):
        node = _node(rng, m.graph)
        node.domain = str(rng.choice(["ai.unknown", "com.microsoft", "ai.onnx.ml"]))
        if node.domain == "ai.unknown":
            m.opset_import.append(helper.make_opsetid("ai.unknown", 1))

    def ir_version(rng, m):
        m.ir_version = int(rng.choice([0, 1, 2, 99]))

    def initializer_size(rng, m):
        init = m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]
        choice = int(rng.integers(0, 3))
        if choice == 0 and init.dims:
            init.dims[0] = init.dims[0] * 2 + 1  # more elements than its bytes
        elif choice == 1:
            init.raw_data = init.raw_data[: len(init.raw_data) // 2]
        else:
            init.data_type = int(rng.choice([TensorProto.STRING, TensorProto.INT8, 99]))

    def no_output(rng, m):
        del m.graph.output[:]

    def renamed_output(rng, m):
        m.graph.output[0].name = "not_computed"

    def duplicate_input(rng, m):
        m.graph.input.append(m.graph.input[0])

    def nan_weights(rng, m):
        init = m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]
        array = numpy_helper.to_array(init).copy()
        if array.dtype.kind == "f":
            array.flat[0] = float(rng.choice([np.nan, np.inf, 1e30]))
            init.CopyFrom(numpy_helper.from_array(array, init.name))

    return [unknown_op, op_of_another_arity, dangling_input, duplicate_output, deleted_node, cycle, bad_attribute,
            input_type, huge_dim, odd_dim, no_shape, wrong_opset, unknown_domain, ir_version, initializer_size,
            no_output, renamed_output, duplicate_input, nan_weights]  # fmt: skip


MUTATIONS = _mutations()


def mutated_model(rng) -> tuple[str, bytes]:
    mutate = MUTATIONS[int(rng.integers(0, len(MUTATIONS)))]
    model = transformer_block(int(rng.integers(0, 4)))
    for _ in range(int(rng.choice([1, 1, 1, 2]))):
        mutate(rng, model)
    return mutate.__name__, model.SerializeToString()


# -------------------------------------------------------------------- external data that escapes
ESCAPES = ["dotdot", "absolute", "symlink_out", "hardlink", "past_end", "backslash", "url", "drive", "missing", "dir"]


def external_data_model(rng, directory: Path, outside: Path, escape: str) -> Path:
    """The block model with its largest weight in external data, placed to escape in one way."""
    model = transformer_block(0)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = init.raw_data
    outside.write_bytes(b"secret" * 1000 + data)  # a file the model must never read
    directory.mkdir(parents=True, exist_ok=True)
    offset, length = 0, len(data)
    if escape == "dotdot":
        location = os.path.relpath(outside, directory)
    elif escape == "absolute":
        location = str(outside)
    elif escape == "symlink_out":
        (directory / "weights.bin").symlink_to(outside)
        location = "weights.bin"
    elif escape == "hardlink":
        os.link(outside, directory / "weights.bin")
        location = "weights.bin"
    elif escape == "past_end":
        (directory / "weights.bin").write_bytes(data)
        offset, length = int(rng.choice([len(data), 1, 2**40])), len(data)
        location = "weights.bin"
    elif escape == "backslash":
        location = "..\\" + outside.name
    elif escape == "url":
        location = str(rng.choice([f"file://{outside}", "http://example.com/w.bin", "s3://bucket/w.bin"]))
    elif escape == "drive":
        location = "C:\\weights.bin"
    elif escape == "missing":
        location = "nowhere.bin"
    else:  # a directory, not a file
        (directory / "weights.d").mkdir()
        location = "weights.d"
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        init.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------------------------------- engines
def damage_engine(rng, engine: Path) -> str:
    """Damage a copied engine directory in one way; returns what was done."""
    model = engine / "model.ort.onnx"
    manifest_path = engine / "engine.json"
    choice = int(rng.integers(0, 9))
    if choice == 0:
        model.write_bytes(truncated(rng, model.read_bytes()))
        return "truncated engine model"
    if choice == 1:
        model.write_bytes(flipped_bytes(rng, model.read_bytes()))
        return "flipped engine model"
    if choice == 2:
        model.unlink()
        return "no engine model"
    if choice == 3:
        manifest_path.write_bytes(truncated(rng, manifest_path.read_bytes()))
        return "truncated manifest"
    if choice == 4:
        manifest_path.write_bytes(flipped_bytes(rng, manifest_path.read_bytes()))
        return "flipped manifest"
    manifest = json.loads(manifest_path.read_text())
    if choice == 5:
        key = str(rng.choice(sorted(manifest)))
        del manifest[key]
        what = f"manifest without {key}"
    elif choice == 6:
        key = str(rng.choice(sorted(manifest)))
        manifest[key] = [None, 5, "x", [], {}, -1][int(rng.integers(0, 6))]
        what = f"manifest {key} of the wrong type"
    elif choice == 7:
        manifest["model"] = str(rng.choice(["../../../etc/passwd", "/etc/passwd", "..", "engine.json", ""]))
        what = "manifest model path escaping"
    else:
        spec = manifest["inputs"][0]
        field = str(rng.choice(["dtype", "shape", "name"]))
        spec[field] = {"dtype": "float99", "shape": [1, "nodim", -4], "name": ""}[field]
        what = f"manifest input {field} wrong"
    manifest_path.write_text(json.dumps(manifest))
    return what


# ----------------------------------------------------------------------------------------- arrays
def bad_array_file(rng, path: Path, good: dict[str, np.ndarray]) -> str:
    """An .npz (or what pretends to be one) that is wrong in one way; returns what was done."""
    name, array = next(iter(good.items()))
    choice = int(rng.integers(0, 14))
    if choice == 0:
        np.savez(path, wrong=array)
        return "wrong name"
    if choice == 1:
        np.savez(path, **{name: array[0]})
        return "wrong rank"
    if choice == 2:
        shape = list(array.shape)
        shape[-1] += int(rng.integers(1, 5))
        np.savez(path, **{name: np.zeros(shape, array.dtype)})
        return "wrong static dim"
    if choice == 3:
        dtype = rng.choice([np.float64, np.int32, np.int64, np.bool_, np.complex64, np.uint8, np.float16])
        np.savez(path, **{name: array.astype(dtype)})
        return "wrong dtype"
    if choice == 4:
        bad = array.copy()
        bad.flat[int(rng.integers(0, bad.size))] = float(rng.choice([np.nan, np.inf, -np.inf]))
        np.savez(path, **{name: bad})
        return "nan or inf"
    if choice == 5:
        shape = list(array.shape)
        shape[int(rng.integers(0, len(shape)))] = 0
        np.savez(path, **{name: np.zeros(shape, array.dtype)})
        return "empty"
    if choice == 6:
        np.savez(path, **{name: np.array([{"a": 1}, None], dtype=object)})
        return "object array"
    if choice == 7:
        np.save(path.with_suffix(".npy"), array)
        os.replace(path.with_suffix(".npy"), path)
        return "an .npy named .npz"
    if choice == 8:
        np.savez(path, **good)
        path.write_bytes(truncated(rng, path.read_bytes()))
        return "truncated npz"
    if choice == 9:
        path.write_bytes(random_bytes(rng, b""))
        return "random bytes"
    if choice == 10:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{name}.npy", b"not an array")
        return "zip of junk"
    if choice == 11:
        np.savez(path, **good, extra=array)
        return "an extra array"
    if choice == 12:
        shape = list(array.shape)
        shape[0] = int(rng.integers(5, 9))  # past the batch max: runs with a warning
        np.savez(path, **{name: np.zeros(shape, array.dtype)})
        return "beyond the profile"
    np.savez(path, **{name: np.array("text")})
    return "string array"


def bad_latents(rng, path: Path) -> str:
    """Latents for a [1..4, 4, 8, 8] decoder, wrong in one way (or right)."""
    choice = int(rng.integers(0, 10))
    good = np.random.default_rng(int(rng.integers(0, 100))).standard_normal((3, 4, 8, 8)).astype(np.float32)
    if choice == 0:
        np.save(path, good)
        return "good"
    if choice == 1:
        np.save(path, np.zeros((0, 4, 8, 8), np.float32))
        return "empty"
    if choice == 2:
        np.save(path, good[0])
        return "wrong rank"
    if choice == 3:
        np.save(path, np.zeros((2, 3, 8, 8), np.float32))
        return "wrong channels"
    if choice == 4:
        good.flat[0] = np.nan
        np.save(path, good)
        return "nan"
    if choice == 5:
        np.save(path, np.array([None, {"a": 1}], dtype=object), allow_pickle=True)
        return "pickled"
    if choice == 6:
        np.save(path, good)
        path.write_bytes(truncated(rng, path.read_bytes()))
        return "truncated"
    if choice == 7:
        np.savez(path.with_suffix(".npz"), a=good)
        os.replace(path.with_suffix(".npz"), path)
        return "an npz"
    if choice == 8:
        np.save(path, good.astype(rng.choice([np.float16, np.float64, np.int64, np.bool_])))
        return "other dtype"
    np.save(path, np.zeros((2, 4, int(rng.choice([1, 16, 9])), 8), np.float32))
    return "off the profile"


# ----------------------------------------------------------------------------------------- frames
def frames_folder(rng, folder: Path, size=(40, 56)) -> str:
    """A folder of frames, wrong in one way (or right)."""
    import cv2

    folder.mkdir(parents=True)
    count = int(rng.integers(2, 5))
    h, w = size
    for i in range(count):
        image = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"f_{i:03d}.png"), image)
    choice = int(rng.integers(0, 9))
    victim = folder / f"f_{int(rng.integers(0, count)):03d}.png"
    if choice == 0:
        return "good"
    if choice == 1:
        victim.write_bytes(truncated(rng, victim.read_bytes()))
        return "truncated frame"
    if choice == 2:
        victim.write_bytes(random_bytes(rng, b""))
        return "random bytes frame"
    if choice == 3:
        cv2.imwrite(str(victim), np.zeros((h + int(rng.integers(1, 9)), w, 3), np.uint8))
        return "mixed sizes"
    if choice == 4:
        for p in folder.iterdir():
            p.unlink()
        (folder / "notes.txt").write_text("no frames")
        return "no images"
    if choice == 5:
        for p in sorted(folder.iterdir())[1:]:
            p.unlink()
        return "one frame"
    if choice == 6:
        cv2.imwrite(str(victim), np.zeros((h, w), np.uint8))
        return "grayscale frame"
    if choice == 7:
        cv2.imwrite(str(victim), np.zeros((h, w, 4), np.uint8))
        return "rgba frame"
    (folder / "sub.png").mkdir()
    return "a folder named like a frame"
