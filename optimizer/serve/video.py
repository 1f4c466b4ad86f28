"""Video files in and out, through OpenCV (the [serve] extra). Encoding runs on the CPU.

A video is written to a temporary file beside its destination and renamed when the last frame is in;
a run that fails leaves no video behind, and the file that was there before is kept.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kiln.optimizer.errors import InputError
from kiln.optimizer.outdir import cannot_write
from kiln.optimizer.serve.frames import opencv, to_uint8

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def video_info(path: Path) -> tuple[int | None, float]:
    """The frame count (None if the container does not say) and the frame rate (30 if it does not say)."""
    cv2 = opencv()
    capture = cv2.VideoCapture(os.fspath(path))
    count, fps = 0, 0.0
    try:
        if capture.isOpened():
            count, fps = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    return count or None, fps if fps and fps > 0 else 30.0


def read_video(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 RGB frame [H, W, 3]) for each frame of the video at path."""
    cv2 = opencv()
    if not path.is_file():
        raise InputError(f"{path}: no such video file")
    capture = cv2.VideoCapture(os.fspath(path))
    if not capture.isOpened():
        raise InputError(f"{path}: OpenCV cannot open it as a video", hint=f"use one of {', '.join(VIDEO_SUFFIXES)}, or a folder of frames")
    try:
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            yield index, np.ascontiguousarray(image[:, :, ::-1])
            index += 1
        if index == 0:
            raise InputError(f"{path}: no frame could be decoded (empty or corrupt video)")
    finally:
        capture.release()


class VideoSink:
    """Writes frames to one video file, in index order whatever order they arrive in."""

    def __init__(self, path: Path, fps: float, fourcc: str = "mp4v"):
        self.path, self.fps, self.fourcc = Path(path), fps, fourcc
        self.tmp = self.path.with_name(f".{self.path.stem}.kiln-tmp{self.path.suffix}")
        self._writer = None
        self._pending: dict[int, np.ndarray] = {}
        self._next = 0
        self._lock = threading.Lock()

    def write(self, index: int, frame: np.ndarray) -> None:
        image = to_uint8(frame)[:, :, ::-1]  # the conversion runs in the worker, in parallel
        with self._lock:  # one encoder: frames go in strictly in order
            self._pending[index] = np.ascontiguousarray(image)
            while self._next in self._pending:
                self._encode(self._pending.pop(self._next))
                self._next += 1

    def _encode(self, image: np.ndarray) -> None:
        if self._writer is None:
            cv2 = opencv()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise cannot_write(self.path, exc) from None
            height, width = image.shape[:2]
            self._writer = cv2.VideoWriter(os.fspath(self.tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (width, height))
            if not self._writer.isOpened():
                raise InputError(f"cannot write {self.path}: OpenCV's {self.fourcc} video writer would not open "
                                 f"(it writes {self.tmp.name} beside it first)",
                                 hint="check that its directory is writable and has free space")  # fmt: skip
        self._writer.write(image)

    def close(self) -> None:
        """Finish the video and move it into place."""
        if self._pending:
            raise RuntimeError(f"frames {sorted(self._pending)} arrived but frame {self._next} never did")
        if self._writer is not None:
            self._writer.release()
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.release()
        self.tmp.unlink(missing_ok=True)
