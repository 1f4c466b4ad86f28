"""Rotary grids cropped to the latents' aspect ratio, made inside the graph (HunyuanDiT, EasyAnimate).

HunyuanDiT's pipeline and EasyAnimate's rope module place the rotary grid in a rectangle of base sizes
(in patches): the latent grid is resized to fit it (get_resize_crop_region_for_grid, with Python round())
and the positions spread over that region. In Python the region is fixed when traced; kiln computes the
same region with tensor arithmetic (float64, torch.round rounds half to even as Python's round does),
then the same positions and embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    Patch,
    _batch,
    _instance_method,
    _sides,
    _text,
)
from kiln.targets import DimRange


def _count(torch, n):
    """The symbolic size n as a float64 tensor (a Python float of it would be fixed when traced)."""
    return torch.ones(n, dtype=torch.float64).sum()


def crop_region(torch, rows, cols, base_height: int, base_width: int):
    """get_resize_crop_region_for_grid((rows, cols), ...) into base_height x base_width, as float64 tensors:
    (top, left), (bottom, right)."""
    h, w = _count(torch, rows), _count(torch, cols)
    tall = h / w > base_height / base_width
    height = torch.where(tall, base_height, torch.round(base_width / w * h))
    width = torch.where(tall, torch.round(base_height / h * w), base_width)
    top, left = torch.round((base_height - height) / 2.0), torch.round((base_width - width) / 2.0)
    return (top, left), (top + height, left + width)


def _spread(torch, start, stop, n):
    """torch.linspace(start, stop * (n - 1) / n, n), as get_2d_rotary_pos_embed spreads the grid, in float32."""
    count = _count(torch, n)
    end = stop * (count - 1) / count
    step = (end - start) / torch.clamp(count - 1, min=1)
    return (start + torch.arange(n, dtype=torch.float64) * step).float()


def cropped_rotary(embed_dim: int, rows, cols, base: int):
    """get_2d_rotary_pos_embed(embed_dim, crop_region(rows, cols, base), (rows, cols)): (cos, sin)."""
    import torch
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_from_grid

    (top, left), (bottom, right) = crop_region(torch, rows, cols, base, base)
    grid = torch.stack(torch.meshgrid(_spread(torch, left, right, cols), _spread(torch, top, bottom, rows), indexing="xy"))
    return get_2d_rotary_pos_embed_from_grid(embed_dim, grid.reshape(2, 1, *grid.shape[1:]), use_real=True)


def _easyanimate_rope(self, hidden_states):
    """EasyAnimateRotaryPosEmbed.forward (get_3d_rotary_pos_embed over the cropped region) in tensor arithmetic."""
    import torch
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    _, _, frames, height, width = hidden_states.shape
    p = self.patch_size
    rows, cols = height // p, width // p
    (top, left), (bottom, right) = crop_region(torch, rows, cols, 60 // p, 90 // p)
    zero = torch.zeros((), dtype=torch.float64)
    grids = (_spread(torch, zero, _count(torch, frames), frames), _spread(torch, top, bottom, rows),
             _spread(torch, left, right, cols))  # fmt: skip
    dims = (self.rope_dim // 4, self.rope_dim // 8 * 3, self.rope_dim // 8 * 3)
    freqs = [get_1d_rotary_pos_embed(d, g, use_real=True) for d, g in zip(dims, grids, strict=True)]
    shape = (frames, rows, cols, -1)
    views = ((slice(None), None, None), (None, slice(None), None), (None, None, slice(None)))

    def combined(i):  # cos (0) or sin (1) over the (frames, rows, cols) grid
        return torch.cat([f[i][v].expand(*shape) for f, v in zip(freqs, views, strict=True)], dim=-1).view(-1, sum(dims))

    return combined(0), combined(1)


EASYANIMATE_PATCH = Patch(
    "EasyAnimate's rotary grid cropped in tensor arithmetic",
    "EasyAnimateRotaryPosEmbed crops its grid to a region rounded from the latent size in Python "
    "(get_resize_crop_region_for_grid), which fixes the size when traced; kiln exports the same region and "
    "grid computed with tensors",
    lambda m: _instance_method(m.rope_embedding, "forward", _easyanimate_rope),
)


def _easyanimate(model, config) -> Adapter:
    from kiln.optimizer.importers.video_adapters import _video  # it builds on diffusion_adapters, as this module

    return _video("easyanimate", timestep="float", patches=(EASYANIMATE_PATCH,))(model, config)


# -- HunyuanDiT ------------------------------------------------------------------------------------

# The pipeline's square: 512 pixels, over the VAE's 8 and the patch.
_HUNYUAN_DIT_PIXELS = 512


def _hunyuan_dit_call(names: tuple[str, ...], config):
    patch = config["patch_size"]
    base = _HUNYUAN_DIT_PIXELS // 8 // patch

    def call(model, *tensors):
        import torch

        given = dict(zip(names, tensors, strict=True))
        latents = given["hidden_states"]
        head_dim = model.inner_dim // model.num_heads
        rope = cropped_rotary(head_dim, latents.shape[-2] // patch, latents.shape[-1] // patch, base)
        style = torch.zeros(latents.shape[0], dtype=torch.int64)  # its style table has one entry
        return model(**given, style=style, image_rotary_emb=rope, return_dict=False)[0]

    return call


def _hunyuan_dit(model, config) -> Adapter:
    height, width = _sides(config["patch_size"], ())
    text, t5 = config["text_len"], config["text_len_t5"]
    why = "its text padding embedding covers text_len + text_len_t5 tokens"
    text_dims = (dataclasses.replace(_text(text, why), name="text_len"),
                 DimRule("text_len_t5", DimRange(t5, t5, t5), fixed=t5, why=why))  # fmt: skip
    inputs = (
        InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
        InputRule("timestep", ("batch",), "uniform", 1000.0),
        InputRule("encoder_hidden_states", ("batch", "text_len", config["cross_attention_dim"])),
        InputRule("text_embedding_mask", ("batch", "text_len"), "mask"),
        InputRule("encoder_hidden_states_t5", ("batch", "text_len_t5", config["cross_attention_dim_t5"])),
        InputRule("text_embedding_mask_t5", ("batch", "text_len_t5"), "mask"),
        InputRule("image_meta_size", ("batch", 6), "uniform", 2048.0),
    )
    return Adapter(
        type(model).__name__, "hunyuan-dit", inputs, (_batch(), height, width, *text_dims),
        call=_hunyuan_dit_call(tuple(i.name for i in inputs), config),
        output_axes=("batch", None, "height", "width"),
        notes=(f"text lengths are fixed at text_len = {text} and text_len_t5 = {t5}",
               "image_meta_size is the pipeline's (original size, target size, crop's top-left), in pixels; the "
               "rotary grid is cropped to the latents' aspect ratio inside the graph, as the pipeline crops it"),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {
    "HunyuanDiT2DModel": _hunyuan_dit,
    "EasyAnimateTransformer3DModel": _easyanimate,
}
