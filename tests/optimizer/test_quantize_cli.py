"""kiln optimize --quantize: the report's quantization section and per-layer table, verification by
relative L2, recipes, and each bad option or calibration input refused with exit 2 before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import assert_bad_input, run_cli

from kiln.calibration import stats
from kiln.optimizer import config
from kiln.passes import quantize


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    root = tmp_path_factory.mktemp("qblock")
    from kiln.optimizer.cli import main

    assert main(["example", "block", str(root / "ex"), "-q"]) == 0
    return root / "ex" / "model.onnx"


def test_option_choices_agree_with_the_passes():
    assert config.FORMATS == quantize.FORMATS and config.BACKENDS == quantize.BACKENDS
    assert config.BACKEND_FORMATS == quantize.BACKEND_FORMATS and config.CALIB_METHODS == stats.METHODS


def test_int8_on_the_cpu(capsys, tmp_path, block):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "optimize", block, "-o", out, "--quantize", "int8", "--shapes", "batch=1..2",
                                "--shapes", "seq=8..32", "--bench-runs", "0")  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    quantization = report["quantization"]
    assert (quantization["format"], quantization["backend"], quantization["fallback"]) == ("int8", "ort", None)
    held_out = quantization["quality"]["held_out"]["y"]
    assert held_out["rel_l2"] < 0.02 and held_out["psnr"] > 40 and held_out["ssim"] > 0.99
    assert "sampling" not in quantization["quality"]  # not a diffusers model
    record = next(p for p in report["passes"] if p["name"] == "quantize")
    assert record["stats"] == {"layers": 4, "quantized": 2, "kept": 2, "smoothed": 0}
    assert record["details"]["calibration"]["samples"] == config.DEFAULT_CALIB_SAMPLES
    assert record["details"]["calibration"]["method"] == "entropy"
    assert report["verification"]["tolerance"] == {"rel_l2": config.QUANT_TOLERANCES["int8"]["rel_l2"]}
    assert report["verification"]["passed"] is True
    assert all(c["outputs"]["y"]["rel_l2"] < 0.05 for c in report["verification"]["shapes"])
    assert any("calibrated on 16 random samples" in n for n in report["notes"])
    md = (out / "report.md").read_text()
    assert "## Quantization" in md and "| layer | op | format | activation scale |" in md
    assert "INT8 through the ort backend; 2 of 4 layers quantized, 2 kept in float" in md
    assert "‖got − want‖ / ‖want‖ ≤ 0.15 per output (quantized engine)" in md


def _calib_folder(folder, count: int, seed: int):
    """count recorded samples of the block's input, one .npz each, in name order."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((2, 16, 64)).astype(np.float32))
    return folder


def test_recipe_and_recorded_calibration(capsys, tmp_path, block):
    calib = _calib_folder(tmp_path / "calib", 3, 0)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[quantize]\nformat = "int8"\nbackend = "kiln"\ncalib = "calib"\nmethod = "percentile"\n'
                      'percentile = 99.9\nsamples = 2\nkeep = ["."]\n[verify]\nrel_l2 = 0.01\n')  # fmt: skip
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "optimize", block, "-o", out, "--config", recipe, "--bench-runs", "0")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "quantize")
    calibration = record["details"]["calibration"]
    assert calibration["samples"] == 2 and calibration["method"] == "percentile" and calibration["percentile"] == 99.9
    assert calibration["source"] == str(calib) and calibration["held_out"] == 0  # 3 samples: too few to hold any out
    assert any("quality is measured on random inputs: --calib holds fewer than 4 samples" in n for n in report["notes"])
    assert {layer["kept"] for layer in record["details"]["layers"]} == {"--keep ."}
    assert report["verification"]["tolerance"] == {"rel_l2": 0.01}


