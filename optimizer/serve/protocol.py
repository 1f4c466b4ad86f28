"""The Open Inference Protocol (KServe v2, the HTTP/REST protocol Triton speaks), as `kiln serve` speaks it:
tensor datatypes, infer requests and responses in JSON and with the binary-tensor extension, and model
metadata from an engine's specs. Pure functions over bytes and numpy arrays; the server wires them up.

The binary extension: a body is a JSON header of `Inference-Header-Content-Length` bytes followed by the
raw bytes of each tensor whose `parameters.binary_data_size` says how long it is, in the order listed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
EXTENSIONS = ["binary_tensor_data", "kiln_jobs"]

# The protocol's datatypes and numpy's names for them (BYTES, strings, is not a tensor kiln engines take).
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16",
}  # fmt: skip
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}


class ProtocolError(Exception):
    """A request the protocol or the engine cannot take: HTTP 400 (or status) with the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def numpy_dtype(datatype: str) -> np.dtype:
    if datatype == "BF16":
        return np.dtype(ml_dtypes.bfloat16)
    if datatype not in DATATYPES:
        raise ProtocolError(f"datatype {datatype!r} is not one kiln engines take; use one of {', '.join(DATATYPES)}")
    return np.dtype(DATATYPES[datatype])


def datatype_of(dtype: str | np.dtype) -> str:
    return NUMPY_TO_DATATYPE[np.dtype(dtype).name]


@dataclasses.dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # the outputs asked for, in order; None for all
    binary_outputs: set[str]  # outputs to send as raw bytes after the JSON header
    id: str | None = None


def parse_infer(body: bytes, header_length: int | None) -> InferRequest:
    """An infer request: the whole body is JSON without header_length, else its first header_length bytes
    are, and the binary tensors follow."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length is {header_length}, and the body is {len(body)} bytes")
    header_bytes = body if header_length is None else body[:header_length]
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request's JSON does not parse: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError('the request must be a JSON object with a non-empty "inputs" list')
    binary = memoryview(body)[len(header_bytes) :]
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in header["inputs"]:
        name, array, used = _input_tensor(tensor, binary[offset:])
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} byte(s) after the tensors its header lists")
    binary_default = bool(_parameters(header).get("binary_data_output", False))
    outputs, binary_outputs = None, set()
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise ProtocolError('"outputs" must be a list of {"name": ...} objects')
        outputs = []
        for output in header["outputs"]:
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise ProtocolError('each of "outputs" must be an object with a "name"')
            outputs.append(output["name"])
            if _parameters(output).get("binary_data", binary_default):
                binary_outputs.add(output["name"])
    elif binary_default:
        binary_outputs = {"*"}
    request_id = header.get("id")
    return InferRequest(inputs, outputs, binary_outputs, None if request_id is None else str(request_id))


def _parameters(item: dict) -> dict:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError('"parameters" must be an object')
    return parameters


def _input_tensor(tensor, binary: memoryview) -> tuple[str, np.ndarray, int]:
    """(name, array, binary bytes it used) of one input in the request's header."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise ProtocolError('each input must be an object with "name", "shape", "datatype" and "data"')
    name, shape, datatype = tensor["name"], tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative whole numbers, got {shape!r}")
    dtype = numpy_dtype(str(datatype))
    count = math.prod(shape)
    size = _parameters(tensor).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise ProtocolError(f"input {name!r}: binary_data_size is {size}; shape {shape} of {datatype} is {count * dtype.itemsize} bytes")
        if size > len(binary):
            raise ProtocolError(f"input {name!r}: the body ends {size - len(binary)} byte(s) short of its binary data")
        return name, np.frombuffer(binary[:size], dtype).reshape(shape), size
    if "data" not in tensor:
        raise ProtocolError(f'input {name!r} has no "data" and no binary_data_size')
    try:
        array = np.asarray(tensor["data"], dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: its data is not {datatype} values ({exc})") from None
    if array.size != count:
        raise ProtocolError(f"input {name!r}: shape {shape} holds {count} value(s), its data has {array.size}")
    return name, array.reshape(shape), 0


def encode_infer(model: str, request: InferRequest, results: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON alone, or a JSON header and the binary outputs."""
    names = request.outputs if request.outputs is not None else list(results)
    outputs, blobs = [], []
    for name in names:
        array = np.ascontiguousarray(results[name])
        entry = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if name in request.binary_outputs or "*" in request.binary_outputs:
            blobs.append(array.tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = (array.astype(np.float32) if array.dtype.name == "bfloat16" else array).ravel().tolist()
        outputs.append(entry)
    body = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body).encode()
    if not blobs:
        return header, {"content-type": JSON_TYPE}
    return header + b"".join(blobs), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}


def check_outputs(request: InferRequest, names: Sequence[str]) -> None:
    unknown = [n for n in request.outputs or () if n not in names]
    if unknown:
        raise ProtocolError(f"the model has no output {unknown[0]!r}; its outputs are {list(names)}")


def tensor_metadata(spec) -> dict:
    """A TensorSpec as the protocol's tensor metadata: a dynamic dim is -1."""
    return {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}


def model_metadata(name: str, config) -> dict:
    """`GET /v2/models/NAME`: the protocol's fields, and kiln's profile (each dynamic dim's min, opt and max)
    and target under "parameters"."""
    dims = {d: {"min": r.min, "opt": r.opt, "max": r.max} for d, r in config.profile.dims.items()}
    return {
        "name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [tensor_metadata(s) for s in config.inputs], "outputs": [tensor_metadata(s) for s in config.outputs],
        "parameters": {"kiln_target": config.target, "kiln_precision": config.precision, "kiln_dims": dims},
    }  # fmt: skip


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
