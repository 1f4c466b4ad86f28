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
