"""Video VAE decoders exported whole-clip: Wan's frame loop (a cache carried from latent frame to latent frame)
rewritten as one decode of the whole clip computes what diffusers' loop does, for Wan 2.1 and Wan 2.2 (its
residual up blocks and patched output), at frame counts of 1 to 5; and a Wan 2.2 decoder imports and
verifies against diffusers end to end."""

import types

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import diffusers_suite as suite  # noqa: E402

from kiln.optimizer.examples.tiny_diffusers import write_model  # noqa: E402
from kiln.optimizer.importers.diffusers import import_diffusers  # noqa: E402
from kiln.optimizer.importers.video_decoders import WAN_PATCH  # noqa: E402

WAN_21 = next(c for c in suite.VAES if c.class_name == "AutoencoderKLWan").config
# Wan 2.2's layout at a tiny width: residual up blocks (with DupUp3D shortcuts), 2x2 patches of 3 channels: 8x
WAN_22 = dict(base_dim=4, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
              temperal_downsample=[True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
              latents_mean=[0.0] * 8, latents_std=[1.0] * 8, scale_factor_spatial=8)  # fmt: skip


@pytest.mark.parametrize("config", [WAN_21, WAN_22], ids=["wan2.1", "wan2.2"])
def test_wan_whole_clip_decode_matches_the_frame_loop(config):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**config).eval()
    for frames in (1, 2, 5):
        z = torch.randn(2, config["z_dim"], frames, 6, 4, generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            want = model.decode(z, return_dict=False)[0]
            with WAN_PATCH.apply(model):
                got = model.decode(z, return_dict=False)[0]
        assert got.shape == want.shape and got.shape[2] == 1 + 4 * (frames - 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wan22_decoder_imports_and_verifies(tmp_path):
    model_dir = write_model("AutoencoderKLWan", tmp_path / "model", config=WAN_22)
    shapes = [("--shapes", "batch=1..1"), ("--shapes", "frames=1..2..3"), ("--shapes", "height=4..6")]
    _, source, notes = import_diffusers(model_dir, tmp_path, types.SimpleNamespace(shapes=shapes, seed=0))
    assert source["family"] == "video-vae-decoder" and len(source["torch_parity"]["shapes"]) >= 3
    assert any("1+4*(frames-1)" in note and "8*height" in note for note in notes), notes
