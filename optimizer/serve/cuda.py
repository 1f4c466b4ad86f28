"""The pipeline's GPU backend: torch's CUDA streams, events and pinned memory around an ONNX Runtime
CUDA engine.

Why torch and not cuda-python: kiln already depends on torch (the [torch] importer), and torch gives
in one library what the pipeline needs: streams and timing events, a caching device allocator, pinned
host tensors that numpy can view without a copy, and the small device-side conversions (pad, cast,
scale to uint8) as one-line ops. cuda-python would give the streams and events but leave us to write
an allocator and those kernels.

The engine runs through its one binding (kiln.targets.engine) over torch CUDA tensors: buffers
allocated once per shape, padding and cropping on the device, the CUDA graph captured there.

Stream layout. The engine's session is created on the compute stream (ONNX Runtime's
`user_compute_stream`), so uploads, the engine run and the conversion to uint8 are ordered on one
stream with no host synchronisation; the session is told not to synchronise at the end of a run. Each
work item records a ready event; the copier thread makes the copy stream wait for it, copies into a
pinned ring buffer and waits for that copy alone. Events around each work item and each engine run
on the compute stream give the GPU's busy fraction, and events around each copy the device-to-host
rate.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from kiln.optimizer.errors import InputError
from kiln.optimizer.lazy import require


@dataclasses.dataclass
class DeviceFrame:
    """A uint8 frame on the GPU and the event after which it is complete."""

    tensor: Any
    ready: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(str(self.tensor.dtype).removeprefix("torch."))


class CudaBackend:
    """Frames computed on the GPU, copied to a pinned host ring on a second stream (see the module doc)."""

    def __init__(self, engine_dir: Path):
        torch = require("torch", "torch", "running a CUDA engine in the frame pipeline")
        if not torch.cuda.is_available():
            raise InputError(f"the engine in {engine_dir} runs on CUDA, and torch here sees no CUDA device",
                             hint="run it on a machine with an NVIDIA GPU and a CUDA build of torch")  # fmt: skip
        import onnxruntime as ort

        from kiln.optimizer.run import open_engine
        from kiln.targets import TorchCudaBuffers

        self.torch = torch
        self.compute_stream = torch.cuda.Stream()
        self.copy_stream = torch.cuda.Stream()
        self.engine = open_engine(engine_dir, cuda_stream=self.compute_stream.cuda_stream)
        # The engine runs on the compute stream; the session must not wait for the device after a run.
        options = ort.RunOptions()
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.binding = self.engine.bind(TorchCudaBuffers(torch), options)
        self._items: list[tuple[Any, Any]] = []  # (start, end) events of each work item on the compute stream
        self._runs: list[tuple[Any, Any]] = []  # (start, end) events of each engine run
        self._copies: list[tuple[Any, Any, int]] = []  # (start, end, bytes) of each device-to-host copy

    def _event(self, stream) -> Any:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    # ------------------------------------------------------------------ the pipeline's side
    def launch(self, compute, item) -> list[tuple[int, Any]]:
        with self.torch.cuda.stream(self.compute_stream):
            start = self._event(self.compute_stream)
            frames = list(compute(item))
            ready = self._event(self.compute_stream)
        self._items.append((start, ready))
        return [(index, DeviceFrame(f, ready) if isinstance(f, self.torch.Tensor) else f) for index, f in frames]

    def host_buffer(self, shape, dtype) -> np.ndarray:
        # numpy's view keeps the pinned tensor alive; it goes when the ring drops the view.
        return self.torch.empty(shape, dtype=getattr(self.torch, np.dtype(dtype).name), pin_memory=True).numpy()

    def to_host(self, result, out: np.ndarray) -> int:
        if isinstance(result, np.ndarray):  # an input frame passed through: already on the host
            np.copyto(out, result)
            return 0
        with self.torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(result.ready)
            start = self._event(self.copy_stream)
            self.torch.from_numpy(out).copy_(result.tensor, non_blocking=True)
            end = self._event(self.copy_stream)
        end.synchronize()
        self._copies.append((start, end, result.tensor.nbytes))
        return result.tensor.nbytes

    def device_metrics(self) -> dict:
        """From the events on the compute stream, over the span from the first work item's start to the
        last one's end: gpu_busy is the time inside work items (uploads and conversions included),
        engine_busy the time inside engine runs alone. Device-to-host GB/s from the copy events alone.
        An event pair times all the stream did between the two, so a gap inside one (the host late to
        launch the next op) counts as busy; with a CUDA graph an engine run is one launch."""
        self.torch.cuda.synchronize()
        items, runs, copies = self._items, self._runs, self._copies
        self._items, self._runs, self._copies = [], [], []
        if not items:
            return {}
        busy_ms = sum(start.elapsed_time(end) for start, end in items)
        span_ms = items[0][0].elapsed_time(items[-1][1])
        engine_ms = sum(start.elapsed_time(end) for start, end in runs)
        copy_ms = sum(start.elapsed_time(end) for start, end, _ in copies)
        return {
            "gpu_busy": busy_ms / max(span_ms, 1e-9),
            "engine_busy": engine_ms / max(span_ms, 1e-9),
            "gpu_compute_s": busy_ms / 1e3,
            "gpu_span_s": span_ms / 1e3,
            "d2h_s": copy_ms / 1e3,
            "d2h_gb_per_s": sum(n for *_, n in copies) / max(copy_ms, 1e-9) / 1e6,
        }

    # ------------------------------------------------------------------ the job's side
    def _on_compute_stream(self):
        return self.torch.cuda.stream(self.compute_stream)

    def upload_array(self, array: np.ndarray) -> Any:
        with self._on_compute_stream():
            staged = self.torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
            return staged.to("cuda", non_blocking=True)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        with self._on_compute_stream():  # Wan 2.1's first caches at 480x832 are about 1 GB: not from the host
            torch_dtype = self.torch.from_numpy(np.empty(0, dtype)).dtype
            return self.torch.zeros(shape, dtype=torch_dtype, device="cuda")

    def upload(self, frame: np.ndarray) -> Any:
        with self._on_compute_stream():
            return unit_float(self.upload_array(frame))

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """The engine on device tensors (padded to its alignment, cast to its types, cropped back), timed
        by events on the compute stream."""
        with self._on_compute_stream():
            box = self.binding.stage(feeds)
            start = self._event(self.compute_stream)
            self.binding.execute()
            end = self._event(self.compute_stream)
            self._runs.append((start, end))
            return self.binding.results(box)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out: staged through pinned memory, run, copied back (not timed)."""
        with self._on_compute_stream():
            box = self.binding.stage({k: self.upload_array(v) for k, v in feeds.items()})
            self.binding.execute()
            return {k: v.cpu().numpy() for k, v in self.binding.results(box).items()}

    def to_frame(self, image, channels_first: bool = False, low: float = 0.0) -> Any:
        with self._on_compute_stream():
            return uint8_frame(image, channels_first, low)


# The device-side twins of HostBackend's conversions, op for op, so both give the same bytes.
def unit_float(frame):
    """A uint8 tensor as float32 in [0, 1]."""
    return frame.float().div_(255.0)


def uint8_frame(image, channels_first: bool = False, low: float = 0.0):
    """A float image tensor in [low, 1] ([H, W, 3], or [3, H, W] if channels_first) as uint8 RGB [H, W, 3]."""
    import torch

    image = image.float()
    if channels_first:
        image = image.permute(1, 2, 0)
    if low:
        image = (image - low) / (1.0 - low)
    return (image * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).contiguous()
