"""Holding SIGINT and SIGTERM over stretches that must not be cut: a sequence of renames, and the
first import of a framework (torch's C++ start-up aborts the process if Ctrl-C lands inside it)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on the first, so a sequence of renames is
    never cut in half. (Blocking them in the OS would not do: ONNX Runtime's threads would take them.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs Python's signal handlers
        return
    caught: list[int] = []
    # A handler set outside Python (getsignal gives None: an embedding process's, such as Triton's Python
    # stub) could not be put back, so that signal is left alone.
    held = [signum for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not None]
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])  # to this thread, at once (os.kill may land on another)
