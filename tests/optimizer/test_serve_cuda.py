"""The frame pipeline's GPU backend (torch streams, events and pinned memory) on a real CUDA engine:
the tiny AutoencoderKL's decoder built for target `cuda`, dynamic and frozen to one shape (a CUDA
graph). Frames match the same model's CPU engine, serial and overlapped runs write the same bytes,
and a dying encoder stops the GPU pipeline cleanly. Skipped without a CUDA device (CI has none)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading

import numpy as np
import pytest

from kiln.optimizer.cli import main

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("diffusers")
if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("needs a CUDA device and onnxruntime-gpu", allow_module_level=True)


def kiln(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    assert kiln("example", "vae", root / "vae")[0] == 0
    shapes = ["--shapes", "height=8", "--shapes", "width=8", "--bench-runs", "0"]
    built = {}
    for name, target, batch in (("cpu", "cpu", "batch=1..2..4"), ("dynamic", "cuda", "batch=1..2..4"), ("static", "cuda", "batch=2")):
        built[name] = root / name
        assert kiln("optimize", root / "vae", "-o", built[name], "--target", target, "--shapes", batch, *shapes)[0] == 0
    latents = np.random.default_rng(0).standard_normal((7, 4, 8, 8)).astype(np.float32)
    np.save(root / "z.npy", latents)
    return built, root / "z.npy"


def frames(folder) -> list[np.ndarray]:
    return [cv2.imread(str(folder / name)).astype(np.int16) for name in sorted(os.listdir(folder))]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_gpu_decode_matches_the_cpu_engine(engines, tmp_path, kind):
    built, latents = engines
    code, out = kiln("decode", built[kind], latents, "-o", tmp_path / "gpu", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["frames"] == 7 and result["chunk"] == (2 if kind == "static" else 8)
    assert 0 < result["engine_busy"] <= result["gpu_busy"] + 1e-6 <= 1 + 1e-6  # engine runs lie inside work items
    assert result["d2h_gb_per_s"] > 0 and result["gpu_compute_s"] > 0
    assert kiln("decode", built["cpu"], latents, "-o", tmp_path / "cpu")[0] == 0
    gpu, cpu = frames(tmp_path / "gpu"), frames(tmp_path / "cpu")
    assert len(gpu) == len(cpu) == 7
    assert max(np.abs(g - c).max() for g, c in zip(gpu, cpu)) <= 1  # fp32 on both; rounding may differ by one level


def test_gpu_serial_and_overlapped_write_the_same_bytes(engines, tmp_path):
    built, latents = engines
    assert kiln("decode", built["static"], latents, "-o", tmp_path / "a", "--workers", "3")[0] == 0
    assert kiln("decode", built["static"], latents, "-o", tmp_path / "b", "--serial")[0] == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and len(names) == 7
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


def test_a_static_engine_refuses_another_chunk(engines, tmp_path):
    built, latents = engines
    code, _ = kiln("decode", built["static"], latents, "-o", tmp_path / "x", "--chunk", "3")
    assert code == 2


def test_gpu_pipeline_stops_cleanly_when_an_encoder_dies(engines, tmp_path):
    from kiln.optimizer.serve.frames import FrameFolderSink
    from kiln.optimizer.serve.jobs import open_backend
    from kiln.optimizer.serve.pipeline import FramePipeline, PipelineError

    backend = open_backend(engines[0]["static"])
    latents = np.load(engines[1])

    def compute(start):
        sample = backend.run({"latent_sample": backend.upload_array(latents[start : start + 2])})["sample"]
        return [(start + i, backend.to_frame(sample[i], channels_first=True, low=-1.0)) for i in range(2)]

    class Dying(FrameFolderSink):
        def write(self, index, frame):
            if index == 3:
                raise RuntimeError("encoder crashed")
            super().write(index, frame)

    pinned = []
    real_buffer = backend.host_buffer
    backend.host_buffer = lambda shape, dtype: pinned.append(real_buffer(shape, dtype)) or pinned[-1]
    with pytest.raises(PipelineError, match="the post-processing stage failed at frame 3: RuntimeError: encoder crashed"):
        FramePipeline(compute, Dying(tmp_path), backend, workers=2).run(range(0, 6, 2))
    assert pinned and all(torch.from_numpy(b).is_pinned() for b in pinned)  # the ring is pinned host memory
    assert not [t for t in threading.enumerate() if t.name.startswith("kiln-")]
    assert 3 not in [int(n[6:12]) for n in os.listdir(tmp_path)]
