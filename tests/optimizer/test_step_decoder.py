"""Video VAE decoders as step functions (`kiln optimize --video-decoder step`: Wan 2.1's, CogVideoX's), at the tiny
configurations of diffusers' own test suite: the graph's caches as inputs and outputs, the import's chunk-after-
chunk check against diffusers' decode, `kiln decode` through the frame pipeline against diffusers' decode at two
frame counts each, and one clear message for each kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from kiln.optimizer.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
cv2 = pytest.importorskip("cv2")

import diffusers_suite as suite  # noqa: E402

from kiln.optimizer.importers.step_decoders import STEP_METADATA_KEY, chunks, fold, unfold  # noqa: E402

CASES = {case.class_name: case for case in suite.VAES}
WAN = CASES["AutoencoderKLWan"]
SHAPES = ["--shapes", "batch=1..1..2", "--shapes", "height=4..6..8", "--shapes", "width=4..6..8"]
# Each family's step: latent frames in (a dim for CogVideoX: 2 a step, 1 or 3 on a clip's first), frames out by
# latent frames in, the first step's frames that are the clip's (None: all), and its caches.
LAYOUTS = {
    "AutoencoderKLWan": (1, {"1": 4}, 1, 24),
    "AutoencoderKLCogVideoX": ("frames", {"1": 1, "2": 8, "3": 9}, None, 22),
}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args] + ["-q"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each family's tiny model directory and the step engine `kiln optimize` built from it (cpu target), built
    when first asked for."""
    from kiln.optimizer.examples.tiny_diffusers import write_model

    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            work = tmp_path_factory.mktemp(name)
            model = write_model(name, work / "model", config=CASES[name].config)
            engine = work / "engine"
            with contextlib.redirect_stdout(io.StringIO()):  # not into a test's captured output, whichever asks first
                code = main(["optimize", str(model), "-o", str(engine), "--video-decoder", "step", *SHAPES, "--bench-runs", "0", "-q"])
            assert code == 0
            built[name] = model, engine
        return built[name]

    return get


def diffusers_decode(name: str, model_dir: Path, latents: np.ndarray) -> np.ndarray:
    import diffusers

    model = getattr(diffusers, name).from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents)).sample.numpy()


def test_fold_is_a_lossless_relayout():
    cache = torch.randn(2, 3, 2, 12, 8)
    folded = fold(cache, 4)
    assert folded.shape == (2, 48, 2, 3, 2)
    assert torch.equal(unfold(folded, 4), cache)
    assert torch.equal(folded[:, :16].reshape(2, 4, 4, 2, 3, 2)[:, 1, 2, :, 0, 1], cache[:, 0, :, 1, 6])


def test_chunks_follow_diffusers_split():
    assert chunks(13, 2) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]  # CogVideoX's 13 latent frames
    assert chunks(4, 2) == [(0, 2), (2, 4)] and chunks(1, 2) == [(0, 1)] and chunks(3, 1) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_step_graph_takes_and_gives_its_caches(engines, name):
    _, engine = engines(name)
    model = onnx.load(engine / "model.onnx", load_external_data=False)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    layout = json.loads({p.key: p.value for p in model.metadata_props}[STEP_METADATA_KEY])
    frames, frames_out, first_frames, caches = LAYOUTS[name]
    assert (layout["frames_out"], layout["first_frames"], len(layout["inputs"])) == (frames_out, first_frames, caches)
    assert layout["outputs"] == [f"cache_out_{k:02d}" for k in range(caches)]
    channels = CASES[name].config.get("z_dim") or CASES[name].config["latent_channels"]
    assert list(inputs)[:2] == ["latent_sample", "first"] and inputs["first"] == [1]
    assert inputs["latent_sample"] == ["batch", channels, frames, "height", "width"]
    assert outputs["sample"][:2] == ["batch", 3] and outputs["sample"][3:] == ["8*height", "8*width"]
    for k in range(caches):  # every cache shares the latent's dims, its upsampled pixels folded into channels
        got, given = inputs[f"cache_in_{k:02d}"], outputs[f"cache_out_{k:02d}"]
        assert got == given and got[0] == "batch" and got[2:] == [2, "height", "width"], (k, got, given)
    checks = json.loads((engine / "report.json").read_text())["source"]["decode_check"]
    counts = [2 * layout["latent_frames"], 2 * layout["latent_frames"] + 1]  # two steps or more, with a remainder
    assert [c["frames"] for c in checks] == counts and all(c["max_abs"] <= c["limit"] for c in checks), checks


@pytest.mark.parametrize("name, frames", [("AutoencoderKLWan", 2), ("AutoencoderKLWan", 5),
                                          ("AutoencoderKLCogVideoX", 4), ("AutoencoderKLCogVideoX", 7)])  # fmt: skip
