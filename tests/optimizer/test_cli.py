"""The kiln CLI through its entry point: the main job end to end, and every bad input's message and exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kiln.optimizer.cli import main
from kiln.optimizer.examples import transformer_block


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("example")
    assert main(["example", "block", str(directory)]) == 0
    return directory / "model.onnx"


@pytest.fixture(scope="module")
def built(example, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    assert main(["optimize", str(example), "-o", str(out), "--bench-runs", "2"]) == 0
    return out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args] + ["-q"])  # progress off: stderr holds only warnings and errors
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(capsys, fragment: str, *args: str) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert fragment in err
    assert "Traceback" not in err
    assert err.startswith("kiln: error: ")
    return err


def reference(model_path: Path, feeds: dict) -> dict:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


# --- the main job -------------------------------------------------------------------------------


def test_optimize_writes_engine_and_reports(built):
    assert sorted(p.name for p in built.iterdir()) == ["engine", "model.onnx", "report.json", "report.md"]
    assert sorted(p.name for p in (built / "engine").iterdir()) == ["engine.json", "model.ort.onnx"]
    report = json.loads((built / "report.json").read_text())
    assert report["schema"] == "kiln-report" and report["schema_version"] == 2
    assert report["status"] == "ok"
    assert report["source"]["nodes"] == 35 and report["model"]["nodes"] == 30
    assert [p["name"] for p in report["passes"]] == [
        "warp-to-gridsample", "infer-shapes", "lift-constants", "fold-constants", "remove-identity",
        "cse", "dedupe-initializers", "remove-dead-nodes", "topological-sort", "fusions",
    ]  # fmt: skip
    assert report["profile"]["dims"] == {"batch": {"min": 1, "opt": 2, "max": 4}, "seq": {"min": 1, "opt": 16, "max": 64}}
    checks = report["verification"]["shapes"]
    # min, opt, max and the corners off the diagonal: batch and seq each at the other's extreme.
    assert [c["corner"] for c in checks] == ["min", "opt", "max", "batch min, seq max", "batch max, seq min"]
    assert checks[2]["shapes"] == {"x": [4, 64, 64]} and checks[4]["shapes"] == {"x": [4, 1, 64]}
    assert all(c["passed"] and c["outputs"]["y"]["max_abs"] < 1e-4 for c in checks)
    assert [b["corner"] for b in report["latency"]] == ["min", "opt", "max"]
    assert {"onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "python"} <= set(report["versions"])
    md = (built / "report.md").read_text()
    assert "**Status: ok**" in md and "| max | x 4×64×64 | y |" in md and "| batch max, seq min | x 4×1×64 | y |" in md


def test_optimize_is_deterministic_apart_from_timings(example, built, tmp_path):
    out = tmp_path / "again"
    assert main(["optimize", str(example), "-o", str(out), "--bench-runs", "2"]) == 0
    first, second = (json.loads((d / "report.json").read_text()) for d in (built, out))
    for report in (first, second):
        for key in ("latency", "timings"):
            report.pop(key)
        for record in report["passes"]:
            record.pop("seconds")
    assert first == second
    assert (built / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_json_mode_prints_only_the_report(capsys, example, tmp_path):
    code, out, err = run_cli(capsys, "optimize", example, "-o", tmp_path / "o", "--json", "--bench-runs", "1")
    assert code == 0 and err == ""
    assert json.loads(out)["status"] == "ok"


def test_json_mode_keeps_what_libraries_print_off_stdout(capsys, example, tmp_path, monkeypatch):
    """An exporter or runtime that prints progress to stdout (torch.onnx does) must not break --json's output."""
    import onnxruntime as ort

    original = ort.InferenceSession.__init__

    def chatty(self, *args, **kwargs):
        print("library chatter")
        original(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", chatty)
    code, out, err = run_cli(capsys, "optimize", example, "-o", tmp_path / "o", "--json", "--bench-runs", "0")
    assert code == 0 and json.loads(out)["status"] == "ok"
    assert "library chatter" in err


def test_fp16_engine_is_verified_with_fp16_tolerances(capsys, example, tmp_path):
    code, out, err = run_cli(capsys, "optimize", example, "-o", tmp_path / "o", "--precision", "fp16", "--json", "--bench-runs", "0")
    assert code == 0, err
    report = json.loads(out)
    assert report["verification"]["tolerance"] == {"atol": 2e-2, "rtol": 2e-2}
    assert report["model"]["op_counts"]["Cast"] == 2
    assert all(c["passed"] for c in report["verification"]["shapes"])
    assert report["latency"] == []
    markdown = (tmp_path / "o" / "report.md").read_text()
    assert "- LayerNormalization (fp16): runs in low precision; its statistics accumulate in float32" in markdown


def test_static_profile_freezes_shapes(capsys, example, tmp_path):
    code, out, err = run_cli(capsys, "optimize", example, "-o", tmp_path / "o", "--shapes", "batch=2", "--shapes", "seq=8", "--json", "--bench-runs", "2")
    assert code == 0, err
    report = json.loads(out)
    assert report["passes"][0]["name"] == "freeze-shapes"
    assert report["passes"][0]["stats"]["inputs_frozen"] == 1
    engine_input = onnx.load(tmp_path / "o" / "model.onnx").graph.input[0]
    assert [d.dim_value for d in engine_input.type.tensor_type.shape.dim] == [2, 8, 64]
    assert [c["shapes"]["x"] for c in report["verification"]["shapes"]] == [[2, 8, 64]]
    assert report["latency"][0]["io"] == "host"  # the CPU engine runs from host arrays
    code, _, _ = run_cli(capsys, "optimize", example, "-o", tmp_path / "d", "--shapes", "batch=2", "--shapes", "seq=8",
                         "--disable-pass", "freeze-shapes", "--bench-runs", "0")  # fmt: skip
    assert code == 0


def test_float16_io_engine(capsys, example, tmp_path):
    code, out, err = run_cli(capsys, "optimize", example, "-o", tmp_path / "o", "--precision", "fp16", "--io-dtype", "float16", "--json", "--bench-runs", "1")
    assert code == 0, err
    report = json.loads(out)
    # The report states the engine's own types, as does its manifest.
    assert report["inputs"][0]["dtype"] == report["outputs"][0]["dtype"] == "float16"
    manifest = json.loads((tmp_path / "o" / "engine" / "engine.json").read_text())
    assert manifest["inputs"][0]["dtype"] == "float16" and manifest["precision"] == "fp16"
    assert report["model"]["op_counts"].get("Cast", 0) == 0
    assert all(c["passed"] for c in report["verification"]["shapes"])
    assert_bad_input(capsys, "io_dtype float16 needs precision fp16, not fp32", "optimize", example, "-o", tmp_path / "x", "--io-dtype", "float16")


def test_bf16_is_refused_on_the_cpu_target(capsys, example, tmp_path):
    message = assert_bad_input(capsys, "target 'cpu' does not support bf16", "optimize", example, "-o", tmp_path / "o", "--precision", "bf16")
    assert "it supports fp32, fp16" in message


def test_verify_each_runs_and_names_the_breaking_pass(capsys, example, tmp_path):
    assert run_cli(capsys, "optimize", example, "-o", tmp_path / "ok", "--verify-each", "--bench-runs", "0")[0] == 0
    recipe = tmp_path / "strict.toml"
    recipe.write_text('precision = "fp16"\n[verify]\natol = 0\nrtol = 0\n')
    code, _, err = run_cli(capsys, "optimize", example, "-o", tmp_path / "bad", "--config", recipe, "--verify-each")
    assert code == 1
    assert "--verify-each: after pass 'fp16', output 'y' differs at the opt shape" in err
    assert not (tmp_path / "bad").exists()


def test_verification_failure_exits_3_and_writes_the_report(capsys, example, tmp_path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('precision = "fp16"\n[verify]\natol = 0\nrtol = 0\n')
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "optimize", example, "-o", out, "--config", recipe, "--bench-runs", "0")
    assert code == 3
    assert "verification failed at 5 of 5 shape(s); first at the min shape (x [1, 1, 64])" in err
    assert json.loads((out / "report.json").read_text())["status"] == "verification-failed"
    assert run_cli(capsys, "optimize", example, "-o", tmp_path / "n", "--config", recipe, "--no-verify", "--bench-runs", "0")[0] == 0


def test_shapes_option_sets_the_profile(capsys, example, tmp_path):
    code, out, _ = run_cli(
        capsys, "optimize", example, "-o", tmp_path / "o", "--shapes", "batch=3", "--shapes", "x:1=5..7..9", "--json", "--bench-runs", "0"
    )
    assert code == 0
    report = json.loads(out)
    assert [c["shapes"]["x"] for c in report["verification"]["shapes"]] == [[3, 5, 64], [3, 7, 64], [3, 9, 64]]


def test_run_matches_onnxruntime_on_the_original(capsys, example, built, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code, out, err = run_cli(capsys, "run", built, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz")
    assert code == 0, err
    assert "y: float32 [3, 5, 64]" in out
    got = np.load(tmp_path / "out.npz")["y"]
    np.testing.assert_allclose(got, reference(example, {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_run_warns_outside_the_verified_profile(capsys, built, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((9, 2, 64), np.float32))
    code, _, err = run_cli(capsys, "run", built, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert code == 0
    assert "x axis 0 (batch) is 9, outside the profile 1..4; the engine was not verified at this shape" in err


def test_run_rejects_wrong_inputs(capsys, built, tmp_path):
    np.savez(tmp_path / "name.npz", z=np.zeros((1, 1, 64), np.float32))
    assert_bad_input(capsys, "missing ['x']; unexpected ['z']", "run", built, "--inputs", tmp_path / "name.npz", "--output", tmp_path / "o.npz")
    np.savez(tmp_path / "shape.npz", x=np.zeros((1, 1, 32), np.float32))
    assert_bad_input(capsys, "input 'x' has shape [1, 1, 32], the engine takes ['batch', 'seq', 64]",
                     "run", built, "--inputs", tmp_path / "shape.npz", "--output", tmp_path / "o.npz")  # fmt: skip
    np.savez(tmp_path / "dtype.npz", x=np.zeros((1, 1, 64), np.float64))
    assert_bad_input(capsys, "input 'x' is float64, the engine takes float32", "run", built, "--inputs", tmp_path / "dtype.npz", "--output", tmp_path / "o.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert_bad_input(capsys, "is not an .npz file", "run", built, "--inputs", tmp_path / "junk.npz", "--output", tmp_path / "o.npz")
    assert_bad_input(capsys, "engine.json is missing", "run", tmp_path, "--inputs", tmp_path / "dtype.npz", "--output", tmp_path / "o.npz")
    assert not (tmp_path / "o.npz").exists()


def test_bench_reports_each_profile_shape(capsys, built):
    code, out, _ = run_cli(capsys, "bench", built, "--runs", "3", "--warmup", "1", "--json")
    assert code == 0
    results = json.loads(out)["results"]
    assert [r["corner"] for r in results] == ["min", "opt", "max"]
    assert all(r["runs"] == 3 and 0 < r["median_ms"] <= r["p90_ms"] for r in results)


def test_targets_lists_cpu(capsys):
    code, out, _ = run_cli(capsys, "targets", "--json")
    cpu = next(t for t in json.loads(out)["targets"] if t["name"] == "cpu")
    assert code == 0 and cpu["available"] and cpu["precisions"] == ["fp32", "fp16"]


def test_example_refuses_to_overwrite(capsys, tmp_path):
    assert run_cli(capsys, "example", "block", tmp_path)[0] == 0
    assert_bad_input(capsys, "model.onnx already exists", "example", "block", tmp_path)
    assert run_cli(capsys, "example", "block", tmp_path, "--force")[0] == 0
    assert_bad_input(capsys, "unknown example 'nope'", "example", "nope", tmp_path / "n")


def test_example_in_an_unwritable_place_is_bad_input(capsys):
    """Found by the fuzzing harness: a directory kiln cannot create was an internal FileNotFoundError."""
    err = assert_bad_input(capsys, "cannot write /proc/kiln/x/ex: No such file or directory", "example", "block", "/proc/kiln/x/ex")
    assert "hint: check that its directory exists, is writable and has free space" in err


def test_vae_example_on_a_full_disk_leaves_nothing(tmp_path):
    """Found by the fuzzing harness: safetensors' write error on a full disk was an internal error,
    and left a half-written weights file. A file-size limit stands in for the full disk."""
    pytest.importorskip("diffusers")
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    out = tmp_path / "vae"
    proc = subprocess.run([sys.executable, "-m", "kiln.optimizer.cli", "example", "vae", str(out), "-q"],
                          capture_output=True, text=True, preexec_fn=limit)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"kiln: error: cannot write {out}: Error while serializing: I/O error: File too large")
    assert not out.exists()
    old = os.umask(0o022)
    try:
        assert main(["example", "vae", str(out), "-q"]) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}  # safetensors' own is 0600


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--workers", "0", "must be at least 1, got 0"), ("--workers", "x", "'x' is not a whole number"),
    ("--fps", "0", "must be above 0, got 0"), ("--fps", "nan", "must be above 0, got nan"), ("--fps", "x", "'x' is not a number"),
])  # fmt: skip
def test_workers_and_fps_must_be_positive_numbers(capsys, tmp_path, option, value, message):
    """Found by the fuzzing harness: --workers 0 reached the pipeline's ValueError, an internal error,
    and --fps 0 an OpenCV failure naming a temporary file."""
    code, _, err = run_cli(capsys, "decode", tmp_path, tmp_path / "l.npy", "-o", tmp_path / "o", option, value)
    assert code == 2 and f"kiln: error: kiln decode: argument {option}: {message}\n" in err


# --- bad input (issue: each gets one message, exit code 2, no traceback) -------------------------


def test_missing_path(capsys, tmp_path):
    assert_bad_input(capsys, "nowhere.onnx: no such file or directory", "optimize", tmp_path / "nowhere.onnx", "-o", tmp_path / "o")


def test_directory_without_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_bad_input(capsys, "is a directory with no model in it", "optimize", tmp_path / "empty", "-o", tmp_path / "o")


def test_directory_with_model_is_accepted(capsys, example, tmp_path):
    assert run_cli(capsys, "optimize", example.parent, "-o", tmp_path / "o", "--bench-runs", "0")[0] == 0


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty (0 bytes)"),
        (np.random.default_rng(0).bytes(4096), "is not a readable ONNX model"),
        ("truncated", "is not a readable ONNX model"),
    ],
)
def test_unreadable_model(capsys, tmp_path, content, fragment):
    if content == "truncated":
        content = transformer_block().SerializeToString()[:20000]
    (tmp_path / "bad.onnx").write_bytes(content)
    assert_bad_input(capsys, fragment, "optimize", tmp_path / "bad.onnx", "-o", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unsupported_opset_and_ir_version(capsys, tmp_path):
    model = transformer_block()
    model.opset_import[0].version = 99
    onnx.save(model, tmp_path / "opset.onnx")
    assert_bad_input(capsys, "uses ONNX opset 99; kiln supports opsets 13..", "optimize", tmp_path / "opset.onnx", "-o", tmp_path / "o")
    model = transformer_block()
    model.ir_version = onnx.IR_VERSION + 1
    onnx.save(model, tmp_path / "ir.onnx")
    assert_bad_input(capsys, f"has IR version {onnx.IR_VERSION + 1}; kiln supports 7..", "optimize", tmp_path / "ir.onnx", "-o", tmp_path / "o")


def test_external_data_escaping_the_model_directory(capsys, tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    model = transformer_block()
    onnx.save(model, model_dir / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1_000_000)
    proto = onnx.load(model_dir / "model.onnx", load_external_data=False)
    weight = next(t for t in proto.graph.initializer if t.name == "w_qkv")
    entry = next(e for e in weight.external_data if e.key == "location")
    entry.value = "../secret.bin"
    onnx.save(proto, model_dir / "model.onnx")
    assert_bad_input(capsys, "which uses '..' to leave the model's directory", "optimize", model_dir / "model.onnx", "-o", tmp_path / "o")


def test_shapes_naming_what_the_model_lacks(capsys, example, tmp_path):
    assert_bad_input(capsys, "the model has no input or dynamic dim called 'frames'", "optimize", example, "-o", tmp_path / "o", "--shapes", "frames=1..4")
    assert_bad_input(capsys, "dynamic dims: batch (x:0), seq (x:1)", "optimize", example, "-o", tmp_path / "o", "--shapes", "frames=1..4")
    assert_bad_input(capsys, "axis 2 of input 'x' is static (64)", "optimize", example, "-o", tmp_path / "o", "--shapes", "x:2=1..4")
    assert_bad_input(capsys, "min 8 is greater than max 1", "optimize", example, "-o", tmp_path / "o", "--shapes", "batch=8..1")


def test_outdir_that_is_not_a_kiln_output(capsys, example, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_bad_input(capsys, "exists and is not a kiln output", "optimize", example, "-o", out)
    assert (out / "notes.txt").read_text() == "mine"
    assert run_cli(capsys, "optimize", example, "-o", out, "--force", "--bench-runs", "0")[0] == 0
    assert (out / "report.json").exists() and not (out / "notes.txt").exists()


def test_a_kiln_outdir_holding_the_users_files_is_not_replaced(capsys, example, built, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(built, out)
    (out / "notes.txt").write_text("mine")
    shutil.copytree(built, out / "sub")  # a nested kiln output
    before = tree(tmp_path)
    err = assert_bad_input(capsys, f"output directory {out} is a kiln output but also holds notes.txt, sub/, which kiln did not write; "
                           "replacing it would delete them", "optimize", example, "-o", out)  # fmt: skip
    assert "pass --force to replace it with everything in it" in err
    assert tree(tmp_path) == before
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "sub")
    assert run_cli(capsys, "optimize", example, "-o", out, "--bench-runs", "0")[0] == 0  # kiln's own files alone: replaced


def test_outputs_get_the_umask_permissions_and_links_are_refused(capsys, example, tmp_path):
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "optimize", example, "-o", tmp_path / "o", "--bench-runs", "0")[0] == 0
        assert run_cli(capsys, "example", "block", tmp_path / "ex")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (tmp_path / "o" / "report.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ex" / "model.onnx").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    (tmp_path / "link").symlink_to(tmp_path / "o")
    assert_bad_input(capsys, f"output directory {tmp_path / 'link'} is a symbolic link (to {tmp_path / 'o'})",
                     "optimize", example, "-o", tmp_path / "link", "--force")  # fmt: skip
    assert (tmp_path / "link").is_symlink()


def test_json_errors_and_usage_errors(capsys, tmp_path):
    code, out, err = run_cli(capsys, "optimize", tmp_path / "missing.onnx", "-o", tmp_path / "o", "--json")
    assert code == 2 and err.startswith(f"kiln: error: {tmp_path / 'missing.onnx'}: no such file or directory")
    assert json.loads(out) == {"error": {"exit_code": 2, "kind": "InputError", "hint": "check the path to the model",
                                         "message": f"{tmp_path / 'missing.onnx'}: no such file or directory"}}  # fmt: skip
    code, out, err = run_cli(capsys, "optimize", "--json")
    assert code == 2 and err.startswith("usage: kiln optimize")
    assert "kiln: error: kiln optimize: the following arguments are required: MODEL, -o/--output" in err
    assert json.loads(out)["error"]["kind"] == "UsageError"


def test_a_closed_stdout_pipe_is_not_an_error():
    # `kiln targets | head -0`: the reader is gone before kiln writes.
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "kiln.optimizer.cli", "passes"], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


def test_outdir_holding_the_model_is_refused_even_with_force(capsys, example, tmp_path):
    shutil.copy(example, tmp_path / "model.onnx")
    assert_bad_input(capsys, "holds the input model", "optimize", tmp_path / "model.onnx", "-o", tmp_path, "--force")
    assert (tmp_path / "model.onnx").exists()


def test_failed_run_leaves_a_previous_output_untouched(capsys, example, tmp_path):
    out = tmp_path / "o"
    assert run_cli(capsys, "optimize", example, "-o", out, "--bench-runs", "0")[0] == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert_bad_input(capsys, "unknown target 'tpu'", "optimize", example, "-o", out, "--target", "tpu")
    assert_bad_input(capsys, "min 8 is greater than max 1", "optimize", example, "-o", out, "--shapes", "batch=8..1")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging directories left behind


def test_bad_recipe_and_unknown_pass(capsys, example, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("precison = 'fp16'\n")
    assert_bad_input(capsys, "unknown key 'precison'", "optimize", example, "-o", tmp_path / "o", "--config", recipe)
    assert_bad_input(capsys, "cannot disable unknown pass(es) 'nope'", "optimize", example, "-o", tmp_path / "o", "--disable-pass", "nope")


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "optimize", tmp_path / "missing.onnx", "-o", tmp_path / "o", "--debug")
    assert code == 2 and "Traceback" in err


def test_console_script_and_bare_imports():
    """`kiln --help` works through the installed entry point and imports no heavy framework."""
    kiln = shutil.which("kiln", path=os.path.dirname(sys.executable)) or shutil.which("kiln")
    assert kiln, "the kiln console script is not installed"
    result = subprocess.run([kiln, "--help"], capture_output=True, text=True, check=True)
    assert "kiln optimize ex/model.onnx -o out/" in result.stdout
    code = (
        "import sys, kiln.optimizer.cli, kiln.optimizer.optimize, kiln.optimizer.run, kiln.passes, kiln.targets, kiln.calibration\n"
        "heavy = {'torch', 'tensorflow', 'tf2onnx', 'diffusers', 'tensorrt', 'modelopt'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_verify_each_when_opt_coincides_with_min(capsys, example, tmp_path):
    code, _, err = run_cli(capsys, "optimize", example, "-o", tmp_path / "o", "--verify-each", "--bench-runs", "0",
                           "--shapes", "batch=1..1..2", "--shapes", "seq=4..4..8")  # fmt: skip
    assert code == 0, err


def test_ctrl_c_that_a_library_wrapped_is_still_an_interruption(capsys, tmp_path, monkeypatch):
    """Found by the fuzzing harness: SIGTERM inside an extension module's import came out as
    "ImportError: initialization failed", an internal error."""

    def interrupted_import(*args):
        try:
            raise KeyboardInterrupt()
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # what the import machinery raises, with the interrupt as context

    monkeypatch.setattr("kiln.optimizer.examples.write_example", interrupted_import)
    code, _, err = run_cli(capsys, "example", "block", tmp_path / "ex")
    assert code == 130 and err == "kiln: interrupted: Ctrl-C; nothing half-written was left\n"


def test_ctrl_c_inside_code_run_from_a_string_exits_130(tmp_path):
    """Found by the fuzzing harness: Ctrl-C while a dataclass was being made (its __init__ is exec'd from a string)
    printed kiln's message, then `python -m kiln.optimizer.cli` died by SIGINT (-2): CPython's exit after an
    unhandled Ctrl-C, which it had remembered from the exec."""
    (tmp_path / "interrupted_cli.py").write_text(
        "import sys\n"
        "import kiln.optimizer.examples\n"
        "from kiln.optimizer.cli import main\n"
        "def interrupted(*args):\n"
        "    exec('raise KeyboardInterrupt')\n"
        "kiln.optimizer.examples.write_example = interrupted\n"
        "sys.argv = ['kiln', 'example', 'block', sys.argv[1]]\n"
        "sys.exit(main())\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "interrupted_cli", str(tmp_path / "ex")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert (done.returncode, done.stderr) == (130, "kiln: interrupted: Ctrl-C; nothing half-written was left\n")


def test_a_signal_after_the_work_is_done_changes_nothing(tmp_path):
    """Found by the fuzzing harness: SIGTERM during the interpreter's shutdown killed kiln (-15) after it
    had written its output and chosen exit 0. Here the signal comes during the shutdown, from atexit."""
    script = ("import atexit, os, signal, sys\n"
              "from kiln.optimizer.cli import main\n"
              "def late():\n"
              "    # SIG_IGN, not a Python handler, which the finalization would swap for the default action\n"
              "    print(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "atexit.register(late)\n"
              "sys.argv = ['kiln', 'example', 'block', sys.argv[1], '-q']\n"
              "sys.exit(main())\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ex")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\nTrue True\n")
    assert (tmp_path / "ex" / "model.onnx").is_file()


def test_a_port_a_server_has_just_left_is_free_and_one_listened_on_is_not():
    """kiln serve checks its ports before starting: a port whose last connection the server closed (left
    in TIME_WAIT for a minute) can be served again at once, as servers bind with SO_REUSEADDR."""
    import socket

    from kiln.optimizer.cluster_cli import _check_port
    from kiln.optimizer.errors import InputError

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton's and Ray's servers bind
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            _check_port("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server closes first: its side of the connection waits in TIME_WAIT
        client.close()
    _check_port("127.0.0.1", port)
