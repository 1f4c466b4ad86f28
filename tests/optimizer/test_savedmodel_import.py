"""TensorFlow SavedModel import through the CLI: `kiln example film`, `kiln optimize` on the SavedModel (tf2onnx in a
subprocess, output pruning, layout, alignment), `kiln run` against TensorFlow run the FILM authors' way, and every bad
input's message.

tf2onnx takes ~20 s on the small FILM, so it runs for real once per module (in `built`) and once more for each
case that must fail inside it; the other optimize runs replay that conversion's output (same SavedModel, signature
and opset, so the same ONNX file), which keeps this module fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import kiln.optimizer.lazy  # noqa: E402
from kiln.optimizer.examples import film_net as F  # noqa: E402
from kiln.optimizer.cli import main  # noqa: E402
from kiln.optimizer.importers import savedmodel  # noqa: E402

ALIGN = 64  # what kiln pads FILM to, as the FILM authors' tools do
SHAPES = ["--shapes", "height=64..128", "--shapes", "width=64..192"]
RULE = (
    "height and width of x0, x1 must be multiples of 64; kiln's engine pads other sizes with zeros (centred) "
    "up to the next multiple and crops the outputs back"
)
TOL = 1e-4


# --------------------------------------------------------------------------------------------- helpers


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args] + ["-q"])  # progress off: stderr holds only warnings and errors
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(capsys, fragment: str, *args) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert err.startswith("kiln: error: ")
    return err


def frames(batch: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = rng.random((batch, height, width, 3), dtype=np.float32)
    x1 = np.clip(np.roll(x0, shift=(2, -3), axis=(1, 2)) * 1.1, 0, 1).astype(np.float32)
    return {"x0": x0, "x1": x1, "time": np.full((batch, 1), 0.5, np.float32)}


def authors_padding(height: int, width: int, align: int = ALIGN) -> dict[str, int]:
    """The box FILM's own tools pad to with tf.image.pad_to_bounding_box (and crop back from)."""
    height_to_pad = (align - height % align) if height % align else 0
    width_to_pad = (align - width % align) if width % align else 0
    return {"offset_height": height_to_pad // 2, "offset_width": width_to_pad // 2,
            "target_height": height + height_to_pad, "target_width": width + width_to_pad}  # fmt: skip


