"""Atomic writes, the comparison behind verification, and progress output."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from kiln.optimizer.errors import InputError
from kiln.optimizer.outdir import atomic_file, check_outdir, staged_dir
from kiln.optimizer.progress import FrameCounter, Progress
from kiln.optimizer.verify import check_outputs, compare


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_staged_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(out) as stage:
        (stage / "a").write_text("half")
        raise RuntimeError("boom")
    assert (out / "a").read_text() == "old"
    with staged_dir(out) as stage:
        (stage / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_outdir(tmp_path):
    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(b"x")
    check_outdir(tmp_path / "new", model, force=False)
    (tmp_path / "empty").mkdir()
    check_outdir(tmp_path / "empty", model, force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is a file"):
        check_outdir(tmp_path / "file", model, force=True)
    with pytest.raises(InputError, match="holds the input model"):
        check_outdir(tmp_path, model, force=True)


def test_compare_tolerances_and_nan():
    want = np.array([1.0, -2.0, 0.0], np.float32)
    ok, err = compare(want + np.float32(1e-5), want, atol=1e-4, rtol=0)
    assert ok and err["max_abs"] == pytest.approx(1e-5, rel=1e-2) and err["max_rel"] == pytest.approx(5e-6, rel=1e-2)
    ok, _ = compare(want + np.float32(1e-3), want, atol=1e-4, rtol=0)
    assert not ok
    ok, _ = compare(np.array([1.0, np.nan, 0.0], np.float32), want, atol=1, rtol=1)
    assert not ok
    ok, _ = compare(np.array([np.nan]), np.array([np.nan]), atol=0, rtol=0)
    assert ok
    ok, err = compare(np.zeros(2), np.zeros(3), atol=1, rtol=1)
    assert not ok and err["max_abs"] == float("inf")
    ok, errors = check_outputs({"y": want}, {"y": want, "z": want}, atol=0, rtol=0)
    assert not ok and "z" in errors


def test_compare_takes_the_same_infinity_as_equal():
    want = np.array([np.inf, -np.inf, 1.0], np.float32)
    ok, err = compare(want.copy(), want, atol=0, rtol=0)
    assert ok and err["max_abs"] == 0.0
    ok, err = compare(np.array([-np.inf, -np.inf, 1.0], np.float32), want, atol=1, rtol=1)
    assert not ok and err["max_abs"] == float("inf")


def test_progress_writes_stages_only_when_enabled():
    stream = io.StringIO()
    with Progress(True, stream, terminal=True).stage("build"):
        pass
    lines = stream.getvalue().splitlines()
    assert lines[0] == "kiln: build ..." and lines[1].startswith("kiln: build done (")
    log = io.StringIO()  # not a terminal: one line per stage, stamped with the time since the start
    with Progress(True, log).stage("build"):
        pass
    assert re.fullmatch(r"kiln: \[ +\d+\.\ds\] build done \(\d+\.\d\ds\)\n", log.getvalue())
    quiet = io.StringIO()
    with Progress(False, quiet).stage("build"):
        pass
    assert quiet.getvalue() == ""


def test_frame_progress_in_a_log_is_a_line_per_tenth():
    log = io.StringIO()
    counter = FrameCounter(total=25, enabled=True, stream=log)
    for _ in range(25):
        counter.advance()
    counter.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in log.getvalue()
    assert re.fullmatch(r"kiln: \[ +\d+\.\ds\] 3/25 frames \(12%\), [\d.]+ fps", lines[0])
    assert lines[-1].split("] ")[1].startswith("25/25 frames (100%)")
