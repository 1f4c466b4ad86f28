"""kiln.optimizer.run: an OUTDIR's engine opened for `kiln run`, `kiln bench` and the serving commands,
with every engine problem turned into a bad-input error (exit 2) that keeps its hint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kiln.optimizer.cli import main
from kiln.optimizer.errors import EXIT_BAD_INPUT, InputError
from kiln.optimizer.run import engine_dir, open_engine, run_engine


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert main(["example", "block", str(root / "ex")]) == 0
    assert main(["optimize", str(root / "ex" / "model.onnx"), "-o", str(root / "out"), "--bench-runs", "0"]) == 0
    return root / "out"


def test_an_outdir_or_its_engine_dir_opens_the_same_engine(outdir):
    assert engine_dir(outdir) == engine_dir(outdir / "engine") == outdir / "engine"
    first, second = open_engine(outdir), open_engine(outdir / "engine")
    assert first.config == second.config and first.config.target == "cpu"


def test_run_engine_writes_the_outputs_and_warns_off_the_profile(outdir, tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 8, 64)).astype(np.float32)  # batch 5: the profile stops at 4
    np.savez(tmp_path / "in.npz", x=x)
    results, warnings = run_engine(outdir, tmp_path / "in.npz", tmp_path / "sub" / "out.npz")
    assert warnings == ["x axis 0 (batch) is 5, outside the profile 1..4; the engine was not verified at this shape"]
    with np.load(tmp_path / "sub" / "out.npz") as saved:
        np.testing.assert_array_equal(saved["y"], results["y"])
    assert results["y"].shape == (5, 8, 64)


def test_engine_problems_are_bad_input(outdir, tmp_path):
    with pytest.raises(InputError, match="no such directory") as info:
        open_engine(tmp_path / "missing")
    assert info.value.exit_code == EXIT_BAD_INPUT
    with pytest.raises(InputError, match="engine.json is missing") as info:
        open_engine(tmp_path)
    assert info.value.hint == "pass the OUTDIR that `kiln optimize -o` wrote"
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 8, 65), np.float32))
    with pytest.raises(InputError, match=r"input 'x' has shape \[1, 8, 65\], the engine takes \['batch', 'seq', 64\]"):
        run_engine(outdir, tmp_path / "in.npz", tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_an_engine_of_an_older_format_says_rebuild(outdir, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(outdir, old)
    manifest = old / "engine" / "engine.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 1}))
    assert main(["bench", str(old), "--runs", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "has engine format version 1, this kiln reads versions 2 and 3" in err
    assert "hint: rebuild the engine with this kiln (`kiln optimize`)" in err


def test_bad_inputs_and_outputs_for_kiln_run(outdir, tmp_path, capsys):
    np.savez(tmp_path / "nan.npz", x=np.full((1, 8, 64), np.nan, np.float32))
    np.savez(tmp_path / "ok.npz", x=np.zeros((1, 8, 64), np.float32))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    cases = [
        (["--inputs", tmp_path / "nan.npz", "--output", tmp_path / "o.npz"], f"{tmp_path / 'nan.npz'}: array 'x' holds 512 NaN or infinite value(s)"),
        (["--inputs", tmp_path / "ok.npz", "--output", tmp_path / "taken"], f"--output {tmp_path / 'taken'} is a directory"),
        (["--inputs", tmp_path / "ok.npz", "--output", "/proc/kiln/o.npz"], "cannot write /proc/kiln/o.npz"),
        (["--inputs", tmp_path / "ok.npz", "--output", "/proc/o.npz"], "cannot write /proc/o.npz"),
        (["--inputs", tmp_path / "empty.npz", "--output", tmp_path / "o.npz"],
         f"{tmp_path / 'empty.npz'}: input 'x' has shape [0, 8, 64], which holds no elements"),
        (["--inputs", tmp_path / "ok.npz", "--output", tmp_path / "link.npz"], f"output {tmp_path / 'link.npz'} is a symbolic link"),
    ]
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8, 64), np.float32))
    (tmp_path / "link.npz").symlink_to(tmp_path / "taken" / "mine.txt")
    for args, message in cases:
        assert main(["run", str(outdir), *map(str, args)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"kiln: error: {message}") and "Traceback" not in err, err
    assert not (tmp_path / "o.npz").exists()
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_an_engine_that_failed_verification_says_so_when_run(outdir, tmp_path, capsys):
    failed = tmp_path / "failed"
    shutil.copytree(outdir, failed)
    report = json.loads((failed / "report.json").read_text())
    (failed / "report.json").write_text(json.dumps({**report, "status": "verification-failed"}))
    np.savez(tmp_path / "ok.npz", x=np.zeros((1, 8, 64), np.float32))
    for engine in (failed, failed / "engine"):
        assert main(["run", str(engine), "--inputs", str(tmp_path / "ok.npz"), "--output", str(tmp_path / "o.npz"), "-q"]) == 0
        assert capsys.readouterr().err == (f"kiln: warning: this engine failed verification when it was built, so its outputs "
                                           f"may be wrong; see {failed / 'report.md'}\n")  # fmt: skip
    assert main(["bench", str(failed), "--runs", "1", "-q"]) == 0
    assert "failed verification when it was built" in capsys.readouterr().err
