"""kiln compare: the grid and its refusals (exit 2 before any build), a sweep end to end on the trained
example DiT (compare.json, compare.md, the PNGs), the cache on a rerun, resuming after Ctrl-C
mid-sweep, a failing point, and the baseline rows of an ONNX model and a SavedModel."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_bad_input, run_cli

from kiln.optimizer.cli import build_parser, main, options_from_args
from kiln.optimizer.compare_grid import MAX_POINTS, read_grid

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cmp-dit")
    assert main(["example", "dit", str(root / "dit"), "-q"]) == 0
    return root / "dit"


@pytest.fixture(scope="module")
def trained_dit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cmp-trained")
    assert main(["example", "dit-trained", str(root / "dit"), "-q"]) == 0
    return root / "dit"


TINY = ("--shapes", "batch=2", "--shapes", "height=16")


def sweep(model, out, *grid):
    args = build_parser().parse_args(["compare", str(model), "-o", str(out), *map(str, grid)])
    return read_grid(args)


# --- the grid ---------------------------------------------------------------------------------------


def test_settings_that_do_not_apply_are_dropped_and_the_points_merged(tiny_dit, tmp_path):
    points = sweep(tiny_dit, tmp_path / "o", "--grid", "precision=fp32,fp16", "--grid", "quantize=none,int8,fp8",
                   "--grid", "calib-samples=8,16").points  # fmt: skip
    labels = [p.label for p in points]
    assert labels == [
        "precision=fp32 quantize=none", "precision=fp32 quantize=int8 calib-samples=8", "precision=fp32 quantize=int8 calib-samples=16",
        "precision=fp32 quantize=fp8 calib-samples=8", "precision=fp32 quantize=fp8 calib-samples=16",
        "precision=fp16 quantize=none", "precision=fp16 quantize=int8 calib-samples=8", "precision=fp16 quantize=int8 calib-samples=16",
        "precision=fp16 quantize=fp8 calib-samples=8", "precision=fp16 quantize=fp8 calib-samples=16",
    ]  # fmt: skip
    skipped = {p.label: p.skipped for p in points if p.skipped}
    assert set(skipped) == {label for label in labels if "fp8" in label}
    assert all(reason == "target 'cpu' cannot run FP8 engines: it runs int8" for reason in skipped.values())
    built = points[6]
    assert (built.options.precision, built.options.quantize, built.options.calib_samples) == ("fp16", "int8", 8)
    assert built.flags == ["--precision", "fp16", "--quantize", "int8", "--calib-samples", "8"]
    assert built.short_label == "fp16 int8 8 samples"


def test_the_command_for_a_point_holds_every_shared_option(tiny_dit, tmp_path):
    shared = ["--target", "cpu", "--shapes", "batch=2", "--shapes", "height=16", "--seed", "3", "--trust-pickle", "--keep", "attn1",
              "--int-range", "class_labels=0..9", "--outputs", "a,b"]  # fmt: skip
    found = sweep(tiny_dit, tmp_path / "o", *shared, "--grid", "quantize=none,int8")
    assert sorted(found.base_flags) == sorted(shared)
    for point in found.points:  # the point without quantization drops --keep, which kiln optimize takes only with it
        command = point.command_flags(found.base_flags)
        assert ("--keep" in command) == (point.options.quantize == "int8")
        assert options_from_args(build_parser().parse_args(["optimize", str(tiny_dit), "-o", "x", *command])) == point.options


def test_or_joins_grids_and_a_recipe_gives_them(tiny_dit, tmp_path):
    points = sweep(tiny_dit, tmp_path / "o", "--grid", "precision=fp32,fp16", "--or", "--grid", "precision=fp16",
                   "--grid", "quantize=int8", "--grid", "smoothquant=none,0.5").points  # fmt: skip
    assert [p.label for p in points] == ["precision=fp32", "precision=fp16", "precision=fp16 quantize=int8 smoothquant=none",
                                         "precision=fp16 quantize=int8 smoothquant=0.5"]  # fmt: skip
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('precision = "fp16"\n[[compare.grid]]\nquantize = ["none"]\n[[compare.grid]]\nquantize = ["int8"]\n'
                      'calib-samples = [4, 8]\n')  # fmt: skip
    points = sweep(tiny_dit, tmp_path / "o", "--config", recipe).points
    assert [p.label for p in points] == ["quantize=none", "quantize=int8 calib-samples=4", "quantize=int8 calib-samples=8"]
    assert all(p.options.precision == "fp16" for p in points)  # the recipe's shared options hold for every point
    # The command line's grid replaces the recipe's; kiln optimize takes the same recipe and skips [compare].
    assert [p.label for p in sweep(tiny_dit, tmp_path / "o", "--config", recipe, "--grid", "precision=fp32").points] == ["precision=fp32"]
    options = options_from_args(build_parser().parse_args(["optimize", str(tiny_dit), "-o", "x", "--config", str(recipe)]))
    assert options.precision == "fp16"


@pytest.mark.parametrize(
    ("fragment", "grid"),
    [
        ("the grid is empty: give it with --grid OPTION=V1,V2", []),
        ("--grid quantize= gives no values", ["--grid", "quantize="]),
        ("--grid: 'frobnicate' is not an option kiln compare can vary", ["--grid", "frobnicate=1,2"]),
        ("--grid: --shapes cannot vary across points: every point is verified and measured on the same inputs", ["--grid", "shapes=batch=1"]),
        ("--grid: --calib cannot vary across points", ["--grid", "calib=a.npz,b.npz"]),
        ("--grid precision=fp9: argument --precision: invalid choice: 'fp9'", ["--grid", "precision=fp9,fp16"]),
        ("--grid calib-samples=many: argument --calib-samples: invalid int value: 'many'", ["--grid", "calib-samples=8,many"]),
        ("cannot disable unknown pass(es) 'no-such-pass'", ["--grid", "disable-pass=none,no-such-pass"]),
        (f"--grid gives 25 points, more than {MAX_POINTS}; each is a build", ["--grid", f"calib-samples={','.join(map(str, range(1, 26)))}"]),
        ("--no-verify would leave nothing to compare", ["--no-verify", "--grid", "precision=fp32"]),
        ("--bench-runs 0 would leave nothing to compare", ["--bench-runs", "0", "--grid", "precision=fp32"]),
        ("unknown target 'gpu9000'; known targets: auto, cpu, cuda, t4, a10g, a100, l4, l40s, h100, h200, b200, rtx-pro-6000, and each GPU's NAME-trt and NAME-ort-trt", ["--target", "gpu9000", "--grid", "precision=fp32"]),
    ],
)
def test_bad_grids_exit_2_before_any_build(capsys, tmp_path, tiny_dit, fragment, grid):
    out = tmp_path / "out"
    assert_bad_input(capsys, fragment, "compare", tiny_dit, "-o", out, *grid)
    assert not out.exists()


def test_more_than_max_points_run_with_yes(capsys, tmp_path):
    missing = tmp_path / "missing-model"
    # Past the grid's size check, the next refusal is the missing model's: nothing was built.
    assert_bad_input(capsys, "missing-model", "compare", missing, "-o", tmp_path / "out", "--yes", "--grid",
                     f"calib-samples={','.join(map(str, range(1, 26)))}", "--grid", "quantize=int8")  # fmt: skip


def test_an_outdir_holding_something_else_is_refused_and_kept(capsys, tmp_path, tiny_dit):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_bad_input(capsys, f"output directory {out} holds notes.txt, which kiln compare did not write",
                     "compare", tiny_dit, "-o", out, "--grid", "precision=fp32")  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


# --- a sweep end to end -------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


ROW_KEYS = {"schema", "kind", "label", "short_label", "key", "settings", "status", "error", "dir", "command", "latency", "quality",
            "quality_detail", "engine_mb", "device_memory_mb", "fallback", "seconds", "cached", "pareto", "speedup"}  # fmt: skip


def test_a_sweep_of_the_trained_dit_then_a_rerun_that_builds_nothing(capsys, tmp_path, trained_dit):
    out = tmp_path / "out"
    grid = ("--grid", "precision=fp32,fp16", "--grid", "quantize=none,int8", "--bench-runs", "3")
    code, stdout, err = run_cli(capsys, "compare", trained_dit, "-o", out, *grid, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result == json.loads((out / "compare.json").read_text()) | {"plots": result["plots"]}
    assert (result["schema"], result["schema_version"], result["command"], result["target"]) == ("kiln-compare", 1, "compare", "cpu")
    assert result["counts"] == {"points": 4, "ok": 4, "built": 4, "cached": 0, "skipped": 0, "failed": 0, "error": 0,
                                "verification-failed": 0, "budget-not-met": 0}  # fmt: skip
    assert result["quality_metric"] == "psnr" and result["quality_on"] == "final latents of 16 samples (8 loops of 8 steps)"
    assert result["baseline"] == "PyTorch eager fp32"
    rows = {r["label"]: r for r in result["points"]}
    assert set(rows) == {"precision=fp32 quantize=none", "precision=fp32 quantize=int8", "precision=fp16 quantize=none",
                         "precision=fp16 quantize=int8", "PyTorch eager fp32"}  # fmt: skip
    for row in rows.values():
        assert set(row) == ROW_KEYS and row["status"] == "ok" and row["error"] is None
        assert row["latency"]["median_ms"] > 0 and row["latency"]["p90_ms"] >= row["latency"]["median_ms"] and row["latency"]["io"] == "host"
        assert set(row["quality"]) == {"on", "rel_l2", "max_abs", "psnr", "ssim"}
        assert (out / row["dir"] / "pictures.npz").is_file()
    psnr = {label: row["quality"]["psnr"] for label, row in rows.items()}
    assert psnr["precision=fp32 quantize=none"] > 90 and psnr["PyTorch eager fp32"] > 80  # the same arithmetic as the reference
    assert psnr["precision=fp16 quantize=none"] > 45 > psnr["precision=fp16 quantize=int8"] > 25
    assert rows["PyTorch eager fp32"]["speedup"] == 1.0 and rows["PyTorch eager fp32"]["kind"] == "baseline"
    engine = rows["precision=fp16 quantize=int8"]
    assert engine["engine_mb"] > 0 and engine["device_memory_mb"] is None  # the CPU reports no device memory
    assert engine["command"].endswith("--precision fp16 --quantize int8")
    report = json.loads((out / engine["dir"] / "report.json").read_text())  # each point is a kiln optimize OUTDIR
    assert report["schema"] == "kiln-report" and report["quantization"]["format"] == "int8"
    # The Pareto mark: no marked row is beaten on both latency and PSNR by another row.
    marked = [r for r in rows.values() if r["pareto"]]
    assert marked and all(not (o["latency"]["median_ms"] <= r["latency"]["median_ms"] and o["quality"]["psnr"] > r["quality"]["psnr"])
                          for r in marked for o in rows.values())  # fmt: skip
    markdown = (out / "compare.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "ms" not in line]
    latencies = [float(line.split(" | ")[2]) for line in table]
    assert len(table) == 5 and latencies == sorted(latencies)  # fastest first
    for name in ("pareto.png", "samples.png"):
        width, height = png_size(out / name)
        assert width > 500 and height > 300 and (out / name).stat().st_size > 20_000, (name, width, height)

    # The same grid again: every point from the cache, nothing imported or built.
    code, stdout, err = run_cli(capsys, "compare", trained_dit, "-o", out, *grid, "--json")
    again = json.loads(stdout)
    assert code == 0 and again["counts"]["built"] == 0 and again["counts"]["cached"] == 4
    assert [r["quality"] for r in again["points"]] == [r["quality"] for r in result["points"]]
    code = main(["compare", str(trained_dit), "-o", str(out), *grid])
    assert code == 0 and "import" not in capsys.readouterr().err


def test_ctrl_c_mid_sweep_keeps_the_points_done_and_a_rerun_resumes(tmp_path, tiny_dit):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kiln.optimizer.cli", "compare", str(tiny_dit), "-o", str(out), *TINY, "--bench-runs", "200",
               "--grid", "precision=fp32,fp16", "--grid", "quantize=none,int8", "--grid", "calib-samples=4,8"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while not _points_done(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()
    assert b"interrupted: Ctrl-C" in err and b"Traceback" not in err
    done = _points_done(out)
    assert 1 <= len(done) < 6
    assert not [p for p in (out / "points").iterdir() if p.name.startswith(".")]  # no half-built point left
    assert all(json.loads(p.read_text())["status"] == "ok" for p in out.glob("points/*/point.json"))

    result = subprocess.run([*command, "--json", "-q"], capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    counts = json.loads(result.stdout)["counts"]
    assert counts["cached"] == len(done - {_baseline_key(out)}) and counts["built"] == 6 - counts["cached"] and counts["ok"] == 6


def _points_done(out: Path) -> set[str]:
    """The points renamed into place: pathlib's glob also matches the hidden staging folder a point is written
    in before its rename, which a Ctrl-C then removes."""
    return {p.parent.name for p in out.glob("points/*/point.json") if not p.parent.name.startswith(".")}


def _baseline_key(out: Path) -> str | None:
    for path in out.glob("points/*/point.json"):
        if json.loads(path.read_text())["kind"] == "baseline":
            return path.parent.name
    return None


def test_a_failing_point_gets_its_error_and_the_sweep_goes_on(capsys, tmp_path, tiny_dit):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "compare", tiny_dit, "-o", out, *TINY, "--bench-runs", "2", "--grid", "quantize=int8",
                                "--grid", "quality=none,psnr>=200", "--json")  # fmt: skip
    assert code == 0, err
    rows = {r["label"]: r for r in json.loads(stdout)["points"]}
    failed = rows["quantize=int8 quality=psnr>=200"]
    assert failed["status"] == "budget-not-met" and failed["error"].startswith("the quality budget psnr>=200 is not met")
    assert failed["fallback"]["met"] is False and failed["speedup"] is None and not failed["pareto"]
    assert rows["quantize=int8 quality=none"]["status"] == "ok"
    markdown = (out / "compare.md").read_text()
    assert "- `quantize=int8 quality=psnr>=200`: **budget-not-met**: the quality budget psnr>=200 is not met" in markdown


# --- baselines of other sources ---------------------------------------------------------------------------


def test_an_onnx_model_is_compared_with_onnx_runtimes_own_optimizer(capsys, tmp_path):
    assert main(["example", "block", str(tmp_path / "ex"), "-q"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "compare", tmp_path / "ex" / "model.onnx", "-o", out, "--shapes", "batch=2", "--shapes", "seq=16",
                                "--grid", "precision=fp32,fp16", "--bench-runs", "3", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    rows = {r["label"]: r for r in result["points"]}
    assert result["baseline"] == "ONNX Runtime, its optimizer (CPU, fp32)"
    assert rows["ONNX Runtime, its optimizer (CPU, fp32)"]["quality"]["rel_l2"] < 1e-5
    assert rows["precision=fp16"]["quality"]["rel_l2"] > rows["precision=fp32"]["quality"]["rel_l2"]
    assert result["quality_on"] == "the verification inputs, worst output"


def test_film_is_compared_with_tensorflow(capsys, tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    assert main(["example", "film", str(tmp_path / "film"), "-q"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "compare", tmp_path / "film", "-o", out, "--shapes", "height=64", "--shapes", "width=64",
                                "--grid", "precision=fp32,fp16", "--bench-runs", "2", "--json")  # fmt: skip
    assert code == 0, err
    rows = {r["label"]: r for r in json.loads(stdout)["points"]}
    tf_row = rows["TensorFlow (CPU)"]
    assert tf_row["status"] == "ok" and tf_row["quality"]["psnr"] > 60  # TensorFlow computes what its ONNX export does
    with np.load(out / tf_row["dir"] / "pictures.npz") as pictures:
        assert pictures["picture_0"].shape == (64, 64, 3)  # FILM's interpolated frame, NHWC
    assert png_size(out / "samples.png")[0] > 500


def test_a_recipe_that_does_not_read_says_so(capsys, tmp_path, tiny_dit):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("target = [\n")
    assert_bad_input(capsys, f"recipe {recipe} is not valid TOML", "compare", tiny_dit, "-o", tmp_path / "out", "--config", recipe)
    assert_bad_input(capsys, f"recipe {tmp_path / 'nope.toml'}: no such file", "compare", tiny_dit, "-o", tmp_path / "out",
                     "--config", tmp_path / "nope.toml")  # fmt: skip
