"""`kiln build`: every cell of a matrix through `kiln optimize` and the cache, skipped cells with their
reason, the summary JSON, and the exit codes 0, 1, 2 and 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.optimizer import config
from kiln.optimizer.cli import main


@pytest.fixture(scope="module")
def block(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("matrix")
    assert main(["example", "block", str(root / "block"), "-q"]) == 0
    return root


def matrix(root: Path, text: str) -> Path:
    path = root / "matrix.toml"
    path.write_text(text)
    return path


def build(capsys, path: Path, out: Path, *flags: str) -> tuple[int, dict, str]:
    code = main(["build", str(path), "-o", str(out), "-q", *flags])
    captured = capsys.readouterr()
    summary = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else None
    return code, summary, captured.out + captured.err


def test_a_matrix_builds_every_cell_it_can_and_skips_the_rest_with_the_reason(block, tmp_path, capsys):
    path = matrix(block, 'models = [{path = "block/model.onnx", name = "block"}]\ntargets = ["cpu", "h100-trt", "h100"]\nprecisions = ["fp32", "fp16"]\n')
    code, summary, text = build(capsys, path, tmp_path / "out")
    assert code == 0 and summary["exit_code"] == 0
    cells = {c["cell"]: c for c in summary["cells"]}
    assert list(cells) == ["block-cpu-fp32", "block-cpu-fp16", "block-h100-trt-fp32", "block-h100-trt-fp16", "block-h100-fp32", "block-h100-fp16"]
    for name in ("block-cpu-fp32", "block-cpu-fp16"):
        cell = cells[name]
        assert (cell["status"], cell["verified"], cell["cache"], cell["engine"]) == ("ok", "5/5", "miss", str(tmp_path / "out" / name))
        assert cell["latency_ms"] > 0 and (tmp_path / "out" / name / "engine" / "engine.json").is_file()
        assert json.loads((tmp_path / "out" / name / "report.json").read_text())["precision"] == cell["precision"]
    skipped = cells["block-h100-trt-fp16"]
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("target 'h100-trt' is not available here: ")
    # Without the GPU, an ONNX Runtime GPU cell is built for `kiln verify` to finish there.
    deferred = cells["block-h100-fp16"]
    assert (deferred["status"], deferred["verified"], deferred["latency_ms"]) == ("not-verified", None, None)
    assert summary["counts"] == {"ok": 2, "not-verified": 2, "skipped": 2, "verification-failed": 0, "failed": 0, "not run": 0}
    assert "2 ok, 2 not-verified, 2 skipped; summary: " in text
    # Again: every built cell comes from the cache.
    code, summary, _ = build(capsys, path, tmp_path / "out")
    assert code == 0 and [c["cache"] for c in summary["cells"]] == ["hit", "hit", None, None, "hit", "hit"]
    # --strict: a cell that cannot build here is a failure, and the matrix stops there without --keep-going.
    code, summary, _ = build(capsys, path, tmp_path / "strict", "--strict")
    assert code == 1 and [c["status"] for c in summary["cells"]] == ["ok", "ok", "failed", "not run", "not run", "not run"]
    code, summary, _ = build(capsys, path, tmp_path / "strict", "--strict", "--keep-going")
    assert code == 1 and [c["status"] for c in summary["cells"]] == ["ok", "ok", "failed", "failed", "not-verified", "not-verified"]


def test_a_failed_verification_exits_3_and_a_failed_build_exits_1(block, tmp_path, capsys, monkeypatch):
    path = matrix(block, 'models = ["block/model.onnx"]\ntargets = ["cpu"]\nprecisions = ["fp16", "fp32"]\n')
    monkeypatch.setitem(config.TOLERANCES, "fp16", {"atol": 0.0, "rtol": 0.0})
    code, summary, _ = build(capsys, path, tmp_path / "out", "--keep-going")
    assert code == 3 and [c["status"] for c in summary["cells"]] == ["verification-failed", "ok"]
    assert summary["cells"][0]["reason"].startswith("verification failed at ")
    code, summary, _ = build(capsys, path, tmp_path / "stop")
    assert code == 3 and [c["status"] for c in summary["cells"]] == ["verification-failed", "not run"]
    # A model that cannot be read: its cells fail (the matrix itself is fine).
    (block / "broken.onnx").write_bytes((block / "block" / "model.onnx").read_bytes()[:200])
    code, summary, _ = build(capsys, matrix(block, 'models = ["broken.onnx"]\ntargets = ["cpu"]\nprecisions = ["fp32"]\n'), tmp_path / "broken")
    assert code == 1 and summary["cells"][0]["status"] == "failed" and "broken.onnx" in summary["cells"][0]["reason"]


@pytest.mark.parametrize(("text", "message"), [
    ('models = ["block"]\ntargets = ["cpu"]\nprecisions = ["fp32"]\nprofile = "x"\n', "unknown key 'profile'"),
    ('targets = ["cpu"]\nprecisions = ["fp32"]\n', "models is missing"),
    ('models = ["block"]\ntargets = ["cpu"]\nprecisions = ["fp8"]\n', "precisions has 'fp8'"),
    ('models = ["nowhere"]\ntargets = ["cpu"]\nprecisions = ["fp32"]\n', "model 'nowhere' does not exist"),
    ('models = ["block", {path = "block", shape = {}}]\ntargets = ["cpu"]\nprecisions = ["fp32"]\n', "model 'block' has unknown key 'shape'"),
    ('models = ["block", "block"]\ntargets = ["cpu"]\nprecisions = ["fp32"]\n', "two models are named 'block'"),
    ('models = ["block"]\ntargets = []\nprecisions = ["fp32"]\n', "targets must be a non-empty list"),
    ('models = ["block"]\ntargets = ["h1000"]\nprecisions = ["fp32"]\n', "targets has 'h1000', which is no target"),
    ('models = ["block"\n', "is not valid TOML"),
    ('models = ["block"]\ntargets = ["cpu"]\nprecisions = ["fp32"]\nprofile_from = "tablet"\n', "profile_from: 'tablet' is no file (relative to the matrix) and no preset"),
    ('models = ["block"]\ntargets = ["cpu"]\nprecisions = ["fp32"]\nprofile_from = "phone"\nprofiles = 9\n', "profiles is 9"),
    ('models = ["block"]\ntargets = ["cpu"]\nprecisions = ["fp32"]\nprofiles = 2\n', "profiles = 2 needs profile_from, which model 'block' has none of"),
])  # fmt: skip
def test_a_bad_matrix_exits_2_naming_what_is_wrong(block, tmp_path, capsys, text, message):
    path = matrix(block, text)
    code, summary, output = build(capsys, path, tmp_path / "out")
    assert code == 2 and summary is None and not (tmp_path / "out").exists()
    assert f"kiln: error: matrix {path}" in output and message in output


def test_a_matrix_model_s_profile_comes_from_its_requests(block, tmp_path, capsys):
    (block / "requests.json").write_text(json.dumps([{"batch": 1, "seq": 8, "count": 3}, {"batch": 2, "seq": 32}]))
    path = matrix(block, 'models = [{path = "block/model.onnx", name = "b", profile_from = "requests.json"}]\ntargets = ["cpu"]\nprecisions = ["fp32"]\n')
    code, summary, _ = build(capsys, path, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "b-cpu-fp32" / "report.json").read_text())
    assert code == 0 and report["profile"]["dims"] == {"batch": {"min": 1, "opt": 1, "max": 2}, "seq": {"min": 8, "opt": 8, "max": 32}}
    assert report["profile_from"]["source"] == str(block / "requests.json")
    assert len(report["profiles"]) == 2  # auto: one profile would pad 5/6 of the work
    assert summary["cells"][0]["latency_ms"] > 0  # at the opt shape of them all, which profile 1 runs
