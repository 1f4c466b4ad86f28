"""Stage progress on stderr, so stdout stays clean for --json."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, label: str):
        self.line(f"kiln: {label} ...")
        start = time.perf_counter()
        yield
        self.line(f"kiln: {label} done ({time.perf_counter() - start:.2f}s)")


class FrameCounter:
    """A one-line progress bar for frame work on a terminal: done/total and frames per second."""

    def __init__(self, total: int | None, enabled: bool, stream=None, every_s: float = 0.25):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def advance(self, frames: int = 1) -> None:
        self.done += frames
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every_s or self.done == self.total):
            self._last = now
            fps = self.done / max(now - self.start, 1e-9)
            of = f"/{self.total}" if self.total else ""
            print(f"\rkiln: {self.done}{of} frames, {fps:.1f} fps", end="", file=self.stream, flush=True)

    def finish(self) -> None:
        if self.enabled and self.done:
            print(file=self.stream, flush=True)
