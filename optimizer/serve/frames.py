"""Frames on disk: a folder of images in, a folder of PNG or JPEG files out (OpenCV, the [serve] extra).

Each output frame is encoded in memory, written to a temporary name and renamed, so a frame on disk is
always whole, whatever stops the pipeline; its name comes from its index, so none is written twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kiln.optimizer.errors import InputError
from kiln.optimizer.lazy import require
from kiln.optimizer.outdir import cannot_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def opencv():
    return require("cv2", "serve", "reading and writing frames")


def frame_paths(folder: Path) -> list[Path]:
    """The image files in folder, in name order; InputError if there are none."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of frames")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"{folder} holds no image files", hint=f"frames are files ending in {', '.join(IMAGE_SUFFIXES)}")
    return paths


def read_frame(path: Path) -> np.ndarray:
    """An RGB frame, uint8 [H, W, 3]; InputError naming the file if it cannot be read. Frames stay uint8
    until the backend uploads them: a quarter of the bytes to move, and the conversion runs on the GPU."""
    cv2 = opencv()
    data = np.fromfile(path, np.uint8) if path.is_file() else None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if image is None:
        raise InputError(f"{path}: cannot be decoded as an image (corrupt or truncated?)", hint="fix or remove that frame")
    return np.ascontiguousarray(image[:, :, ::-1])


def read_frames(folder: Path) -> Iterator[tuple[int, np.ndarray]]:
    for index, path in enumerate(frame_paths(folder)):
        yield index, read_frame(path)


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """A float RGB frame in [0, 1] ([H, W, 3] or [1, H, W, 3]) as uint8 [H, W, 3]; uint8 passes through."""
    frame = np.asarray(frame)
    if frame.dtype == np.uint8:
        return frame.reshape(frame.shape[-3:])
    return np.clip(frame.reshape(frame.shape[-3:]) * 255.0 + 0.5, 0, 255).astype(np.uint8)


class FrameFolderSink:
    """Writes frame `index` (uint8 RGB, or float in [0, 1]; [H, W, 3] or [1, H, W, 3]) as DIR/frame_{index:06d}.EXT."""

    def __init__(self, directory: Path, ext: str = "png", jpeg_quality: int = 90, png_level: int = 1):
        cv2 = opencv()
        if ext not in ("png", "jpg"):
            raise InputError(f"cannot write .{ext} frames", hint="use png or jpg")
        self.directory, self.ext = Path(directory), ext
        self.directory.mkdir(parents=True, exist_ok=True)
        self.params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, png_level]

    def close(self) -> None:
        """Nothing to finish: every frame is already in place."""

    def abort(self) -> None:
        """Frames already written are whole and stay."""

    def path(self, index: int) -> Path:
        return self.directory / f"frame_{index:06d}.{self.ext}"

    def encode(self, frame: np.ndarray, index: int = 0) -> bytes:
        """frame as the bytes of a .png or .jpg file."""
        ok, encoded = opencv().imencode(f".{self.ext}", np.ascontiguousarray(to_uint8(frame)[:, :, ::-1]), self.params)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode frame {index} as {self.ext}")
        return encoded.tobytes()

    def write(self, index: int, frame: np.ndarray) -> None:
        encoded = self.encode(frame, index)
        final = self.path(index)
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(encoded)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise cannot_write(final, exc) from None
