"""The adapter for Wan-Animate-2 (WanAnimate2Transformer3DModel): its generation step, the reference cache as inputs.

Its pipeline runs, per video segment, one reference pass over the driving video (kv_cache_mode="extract"), which
stores every layer's pre-RoPE keys and values of the reference tokens in a WanAnimate2KVCache, then each denoising
step as a generation pass (kv_cache_mode="cached"), whose self-attention covers the generation tokens and the
cached reference tokens under a flex-attention BlockMask. kiln exports the generation pass as a step function, as
it does video VAE step decoders: the cache is two inputs, reference_keys and reference_values [layers, batch,
frames, height/2, width/2, heads, head_dim]. Inside the graph the rotary tables of both streams come from the sizes
and the BlockMask is a dense boolean mask over [generation | reference] keys. The check against PyTorch fills a
WanAnimate2KVCache with the inputs' keys and values, as the reference pass does, and calls the original forward in
"cached" mode, one sample a call, with what the pipeline passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    Patch,
    _batch,
    _forward_and_attention,
    _module_attribute,
    _spatial,
    _text,
    exported_or_original,
    rotate_pairs,
    supported_hint,
    wan_grid_angles,
)
from kiln.optimizer.importers.video_adapters import CLIP_IMAGE_TOKENS
from kiln.targets import DimRange

ROPE_TABLE = 512  # positions rope_params tabulates on each axis
UNCOND_SKIPPED_BLOCK = 9  # the block the unconditional branch (is_uncondtion) skips
VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # the Wan VAE's compression, from which the pipeline's origin_len and origin_area come


def rotary(model, frames, rows, cols, offsets, stride):
    """(cos, sin) [frames x rows x cols, 1, head_dim / 2] of a stream's tokens, as _rope_freqs(offsets) and rope_apply
    with this time stride make them: frame t at t x stride + offsets[0], row and col moved by offsets[1] and [2]."""
    import torch

    positions = (torch.arange(frames) * stride + offsets[0], torch.arange(rows) + offsets[1], torch.arange(cols) + offsets[2])
    angles = wan_grid_angles(torch, model.config.dim // model.config.num_heads, *positions)[:, None]
    return angles.cos(), angles.sin()


def reference_offsets(config, frames, rows, cols):
    """The reference stream's rotary offsets: the config's refer_offset_*, -1 meaning the reference grid's size."""
    given = (config.refer_offset_t, config.refer_offset_h, config.refer_offset_w)
    return tuple(size if offset < 0 else offset for offset, size in zip(given, (frames, rows, cols)))


def dense_mask(torch, frames, tokens_per_frame, device=None):
    """create_mask's pattern as a dense [gen, gen + ref] boolean mask, without its 128-aligned padding: every
    generation token sees every generation token, and generation frame f + 1 sees reference frame f."""
    gen_frame = torch.arange(frames + 1, device=device)[:, None].expand(-1, tokens_per_frame).reshape(-1)
    ref_frame = torch.arange(1, frames + 1, device=device)[:, None].expand(-1, tokens_per_frame).reshape(-1)
    everything = torch.ones(gen_frame.shape[0], gen_frame.shape[0], dtype=torch.bool, device=device)
    return torch.cat([everything, gen_frame[:, None] == ref_frame[None, :]], dim=1)


