"""What a user runs today, on the inputs `kiln compare` measures engines on: the baseline rows.

- a diffusers model: PyTorch eager (fp32 on the CPU; bf16 on a GPU, as diffusers models are served)
  and, on a GPU, torch.compile of the same, as it comes and with CUDA graphs (mode="reduce-overhead"):
  as it comes, a compiled DiT-XL/2 at 256² batch 8 waits on its kernel launches and its latency moved
  between 10 and 18 ms from one compile to the next on the H200 machine, where CUDA graphs gave 6.0 to
  6.8 ms (benchmarks/baseline_state.py); kiln's GPU engines replay CUDA graphs too;
- a TensorFlow SavedModel: TensorFlow (on the CPU: kiln's machines have no TensorFlow with CUDA);
- an ONNX model: ONNX Runtime with its own graph optimizer, on the target's providers, in fp32.

Each is a runner over host arrays (for quality) and a timed call on inputs already where it computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from kiln import targets

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
CUDA_GRAPHS = "torch.compile bf16, CUDA graphs"


@dataclasses.dataclass
class Baseline:
    name: str
    run: Run  # host feeds -> host outputs
    timer: Callable[[dict[str, np.ndarray]], Callable[[], None]]  # feeds -> one run on resident inputs, waited for
    io: str  # where the timed run's inputs and outputs live: "device" or "host"
    peak_memory_mb: Callable[[], float | None] = lambda: None  # device memory at its peak since the baseline was made


def baseline_names(model: Path, target: targets.Target) -> list[str]:
    """The baselines that can run here for this model and target (installed frameworks only)."""
    from kiln.optimizer.importers.diffusers import is_diffusers_dir
    from kiln.optimizer.importers.savedmodel import is_saved_model

    gpu = getattr(target, "device", "cpu") == "cuda"
    if is_diffusers_dir(model):
        if not _installed("torch", "diffusers"):
            return []
        return ["PyTorch eager bf16", "torch.compile bf16", CUDA_GRAPHS] if gpu else ["PyTorch eager fp32"]
    if is_saved_model(model):
        return ["TensorFlow (CPU)"] if _installed("tensorflow") else []
    return [f"ONNX Runtime, its optimizer ({'CUDA' if gpu else 'CPU'}, fp32)"]


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@contextlib.contextmanager
def open_baseline(name: str, model: Path, model_path: Path, target: targets.Target, options) -> Iterator[Baseline]:
    """The baseline `name` (from baseline_names) of the model; model_path is its imported ONNX form."""
    if name.startswith("PyTorch") or name.startswith("torch.compile"):
        mode = "reduce-overhead" if name == CUDA_GRAPHS else None
        yield _torch(name, model, gpu=getattr(target, "device", "cpu") == "cuda", compiled=name.startswith("torch.compile"), mode=mode,
                     step=getattr(options, "video_decoder", "clip") == "step")
    elif name.startswith("TensorFlow"):
        yield _tensorflow(name, model, model_path, options)
    else:
        yield _onnxruntime(name, model_path, target)


def _torch(name: str, directory: Path, gpu: bool, compiled: bool, mode: str | None = None, step: bool = False) -> Baseline:
    import torch

    from kiln.optimizer.importers.diffusers import adapter_for, load, quiet_libraries, wrapped_model

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    with quiet_libraries():
        model = load(directory)
    adapter = adapter_for(model, step)  # on the CPU in fp32: some adapters probe the model
    with quiet_libraries():  # diffusers warns about casting with to(); the whole model in one dtype is what is measured
        model = model.to(device, dtype)
    module = wrapped_model(model, adapter)
    if compiled:
        module = torch.compile(module, mode=mode)

    def tensors(feeds) -> list:
        found = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in adapter.input_names]
        return [t.to(dtype) if t.is_floating_point() else t for t in found]

    # no_grad, as diffusers' pipelines run
    def run(feeds):
        with torch.no_grad():
            out = module(*tensors(feeds))
        return {name: o.float().cpu().numpy() for name, o in zip(adapter.outputs, out if isinstance(out, tuple) else (out,), strict=True)}

    def timer(feeds):
        resident = tensors(feeds)

        def once():
            with torch.no_grad():
                module(*resident)
            if gpu:
                torch.cuda.synchronize()

        return once

    if not gpu:
        return Baseline(name, run, timer, "host")
    torch.cuda.reset_peak_memory_stats()
    return Baseline(name, run, timer, "device", lambda: torch.cuda.max_memory_allocated() / 2**20)


def _tensorflow(name: str, directory: Path, model_path: Path, options) -> Baseline:
    import onnx

    from kiln.optimizer.lazy import require

    tf = require("tensorflow", "tf", "the TensorFlow baseline")
    with tf.device("/CPU:0"):
        function = tf.saved_model.load(str(directory)).signatures[options.signature]
    kept = [o.name for o in onnx.load(str(model_path), load_external_data=False).graph.output]  # the outputs the import kept

    def run(feeds):
        with tf.device("/CPU:0"):
            out = function(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: out[k].numpy() for k in kept}

    def timer(feeds):
        return lambda: run(feeds)

    return Baseline(name, run, timer, "host")


def _onnxruntime(name: str, model_path: Path, target: targets.Target) -> Baseline:
    import onnxruntime as ort

    from kiln.optimizer.calibrate import calibration_providers
    from kiln.targets.engine import Engine, session_options

    options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    providers = list(calibration_providers(target))  # the target's GPU, with ONNX Runtime's own kernels
    session = ort.InferenceSession(str(model_path), options, providers=providers)
    engine = Engine.from_session(session, "cuda" if "CUDAExecutionProvider" in providers else "cpu")

    def timer(feeds):
        feeds = engine.as_input_types(feeds)
        return engine.device_runner(feeds) if engine.device_resident else (lambda: engine.run(feeds))

    return Baseline(name, lambda feeds: engine.run(engine.as_input_types(feeds)), timer, "device" if engine.device_resident else "host")
