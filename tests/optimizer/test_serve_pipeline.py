"""The frame pipeline in CPU mode (host buffers, the same scheduling as on a GPU): order, exactly once,
frame counts, backpressure, serial against overlapped, and each fault stopping it cleanly."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import numpy as np
import pytest

from kiln.optimizer.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED

cv2 = pytest.importorskip("cv2")

from kiln.optimizer.serve.frames import FrameFolderSink, read_frame, read_frames  # noqa: E402
from kiln.optimizer.serve.pipeline import COPY_AHEAD, FramePipeline, PipelineError  # noqa: E402

H, W = 24, 32


def frame(index: int) -> np.ndarray:
    """A distinct, seeded frame per index, float RGB in [0, 1]."""
    return np.random.default_rng(index).uniform(0, 1, (1, H, W, 3)).astype(np.float32)


def two_frames(item: int):
    """A work item that yields two frames, as a FILM pair yields its in-betweens."""
    return [(2 * item, frame(2 * item)), (2 * item + 1, frame(2 * item + 1))]


class RecordingSink:
    """Keeps what it is given; sleeps a random while, so workers finish out of order."""

    def __init__(self, delay: float = 0.002):
        self.frames: dict[int, np.ndarray] = {}
        self.calls: list[int] = []
        self.lock = threading.Lock()
        self.delay = delay

    def write(self, index: int, data: np.ndarray) -> None:
        time.sleep(random.uniform(0, self.delay))
        with self.lock:
            self.calls.append(index)
            self.frames[index] = data.copy()


def kiln_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kiln-")]


def assert_frames_whole(directory, count: int) -> None:
    """Exactly frames 0..count-1 on disk, each decodable, and no temporary file left."""
    names = sorted(os.listdir(directory))
    assert names == [f"frame_{i:06d}.png" for i in range(count)]
    for name in names:
        assert read_frame(directory / name).shape == (H, W, 3)


@pytest.mark.parametrize("serial", [False, True])
def test_every_frame_once_with_its_own_data(serial):
    sink = RecordingSink()
    metrics = FramePipeline(two_frames, sink, workers=3, serial=serial).run(range(25))
    assert sorted(sink.calls) == list(range(50))  # exactly once each
    for index, data in sink.frames.items():
        np.testing.assert_array_equal(data, frame(index))  # a reused buffer never leaks into another frame
    assert metrics.frames == 50 and metrics.serial is serial
    assert metrics.bytes_copied == 50 * frame(0).nbytes
    assert kiln_threads() == []


def test_overlapped_and_serial_write_identical_files(tmp_path):
    FramePipeline(two_frames, FrameFolderSink(tmp_path / "a"), workers=4).run(range(6))
    FramePipeline(two_frames, FrameFolderSink(tmp_path / "b"), serial=True).run(range(6))
    assert_frames_whole(tmp_path / "a", 12)
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_slow_encoder_applies_backpressure():
    computed, sink = [], RecordingSink(delay=0.01)

    def compute(item):
        computed.append(item)
        with sink.lock:
            in_flight = 2 * len(computed) - len(sink.calls)
        peak.append(in_flight)
        return two_frames(item)

    peak: list[int] = []
    pipeline = FramePipeline(compute, sink, workers=1, ring=3)
    pipeline.run(range(30))
    # Frames computed but not yet written: the ring, and the frames of the items queued for the copy,
    # in the copier's hands and being computed, no more.
    assert max(peak) <= pipeline.ring_size + 2 * (COPY_AHEAD + 2)
    assert sorted(sink.calls) == list(range(60))


def test_reading_runs_ahead_of_compute_by_a_bounded_amount():
    from kiln.optimizer.serve.pipeline import READ_AHEAD

    read, ahead = [], []

    def source():
        for item in range(30):
            read.append(item)
            yield item

    def compute(item):
        ahead.append(len(read) - item - 1)  # items read but not yet computed
        time.sleep(0.002)
        return two_frames(item)

    sink = RecordingSink(delay=0)
    metrics = FramePipeline(compute, sink, workers=2).run(source())
    # The queue holds READ_AHEAD items and the reader one more in hand, waiting for room.
    assert max(ahead) <= READ_AHEAD + 1 and max(ahead) >= 1
    assert sorted(sink.calls) == list(range(60)) and metrics.read_s >= 0


def test_an_encoder_worker_that_dies_stops_the_pipeline(tmp_path):
    class Dying(FrameFolderSink):
        def write(self, index, data):
            if index == 9:
                raise RuntimeError("encoder crashed")
            super().write(index, data)

    with pytest.raises(PipelineError) as info:
        FramePipeline(two_frames, Dying(tmp_path), workers=3).run(range(40))
    message = info.value.message
    assert message.startswith("the post-processing stage failed at frame 9: RuntimeError: encoder crashed; ")
    assert info.value.exit_code == EXIT_INTERNAL
    written = sorted(int(n[6:12]) for n in os.listdir(tmp_path))
    assert 9 not in written and len(written) == len(set(written)) < 80
    assert message.endswith(f"{len(written)} frame(s) written, each complete")
    for name in os.listdir(tmp_path):
        assert not name.startswith(".") and read_frame(tmp_path / name).shape == (H, W, 3)
    assert kiln_threads() == []


def test_a_full_disk_stops_the_pipeline_and_keeps_whole_frames(tmp_path, monkeypatch):
    real_open = open
    state = {"files": 0}

    def filling_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tmp"):
            state["files"] += 1
            if state["files"] > 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", filling_open)
    with pytest.raises(PipelineError, match=rf"the post-processing stage failed at frame \d+: cannot write {tmp_path}/frame_\d+.png: No space left on device") as info:
        FramePipeline(two_frames, FrameFolderSink(tmp_path), workers=2).run(range(20))
    assert info.value.exit_code == EXIT_BAD_INPUT  # a full disk is not a bug in kiln
    monkeypatch.undo()
    names = os.listdir(tmp_path)
    assert len(names) == 5 and not any(n.endswith(".tmp") for n in names)
    for name in names:
        assert read_frame(tmp_path / name).shape == (H, W, 3)
    assert kiln_threads() == []


@pytest.mark.parametrize("serial", [False, True])
def test_a_corrupt_input_frame_is_named(tmp_path, serial):
    frames_in = tmp_path / "in"
    frames_in.mkdir()
    for i in range(6):
        cv2.imwrite(str(frames_in / f"{i:03d}.png"), (frame(i)[0] * 255).astype(np.uint8))
    (frames_in / "003.png").write_bytes((frames_in / "003.png").read_bytes()[:40])  # truncated
    with pytest.raises(PipelineError) as info:
        FramePipeline(lambda item: [item], FrameFolderSink(tmp_path / "out"), serial=serial).run(read_frames(frames_in))
    assert info.value.message.startswith(f"the read stage failed: {frames_in / '003.png'}: cannot be decoded as an image (corrupt or truncated?); ")
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert_frames_whole(tmp_path / "out", 3)  # the frames before it, whole
    assert kiln_threads() == []


@pytest.mark.parametrize("serial", [False, True])
def test_ctrl_c_stops_cleanly(tmp_path, serial):
    def compute(item):
        if item == 5:
            raise KeyboardInterrupt
        return two_frames(item)

    with pytest.raises(PipelineError) as info:
        FramePipeline(compute, FrameFolderSink(tmp_path), workers=2, serial=serial).run(range(20))
    # The frames computed before Ctrl-C (items 0-4) are all written; nothing after.
    assert info.value.message == "interrupted; 10 frame(s) written, each complete"
    assert info.value.exit_code == EXIT_INTERRUPTED == 130  # as from kiln optimize, not 1
    assert_frames_whole(tmp_path, 10)
    assert kiln_threads() == []


@pytest.mark.parametrize("where", ["/proc/self/clip.mp4", "/proc/kiln/x/clip.mp4"])
def test_a_video_that_cannot_be_written_names_the_video(where):
    """Found by the fuzzing harness: the message named OpenCV's temporary file, not the output."""
    from pathlib import Path

    from kiln.optimizer.serve.video import VideoSink

    with pytest.raises(PipelineError, match=rf"the post-processing stage failed at frame 0: cannot write {where}: ") as info:
        FramePipeline(two_frames, VideoSink(Path(where), 24.0), workers=1).run(range(2))
    assert info.value.exit_code == EXIT_BAD_INPUT
