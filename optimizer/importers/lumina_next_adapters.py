"""The adapter for Lumina-Next (LuminaNextDiT2DModel): the pipeline's rotary table as an input, and its
proportional attention computed from the sequence length in the graph.

Lumina-Next's pipeline makes a new rotary table at every step (scaled linearly or by NTK, by a factor it
picks from the timestep and the image size) and passes it to the model, which cuts the latent's patch grid
from it. kiln's engine takes that cut as an input: image_rotary_emb [height/2, width/2, head_dim/2, 2], the
table's first rows and columns as (cos, sin) pairs, `torch.view_as_real(table[:height // 2, :width // 2])`.
Its attention scales the logits by sqrt(log(tokens) / log(base)), base being the token count at the
pipeline's default image size (proportional attention). diffusers computes that with math.log of the
length, a Python number that tracing fixes; kiln exports an attention that takes the length from the graph.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    InputRule,
    Patch,
    _batch,
    _instance_method,
    _sides,
    _text,
    rotate_pairs,
)
from kiln.optimizer.importers.video_adapters import _processors

# The pipeline's table covers 384 patches a side, and its VAE (SDXL's) downsamples by 8.
TABLE_SIDE, VAE_FACTOR = 384, 8


class ProportionalAttention:
    """LuminaAttnProcessor2_0 with the rotation in real arithmetic (the table's (cos, sin) pairs) and the
    proportional-attention factor computed from the sequence length as a tensor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, base_sequence_length=None):  # fmt: skip
        import torch
        import torch.nn.functional as F

        batch, length, _ = hidden_states.shape
        query, key = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        query = (attn.norm_q(query) if attn.norm_q is not None else query).view(batch, -1, attn.heads, head_dim)
        key = (attn.norm_k(key) if attn.norm_k is not None else key).view(batch, -1, kv_heads, head_dim)
        value = value.view(batch, -1, kv_heads, head_dim)
        if query_rotary_emb is not None:
            query = rotate_pairs(query, query_rotary_emb[..., None, :, 0], query_rotary_emb[..., None, :, 1])
        scale = None
        if key_rotary_emb is not None:
            key = rotate_pairs(key, key_rotary_emb[..., None, :, 0], key_rotary_emb[..., None, :, 1])
            scale = attn.scale
            if base_sequence_length is not None:
                tokens = torch.ones_like(hidden_states[0, :, 0], dtype=torch.float32).sum()  # the length, as a tensor
                query = query * torch.sqrt(torch.log(tokens) / math.log(base_sequence_length))
        repeats = attn.heads // kv_heads
        key, value = (t.unsqueeze(3).repeat(1, 1, 1, repeats, 1).flatten(2, 3) for t in (key, value))
        mask = attention_mask.bool().view(batch, 1, 1, -1).expand(-1, attn.heads, length, -1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask, scale=scale)  # fmt: skip
        return out.transpose(1, 2)


def _patch_embed(self, x, freqs_cis):
    """LuminaPatchEmbed.forward with one image size for the batch: its list of one per sample, [size] * batch,
    fixes the batch when traced, and forward reads the first only."""
    batch, channels, height, width = x.shape
    p = self.patch_size
    rows, cols = height // p, width // p
    tokens = self.proj(x.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).flatten(3)).flatten(1, 2)
    mask = tokens.new_ones(tokens.shape[:2]).int()
    return tokens, mask, [(height, width)], freqs_cis[:rows, :cols].flatten(0, 1).unsqueeze(0)


@contextlib.contextmanager
def _traceable(model) -> Iterator[None]:
    with _processors(model, ProportionalAttention()), _instance_method(model.patch_embedder, "forward", _patch_embed):
        yield


PROPORTIONAL_PATCH = Patch(
    "Lumina-Next's attention with the length in the graph, one image size per batch",
    "its proportional attention scales by math.log of the sequence length, a Python number that tracing fixes, "
    "and rotates q and k by a complex table; its patch embedding lists the image size once per sample, which "
    "fixes the batch; kiln exports the same attention with the factor made from the length in the graph and "
    "the rotation in real arithmetic, and the size listed once",
    _traceable,
)


def _base_sequence_length(config) -> int:
    """The pipeline's: the token count at its default image size (sample_size latents, 16 pixels a patch)."""
    return (config["sample_size"] * VAE_FACTOR // 16) ** 2


def _lumina_next_call(model, latents, timestep, text, mask, table):
    import torch

    # Exporting, PROPORTIONAL_PATCH's attention takes the (cos, sin) pairs; diffusers' own, the complex table.
    exporting = "forward" in vars(model.patch_embedder)  # the patch's _patch_embed is in place
    table = table if exporting else torch.view_as_complex(table.contiguous())
    return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, encoder_mask=mask,
                 image_rotary_emb=table, cross_attention_kwargs={"base_sequence_length": _base_sequence_length(model.config)},
                 return_dict=False)[0]  # fmt: skip


def _lumina_next(model, config) -> Adapter:
    p = config["patch_size"]
    height, width = _sides(p, (), TABLE_SIDE * p, f", and the pipeline's rotary table covers {TABLE_SIDE} patches a side")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
              InputRule("timestep", ("batch",), "uniform", 1.0),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["cross_attention_dim"])),
              InputRule("encoder_mask", ("batch", "text_len"), "mask"),
              InputRule("image_rotary_emb", (f"height/{p}", f"width/{p}", head_dim // 2, 2)))  # fmt: skip
    return Adapter(
        type(model).__name__, "lumina-next", inputs, (_batch(), height, width, _text()), call=_lumina_next_call,
        output_axes=("batch", None, "height", "width"), patches=(PROPORTIONAL_PATCH,),
        notes=(f"image_rotary_emb is the pipeline's table for this step cut to the patch grid, as (cos, sin) pairs: "
               f"view_as_real(table[:height/{p}, :width/{p}]); timesteps are the pipeline's 1 - t/1000; proportional "
               f"attention at the pipeline's base length {_base_sequence_length(config)}",),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"LuminaNextDiT2DModel": _lumina_next}