def test_recorded_calibration_holds_out_its_last_fifth(capsys, tmp_path, block):
    calib = _calib_folder(tmp_path / "calib", 10, 1)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "optimize", block, "-o", out, "--quantize", "int8", "--calib", calib, "--quality", "rel_l2<=0.5",
                           "--bench-runs", "0")  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    calibration = next(p for p in report["passes"] if p["name"] == "quantize")["details"]["calibration"]
    assert (calibration["samples"], calibration["held_out"]) == (8, 2)
    quality = report["quantization"]["quality"]["calibration_held_out"]
    assert quality["samples"] == 2 and quality["outputs"]["y"]["rel_l2"] < 0.05
    assert report["quantization"]["fallback"]["evaluated_on"] == "2 calibration samples held out"
    md = (out / "report.md").read_text()
    assert "| `y` (2 calibration samples held out) |" in md and "(measured on 2 calibration samples held out)" in md
    assert not any("quality is measured on random inputs" in n for n in report["notes"])

    # --calib-samples 4 reads 5: 4 calibrate, 1 is held out.
    code, _, err = run_cli(capsys, "optimize", block, "-o", tmp_path / "out4", "--quantize", "int8", "--calib", calib,
                           "--calib-samples", "4", "--bench-runs", "0")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "out4" / "report.json").read_text())
    calibration = next(p for p in report["passes"] if p["name"] == "quantize")["details"]["calibration"]
    assert (calibration["samples"], calibration["held_out"]) == (4, 1)


def test_an_input_constant_once_the_held_out_sample_is_removed_is_refused(capsys, tmp_path, block):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):  # the fourth, which differs, is held out
        np.savez(calib / f"{i}.npz", x=np.full((2, 16, 64), 1.0 if i < 3 else 2.0, np.float32))
    assert_bad_input(capsys, "input 'x' is 1 in every sample, so its range and scale would be zero", "optimize", str(block),
                     "-o", str(tmp_path / "out"), "--quantize", "int8", "--calib", str(calib))  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--quantize", "fp8"], "target 'cpu' cannot run FP8 engines: it runs int8"),
        (["--smoothquant", "0.5"], "--smoothquant: only with --quantize"),
        (["--quantize", "fp8", "--quant-backend", "ort"], "the ort backend does not quantize to fp8"),
        (["--quantize", "fp8", "--smoothquant", "0.5"], "--smoothquant applies to INT8 only"),
        (["--quantize", "int8", "--smoothquant", "1.5"], "--smoothquant 1.5: alpha must be in [0, 1]"),
        (["--quantize", "int8", "--calib-samples", "0"], "--calib-samples 0: must be 1 or more"),
        (["--quantize", "int8", "--keep", "("], "--keep '(' is not a regular expression"),
    ],
)
def test_bad_options(capsys, tmp_path, block, args, fragment):
    assert_bad_input(capsys, fragment, "optimize", str(block), "-o", str(tmp_path / "o"), *args)
    assert not (tmp_path / "o").exists()


def test_bad_calibration_data_names_sample_and_input(capsys, tmp_path, block):
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "a.npz", x=np.ones((1, 8, 64), np.float32))
    np.savez(calib / "b.npz", y=np.ones((1, 8, 64), np.float32))
    err = assert_bad_input(capsys, "--calib calibration sample calib/b.npz: missing input(s) ['x']; unknown input(s) ['y']",
                           "optimize", str(block), "-o", str(tmp_path / "o"), "--quantize", "int8", "--calib", str(calib))  # fmt: skip
    assert "hint: a calibration sample is an .npz file with one array per model input" in err
    (calib / "b.npz").unlink()
    np.savez(calib / "b.npz", x=np.full((1, 8, 64), np.nan, np.float32))
    assert_bad_input(capsys, "calibration sample calib/b.npz: input 'x' holds 512 NaN or infinite value(s)",
                     "optimize", str(block), "-o", str(tmp_path / "o"), "--quantize", "int8", "--calib", str(calib))  # fmt: skip
    np.savez(calib / "b.npz", x=np.ones((1, 8, 64), np.float32))
    assert_bad_input(capsys, "input 'x' is 1 in every sample, so its range and scale would be zero",
                     "optimize", str(block), "-o", str(tmp_path / "o"), "--quantize", "int8", "--calib", str(calib))  # fmt: skip
    assert_bad_input(capsys, f"--calib {tmp_path / 'nope'}: no such file or folder",
                     "optimize", str(block), "-o", str(tmp_path / "o"), "--quantize", "int8", "--calib", str(tmp_path / "nope"))  # fmt: skip