def tf_interpolate(loaded, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The SavedModel's image the way the FILM authors run it: zero-pad centred to a multiple of 64, run, crop."""
    height, width = feeds["x0"].shape[1:3]
    box = authors_padding(height, width)
    x0 = tf.image.pad_to_bounding_box(tf.constant(feeds["x0"]), **box)
    x1 = tf.image.pad_to_bounding_box(tf.constant(feeds["x1"]), **box)
    out = loaded.signatures["serving_default"](x0=x0, x1=x1, time=tf.constant(feeds["time"]))
    image = tf.image.crop_to_bounding_box(out["image"], box["offset_height"], box["offset_width"], height, width)
    return image.numpy()


def kiln_run(capsys, outdir: Path, feeds: dict, tmp_path: Path) -> tuple[dict[str, np.ndarray], dict]:
    np.savez(tmp_path / "in.npz", **feeds)
    code, out, err = run_cli(capsys, "run", outdir, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz", "--json")
    assert code == 0, err
    with np.load(tmp_path / "out.npz") as data:
        return {k: data[k] for k in data.files}, json.loads(out)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def film_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("film") / "film"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["example", "film", str(directory)]) == 0
    assert f"wrote {directory}" in out.getvalue()
    assert savedmodel.is_saved_model(directory)
    return directory


@pytest.fixture(scope="module")
def tf_model(film_dir):
    return F.load_saved_model(film_dir)


@pytest.fixture(scope="module")
def built(film_dir, tmp_path_factory) -> dict:
    """`kiln optimize` on the SavedModel with a real tf2onnx run, whose ONNX output is kept for `replay`."""
    root = tmp_path_factory.mktemp("built")
    cache = root / "tf2onnx.onnx"
    real = savedmodel.convert
    calls = []

    def recording(directory, output, signature, opset, timeout):
        real(directory, output, signature, opset, timeout)
        calls.append((Path(directory), signature, opset))
        shutil.copyfile(output, cache)

    out = root / "out"
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as stdout:
        mp.setattr(savedmodel, "convert", recording)
        code = main(["optimize", str(film_dir), "-o", str(out), *SHAPES, "--bench-runs", "1", "--json"])
    assert code == 0
    assert calls == [(film_dir, "serving_default", 17)]
    return {"out": out, "report": json.loads(stdout.getvalue()), "cache": cache, "film": film_dir}


@pytest.fixture
def replay(built, monkeypatch):
    """Later optimize runs get the recorded conversion instead of running tf2onnx again."""

    def replayed(directory, output, signature, opset, timeout):
        assert (Path(directory), signature, opset) == (built["film"], "serving_default", 17), "not the recorded conversion"
        shutil.copyfile(built["cache"], output)

    monkeypatch.setattr(savedmodel, "convert", replayed)


# --------------------------------------------------------------------------------------------- optimize


def test_optimize_film_report(built):
    report, out = built["report"], built["out"]
    assert report == json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    source = report["source"]
    assert source["format"] == "tf-savedmodel"
    assert source["outputs_kept"] == ["image"]
    assert (source["signature"], source["opset"], source["layout"]) == ("serving_default", 17, "nhwc")
    assert source["hash"] == savedmodel.hash_directory(built["film"])
    assert source["converted_nodes"] > source["nodes"]  # pruning dropped what fed only the other outputs

    warp = report["passes"][0]
    assert warp["name"] == "warp-to-gridsample"  # fusions see the graph as tf2onnx wrote it
    assert warp["stats"] == {"warps_rewritten": 16, "warps_left": 0}
    assert warp["warnings"] == [] and warp["modified"] is True
    assert report["model"]["op_counts"]["GridSample"] == 16

    assert [(i["name"], i["shape"]) for i in report["inputs"]] == [
        ("time", ["batch", 1]), ("x0", ["batch", "height", "width", 3]), ("x1", ["batch", "height", "width", 3])
    ]  # fmt: skip
    ((name, shape),) = [(o["name"], o["shape"]) for o in report["outputs"]]
    assert name == "image" and len(shape) == 4 and shape[3] == 3 and all(isinstance(d, str) for d in shape[:3])
    alignment = report["alignment"]
    assert alignment["multiple"] == 64
    assert alignment["inputs"] == {"x0": [1, 2], "x1": [1, 2]} and alignment["outputs"] == {"image": [1, 2]}
    assert alignment["rule"] == RULE
    assert f"alignment: {RULE}" in report["notes"]
    assert RULE in (out / "report.md").read_text()

    dims = report["profile"]["dims"]
    assert dims["height"] == {"min": 64, "opt": 64, "max": 128}
    assert dims["width"] == {"min": 64, "opt": 128, "max": 192}
    assert dims["batch"] == {"min": 1, "opt": 1, "max": 2}  # the importer's default for FILM
    verification = report["verification"]
    checks = verification["shapes"]
    # opt and the 2^3 corners of batch, height and width, then opt off the alignment.
    assert [c["corner"] for c in checks][:3] == ["min", "opt", "max"] and checks[-1]["corner"] == "opt, padded"
    assert len(checks) == 10 and {tuple(c["shapes"]["x0"]) for c in checks[3:-1]} == {
        (b, h, w, 3) for b in (1, 2) for h in (64, 128) for w in (64, 192)} - {(1, 64, 64, 3), (2, 128, 192, 3)}  # fmt: skip
    assert checks[2]["shapes"]["x0"] == [2, 128, 192, 3]
    padded = checks[-1]["shapes"]["x0"]
    assert padded[1] % 64 and padded[2] % 64  # the engine had to pad
    assert verification["passed"] is True
    assert all(c["passed"] and c["error"] is None and c["outputs"]["image"]["max_abs"] <= TOL for c in checks)


@pytest.mark.parametrize("batch, height, width", [(1, 51, 77), (2, 64, 101)])  # odd padding: 13 / 51, 0 / 27
def test_run_pads_like_the_film_authors(capsys, built, tf_model, tmp_path, batch, height, width):
    assert height % ALIGN or width % ALIGN
    feeds = frames(batch, height, width, seed=height + width)
    got, summary = kiln_run(capsys, built["out"], feeds, tmp_path)
    assert list(got) == ["image"]
    assert summary["outputs"] == {"image": {"dtype": "float32", "shape": [batch, height, width, 3]}}
    assert summary["warnings"] == []  # padded to 64×128 / 64×128: inside the verified profile
    want = tf_interpolate(tf_model, feeds)
    assert want.shape == (batch, height, width, 3)
    assert max_abs(got["image"], want) <= TOL


def test_run_at_an_aligned_size_matches_tensorflow_directly(capsys, built, film_dir, tf_model, tmp_path):
    feeds = frames(2, 64, 128, seed=3)
    got, summary = kiln_run(capsys, built["out"], feeds, tmp_path)
    assert summary["warnings"] == []
    want = F.reference_interpolate(film_dir, feeds["x0"], feeds["x1"], feeds["time"], model=tf_model)["image"]
    assert max_abs(got["image"], want) <= TOL


def test_outputs_option_keeps_two_outputs(capsys, replay, built, tf_model, tmp_path):
    code, out, err = run_cli(capsys, "optimize", built["film"], "-o", tmp_path / "o", "--outputs", "image,x0_warped",
                             "--shapes", "height=64", "--shapes", "width=64..128", "--bench-runs", "0", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["source"]["outputs_kept"] == ["image", "x0_warped"]
    assert [o["name"] for o in report["outputs"]] == ["image", "x0_warped"]
    assert report["alignment"]["outputs"] == {"image": [1, 2], "x0_warped": [1, 2]}
    assert report["model"]["op_counts"]["GridSample"] == 16
    assert all(c["passed"] and set(c["outputs"]) == {"image", "x0_warped"} for c in report["verification"]["shapes"])
    # Both outputs are cropped back, and both match TensorFlow.
    feeds = frames(1, 61, 90, seed=5)
    got, _ = kiln_run(capsys, tmp_path / "o", feeds, tmp_path)
    assert sorted(got) == ["image", "x0_warped"]
    box = authors_padding(61, 90)
    padded = {k: tf.image.pad_to_bounding_box(tf.constant(feeds[k]), **box) for k in ("x0", "x1")}
    want = tf_model.signatures["serving_default"](**padded, time=tf.constant(feeds["time"]))
    for name in got:
        crop = tf.image.crop_to_bounding_box(want[name], box["offset_height"], box["offset_width"], 61, 90).numpy()
        assert max_abs(got[name], crop) <= TOL, name


def test_unknown_output_is_refused_with_the_list(capsys, replay, built, tmp_path):
    err = assert_bad_input(capsys, "the signature has no output(s) nope", "optimize", built["film"], "-o", tmp_path / "o", "--outputs", "nope")
    hint = err.split("hint: its outputs: ", 1)[1]
    assert set(hint.strip().split(", ")) == set(F.output_names(F.FilmConfig.small()))
    assert not (tmp_path / "o").exists()


def test_nchw_layout(capsys, replay, built, tf_model, tmp_path):
    out = tmp_path / "o"
    code, stdout, err = run_cli(capsys, "optimize", built["film"], "-o", out, "--layout", "nchw",
                                "--shapes", "height=64..128", "--shapes", "width=64..128", "--bench-runs", "0", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["source"]["layout"] == "nchw"
    shapes = {i["name"]: i["shape"] for i in report["inputs"]}
    assert shapes == {"time": ["batch", 1], "x0": ["batch", 3, "height", "width"], "x1": ["batch", 3, "height", "width"]}
    ((name, shape),) = [(o["name"], o["shape"]) for o in report["outputs"]]
    assert name == "image" and len(shape) == 4 and shape[1] == 3 and all(isinstance(d, str) for d in (shape[0], *shape[2:]))
    assert report["alignment"]["inputs"] == {"x0": [2, 3], "x1": [2, 3]}
    assert report["alignment"]["outputs"] == {"image": [2, 3]}
    assert report["model"]["op_counts"]["GridSample"] == 16
    assert all(c["passed"] for c in report["verification"]["shapes"])

    nhwc = frames(2, 60, 91, seed=11)
    feeds = {"x0": nhwc["x0"].transpose(0, 3, 1, 2).copy(), "x1": nhwc["x1"].transpose(0, 3, 1, 2).copy(), "time": nhwc["time"]}
    got, _ = kiln_run(capsys, out, feeds, tmp_path)
    assert got["image"].shape == (2, 3, 60, 91)
    assert max_abs(got["image"], tf_interpolate(tf_model, nhwc).transpose(0, 3, 1, 2)) <= TOL


# --------------------------------------------------------------------------------------------- bad input


def test_garbage_saved_model(capsys, tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"this is not a protobuf")
    err = assert_bad_input(capsys, "tf2onnx could not convert the SavedModel", "optimize", tmp_path / "sm", "-o", tmp_path / "o")
    assert "saved_model.pb" in err and "hint: check the SavedModel loads in TensorFlow" in err
    assert not (tmp_path / "o").exists()


def test_unknown_signature(capsys, film_dir, tmp_path):
    err = assert_bad_input(capsys, "Specified signature not in model nope", "optimize", film_dir, "-o", tmp_path / "o", "--signature", "nope")
    assert f"tf2onnx could not convert the SavedModel {film_dir}" in err
    assert "--signature" in err


def test_import_timeout(capsys, film_dir, tmp_path):
    err = assert_bad_input(capsys, "took longer than 0.5 s and was stopped", "optimize", film_dir, "-o", tmp_path / "o", "--import-timeout", "0.5")
    assert "hint: raise the limit with --import-timeout" in err


@pytest.mark.parametrize("missing", ["tensorflow", "tf2onnx"])
def test_missing_framework_names_the_extra(capsys, monkeypatch, film_dir, tmp_path, missing):
    real = kiln.optimizer.lazy.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == missing else real(name, *args, **kwargs)

    monkeypatch.setattr(kiln.optimizer.lazy.importlib.util, "find_spec", find_spec)
    err = assert_bad_input(capsys, f"importing the SavedModel {film_dir} needs {missing}, which is not installed",
                           "optimize", film_dir, "-o", tmp_path / "o")  # fmt: skip
    assert "hint: pip install 'kiln-ml[tf]'" in err
    if missing == "tensorflow":
        err = assert_bad_input(capsys, "the film example needs tensorflow, which is not installed", "example", "film", tmp_path / "ex")
        assert "hint: pip install 'kiln-ml[tf]'" in err
        assert not (tmp_path / "ex").exists()


def test_spatial_range_off_the_alignment(capsys, replay, built, tmp_path):
    err = assert_bad_input(capsys, "the profile: height 50..75..100 holds 50, not a multiple of 64, which the engine pads it to",
                           "optimize", built["film"], "-o", tmp_path / "o", "--shapes", "height=50..100")  # fmt: skip
    assert "--shapes height=64..128" in err


def test_example_film_refuses_to_overwrite(capsys, film_dir):
    before = sorted(p.relative_to(film_dir) for p in film_dir.rglob("*"))
    err = assert_bad_input(capsys, "already exists", "example", "film", film_dir)
    assert "--force" in err
    assert sorted(p.relative_to(film_dir) for p in film_dir.rglob("*")) == before
