"""`kiln interpolate` and `kiln decode`: frame jobs for the pipeline, from an engine and a source.

interpolate: FILM's recursive mid-point scheme (the authors' `times_to_interpolate`): each level puts a
frame at t = 0.5 between every two neighbours, so factor 2^k gives (n - 1) * factor + 1 frames.
decode: a VAE decoder over a sequence of latents, a chunk at a time; or a video VAE's step decoder over
one clip's latents, a step of its decode loop at a time, its caches carried from step to step on the device.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.step_decoders import STEP_METADATA_KEY, chunks, clip_frames, kept_frames
from kiln.optimizer.progress import FrameCounter
from kiln.optimizer.outdir import cannot_write, check_not_link
from kiln.optimizer.serve.frames import IMAGE_SUFFIXES, FrameFolderSink, frame_paths, read_frames
from kiln.optimizer.serve.backends import HostBackend
from kiln.optimizer.serve.pipeline import FramePipeline
from kiln.optimizer.serve.video import VIDEO_SUFFIXES, VideoSink, is_video, read_video, video_info
from kiln.targets import read_manifest
from kiln.optimizer.run import engine_dir, engine_errors, open_engine

FILM_INPUTS = {"x0", "x1", "time"}
# Encoders side by side, sharing memory bandwidth and the GIL with the other stages, run slower than one alone.
ENCODE_MARGIN = 1.5
DEFAULT_CHUNK = 8  # latent frames per run for an engine with a dynamic batch, at most its batch max
# Names that are files, not folders of frames: images, and videos kiln does not write.
FILE_SUFFIXES = {*IMAGE_SUFFIXES, ".gif", ".webm", ".wmv", ".flv", ".m4v", ".mpg", ".mpeg", ".ts", ".npy", ".npz"}


def check_factor(factor: int) -> int:
    if factor < 2 or factor & (factor - 1):
        raise InputError(
            f"--factor must be a power of two (2, 4, 8, ...), got {factor}",
            hint="FILM's recursive scheme doubles the frame rate at each level",
        )
    return int(math.log2(factor))


def check_output(output: Path, force: bool) -> None:
    """Refuse to write over what the user has, unless --force, and a name that is neither a folder nor a
    video kiln can write."""
    check_not_link(output, "output")
    if not is_video(output) and output.suffix.lower() in FILE_SUFFIXES:
        raise InputError(f"{output}: kiln writes videos as {', '.join(VIDEO_SUFFIXES)} and frames into a folder, not {output.suffix} files",
                         hint="give a folder for frames, or a video name ending in .mp4")  # fmt: skip
    if output.exists() and not output.is_dir() and not is_video(output):
        raise InputError(f"{output} is a file, not a folder for frames", hint="give a folder, or a video name ending in .mp4")
    if output.exists() and (output.is_file() or any(output.iterdir())) and not force:
        raise InputError(f"{output} exists and is not empty", hint="choose another -o, or pass --force to write over it")


def make_sink(output: Path, fps: float, fmt: str):
    try:
        return VideoSink(output, fps) if is_video(output) else FrameFolderSink(output, fmt)
    except OSError as exc:
        raise cannot_write(output, exc) from None


def source_frames(source: Path) -> tuple[Iterator[tuple[int, np.ndarray]], int | None, float]:
    """Frames of a folder or a video file, their count if known, and the frame rate (30 for folders)."""
    if source.is_dir():
        return read_frames(source), len(frame_paths(source)), 30.0
    if is_video(source):
        return read_video(source), *video_info(source)
    raise InputError(f"{source}: not a folder of frames or a video file", hint="give a folder of images or a .mp4/.avi/.mov/.mkv file")


def open_backend(path: Path):
    """The engine in a kiln OUTDIR, behind the backend for where it runs: CUDA engines on the GPU
    backend (torch streams and pinned memory), every other engine on the host."""
    directory = engine_dir(path)
    with engine_errors():
        config = read_manifest(directory)
    if config.device == "cuda":
        from kiln.optimizer.serve.cuda import CudaBackend

        return CudaBackend(directory)
    return HostBackend(open_engine(directory))


class FilmInterpolator:
    """compute(item) for the pipeline. Items come from `items`: ("frame", k, f) puts input frame k at
    output index k * factor; ("between", k, a, b) puts the in-betweens of frames k and k + 1 after it."""

    def __init__(self, backend, factor: int):
        names = {spec.name for spec in backend.engine.inputs}
        if not FILM_INPUTS <= names:
            raise InputError(f"{backend.engine.directory or 'the engine'}: the engine takes {sorted(names)}, not a FILM interpolator's x0, x1 and time",
                             hint="build one with `kiln optimize` from a FILM SavedModel")  # fmt: skip
        self.backend, self.factor, self.levels = backend, factor, check_factor(factor)
        self.time = backend.upload_array(np.full((1, 1), 0.5, np.float32))
        self._uploaded: dict[int, tuple[np.ndarray, object]] = {}  # each input frame is uploaded once

    def midpoint(self, a, b):
        return self.backend.run({"x0": a[None], "x1": b[None], "time": self.time})["image"][0]

    def between(self, a, b, levels: int) -> list:
        if levels == 0:
            return []
        mid = self.midpoint(a, b)
        return [*self.between(a, mid, levels - 1), mid, *self.between(mid, b, levels - 1)]

    def upload(self, frame: np.ndarray):
        if id(frame) not in self._uploaded:
            if len(self._uploaded) >= 2:  # pairs slide by one frame: keep the newest
                self._uploaded.pop(next(iter(self._uploaded)))
            self._uploaded[id(frame)] = (frame, self.backend.upload(frame))
        return self._uploaded[id(frame)][1]

    def __call__(self, item) -> list[tuple[int, object]]:
        kind, k, *frames = item
        if kind == "frame":
            return [(k * self.factor, frames[0])]
        mids = self.between(*(self.upload(f) for f in frames), self.levels)
        return [(k * self.factor + i + 1, self.backend.to_frame(mid)) for i, mid in enumerate(mids)]

    def items(self, frames: Iterable[tuple[int, np.ndarray]], source: Path) -> Iterator[tuple]:
        """Each input frame as soon as it is read, and the in-betweens of each pair once both are read, so
        a frame that cannot be read stops the job after everything before it is out."""
        previous = None
        for k, frame in frames:
            if previous is not None:
                check_same_size(source, k, frame, previous)
                yield "between", k - 1, previous, frame
            yield "frame", k, frame
            previous = frame


def check_same_size(source: Path, k: int, frame: np.ndarray, previous: np.ndarray) -> None:
    if frame.shape != previous.shape:
        raise InputError(f"{source}: frame {k} is {frame.shape[1]}x{frame.shape[0]}, frame {k - 1} is {previous.shape[1]}x{previous.shape[0]}",
                         hint="every frame must have the same size")  # fmt: skip


def timed_warm_up(backend, compute, item) -> tuple[float, np.ndarray]:
    """Run compute(item) twice: the first run warms the engine up (cuDNN's algorithm search, the CUDA
    graph capture); the second, to the host, gives the time per output frame and a frame to time the
    encoder on. Their measurements are dropped."""
    frames = backend.launch(compute, item)
    host = [backend.host_buffer(f.shape, f.dtype) for _, f in frames]  # allocated before the clock starts
    for (_, frame), out in zip(frames, host, strict=True):
        backend.to_host(frame, out)
    start = time.perf_counter()
    for (_, frame), out in zip(backend.launch(compute, item), host, strict=True):
        backend.to_host(frame, out)
    per_frame_s = (time.perf_counter() - start) / len(frames)
    backend.device_metrics()
    return per_frame_s, host[0]


def encode_seconds(sink, samples: list[np.ndarray]) -> float | None:
    """The slowest of the sample frames to encode for sink (best of two tries each); None for a video,
    whose single encoder sets no worker count."""
    if isinstance(sink, VideoSink):
        return None
    slowest = 0.0
    for frame in samples:
        best = float("inf")
        for _ in range(2):  # the first call may pay the encoder's set-up
            start = time.perf_counter()
            sink.encode(frame)
            best = min(best, time.perf_counter() - start)
        slowest = max(slowest, best)
    return slowest


def auto_workers(encode_s: float | None, compute_s: float) -> int:
    """Enough post-processing workers to keep up with compute: the encode time of a frame over the
    compute time per frame, with a margin, rounded up, plus one; at most the cores there are."""
    if encode_s is None:
        return 2  # one encoder writes the video; a second worker converts the next frame meanwhile
    return max(1, min(os.cpu_count() or 1, math.ceil(ENCODE_MARGIN * encode_s / max(compute_s, 1e-6)) + 1))


def _clear_frames(output: Path) -> None:
    """--force over a folder: remove the frames an earlier run wrote there, and nothing else."""
    if output.is_dir():
        for path in output.glob("frame_*.*"):
            if path.suffix in (".png", ".jpg"):
                path.unlink()


def run_job(backend, compute, items, output: Path, fmt: str, fps: float, total: int | None, workers: int | None,
            serial: bool, progress: bool, per_frame_s: float, samples: list[np.ndarray]) -> dict:  # fmt: skip
    """Run the pipeline into output (a folder or a video), with workers chosen from the encode cost of
    the sample frames against the compute cost per frame unless given; finish the sink, or abort it on
    failure."""
    sink = make_sink(output, fps, fmt)
    encode_s = None
    if workers is None:
        encode_s = encode_seconds(sink, samples)
        workers = auto_workers(encode_s, per_frame_s)
    counter = FrameCounter(total, progress)

    class Counting:  # the progress bar advances as frames are written
        def write(self, index, frame):
            sink.write(index, frame)
            counter.advance()

    pipeline = FramePipeline(compute, Counting(), backend, workers=workers, serial=serial)
    try:
        metrics = pipeline.run(items)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        counter.finish()
    encode_ms = None if encode_s is None else encode_s * 1e3
    return {**metrics.to_json(), "expected_frames": total, "compute_ms_per_frame": per_frame_s * 1e3, "encode_ms": encode_ms}


def interpolate(backend, source: Path, output: Path, factor: int, workers: int | None = None, serial: bool = False,
                fmt: str = "png", fps: float | None = None, force: bool = False, progress: bool = False) -> dict:  # fmt: skip
    film = FilmInterpolator(backend, factor)
    if source.resolve() == output.resolve():
        raise InputError(f"{output} is the input; write the result somewhere else")
    frames, count, source_fps = source_frames(source)
    check_output(output, force)
    head = [next(frames, None), next(frames, None)]
    if head[1] is None:
        raise InputError(f"{source} has {'no frame' if head[0] is None else 'one frame'}; interpolation needs at least two")
    check_same_size(source, 1, head[1][1], head[0][1])
    # Only shapes and types are checked: empty arrays of the engine's types, no copy of the frames.
    dtypes = {spec.name: spec.dtype for spec in backend.engine.inputs}
    shapes = {"x0": (1, *head[0][1].shape), "x1": (1, *head[1][1].shape), "time": (1, 1)}
    with engine_errors():
        warnings = backend.engine.check_feeds({k: np.empty(v, dtypes[k]) for k, v in shapes.items()}, f"frames of {source}")
    # A pair's in-betweens give factor - 1 of every factor output frames.
    per_frame_s, sample = timed_warm_up(backend, film, ("between", 0, head[0][1], head[1][1]))
    per_frame_s *= (factor - 1) / factor
    if force:
        _clear_frames(output)
    total = (count - 1) * factor + 1 if count else None
    items = film.items(itertools.chain(head, frames), source)
    # Input frames are half the output at factor 2 and may encode slower than the in-betweens (noise).
    samples = [head[0][1], sample]
    metrics = run_job(backend, film, items, output, fmt, fps or source_fps * factor, total, workers, serial, progress, per_frame_s, samples)
    return {"job": "interpolate", "factor": factor, "input": str(source), "output": str(output), "warnings": warnings, **metrics}


def decode(backend, latents_path: Path, output: Path, chunk: int | None = None, workers: int | None = None, serial: bool = False,
           fmt: str = "png", fps: float = 24.0, force: bool = False, progress: bool = False) -> dict:  # fmt: skip
    """A VAE decoder engine (latent_sample [B, C, h, w] -> sample [B, 3, H, W] in [-1, 1]) over latents
    [N, C, h, w] from an .npy file, chunk frames at a time. An engine built for one batch size (a static
    profile) decodes exactly that many per run; the last chunk is filled up with copies of its last latent.
    A step decoder's engine (`kiln optimize --video-decoder step`) goes to decode_steps."""
    engine = backend.engine
    if STEP_METADATA_KEY in engine.session.get_modelmeta().custom_metadata_map:
        if chunk is not None:
            raise InputError("--chunk does not apply to a step decoder: it decodes diffusers' steps, one per run",
                             hint="leave out --chunk")  # fmt: skip
        return decode_steps(backend, latents_path, output, workers, serial, fmt, fps, force, progress)
    names = [spec.name for spec in engine.inputs]
    if names != ["latent_sample"]:
        raise InputError(f"{engine.directory or 'the engine'}: the engine takes {names}, not a VAE decoder's latent_sample", hint="build one with `kiln optimize` from a diffusers AutoencoderKL")
    if chunk is not None and chunk < 1:
        raise InputError(f"--chunk must be at least 1, got {chunk}")
    batch = engine.inputs[0].shape[0]
    if isinstance(batch, int) and chunk not in (None, batch):
        raise InputError(f"this engine decodes exactly {batch} frame(s) per run (its profile is static), not --chunk {chunk}",
                         hint=f"pass --chunk {batch}, or rebuild the engine with a range for the batch")  # fmt: skip
    batch_max = engine.profile.dims[batch].max if isinstance(batch, str) else batch
    chunk = batch if isinstance(batch, int) else chunk or min(DEFAULT_CHUNK, batch_max)
    latents = read_latents(latents_path).astype(engine.inputs[0].dtype, copy=False)  # a sampler's float16 or float64 too
    channels = engine.inputs[0].shape[1]
    if latents.ndim != 4 or (isinstance(channels, int) and latents.shape[1] != channels):
        raise InputError(f"{latents_path} holds shape {list(latents.shape)}; the decoder takes [frames, {channels}, height, width]")
    # The shapes of a full chunk, checked without copying the latents: dtype, rank, the profile.
    shape = (min(chunk, len(latents)) if isinstance(batch, str) else batch, *latents.shape[1:])
    with engine_errors():
        warnings = engine.check_feeds({"latent_sample": np.empty(shape, latents.dtype)}, f"{latents_path} in chunks of {chunk}")

    def compute(start: int) -> list[tuple[int, object]]:
        part = latents[start : start + chunk]
        count = len(part)
        if isinstance(batch, int) and count < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - count, axis=0)])
        sample = backend.run({"latent_sample": backend.upload_array(part)})["sample"]
        return [(start + i, backend.to_frame(sample[i], channels_first=True, low=-1.0)) for i in range(count)]

    check_output(output, force)
    per_frame_s, sample = timed_warm_up(backend, compute, 0)
    if force:
        _clear_frames(output)
    metrics = run_job(backend, compute, range(0, len(latents), chunk), output, fmt, fps, len(latents), workers, serial, progress, per_frame_s, [sample])
    return {"job": "decode", "chunk": chunk, "input": str(latents_path), "output": str(output), "warnings": warnings, **metrics}


