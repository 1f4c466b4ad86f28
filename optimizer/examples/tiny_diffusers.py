"""Tiny seeded diffusers models written with save_pretrained, so the diffusers importer runs offline.

`kiln example dit DIR` and `kiln example vae DIR` write the DiT and the AutoencoderKL; the tests build all six.
Needs the [torch] extra (torch, diffusers, safetensors), imported only when a function runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kiln.optimizer.errors import InputError
from kiln.optimizer.lazy import check_installed, require
from kiln.optimizer.outdir import follow_umask

# One or two layers and a hidden width of 16: each exports in seconds on a laptop CPU.
TINY = {
    "DiTTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=16, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=4),
    "PixArtTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, cross_attention_dim=16,
        sample_size=16, patch_size=2, caption_channels=12, norm_num_groups=4),
    "SD3Transformer2DModel": dict(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16),
    "CogVideoXTransformer3DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=12,
        num_layers=1, sample_width=16, sample_height=16, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=6),
    "LatteTransformer3DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, cross_attention_dim=16,
        sample_size=16, patch_size=2, caption_channels=12, video_length=3, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6),
    "AutoencoderKL": dict(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32),
}  # fmt: skip


def tiny_model(class_name: str, seed: int = 0, config: dict | None = None, **overrides):
    """A tiny diffusers model of class_name (config: its constructor's arguments, TINY's by default) with
    seeded weights, in eval mode."""
    why = f"building a tiny {class_name}"
    torch = require("torch", "torch", why)
    diffusers = require("diffusers", "torch", why)
    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**{**(TINY[class_name] if config is None else config), **overrides})
    # Zero-initialised layers (adaLN-zero gates, output projections) would make the output trivially
    # small; give every parameter seeded noise so parity checks compare real numbers.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if torch.count_nonzero(param) == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def write_model(class_name: str, directory: Path, seed: int = 0, config: dict | None = None, **save_kwargs) -> Path:
    """save_pretrained a tiny class_name (config as tiny_model's) into directory (safetensors); returns directory."""
    check_installed(["torch", "diffusers", "safetensors"], "torch", f"the tiny {class_name} example")
    import safetensors

    directory = Path(directory)
    model = tiny_model(class_name, seed, config)
    directory.mkdir(parents=True, exist_ok=True)
    # Saved beside, then moved in file by file: a full disk leaves no half-written weights behind.
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{directory.name}.kiln-"))
    try:
        model.save_pretrained(os.fspath(staging), safe_serialization=True, **save_kwargs)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                destination = directory / path.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                follow_umask(path)  # safetensors writes 0600
                os.replace(path, destination)
    except (OSError, safetensors.SafetensorError) as exc:
        raise InputError(f"cannot write {directory}: {exc}", hint="check that it is writable and has free space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def write_dit(directory: Path, seed: int = 0) -> Path:
    """A tiny class-conditional DiT (DiTTransformer2DModel: 2 layers, width 16, 10 classes, patch 2, latents 4x16x16)."""
    return write_model("DiTTransformer2DModel", directory, seed)


def write_vae(directory: Path, seed: int = 0) -> Path:
    """A tiny AutoencoderKL (4 latent channels, 2x upsampling); kiln imports its decoder."""
    return write_model("AutoencoderKL", directory, seed)