def _attention(attn, hidden_states, rotary_emb, kv_cache, reference_rotary_emb, attention_mask, **_):
    """WanAnimate2AttnProcessor's cached path on whole tensors: kv_cache is this layer's (keys, values) [B, ref
    tokens, heads, head_dim], pre-RoPE; attention_mask the dense mask. The rope_stride, grid and origin arguments
    the block passes are in rotary_emb, reference_rotary_emb and the mask already."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan_animate_2 import _get_qkv_projections

    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    key_ref, value_ref = kv_cache
    query, key = (rotate_pairs(x, *rotary_emb).type_as(value) for x in (query, key))
    key_ref = rotate_pairs(key_ref, *reference_rotary_emb).type_as(value)
    hidden_states = dispatch_attention_fn(query, torch.cat([key, key_ref], dim=1), torch.cat([value, value_ref], dim=1),
                                          attn_mask=attention_mask)  # fmt: skip
    hidden_states = hidden_states.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](hidden_states))


def _forward(self, hidden_states, condition_latents, encoder_hidden_states, timestep, reference_keys, reference_values,
             encoder_hidden_states_image=None, is_uncondtion=None):  # fmt: skip
    """WanAnimate2Transformer3DModel.forward in "cached" mode on batched tensors: latents [B, C, frames + 1, H, W],
    the reference's pre-RoPE keys and values [layers, B, frames, H/2, W/2, heads, head_dim], is_uncondtion [B]."""
    import torch

    config = self.config
    latents = self.patch_embedding(torch.cat([hidden_states, condition_latents], dim=1))
    batch, _, frames_gen, rows, cols = latents.shape
    tokens = latents.flatten(2).transpose(1, 2)
    frames = reference_keys.shape[2]  # the reference's frames: one fewer, the reference image's slot not among them

    time_dtype = next(self.time_embedding.parameters()).dtype
    temb = self.time_embedding(self.timesteps_proj(timestep).to(time_dtype))
    timestep_proj = self.time_projection(temb).unflatten(1, (6, config.dim))
    # The original pads each prompt with zeros to text_len before the embedding; padding by text_len rows and
    # cutting at text_len keeps the padding's length (text_len - prompt) out of the graph's symbols.
    padding = encoder_hidden_states.new_zeros(batch, config.text_len, encoder_hidden_states.shape[2])
    text = self.text_embedding(torch.cat([encoder_hidden_states, padding], dim=1)[:, : config.text_len])
    image = self.img_emb(encoder_hidden_states_image) if config.use_img_emb else None

    gen_rotary = rotary(self, frames_gen, rows, cols, (0, 0, 0), 1)
    ref_rotary = rotary(self, frames, rows, cols, reference_offsets(config, frames, rows, cols), config.refer_stride)
    mask = dense_mask(torch, frames, rows * cols, latents.device)
    keys, values = (x.flatten(2, 4) for x in (reference_keys, reference_values))
    for idx, block in enumerate(self.blocks):
        out = block(tokens, temb=timestep_proj, encoder_hidden_states=text, encoder_hidden_states_image=image,
                    kv_cache=(keys[idx], values[idx]), kv_cache_mode="cached", rotary_emb=gen_rotary,
                    grid_sizes=None, reference_rotary_emb=ref_rotary, attention_mask=mask)  # fmt: skip
        # The unconditional rows skip this block; a per-row choice, so that one batch can hold both branches.
        skip = is_uncondtion is not None and idx == UNCOND_SKIPPED_BLOCK
        tokens = torch.where(is_uncondtion[:, None, None], tokens, out) if skip else out

    out = self.head(tokens, temb)
    pt, ph, pw = config.patch_size
    out = out.view(batch, frames_gen, rows, cols, pt, ph, pw, config.out_dim)
    out = torch.einsum("bfhwpqrc->bcfphqwr", out)
    return out.reshape(batch, config.out_dim, frames_gen * pt, rows * ph, cols * pw).float()


STEP_PATCH = Patch(
    "Wan-Animate-2's generation step with the reference cache as inputs",
    "the cached pass reads its reference keys and values from a WanAnimate2KVCache, takes its grids with .tolist() "
    "(rotary tables in float64 complex numbers) and attends under a flex-attention BlockMask built by compiling a "
    "mask function over 128-aligned buffers, all fixed by tracing; kiln exports a forward that takes the cache as "
    "tensors, makes the rotary angles from the sizes in float32 and attends with the same pattern as a dense boolean "
    "mask over [generation | reference] keys",
    lambda m: _forward_and_attention(m, _forward, [block.self_attn for block in m.blocks], _attention),
)


def _sample(model, hidden_states, condition_latents, encoder_hidden_states, timestep, reference_keys,
            reference_values, encoder_hidden_states_image=None, is_uncondtion=None):  # fmt: skip
    """The original generation pass on one sample, as the pipeline calls it, its cache filled with the keys and
    values [layers, 1, frames, H/2, W/2, heads, head_dim] as the reference pass fills it."""
    import torch
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    frames, height, width = reference_keys.shape[2], hidden_states.shape[-2], hidden_states.shape[-1]
    cache = WanAnimate2KVCache(model.config.num_layers)
    for idx, (key, value) in enumerate(zip(reference_keys, reference_values, strict=True)):
        cache.get(idx).store(key.flatten(1, 3), value.flatten(1, 3))
    out = model([hidden_states[0]], timestep=timestep, encoder_hidden_states=[encoder_hidden_states[0]],
                condition_latents=[condition_latents[0]], kv_cache=cache, kv_cache_mode="cached",
                seq_len=hidden_states[0, 0].numel() // math.prod(model.config.patch_size),
                encoder_hidden_states_image=encoder_hidden_states_image,
                reference_grid_sizes=torch.tensor([reference_keys.shape[2:5]]),
                origin_len=VAE_TEMPORAL * (frames - 1) + 1, origin_area=[VAE_SPATIAL * height, VAE_SPATIAL * width],
                is_uncondtion=bool(is_uncondtion) if is_uncondtion is not None else False, return_dict=False)  # fmt: skip
    return out[0][0][None]