def decode_steps(backend, latents_path: Path, output: Path, workers: int | None = None, serial: bool = False,
                 fmt: str = "png", fps: float = 24.0, force: bool = False, progress: bool = False) -> dict:  # fmt: skip
    """One clip's latents [C, frames, h, w] (or [1, C, frames, h, w], as a pipeline returns them) through a
    step decoder's engine, a step's latent frames per run (chunks): the first run gets first=1 and zero
    caches, each next one the caches the run before gave, never leaving the device; the first run's last
    first_frames (all, if None) and every frame of the others are the clip."""
    engine = backend.engine
    layout = json.loads(engine.session.get_modelmeta().custom_metadata_map[STEP_METADATA_KEY])
    specs = {spec.name: spec for spec in engine.inputs}
    latents = read_latents(latents_path)
    channels = specs["latent_sample"].shape[1]
    if latents.ndim == 5 and len(latents) == 1:
        latents = latents[0]
    if latents.ndim != 4 or latents.shape[0] != channels:
        raise InputError(f"{latents_path} holds shape {list(latents.shape)}; the step decoder takes one clip's latents "
                         f"[{channels}, frames, height, width] (or [1, {channels}, frames, height, width])",
                         hint="decode one clip per run")  # fmt: skip
    latents = latents[None].astype(specs["latent_sample"].dtype, copy=False)
    _, _, count, h, w = latents.shape

    def cache_shape(name: str) -> tuple[int, ...]:
        return (1, specs[name].shape[1], specs[name].shape[2], h, w)

    steps = chunks(count, layout["latent_frames"])
    warnings: list[str] = []
    with engine_errors():
        for start, end in steps[:2]:  # the first step's shape, and the others'
            feeds = {"latent_sample": latents[:, :, start:end], "first": np.ones(1, np.int64), **{n: np.zeros(cache_shape(n), specs[n].dtype) for n in layout["inputs"]}}
            warnings += engine.check_feeds(feeds, f"{latents_path} in steps of {layout['latent_frames']} latent frame(s)")
    warnings = list(dict.fromkeys(warnings))
    state: dict = {}

    def compute(i: int) -> list[tuple[int, object]]:
        (start, end), first = steps[i], int(i == 0)
        if first:  # also when the warm-up ran the first step before: a clip starts from empty caches
            state.update({n: backend.zeros(cache_shape(n), specs[n].dtype) for n in layout["inputs"]}, written=0)
        feeds = {"latent_sample": backend.upload_array(latents[:, :, start:end]),
                 "first": backend.upload_array(np.array([first], np.int64)), **{n: state[n] for n in layout["inputs"]}}  # fmt: skip
        out = backend.run(feeds)
        state.update(zip(layout["inputs"], (out[n] for n in layout["outputs"]), strict=True))
        sample = out["sample"][0]
        kept = kept_frames(sample.shape[1], first, layout["first_frames"])
        index = state["written"]
        state["written"] += len(kept)
        return [(index + n, backend.to_frame(sample[:, k], channels_first=True, low=-1.0)) for n, k in enumerate(kept)]

    check_output(output, force)
    if len(steps) > 1:  # time a later step: the first may give fewer frames
        backend.launch(compute, 0)
    per_frame_s, sample = timed_warm_up(backend, compute, min(1, len(steps) - 1))
    if force:
        _clear_frames(output)
    total = clip_frames(count, layout)
    metrics = run_job(backend, compute, range(len(steps)), output, fmt, fps, total, workers, serial, progress, per_frame_s, [sample])
    return {"job": "decode", "steps": len(steps), "input": str(latents_path), "output": str(output), "warnings": warnings, **metrics}


def read_latents(path: Path) -> np.ndarray:
    """Float latents from an .npy file, without pickle; InputError naming the file for anything else."""
    if not path.is_file():
        raise InputError(f"{path}: no such file", hint="give the .npy file of latents [frames, channels, height, width]")
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})", hint="write it with numpy.save; pickled arrays are refused") from None
    if isinstance(latents, np.lib.npyio.NpzFile):
        names = ", ".join(latents.files)
        latents.close()
        raise InputError(f"{path} is an .npz archive (of {names}); decode takes one array in an .npy file",
                         hint="numpy.save('latents.npy', archive['name'])")  # fmt: skip
    if latents.dtype.kind != "f":
        raise InputError(f"{path} holds {latents.dtype} values; latents are floating point")
    if latents.size == 0:
        raise InputError(f"{path} holds shape {list(latents.shape)}, no latents to decode")
    if not np.isfinite(latents).all():
        raise InputError(f"{path} holds NaN or infinite values", hint="check the sampler that wrote it")
    return latents
