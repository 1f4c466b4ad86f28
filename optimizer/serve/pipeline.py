"""The frame pipeline: reading, engine compute, the copy to host, and host post-processing, overlapped.

Four stages run at once, joined by bounded queues:
- read (one thread) pulls work items from the source (decoding input frames) ahead of compute;
- compute (the caller's thread) launches the engine on each work item through the backend; an item
  may yield several frames;
- copy (one thread) waits for each frame's compute and copies it into a ring of host buffers allocated
  once (pinned on a GPU, where the copy runs on its own stream). Compute runs up to COPY_AHEAD work
  items ahead of it, so the GPU has the next item queued while the copier waits for the current one;
- post-processing (a pool of threads) encodes and writes each frame, then gives its buffer back.

A slow encoder holds buffers, the copier then waits for a free one, and compute for room in the copy
queue: backpressure, not a growing backlog. Frames carry their index, so the sink writes each one
once, under its own name, whatever order the workers finish in.

The first failure decides how it stops. An unreadable input, a failing compute or Ctrl-C stops new
work, and the frames already computed (a few: the queues are bounded) are still copied and written,
so no computed frame is lost. A failing copy or sink stops every stage at once. Either way the threads
are joined and the buffers dropped before PipelineError says what happened.
`serial=True` runs the same stages one after another, with no overlap, for comparison.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from kiln.optimizer.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, KilnError
from kiln.optimizer.serve.backends import Backend, HostBackend

POLL_S = 0.05  # how often a blocked stage looks for a stop
READ_AHEAD = 4  # work items read and decoded ahead of compute
COPY_AHEAD = 2  # work items computed ahead of the copy (their frames held on the device)
_END = object()  # the source is exhausted


class PipelineError(KilnError):
    """The pipeline stopped early; the message names the stage, the frame and how many were written."""


class Sink(Protocol):
    def write(self, index: int, frame: np.ndarray) -> None:
        """Post-process and store frame number index (called from several threads at once)."""


@dataclasses.dataclass
class Metrics:
    frames: int = 0
    wall_s: float = 0.0
    read_s: float = 0.0  # pulling work items from the source (decoding input frames)
    compute_s: float = 0.0
    copy_s: float = 0.0
    post_s: float = 0.0  # summed over the workers
    bytes_copied: int = 0
    workers: int = 1
    serial: bool = False
    device: dict = dataclasses.field(default_factory=dict)  # the backend's own measurements (GPU busy, D2H rate)

    def to_json(self) -> dict:
        wall = max(self.wall_s, 1e-9)
        fields = dataclasses.asdict(self)
        return {
            **{k: v for k, v in fields.items() if k != "device"},
            "fps": self.frames / wall,
            "compute_busy": self.compute_s / wall,  # the compute thread's share of the wall time
            "copy_gb_per_s": self.bytes_copied / max(self.copy_s, 1e-9) / 1e9,  # includes waiting for compute
            **self.device,
        }


@dataclasses.dataclass
class _Failure:
    stage: str
    index: int | None
    error: BaseException


class FramePipeline:
    """Runs compute(item) -> [(index, result), ...] for every item, and sink.write(index, frame) for
    every frame, with the stages overlapped (or one after another when serial)."""

    def __init__(self, compute: Callable[[Any], Iterable[tuple[int, Any]]], sink: Sink, backend: Backend | None = None,
                 workers: int = 2, ring: int | None = None, serial: bool = False):  # fmt: skip
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.compute, self.sink = compute, sink
        self.backend = backend or HostBackend()
        self.workers, self.serial = workers, serial
        self.ring_size = ring or 2 * workers + 2  # enough for every worker plus one in copy and one queued
        self.metrics = Metrics(workers=workers, serial=serial)
        self.written: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # no new work
        self._computing_done = threading.Event()  # compute takes no more items
        self._abort = threading.Event()  # no more work of any kind
        self._failure: _Failure | None = None

    # ---------------------------------------------------------------------------------- shared
    def _fail(self, stage: str, index: int | None, error: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = _Failure(stage, index, error)
        self._stop.set()
        if stage in ("copy", "post-processing"):
            self._abort.set()

    def _put(self, q: queue.Queue, item, give_up: threading.Event | None = None) -> bool:
        """put that gives up when the pipeline aborts (or give_up is set); False if it gave up."""
        while not (self._abort.is_set() or (give_up is not None and give_up.is_set())):
            try:
                q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                if self._abort.is_set():
                    return None

    def _write(self, index: int, frame: np.ndarray) -> None:
        start = time.perf_counter()
        self.sink.write(index, frame)
        with self._lock:
            self.metrics.post_s += time.perf_counter() - start
            self.written.append(index)

    def _copy(self, result, out: np.ndarray) -> None:
        start = time.perf_counter()
        nbytes = self.backend.to_host(result, out)
        self.metrics.copy_s += time.perf_counter() - start
        self.metrics.bytes_copied += nbytes

    def _computed(self, item) -> list[tuple[int, Any]]:
        start = time.perf_counter()
        frames = self.backend.launch(self.compute, item)
        self.metrics.compute_s += time.perf_counter() - start
        return frames

    # ---------------------------------------------------------------------------------- run
    def run(self, items: Iterable[Any]) -> Metrics:
        start = time.perf_counter()
        try:
            if self.serial:
                self._run_serial(items)
            else:
                self._run_overlapped(items)
        except KeyboardInterrupt as exc:
            self._fail("interrupt", None, exc)
        self.metrics.wall_s = time.perf_counter() - start
        self.metrics.frames = len(self.written)
        try:
            self.metrics.device = self.backend.device_metrics()
        except Exception:
            if self._failure is None:  # after a failure (a GPU fault, say) the first error is the one to report
                raise
        if self._failure is not None:
            error = PipelineError(self._describe(self._failure), hint=getattr(self._failure.error, "hint", None))
            if isinstance(self._failure.error, KilnError):  # bad input stays exit 2
                error.exit_code = self._failure.error.exit_code
            elif isinstance(self._failure.error, KeyboardInterrupt):
                error.exit_code = EXIT_INTERRUPTED
            elif isinstance(self._failure.error, OSError):  # a full disk, a folder made read-only: not kiln's bug
                error.exit_code = EXIT_BAD_INPUT
            raise error
        return self.metrics

    def _describe(self, failure: _Failure) -> str:
        done = f"{len(self.written)} frame(s) written, each complete"
        if isinstance(failure.error, KeyboardInterrupt):
            return f"interrupted; {done}"
        where = f" at frame {failure.index}" if failure.index is not None else ""
        error = failure.error
        detail = error.message if isinstance(error, KilnError) else f"{type(error).__name__}: {error}"
        return f"the {failure.stage} stage failed{where}: {detail}; {done}"

    def _items(self, items: Iterable[Any]):
        """items until the pipeline stops; a failing source (an unreadable input frame) fails the 'read' stage."""
        iterator = iter(items)
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                item = next(iterator)
                self.metrics.read_s += time.perf_counter() - start
                yield item
            except StopIteration:
                return
            except Exception as exc:
                self._fail("read", None, exc)
                return

    def _frames(self, item) -> list[tuple[int, Any]] | None:
        try:
            return self._computed(item)
        except Exception as exc:
            self._fail("compute", None, exc)
            return None

    def _run_serial(self, items: Iterable[Any]) -> None:
        buffer = None
        for item in self._items(items):
            for index, result in self._frames(item) or ():
                stage = "copy"
                try:
                    if buffer is None:
                        buffer = self.backend.host_buffer(result.shape, result.dtype)
                    self._copy(result, buffer)
                    stage = "post-processing"
                    self._write(index, buffer)
                except Exception as exc:
                    return self._fail(stage, index, exc)

    def _run_overlapped(self, items: Iterable[Any]) -> None:
        to_copy: queue.Queue = queue.Queue(maxsize=COPY_AHEAD)  # one entry per work item: its frames
        to_post: queue.Queue = queue.Queue(maxsize=self.ring_size)
        free: queue.Queue = queue.Queue()
        ring: list[np.ndarray] = []

        def copier() -> None:
            index = None
            try:
                while (frames := self._get(to_copy)) is not None and frames != "end":
                    for index, result in frames:
                        if not ring:  # the ring is allocated once, at the first frame's shape
                            ring.extend(self.backend.host_buffer(result.shape, result.dtype) for _ in range(self.ring_size))
                            for slot in range(self.ring_size):
                                free.put(slot)
                        slot = self._get(free)
                        if slot is None:
                            return
                        self._copy(result, ring[slot])
                        if not self._put(to_post, (index, slot)):
                            return
                for _ in range(self.workers):  # one end marker per worker
                    self._put(to_post, None)
            except Exception as exc:
                self._fail("copy", index, exc)

        def worker() -> None:
            index = None
            try:
                while not self._abort.is_set() and (job := self._get(to_post)) is not None:
                    index, slot = job
                    self._write(index, ring[slot])
                    free.put(slot)
            except Exception as exc:
                self._fail("post-processing", index, exc)

        to_compute: queue.Queue = queue.Queue(maxsize=READ_AHEAD)

        def reader() -> None:
            for item in self._items(items):  # stops at a read failure, or when compute stops
                if not self._put(to_compute, item, give_up=self._computing_done):
                    return
            self._put(to_compute, _END, give_up=self._computing_done)  # also after a read failure: what was read is still computed

        threads = [threading.Thread(target=reader, name="kiln-read", daemon=True)]
        threads += [threading.Thread(target=copier, name="kiln-copy", daemon=True)]
        threads += [threading.Thread(target=worker, name=f"kiln-post-{i}", daemon=True) for i in range(self.workers)]
        for thread in threads:
            thread.start()
        try:
            while (item := self._get(to_compute)) is not None and item is not _END:
                frames = self._frames(item)
                if frames is None:
                    break
                if not self._put(to_copy, frames):
                    break
        except KeyboardInterrupt as exc:
            self._fail("interrupt", None, exc)  # no new work; what was computed is still written
        finally:
            self._computing_done.set()
        try:
            self._put(to_copy, "end")
            for thread in threads:
                thread.join()
        except BaseException:
            self._abort.set()  # a second Ctrl-C while draining: stop everything now
            for thread in threads:
                thread.join()
            raise
        finally:
            ring.clear()
