"""Progress on stderr, so stdout stays clean for --json.

On a terminal a stage says when it starts and when it is done, and frame work redraws one line. In a
log (stderr not a terminal: CI, `2> log`) every line stands alone and starts with the time since the
command began: one line per stage when it is done, and one per tenth of long frame work.
"""

from __future__ import annotations

import contextlib
import sys
import time


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    def __init__(self, enabled: bool, stream=None, terminal: bool | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.start = time.perf_counter()
        self.prefix = ""  # what the lines are about: `kiln compare` names the point, "[3/8 int8] "

    def line(self, text: str) -> None:
        if self.enabled:
            stamp = "" if self.terminal else f"[{time.perf_counter() - self.start:7.1f}s] "
            print(f"kiln: {stamp}{self.prefix}{text}", file=self.stream, flush=True)

    def started(self, label: str) -> None:
        if self.terminal:  # a log gets the one line at the end, with the time
            self.line(f"{label} ...")

    def finished(self, label: str, seconds: float, detail: str = "") -> None:
        self.line(f"{label} done ({seconds:.2f}s{detail})")

    @contextlib.contextmanager
    def stage(self, label: str):
        self.started(label)
        start = time.perf_counter()
        yield
        self.finished(label, time.perf_counter() - start)


class FrameCounter:
    """done/total frames and frames per second: a line redrawn in place on a terminal, a line per tenth
    of the total (or per LOG_EVERY_S when the total is unknown) in a log."""

    LOG_EVERY_S = 10.0

    def __init__(self, total: int | None, enabled: bool, stream=None, every_s: float = 0.25, terminal: bool | None = None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.every_s = every_s
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._logged_tenths = 0

    def advance(self, frames: int = 1) -> None:
        self.done += frames
        if not self.enabled:
            return
        now = time.perf_counter()
        fps = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        if self.terminal:
            if now - self._last >= self.every_s or self.done == self.total:
                self._last = now
                print(f"\rkiln: {self.done}{of} frames, {fps:.1f} fps", end="", file=self.stream, flush=True)
            return
        tenths = self.done * 10 // self.total if self.total else int((now - self.start) // self.LOG_EVERY_S)
        if tenths > self._logged_tenths:
            self._logged_tenths = tenths
            share = f" ({self.done / self.total:.0%})" if self.total else ""
            print(f"kiln: [{now - self.start:7.1f}s] {self.done}{of} frames{share}, {fps:.1f} fps", file=self.stream, flush=True)

    def finish(self) -> None:
        if self.enabled and self.done and self.terminal:
            print(file=self.stream, flush=True)
