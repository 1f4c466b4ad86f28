"""Buffer allocators for an engine's binding: where its inputs and outputs live.

One binding class (targets/engine.py) binds a session's inputs and outputs by address to buffers that
one of these allocates: host numpy arrays, ONNX Runtime device buffers (OrtValue), or torch CUDA
tensors. Each allocator also copies a feed into its buffer (casting to the engine's type) and hands a
result out as a copy, since the next run overwrites the buffer.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Buffers(Protocol):
    device: str  # ONNX Runtime's device name: "cpu" or "cuda"
    device_id: int
    # Whether outputs ONNX Runtime allocates itself can be handed out in this allocator's kind (through
    # from_ort); if not (torch tensors cannot wrap them), the binding learns each new shape's output
    # shapes from one run and allocates the outputs here, and from_ort is never called.
    takes_ort_outputs: bool

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any: ...

    def address(self, buffer) -> int: ...

    def write(self, buffer, value) -> None:
        """Copy value (a host array, or a buffer of this kind) into buffer, cast to buffer's type."""

    def result(self, buffer) -> Any:
        """A copy of (a view of) a bound output, in this allocator's kind."""

    def from_ort(self, value) -> Any:
        """An output ONNX Runtime allocated (an OrtValue), in this allocator's kind; only where takes_ort_outputs."""


class HostBuffers:
    """numpy arrays in host memory, for engines that run on the CPU."""

    device, device_id, takes_ort_outputs = "cpu", 0, True

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def address(self, buffer: np.ndarray) -> int:
        return buffer.ctypes.data

    def write(self, buffer: np.ndarray, value) -> None:
        np.copyto(buffer, value, casting="same_kind")

    def result(self, buffer: np.ndarray) -> np.ndarray:
        return buffer.copy()

    def from_ort(self, value) -> np.ndarray:
        return value.numpy()


class OrtDeviceBuffers:
    """ONNX Runtime's own device buffers (OrtValue); results come back to the host as numpy arrays.
    What `kiln run`, `kiln bench` and verification use on a GPU: no framework beyond ONNX Runtime."""

    takes_ort_outputs = True

    def __init__(self, device: str = "cuda", device_id: int = 0):
        self.device, self.device_id = device, device_id

    def empty(self, shape, dtype):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), self.device, self.device_id)

    def address(self, buffer) -> int:
        return buffer.data_ptr()

    def write(self, buffer, value) -> None:
        dtype = np.dtype(_ORT_TYPES[buffer.data_type()])
        buffer.update_inplace(np.ascontiguousarray(value, dtype=dtype))

    def result(self, buffer) -> np.ndarray:
        return buffer.numpy()

    def from_ort(self, value) -> np.ndarray:
        return value.numpy()


class TorchCudaBuffers:
    """torch CUDA tensors: the serving pipeline's GPU backend keeps frames on the device as tensors.
    Outputs are always bound here (takes_ort_outputs is False), so it has no from_ort."""

    device, device_id, takes_ort_outputs = "cuda", 0, False

    def __init__(self, torch):
        self.torch = torch

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device="cuda")

    def address(self, buffer) -> int:
        return buffer.data_ptr()

    def write(self, buffer, value) -> None:
        buffer.copy_(self.torch.from_numpy(value) if isinstance(value, np.ndarray) else value)

    def result(self, buffer):
        return buffer.clone()  # device to device, microseconds


# ONNX Runtime's type strings, as numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def numpy_type(ort_type: str) -> str:
    """numpy's name for an ONNX Runtime type string ('tensor(float)' -> 'float32')."""
    return _ORT_TYPES.get(ort_type, "bfloat16" if ort_type == "tensor(bfloat16)" else ort_type)
