"""Building for a GPU on a machine without it: every pass runs, the engine is written and marked not yet
verified, with its verification cases; `kiln verify` finishes it where the target runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln import targets
from kiln.optimizer import deferred
from kiln.optimizer.cli import main
from kiln.optimizer.verify import load_expected


@pytest.fixture(scope="module")
def block(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deferred")
    assert main(["example", "block", str(root), "-q"]) == 0
    return root / "model.onnx"


@pytest.fixture
def no_gpu():
    if targets.TARGETS["h100"].available() is None:
        pytest.skip("the h100 target runs here")


def test_a_gpu_target_without_its_gpu_is_built_and_marked_not_yet_verified(block, tmp_path, capsys, no_gpu):
    out = tmp_path / "out"
    assert main(["optimize", str(block), "-o", str(out), "--target", "h100", "--precision", "fp16"]) == 0
    captured = capsys.readouterr()
    assert f"not-verified: 35 -> 14 nodes, not yet verified: run `kiln verify {out}` on a machine where h100 runs" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "not-verified" and report["verification"]["passed"] is None and report["latency"] == []
    assert any(n.startswith("built without its GPU, so not yet verified (onnxruntime ") for n in report["notes"])
    config = targets.read_manifest(out / "engine")
    assert (config.target, config.verified, config.precision, config.providers[0]) == ("h100", False, "fp16", "CUDAExecutionProvider")
    assert (out / "engine" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()  # optimized for the GPU where it runs
    cases = load_expected(out / "kiln-verify.npz")
    assert [c.corner for c in cases] == [c["corner"] for c in report["verification"]["shapes"]] or len(cases) == 5
    assert all(c.want is not None and c.feeds["x"].dtype == np.float32 for c in cases)
    # Loading it here says why it does not run (on the GPU machine: another GPU model, as an h200 engine on
    # an H100 was refused there); kiln verify here says where to run it.
    assert main(["bench", str(out), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"kiln: error: the engine in {out / 'engine'} was built for target 'h100' without its GPU, and does not run here: this machine has no CUDA GPU" in err
    assert f"hint: `kiln verify {out}` on a machine where h100 runs" in err
    assert main(["verify", str(out)]) == 2
    assert "kiln: error: target 'h100' does not run here, so " in capsys.readouterr().err


def test_tensorrt_plans_are_not_deferred_and_the_ort_tensorrt_variant_is(block, tmp_path, capsys, no_gpu):
    assert main(["optimize", str(block), "-o", str(tmp_path / "plan"), "--target", "h100-trt", "-q"]) == 2
    assert "hint: a TensorRT plan is compiled on its GPU" in capsys.readouterr().err
    assert main(["optimize", str(block), "-o", str(tmp_path / "ep"), "--target", "h100-ort-trt", "-q"]) == 0
    config = targets.read_manifest(tmp_path / "ep" / "engine")
    assert config.verified is False and config.provider_options["trt_profile_opt_shapes"] == "x:2x16x64"


def test_kiln_verify_builds_the_deferred_engine_verifies_it_and_records_it(block, tmp_path, capsys, monkeypatch, no_gpu):
    """The CPU target stands in for the GPU one (this machine has none): kiln verify's own path, with
    the build, the verification cases and the reports."""
    out = tmp_path / "out"
    assert main(["optimize", str(block), "-o", str(out), "--target", "h100", "-q"]) == 0
    monkeypatch.setattr(deferred.targets, "get_target", lambda name: targets.CPU)
    assert main(["verify", str(out), "--bench-runs", "2"]) == 0
    assert "ok: 35 -> 12 nodes, verified at 5/5 shapes" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["verification"]["passed"] is True and [r["corner"] for r in report["latency"]] == ["min", "opt", "max"]
    assert report["notes"][-1].startswith("built by `kiln verify` on this machine")
    assert targets.read_manifest(out / "engine").verified is True
    # Outputs that do not match the saved cases: exit 3, and the report says so.
    cases = np.load(out / "kiln-verify.npz")
    arrays = {k: cases[k] for k in cases.files}
    first_want = next(k for k in arrays if "/want/" in k)
    arrays[first_want] = arrays[first_want] + 1
    np.savez(out / "kiln-verify.npz", **arrays)
    assert main(["verify", str(out)]) == 3
    assert "verification failed at 1 of 5 shape(s)" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["status"] == "verification-failed"
    (out / "kiln-verify.npz").write_bytes(b"PK\x03\x04broken")
    assert main(["verify", str(out)]) == 2
    assert f"kiln: error: {out / 'kiln-verify.npz'} is damaged" in capsys.readouterr().err


def test_a_deferred_engine_for_one_gpu_model_is_refused_on_another(block, tmp_path, capsys, monkeypatch, no_gpu):
    """It recorded no machine, so its target names the GPU: an h200 engine on an H100 is refused (as it
    was on the GPU machine, where `kiln bench` had run it before this check)."""
    out = tmp_path / "out"
    assert main(["optimize", str(block), "-o", str(out), "--target", "h200", "-q"]) == 0
    monkeypatch.setattr("kiln.targets.gpu.device_name", lambda device=0: "NVIDIA H100 80GB HBM3")
    with pytest.raises(targets.EngineError, match="this machine's GPU is NVIDIA H100 80GB HBM3, not the NVIDIA H200 SXM 141GB") as info:
        targets.load_engine(out / "engine")
    assert info.value.hint == f"`kiln verify {out}` on a machine where h200 runs"


def test_kiln_verify_of_a_deferred_build_made_without_verification_builds_it_unverified(block, tmp_path, capsys, monkeypatch, no_gpu):
    out = tmp_path / "out"
    assert main(["optimize", str(block), "-o", str(out), "--target", "h100", "--no-verify", "-q"]) == 0
    assert not (out / "kiln-verify.npz").exists()
    monkeypatch.setattr(deferred.targets, "get_target", lambda name: targets.CPU)
    assert main(["verify", str(out), "--bench-runs", "0", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "unverified" and report["verification"]["passed"] is None
    assert not any(n.startswith("built without its GPU") for n in report["notes"])  # the deferral's note is gone
