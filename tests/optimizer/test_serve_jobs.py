"""`kiln interpolate` and `kiln decode` end to end, on engines `kiln optimize` built from the small FILM
SavedModel and the tiny AutoencoderKL: frame counts and order, pixels against the engine run directly,
video in and out, and one clear message per kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from kiln.optimizer.cli import main

cv2 = pytest.importorskip("cv2")

H, W = 40, 56  # not a multiple of FILM's alignment: the engine pads and crops


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args] + ["-q"])  # progress off: stderr holds only warnings and errors
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quiet(*args) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in args])


def write_frames(folder: Path, count: int) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    frames = []
    for i in range(count):
        image = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"in_{i:03d}.png"), image[:, :, ::-1])
        frames.append(image.astype(np.float32) / 255.0)
    return frames


def read_rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path))[:, :, ::-1]


def test_interpolate_a_folder_by_4(capsys, film_engine, tmp_path):
    from kiln.optimizer.run import open_engine as load_engine
    from kiln.optimizer.serve.backends import HostBackend
    from kiln.optimizer.serve.jobs import FilmInterpolator

    frames = write_frames(tmp_path / "in", 3)
    code, out, err = run_cli(capsys, "interpolate", film_engine, tmp_path / "in", "-o", tmp_path / "out", "--factor", "4", "--json", "--report", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads(out)
    assert result["frames"] == result["expected_frames"] == 9 == (3 - 1) * 4 + 1
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert sorted(os.listdir(tmp_path / "out")) == [f"frame_{i:06d}.png" for i in range(9)]
    # Inputs land at 0, 4 and 8; in-betweens are the engine's recursive mid-points, in order.
    for i, k in ((0, 0), (1, 4), (2, 8)):
        np.testing.assert_array_equal(read_rgb(tmp_path / "out" / f"frame_{k:06d}.png"), np.round(frames[i] * 255).astype(np.uint8))
    film = FilmInterpolator(HostBackend(load_engine(film_engine)), 4)
    expected = film.between(frames[0], frames[1], 2)
    for k, want in enumerate(expected, start=1):
        got = read_rgb(tmp_path / "out" / f"frame_{k:06d}.png").astype(np.int16)
        assert np.abs(got - np.clip(want * 255 + 0.5, 0, 255).astype(np.int16)).max() <= 1


def test_serial_and_overlapped_interpolation_write_the_same_frames(film_engine, tmp_path):
    write_frames(tmp_path / "in", 4)
    assert quiet("interpolate", film_engine, tmp_path / "in", "-o", tmp_path / "a", "--workers", "3") == 0
    assert quiet("interpolate", film_engine, tmp_path / "in", "-o", tmp_path / "b", "--serial", "--format", "png") == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert len(names) == 7 and names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_interpolate_video_to_video(capsys, film_engine, tmp_path):
    source = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (W, H))
    for frame in write_frames(tmp_path / "frames", 5):
        writer.write((frame[:, :, ::-1] * 255).astype(np.uint8))
    writer.release()
    code, out, err = run_cli(capsys, "interpolate", film_engine, source, "-o", tmp_path / "smooth.avi", "--json")
    assert code == 0, err
    capture = cv2.VideoCapture(str(tmp_path / "smooth.avi"))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == json.loads(out)["frames"] == 9
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(20.0)
    assert not [p for p in os.listdir(tmp_path) if "kiln-tmp" in p]


def test_interpolate_bad_input(capsys, film_engine, vae_engine, tmp_path):
    write_frames(tmp_path / "in", 3)

    def bad(fragment, *args):
        code, _, err = run_cli(capsys, "interpolate", *args)
        assert code == 2 and fragment in err and "Traceback" not in err, err
        return err

    bad("--factor must be a power of two (2, 4, 8, ...), got 3", film_engine, tmp_path / "in", "-o", tmp_path / "o", "--factor", "3")
    bad(f"{vae_engine / 'engine'}: the engine takes ['latent_sample'], not a FILM interpolator's x0, x1 and time", vae_engine, tmp_path / "in", "-o", tmp_path / "o")
    bad("not a folder of frames or a video file", film_engine, tmp_path / "nope.txt", "-o", tmp_path / "o")
    (tmp_path / "one").mkdir()
    cv2.imwrite(str(tmp_path / "one" / "a.png"), np.zeros((H, W, 3), np.uint8))
    bad(f"{tmp_path / 'one'} has one frame; interpolation needs at least two", film_engine, tmp_path / "one", "-o", tmp_path / "o")
    (tmp_path / "two").mkdir()
    cv2.imwrite(str(tmp_path / "two" / "a.png"), np.zeros((H, W, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "two" / "b.png"), np.zeros((H + 8, W, 3), np.uint8))
    bad(f"{tmp_path / 'two'}: frame 1 is {W}x{H + 8}, frame 0 is {W}x{H}", film_engine, tmp_path / "two", "-o", tmp_path / "o")
    cv2.imwrite(str(tmp_path / "in" / "in_009.png"), np.zeros((H + 2, W, 3), np.uint8))
    bad(f"{tmp_path / 'in'}: frame 3 is {W}x{H + 2}, frame 2 is {W}x{H}", film_engine, tmp_path / "in", "-o", tmp_path / "sizes")
    (tmp_path / "in" / "in_009.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    err = bad(f"{tmp_path / 'in' / 'in_009.png'}: cannot be decoded as an image (corrupt or truncated?)", film_engine, tmp_path / "in", "-o", tmp_path / "o")
    assert "the read stage failed" in err
    # Everything the readable frames give is out, whole: inputs 0-2 at 0, 2, 4 and the in-betweens 1, 3.
    assert sorted(os.listdir(tmp_path / "o")) == [f"frame_{i:06d}.png" for i in range(5)]
    (tmp_path / "in" / "in_009.png").unlink()
    bad("exists and is not empty", film_engine, tmp_path / "in", "-o", tmp_path / "o")
    assert quiet("interpolate", film_engine, tmp_path / "in", "-o", tmp_path / "o", "--force") == 0
    assert len(os.listdir(tmp_path / "o")) == 5


def test_decode_latents_in_chunks(capsys, vae_engine, tmp_path):
    from kiln.optimizer.run import open_engine as load_engine

    latents = np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "z.npy", latents)
    code, out, err = run_cli(capsys, "decode", vae_engine, tmp_path / "z.npy", "-o", tmp_path / "frames", "--chunk", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["frames"] == 5
    assert sorted(os.listdir(tmp_path / "frames")) == [f"frame_{i:06d}.png" for i in range(5)]
    want = load_engine(vae_engine).run({"latent_sample": latents[3:4]})["sample"][0]
    want = np.clip((np.transpose(want, (1, 2, 0)) + 1) / 2 * 255 + 0.5, 0, 255).astype(np.int16)
    assert np.abs(read_rgb(tmp_path / "frames" / "frame_000003.png").astype(np.int16) - want).max() <= 1

    np.save(tmp_path / "nan.npy", np.full((2, 4, 8, 8), np.nan, np.float32))
    code, _, err = run_cli(capsys, "decode", vae_engine, tmp_path / "nan.npy", "-o", tmp_path / "n")
    assert code == 2 and "holds NaN or infinite values" in err
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    code, _, err = run_cli(capsys, "decode", vae_engine, tmp_path / "wrong.npy", "-o", tmp_path / "w")
    assert code == 2 and "holds shape [2, 3, 8, 8]; the decoder takes [frames, 4, height, width]" in err
    code, _, err = run_cli(capsys, "decode", vae_engine, tmp_path / "z.npy", "-o", tmp_path / "c", "--chunk", "0")
    assert code == 2 and "--chunk must be at least 1, got 0" in err


def test_decode_bad_input_is_one_message(capsys, vae_engine, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 8, 8), np.float32))
    np.savez(tmp_path / "z.npz", a=np.zeros((2, 4, 8, 8), np.float32))
    np.save(tmp_path / "int.npy", np.zeros((2, 4, 8, 8), np.int64))
    np.save(tmp_path / "z.npy", np.zeros((2, 4, 8, 8), np.float32))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        ("empty.npy", "o", f"{tmp_path / 'empty.npy'} holds shape [0, 4, 8, 8], no latents to decode"),
        ("z.npz", "o", f"{tmp_path / 'z.npz'} is an .npz archive (of a); decode takes one array in an .npy file"),
        ("int.npy", "o", f"{tmp_path / 'int.npy'} holds int64 values; latents are floating point"),
        ("pickled.npy", "o", f"{tmp_path / 'pickled.npy'}: not a readable .npy array"),
        ("z.npy", "/proc/dd", "cannot write /proc/dd: No such file or directory"),
        ("z.npy", "o.gif", f"{tmp_path / 'o.gif'}: kiln writes videos as .mp4, .avi, .mov, .mkv and frames into a folder, not .gif files"),
    ]
    for latents, output, message in cases:
        code, out, err = run_cli(capsys, "decode", vae_engine, tmp_path / latents, "-o", tmp_path / output)
        assert code == 2 and err.startswith(f"kiln: error: {message}") and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.npy", "int.npy", "pickled.npy", "z.npy", "z.npz"]


def test_decode_stays_in_the_profile_or_says_it_does_not(capsys, vae_engine, tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((9, 4, 8, 8), np.float32))
    code, out, err = run_cli(capsys, "decode", vae_engine, tmp_path / "z.npy", "-o", tmp_path / "a", "--json")
    assert code == 0 and err == "" and json.loads(out)["chunk"] == 4  # the engine's batch max, not 8
    code, out, err = run_cli(capsys, "decode", vae_engine, tmp_path / "z.npy", "-o", tmp_path / "b", "--chunk", "8", "--json")
    assert code == 0 and err == ("kiln: warning: latent_sample axis 0 (batch) is 8, outside the profile 1..4; "
                                 "the engine was not verified at this shape\n")  # fmt: skip
    assert json.loads(out)["warnings"] == [err.removeprefix("kiln: warning: ").strip()]
    np.save(tmp_path / "big.npy", np.zeros((2, 4, 16, 8), np.float32))
    code, out, err = run_cli(capsys, "decode", vae_engine, tmp_path / "big.npy", "-o", tmp_path / "c")
    assert code == 0 and "latent_sample axis 2 (height) is 16, outside the profile 8..8" in err


def test_decode_with_a_static_batch_fills_the_last_chunk(capsys, tmp_path):
    """An engine built for batch 2 decodes 5 latents as 2 + 2 + (1 and a copy), and writes exactly 5."""
    from kiln.optimizer.run import open_engine as load_engine

    pytest.importorskip("diffusers")
    assert quiet("example", "vae", tmp_path / "vae") == 0
    engine = tmp_path / "engine"
    assert quiet("optimize", tmp_path / "vae", "-o", engine, "--shapes", "batch=2", "--shapes", "height=8", "--shapes", "width=8", "--bench-runs", "0") == 0
    latents = np.random.default_rng(1).standard_normal((5, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "z.npy", latents)
    code, out, err = run_cli(capsys, "decode", engine, tmp_path / "z.npy", "-o", tmp_path / "frames", "--json")
    assert code == 0, err
    assert json.loads(out)["chunk"] == 2
    assert sorted(os.listdir(tmp_path / "frames")) == [f"frame_{i:06d}.png" for i in range(5)]
    want = load_engine(engine).run({"latent_sample": latents[3:5]})["sample"][1]  # the last frame, in a full batch
    want = np.clip((np.transpose(want, (1, 2, 0)) + 1) / 2 * 255 + 0.5, 0, 255).astype(np.int16)
    assert np.abs(read_rgb(tmp_path / "frames" / "frame_000004.png").astype(np.int16) - want).max() <= 1
    code, _, err = run_cli(capsys, "decode", engine, tmp_path / "z.npy", "-o", tmp_path / "x", "--chunk", "3")
    assert code == 2 and "this engine decodes exactly 2 frame(s) per run (its profile is static), not --chunk 3" in err


def test_a_cuda_engine_without_a_gpu_is_one_clear_error(capsys, vae_engine, tmp_path):
    """The engine's manifest picks the GPU backend; without a CUDA device it says so and exits 2."""
    import shutil

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    copy = tmp_path / "engine"
    shutil.copytree(vae_engine, copy)
    manifest_path = copy / "engine" / "engine.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(target="cuda", device="cuda")
    manifest_path.write_text(json.dumps(manifest))
    np.save(tmp_path / "z.npy", np.zeros((2, 4, 8, 8), np.float32))
    code, _, err = run_cli(capsys, "decode", copy, tmp_path / "z.npy", "-o", tmp_path / "frames")
    assert code == 2 and "Traceback" not in err
    assert f"the engine in {copy / 'engine'} runs on CUDA, and torch here sees no CUDA device" in err
    assert not (tmp_path / "frames").exists()


def test_auto_workers_keep_up_with_compute():
    from kiln.optimizer.serve.jobs import ENCODE_MARGIN, auto_workers

    cores = os.cpu_count()
    assert auto_workers(None, 0.04) == 2  # a video: one encoder, one converter
    assert auto_workers(0.001, 1.0) == 2  # encoding is cheap: one worker and one spare
    # A 1080p PNG (250 ms on one core) against FILM's 42 ms of compute per output frame.
    assert auto_workers(0.25, 0.042) == min(cores, math.ceil(ENCODE_MARGIN * 0.25 / 0.042) + 1)
    assert auto_workers(10.0, 0.001) == cores
