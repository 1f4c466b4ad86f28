"""`kiln interpolate` and `kiln decode`: frame jobs for the pipeline, from an engine and a source.

interpolate: FILM's recursive mid-point scheme (the authors' `times_to_interpolate`): each level puts a
frame at t = 0.5 between every two neighbours, so factor 2^k gives (n - 1) * factor + 1 frames.
decode: a VAE decoder over a sequence of latents, a chunk at a time.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from optimizer.errors import InputError
from optimizer.progress import FrameCounter
from optimizer.serve.frames import FrameFolderSink, frame_paths, opencv, read_frames, to_uint8
from optimizer.serve.pipeline import FramePipeline
from optimizer.serve.video import VideoSink, is_video, read_video, video_fps
from optimizer.runner import check_feeds
from targets.base import as_input_types

FILM_INPUTS = {"x0", "x1", "time"}


def check_factor(factor: int) -> int:
    if factor < 2 or factor & (factor - 1):
        raise InputError(
            f"--factor must be a power of two (2, 4, 8, ...), got {factor}",
            hint="FILM's recursive scheme doubles the frame rate at each level",
        )
    return int(math.log2(factor))


def check_output(output: Path, force: bool) -> None:
    """Refuse to write over what the user has, unless --force."""
    if output.exists() and (output.is_file() or any(output.iterdir())) and not force:
        raise InputError(f"{output} exists and is not empty", hint="choose another -o, or pass --force to write over it")


def make_sink(output: Path, fps: float, fmt: str):
    if is_video(output):
        return VideoSink(output, fps)
    if output.exists() and output.is_file():
        raise InputError(f"{output} is a file, not a folder for frames", hint="give a folder, or a video name ending in .mp4")
    return FrameFolderSink(output, fmt)


def source_frames(source: Path) -> tuple[Iterator[tuple[int, np.ndarray]], int | None, float]:
    """Frames of a folder or a video file, their count if known, and the frame rate (30 for folders)."""
    if source.is_dir():
        return read_frames(source), len(frame_paths(source)), 30.0
    if is_video(source):
        cv2 = opencv()
        capture = cv2.VideoCapture(os.fspath(source))
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
        capture.release()
        return read_video(source), count or None, video_fps(source)
    raise InputError(f"{source}: not a folder of frames or a video file", hint="give a folder of images or a .mp4/.avi/.mov/.mkv file")


class FilmInterpolator:
    """compute(item) for the pipeline. Items come from `items`: ("frame", k, f) puts input frame k at
    output index k * factor; ("between", k, a, b) puts the in-betweens of frames k and k + 1 after it."""

    def __init__(self, engine, factor: int):
        names = {spec.name for spec in engine.inputs}
        if not FILM_INPUTS <= names:
            raise InputError(f"the engine takes {sorted(names)}, not a FILM interpolator's x0, x1 and time",
                             hint="build one with `kiln optimize` from a FILM SavedModel")  # fmt: skip
        self.engine, self.factor, self.levels = engine, factor, check_factor(factor)

    def feeds(self, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        return as_input_types(self.engine, {"x0": a[None], "x1": b[None], "time": np.full((1, 1), 0.5, np.float32)})

    def midpoint(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.engine.run(self.feeds(a, b))["image"][0]

    def between(self, a: np.ndarray, b: np.ndarray, levels: int) -> list[np.ndarray]:
        if levels == 0:
            return []
        mid = self.midpoint(a, b)
        return [*self.between(a, mid, levels - 1), mid, *self.between(mid, b, levels - 1)]

    def __call__(self, item) -> list[tuple[int, np.ndarray]]:
        kind, k, *frames = item
        if kind == "frame":
            return [(k * self.factor, frames[0])]
        return [(k * self.factor + i + 1, f) for i, f in enumerate(self.between(*frames, self.levels))]

    def items(self, frames: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple]:
        """Each input frame as soon as it is read, and the in-betweens of each pair once both are read, so
        a frame that cannot be read stops the job after everything before it is out."""
        previous = None
        for k, frame in frames:
            if previous is not None:
                if frame.shape != previous.shape:
                    raise InputError(f"frame {k} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is {previous.shape[1]}x{previous.shape[0]}",
                                     hint="every frame must have the same size")  # fmt: skip
                yield "between", k - 1, previous, frame
            yield "frame", k, frame
            previous = frame


def auto_workers(sink, seconds_per_frame: float, frame: np.ndarray) -> int:
    """Enough post-processing workers to keep up with compute: the encode time of one frame over the
    compute time per frame, rounded up (plus one for slack), at most the cores there are."""
    if isinstance(sink, VideoSink):
        return 2  # one encoder writes the video; a second worker converts the next frame meanwhile
    cv2 = opencv()
    start = time.perf_counter()
    cv2.imencode(f".{sink.ext}", to_uint8(frame)[:, :, ::-1], sink.params)
    encode_s = time.perf_counter() - start
    return max(1, min(os.cpu_count() or 1, math.ceil(encode_s / max(seconds_per_frame, 1e-6)) + 1))


def _clear_frames(output: Path) -> None:
    """--force over a folder: remove the frames an earlier run wrote there, and nothing else."""
    if output.is_dir():
        for path in output.glob("frame_*.*"):
            if path.suffix in (".png", ".jpg"):
                path.unlink()


def run_job(compute, items, output: Path, fmt: str, fps: float, total: int | None, workers: int | None,
            serial: bool, progress: bool, per_frame_s: float, sample: np.ndarray) -> dict:  # fmt: skip
    """Run the pipeline into output (a folder or a video), with workers chosen from the encode cost of
    sample against the compute cost per frame unless given; finish the sink, or abort it on failure."""
    sink = make_sink(output, fps, fmt)
    workers = workers or auto_workers(sink, per_frame_s, sample)
    counter = FrameCounter(total, progress)

    class Counting:  # the progress bar advances as frames are written
        def write(self, index, frame):
            sink.write(index, frame)
            counter.advance()

    pipeline = FramePipeline(compute, Counting(), workers=workers, serial=serial)
    try:
        metrics = pipeline.run(items)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        counter.finish()
    return {**metrics.to_json(), "expected_frames": total}


def interpolate(engine, source: Path, output: Path, factor: int, workers: int | None = None, serial: bool = False,
                fmt: str = "png", fps: float | None = None, force: bool = False, progress: bool = False) -> dict:  # fmt: skip
    film = FilmInterpolator(engine, factor)
    if source.resolve() == output.resolve():
        raise InputError(f"{output} is the input; write the result somewhere else")
    frames, count, source_fps = source_frames(source)
    check_output(output, force)
    # Warm the engine up on the first two frames; the time of a mid-point sets the worker count.
    head = [next(frames, None), next(frames, None)]
    if head[1] is None:
        raise InputError(f"{source} has {'no frame' if head[0] is None else 'one frame'}; interpolation needs at least two")
    warnings = check_feeds(engine, film.feeds(head[0][1], head[1][1]), f"frames of {source}")
    start = time.perf_counter()
    film.midpoint(head[0][1], head[1][1])
    per_frame_s = (time.perf_counter() - start) * (factor - 1) / factor
    if force:
        _clear_frames(output)
    total = (count - 1) * factor + 1 if count else None
    items = film.items(itertools.chain(head, frames))
    metrics = run_job(film, items, output, fmt, fps or source_fps * factor, total, workers, serial, progress, per_frame_s, head[0][1])
    return {"job": "interpolate", "factor": factor, "input": str(source), "output": str(output), "warnings": warnings, **metrics}


def decode(engine, latents_path: Path, output: Path, chunk: int = 8, workers: int | None = None, serial: bool = False,
           fmt: str = "png", fps: float = 24.0, force: bool = False, progress: bool = False) -> dict:  # fmt: skip
    """A VAE decoder engine (latent_sample [B, C, h, w] -> sample [B, 3, H, W] in [-1, 1]) over latents
    [N, C, h, w] from an .npy file, chunk frames at a time."""
    names = [spec.name for spec in engine.inputs]
    if names != ["latent_sample"]:
        raise InputError(f"the engine takes {names}, not a VAE decoder's latent_sample", hint="build one with `kiln optimize` from a diffusers AutoencoderKL")
    if chunk < 1:
        raise InputError("--chunk must be at least 1")
    try:
        latents = np.load(latents_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{latents_path}: not a readable .npy array ({exc})") from None
    channels = engine.inputs[0].shape[1]
    if latents.ndim != 4 or (isinstance(channels, int) and latents.shape[1] != channels):
        raise InputError(f"{latents_path} holds shape {list(latents.shape)}; the decoder takes [frames, {channels}, height, width]")
    if not np.isfinite(latents).all():
        raise InputError(f"{latents_path} holds NaN or infinite values", hint="check the sampler that wrote it")
    dtype = engine.inputs[0].dtype

    def compute(start: int) -> list[tuple[int, np.ndarray]]:
        sample = engine.run({"latent_sample": latents[start : start + chunk].astype(dtype)})["sample"]
        frames = (np.transpose(sample, (0, 2, 3, 1)).astype(np.float32) + 1.0) / 2.0
        return [(start + i, frame) for i, frame in enumerate(frames)]

    check_output(output, force)
    start = time.perf_counter()
    first = compute(0)  # warms the engine up; its time per frame sets the worker count
    per_frame_s = (time.perf_counter() - start) / len(first)
    if force:
        _clear_frames(output)

    def replay(item):
        return first if item == 0 else compute(item)

    metrics = run_job(replay, range(0, len(latents), chunk), output, fmt, fps, len(latents), workers, serial, progress, per_frame_s, first[0][1])
    return {"job": "decode", "chunk": chunk, "input": str(latents_path), "output": str(output), **metrics}
