"""The pipeline's GPU backend: torch's CUDA streams, events and pinned memory around an ONNX Runtime
CUDA engine.

Why torch and not cuda-python: kiln already depends on torch (the [torch] importer), and torch gives
in one library what the pipeline needs: streams and timing events, a caching device allocator, pinned
host tensors that numpy can view without a copy, and the small device-side conversions (pad, cast,
scale to uint8) as one-line ops. cuda-python would give the streams and events but leave us to write
an allocator and those kernels.

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

from optimizer.errors import InputError
from optimizer.lazy import require

WARMUP_RUNS = 3  # ONNX Runtime captures its CUDA graph on the third run; do it before any other thread copies


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


class DeviceSession:
    """The engine's ONNX Runtime session run on torch tensors: inputs and outputs are bound by address
    to buffers allocated once per shape (fixed addresses, as a CUDA graph needs), padded to the
    engine's alignment on the device and cropped back."""

    def __init__(self, engine, torch):
        import onnxruntime as ort

        self.torch = torch
        self.alignment = getattr(engine, "alignment", None)  # an AlignedEngine wraps the session's engine
        inner = getattr(engine, "engine", engine)
        self.session, self.inputs, self.outputs = inner.session, inner.inputs, inner.outputs
        self.static = inner.static
        self.binding = self.session.io_binding()
        self.buffers: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.runs: list[tuple[Any, Any]] = []  # (start, end) events of each engine run

    def _buffer(self, spec, shape) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, spec.dtype), device="cuda")

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if self.static and self.shapes is not None:
            raise InputError(f"this engine runs one shape, {self.shapes}, captured as a CUDA graph; got {shapes}",
                             hint="build the engine with a dynamic profile to run other sizes")  # fmt: skip
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self.buffers = {}
        for spec in self.inputs:
            self.buffers[spec.name] = buffer = self._buffer(spec, shapes[spec.name])
            self.binding.bind_input(spec.name, "cuda", 0, np.dtype(spec.dtype), list(buffer.shape), buffer.data_ptr())
        if all(isinstance(d, int) for spec in self.outputs for d in spec.shape):
            out_shapes = {spec.name: tuple(spec.shape) for spec in self.outputs}
        else:  # learn the output shapes from one run into buffers ONNX Runtime allocates
            for spec in self.outputs:
                self.binding.bind_output(spec.name, "cuda", 0)
            self.session.run_with_iobinding(self.binding)
            out_shapes = {spec.name: tuple(v.shape()) for spec, v in zip(self.outputs, self.binding.get_outputs(), strict=True)}
            self.binding.clear_binding_outputs()
        for spec in self.outputs:
            self.buffers[spec.name] = buffer = self._buffer(spec, out_shapes[spec.name])
            self.binding.bind_output(spec.name, "cuda", 0, np.dtype(spec.dtype), list(buffer.shape), buffer.data_ptr())
        self.shapes = shapes

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        padded, box = self.alignment.pad(feeds) if self.alignment else (feeds, None)
        shapes = {name: tuple(value.shape) for name, value in padded.items()}
        new_shape = shapes != self.shapes
        if new_shape:
            self._bind(shapes)
        for name, value in padded.items():
            self.buffers[name].copy_(value)  # casts to the engine's input type
        start = self.torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(WARMUP_RUNS if new_shape else 1):
            self.session.run_with_iobinding(self.binding, self.options)
        end = self.torch.cuda.Event(enable_timing=True)
        end.record()
        self.runs.append((start, end))
        outputs = {spec.name: self.buffers[spec.name] for spec in self.outputs}
        if box is not None:
            name, (h_axis, w_axis) = next(iter(self.alignment.inputs.items()))
            outputs = self.alignment.crop(outputs, box, (shapes[name][h_axis], shapes[name][w_axis]))
        # The next run overwrites the output buffers: hand out copies (device to device, microseconds).
        return {name: value.clone() for name, value in outputs.items()}


class CudaBackend:
    """Frames computed on the GPU, copied to a pinned host ring on a second stream (see the module doc)."""

    def __init__(self, engine_dir: Path):
        torch = require("torch", "torch", "running a CUDA engine in the frame pipeline")
        if not torch.cuda.is_available():
            raise InputError(f"the engine in {engine_dir} runs on CUDA, and torch here sees no CUDA device",
                             hint="run it on a machine with an NVIDIA GPU and a CUDA build of torch")  # fmt: skip
        import onnxruntime as ort

        from optimizer.runner import load_engine

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA and cuDNN libraries that torch's packages ship
        self.torch = torch
        self.compute_stream = torch.cuda.Stream()
        self.copy_stream = torch.cuda.Stream()
        self.engine = load_engine(engine_dir, cuda_stream=self.compute_stream.cuda_stream)
        self.session = DeviceSession(self.engine, torch)
        self._items: list[tuple[Any, Any]] = []  # (start, end) events of each work item on the compute stream
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
        items, runs, copies = self._items, self.session.runs, self._copies
        self._items, self.session.runs, self._copies = [], [], []
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

    def upload(self, frame: np.ndarray) -> Any:
        with self._on_compute_stream():
            return unit_float(self.upload_array(frame))

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        with self._on_compute_stream():
            return self.session.run(feeds)

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