def _fallback_run(capsys, tmp_path, block, name: str, budget: str) -> tuple[int, dict | None, str]:
    out = tmp_path / name
    code, _, err = run_cli(capsys, "optimize", block, "-o", out, "--quantize", "int8", "--quant-backend", "kiln",
                           "--quality", budget, "--bench-runs", "0")  # fmt: skip
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return code, report, err


def test_quality_fallback_is_deterministic(capsys, tmp_path, block):
    code, first, err = _fallback_run(capsys, tmp_path, block, "a", "rel_l2<=0.005")
    assert code == 0, err
    fallback = first["quantization"]["fallback"]
    # Both quantized miss the budget (rel L2 0.0085 here); keeping the more sensitive one meets it.
    most_sensitive = max(fallback["sensitivity"], key=fallback["sensitivity"].get)
    assert fallback["met"] and fallback["candidates"] == 2 and fallback["kept"] == [most_sensitive]
    assert [c["kept"] for c in fallback["curve"]] == [0, 2, 1] and fallback["curve"][-1]["quality"] <= 0.005
    record = next(p for p in first["passes"] if p["name"] == "quantize")
    assert sum(1 for layer in record["details"]["layers"] if layer["kept"] and layer["kept"].startswith("kept by the quality fallback")) == len(fallback["kept"])
    _, second, _ = _fallback_run(capsys, tmp_path, block, "b", "rel_l2<=0.005")
    without_timings = lambda f: {**f, "curve": [{k: v for k, v in c.items() if k != "latency_ms"} for c in f["curve"]]}  # noqa: E731
    assert without_timings(second["quantization"]["fallback"]) == without_timings(fallback)
    md = (tmp_path / "a" / "report.md").read_text()
    assert "### Quality fallback" in md and "Budget rel_l2<=0.005: met, keeping 1 of 2 quantized layers in float" in md


def test_quality_budget_out_of_reach_exits_3(capsys, tmp_path, block):
    code, report, err = _fallback_run(capsys, tmp_path, block, "c", "psnr>=101")
    assert code == 3
    assert "the quality budget psnr>=101 is not met even with every quantized layer in float (best: psnr 100)" in err
    assert report["quantization"]["fallback"]["met"] is False


def test_bad_quality_budget(capsys, tmp_path, block):
    assert_bad_input(capsys, "--quality: quality budget 'psnr=30' is not one of", "optimize", str(block), "-o", str(tmp_path / "o"),
                     "--quantize", "int8", "--quality", "psnr=30")  # fmt: skip


def test_dit_calibrated_along_a_sampling_loop_meets_a_psnr_budget(capsys, tmp_path):
    pytest.importorskip("diffusers")
    from kiln.optimizer.cli import main

    assert main(["example", "dit", str(tmp_path / "dit"), "-q"]) == 0
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "optimize", tmp_path / "dit", "-o", out, "--quantize", "int8", "--quality", "psnr>=35", "--bench-runs", "0")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "quantize")
    assert record["details"]["calibration"]["source"].startswith("2 loop(s) of 8 DDIMScheduler steps")
    assert record["details"]["calibration"]["samples"] == 16
    sampling = report["quantization"]["quality"]["sampling"]
    assert sampling["samples"] == 16 and sampling["psnr"] >= 35
    fallback = report["quantization"]["fallback"]
    assert fallback["met"] and 0 < len(fallback["kept"]) < fallback["candidates"]
