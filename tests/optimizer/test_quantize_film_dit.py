"""Quantization on kiln's examples: FILM through ModelOpt's INT8 Q/DQ calibrated on frame pairs, and the
trained example DiT (its data, and a short training run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli

from kiln.calibration import quality


def _frames(folder, phase: float, count: int):
    cv2 = pytest.importorskip("cv2")
    folder.mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    frames = []
    for k in range(count):
        img = np.zeros((64, 64, 3), np.float32)
        cx, cy = 14 + 2.5 * k + phase, 26 + np.cos(k / 2 + phase) * 5
        img[..., 0] = 0.5 + 0.4 * np.sin(yy / 5 + k / 4 + phase)
        img[..., 1] = ((xx - cx) ** 2 + (yy - cy) ** 2 < 120) * 0.8
        img[..., 2] = xx / 64
        cv2.imwrite(str(folder / f"{k:03d}.png"), (img[..., ::-1] * 255).astype(np.uint8))
        frames.append(img[None])
    return frames


def test_film_int8_through_modelopt_on_frame_pairs(capsys, tmp_path, film_engine, monkeypatch):
    pytest.importorskip("modelopt.onnx.quantization")
    from kiln.targets import load_engine

    cwd = tmp_path / "cwd"  # ORT's shape inference under ModelOpt saves sym_shape_infer_temp.onnx into it
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    _frames(tmp_path / "calib", 0.0, 7)
    held_out = _frames(tmp_path / "held_out", 1.3, 4)
    out = tmp_path / "int8"
    code, _, err = run_cli(capsys, "optimize", film_engine.parent / "film", "-o", out, "--shapes", "height=64", "--shapes", "width=64",
                           "--quantize", "int8", "--quant-backend", "modelopt", "--calib", tmp_path / "calib", "--bench-runs", "0")  # fmt: skip
    assert code == 0, err
    assert not list(cwd.iterdir())
    assert "Number of" not in err and "Collecting" not in err  # ModelOpt's and ORT's prints are kept out of kiln's output
    report = json.loads((out / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "quantize")
    assert record["details"]["calibration"]["source"] == f"6 frame pairs of {tmp_path / 'calib'}"
    assert (record["details"]["calibration"]["samples"], record["details"]["calibration"]["held_out"]) == (5, 1)
    assert record["stats"]["quantized"] > 50
    assert report["model"]["op_counts"]["QuantizeLinear"] > 50
    int8, fp32 = load_engine(out / "engine"), load_engine(film_engine / "engine")
    psnrs = []
    for a, b in zip(held_out, held_out[1:]):
        feeds = {"x0": a, "x1": b, "time": np.full((1, 1), 0.5, np.float32)}
        psnrs.append(quality.psnr(int8.run(feeds)["image"], fp32.run(feeds)["image"], data_range=1.0))
    assert np.mean(psnrs) > 30, psnrs  # 33 dB measured with onnxruntime 1.32 and ModelOpt 0.47 (the small FILM, random weights)


def test_trained_dit_data_is_seeded_and_its_classes_differ():
    from kiln.optimizer.examples import trained_dit

    images, labels = trained_dit.shapes(200, seed=3)
    again, _ = trained_dit.shapes(200, seed=3)
    np.testing.assert_array_equal(images, again)
    assert images.shape == (200, 4, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1 and set(labels) == set(range(10))
    # The classes are drawn differently: the mean image's spatial variance differs between classes.
    spread = [images[labels == k].std(axis=(2, 3)).mean() for k in range(10)]
    assert len({round(float(s), 3) for s in spread}) >= 8


def test_a_short_training_run_learns_and_saves(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    from kiln.optimizer.examples import trained_dit

    monkeypatch.setitem(trained_dit.TRAINING, "steps", 60)
    monkeypatch.setitem(trained_dit.TRAINING, "images", 512)
    record = trained_dit.train(tmp_path)
    assert record["final_loss"] < record["first_loss"]
    model = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert model.config.num_layers == trained_dit.CONFIG["num_layers"]
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == 60


def test_the_shipped_trained_dit_is_this_configurations_and_example_copies_it(tmp_path):
    from kiln.optimizer.cli import main
    from kiln.optimizer.examples import trained_dit

    assert trained_dit.shipped_key() == trained_dit._key()  # retrain and ship again when CONFIG or TRAINING change
    assert main(["example", "dit-trained", str(tmp_path / "dit"), "-q"]) == 0
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "training.json"):
        assert (tmp_path / "dit" / name).read_bytes() == (trained_dit.SHIPPED / name).read_bytes()
    assert not (Path(os.environ["KILN_CACHE_DIR"]) / "examples").exists()  # nothing trained