def test_kiln_decode_matches_diffusers_decode(capsys, engines, tmp_path, name, frames):
    model, engine = engines(name)
    channels = CASES[name].config.get("z_dim") or CASES[name].config["latent_channels"]
    latents = np.random.default_rng(frames).standard_normal((1, channels, frames, 6, 7)).astype(np.float32)
    np.save(tmp_path / "z.npy", latents)
    code, out, err = run_cli(capsys, "decode", engine, tmp_path / "z.npy", "-o", tmp_path / "frames", "--json")
    assert code == 0, err
    want = diffusers_decode(name, model, latents)[0]  # [3, count, 48, 56]
    count = want.shape[1]
    assert json.loads(out)["frames"] == json.loads(out)["expected_frames"] == count
    assert sorted(os.listdir(tmp_path / "frames")) == [f"frame_{i:06d}.png" for i in range(count)]
    want = np.clip((np.transpose(want, (1, 2, 3, 0)) + 1) / 2 * 255 + 0.5, 0, 255).astype(np.int16)
    got = np.stack([cv2.imread(str(tmp_path / "frames" / f"frame_{i:06d}.png"))[:, :, ::-1] for i in range(count)])
    assert np.abs(got.astype(np.int16) - want).max() <= 1


def test_decode_bad_input_is_one_message(capsys, engines, tmp_path):
    _, engine = engines("AutoencoderKLWan")
    for name, shape, fragment in [
        ("batch2.npy", (2, 16, 3, 6, 6), "holds shape [2, 16, 3, 6, 6]; the step decoder takes one clip's latents [16, frames, height, width]"),
        ("channels.npy", (4, 3, 6, 6), "holds shape [4, 3, 6, 6]; the step decoder takes one clip's latents [16, frames, height, width]"),
    ]:  # fmt: skip
        np.save(tmp_path / name, np.zeros(shape, np.float32))
        code, _, err = run_cli(capsys, "decode", engine, tmp_path / name, "-o", tmp_path / "o")
        assert code == 2 and fragment in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()
    np.save(tmp_path / "z.npy", np.zeros((16, 2, 6, 6), np.float32))
    code, _, err = run_cli(capsys, "decode", engine, tmp_path / "z.npy", "-o", tmp_path / "o", "--chunk", "2")
    assert code == 2 and "--chunk does not apply to a step decoder: it decodes diffusers' steps, one per run" in err


def test_step_decoders_of_other_classes_are_refused(capsys, tmp_path):
    from kiln.optimizer.examples.tiny_diffusers import write_model

    vae = CASES["AutoencoderKLHunyuanVideo"]
    model = write_model(vae.class_name, tmp_path / "model", config=vae.config)
    code, _, err = run_cli(capsys, "optimize", model, "-o", tmp_path / "out", "--video-decoder", "step")
    assert code == 2 and "kiln exports a step decoder for AutoencoderKLWan, AutoencoderKLMagvit, AutoencoderKLCogVideoX, not for AutoencoderKLHunyuanVideo" in err
    wan22 = write_model(WAN.class_name, tmp_path / "wan22", config={**WAN.config, "is_residual": True})
    code, _, err = run_cli(capsys, "optimize", wan22, "-o", tmp_path / "out", "--video-decoder", "step")
    assert code == 2 and "kiln exports the step decoder of Wan 2.1's AutoencoderKLWan, not yet Wan 2.2's" in err
    (tmp_path / "recipe.toml").write_text('[import]\nvideo_decoder = "stream"\n')
    code, _, err = run_cli(capsys, "optimize", wan22, "-o", tmp_path / "out", "--config", tmp_path / "recipe.toml")
    assert code == 2 and "unknown video decoder form 'stream'" in err and "choose one of clip, step" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLMagvit"])
def test_a_first_step_reads_no_cache(name):
    """first=1 starts a clip: the caches passed in do not matter, as diffusers' loop starts from none."""
    import diffusers

    from kiln.optimizer.importers.diffusion_adapters import adapter_for

    torch.manual_seed(0)
    model = getattr(diffusers, name)(**CASES[name].config).eval()
    adapter = adapter_for(model, step=True)
    sizes = {"batch": 1, "frames": 2, "height": 4, "width": 5}
    latent = torch.randn(*(sizes[a] if isinstance(a, str) else a for a in adapter.inputs[0].axes))
    shapes = [[sizes[a] if isinstance(a, str) else a for a in rule.axes] for rule in adapter.inputs[2:]]
    with torch.no_grad():
        empty = adapter.call(model, latent, torch.ones(1, dtype=torch.int64), *[torch.zeros(s) for s in shapes])
        stale = adapter.call(model, latent, torch.ones(1, dtype=torch.int64), *[torch.randn(s) for s in shapes])
    for a, b in zip(empty, stale, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