def _eager_block_masks():
    """A context in which the model's create_mask builds its BlockMask without torch.compile: the same mask, without
    compiling C++ kernels for the check (12 s of the tiny model's 44 s import and fp16 build, on 2 cores)."""
    from diffusers.models.transformers import transformer_wan_animate_2 as module

    compiled = module.create_block_mask
    return _module_attribute(module, "create_block_mask",
                             lambda *args, **kwargs: compiled(*args, **{**kwargs, "_compile": False}))  # fmt: skip


def _original_step(model, given):
    """One pipeline call per row, the check the step function (STEP_PATCH) is verified against."""
    import torch

    rows = zip(*(x.split(1, dim=1 if name.startswith("reference_") else 0) for name, x in given.items()))
    with _eager_block_masks():
        return torch.cat([_sample(model, **dict(zip(given, row))) for row in rows])


def _wan_animate2(model, config) -> Adapter:
    pt, ph, pw = config["patch_size"]
    if (pt, ph, pw) != (1, 2, 2):  # the cached pass sizes its block mask for 1x2x2 patches (origin_area // 256)
        raise InputError(f"kiln exports {type(model).__name__} with patches of 1x2x2, as its block mask assumes, "
                         f"not {pt}x{ph}x{pw}", hint=supported_hint())  # fmt: skip
    heads, layers = config["num_heads"], config["num_layers"]
    head_dim = config["dim"] // heads
    latent = config["out_dim"]
    why = f"its patch is {pt}x{ph}x{pw}, and its rotary tables cover {ROPE_TABLE} patches a side"
    height = DimRule("height", _spatial(ph, ROPE_TABLE * ph), multiple=ph, max=ROPE_TABLE * ph, why=why)
    width = DimRule("width", _spatial(pw, ROPE_TABLE * pw), multiple=pw, max=ROPE_TABLE * pw, why=why)
    limit = min(ROPE_TABLE - 1, ROPE_TABLE // config["refer_stride"])
    frames = DimRule("frames", DimRange(1, 2, 4), max=limit,
                     why=f"the rotary tables cover {ROPE_TABLE} frames (the reference's at stride {config['refer_stride']})")  # fmt: skip
    text = DimRule("text_len", _text().default, max=config["text_len"], why=f"its text_len is {config['text_len']}")
    cache = (layers, "batch", "frames", f"height/{ph}", f"width/{pw}", heads, head_dim)
    inputs = [InputRule("hidden_states", ("batch", latent, "frames+1", "height", "width")),
              InputRule("condition_latents", ("batch", config["in_dim"] - latent, "frames+1", "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["text_dim"]))]  # fmt: skip
    if config["use_img_emb"]:
        inputs.append(InputRule("encoder_hidden_states_image", ("batch", CLIP_IMAGE_TOKENS, 1280)))
    inputs += [InputRule("timestep", ("batch",), "uniform", 1000.0),
               InputRule("reference_keys", cache), InputRule("reference_values", cache)]  # fmt: skip
    if layers > UNCOND_SKIPPED_BLOCK:  # fewer layers: the flag changes nothing
        inputs.append(InputRule("is_uncondtion", ("batch",), "bool"))
    notes = [
        "the generation step (kv_cache_mode=\"cached\"): frames counts the reference (driving video) segment's "
        "latent frames; the latents and their condition latents have frames + 1, the reference image's slot first",
        f"reference_keys and reference_values are the reference pass's per-layer pre-RoPE keys and values, stacked: "
        f"[{layers} layers, batch, frames, height/{ph}, width/{pw}, {heads} heads, {head_dim}] (each layer's "
        "WanAnimate2KVLayerCache key or value, its tokens unflattened to the reference grid)",
        "the segment fills the pipeline's whole block-mask buffer (origin_len = 4·frames − 3 pixel frames, "
        "origin_area = 8·height × 8·width pixels), as the pipeline runs segments of 4n + 1 frames (its default, "
        "81); the mask is dense, without the 128-aligned padding, which attends to nothing",
        "rotary angles in float32 (the original's rope_apply is float64)",
    ]
    if layers > UNCOND_SKIPPED_BLOCK:
        notes.append(f"is_uncondtion [batch] marks the rows of classifier-free guidance's unconditional branch, which "
                     f"skip block {UNCOND_SKIPPED_BLOCK} as in the pipeline; both branches can share one batch")  # fmt: skip
    return Adapter(type(model).__name__, "wan-animate-2", tuple(inputs), (_batch(), frames, height, width, text),
                   call=exported_or_original([i.name for i in inputs], _original_step),
                   output_axes=("batch", None, "frames+1", "height", "width"),
                   patches=(STEP_PATCH,), notes=tuple(notes))  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"WanAnimate2Transformer3DModel": _wan_animate2}
