"""Where the pipeline's frames are computed and how they reach the host: the Backend protocol, and the
host backend (an ONNX Runtime CPU engine, plain host buffers) that CI runs.

A backend does two jobs. For the pipeline it launches a work item's compute, gives the ring its host
buffers and copies a result into one. For a job (`kiln interpolate`, `kiln decode`) it moves frames to
where the engine runs, runs the engine there, and turns its float output into uint8 RGB frames, so
the copy moves a quarter of the bytes and the encoders get what they write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from kiln.optimizer.serve.frames import to_uint8


class Backend(Protocol):
    engine: Any

    def launch(self, compute: Callable[[Any], Iterable[tuple[int, Any]]], item) -> list[tuple[int, Any]]:
        """compute(item), on the compute stream: its frames, which may still be in flight."""

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host buffer for the ring (pinned memory on a GPU)."""

    def to_host(self, result: Any, out: np.ndarray) -> int:
        """Wait for result's compute, copy it into out; return the bytes copied from the device."""

    def device_metrics(self) -> dict:
        """What the device measured since the last call (GPU busy fraction, copy rate); {} on the host."""

    def upload(self, frame: np.ndarray) -> Any:
        """A uint8 RGB frame [H, W, 3] as float32 in [0, 1], where the engine runs."""

    def upload_array(self, array: np.ndarray) -> Any: ...

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A zero array made where the engine runs (a step decoder's first caches: nothing to copy)."""

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """The engine on feeds that upload made; outputs stay where the engine runs."""

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A server's request: host arrays in, the engine run, host arrays out."""

    def to_frame(self, image, channels_first: bool = False, low: float = 0.0) -> Any:
        """A float image in [low, 1] ([H, W, 3], or [3, H, W] if channels_first) as a uint8 RGB frame."""


class HostBackend:
    """Everything on the host: the engine's outputs are numpy arrays and the copy is a memcpy."""

    def __init__(self, engine=None):
        self.engine = engine

    def launch(self, compute, item) -> list[tuple[int, Any]]:
        return list(compute(item))

    def host_buffer(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def to_host(self, result, out: np.ndarray) -> int:
        np.copyto(out, result)
        return out.nbytes

    def device_metrics(self) -> dict:
        return {}

    def upload(self, frame: np.ndarray) -> np.ndarray:
        return frame.astype(np.float32) / 255.0

    def upload_array(self, array: np.ndarray) -> np.ndarray:
        return array

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine.run(self.engine.as_input_types(feeds))

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine.run(feeds)

    def to_frame(self, image, channels_first: bool = False, low: float = 0.0) -> np.ndarray:
        image = np.asarray(image, np.float32)
        if channels_first:
            image = np.transpose(image, (1, 2, 0))
        if low:
            image = (image - low) / (1.0 - low)
        return to_uint8(image)
