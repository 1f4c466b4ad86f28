"""The adapter for AnyFlow-FAR (AnyFlowFARTransformer3DModel): one denoising step of a chunk, the earlier chunks'
key-value cache as inputs.

Its pipeline generates the video chunk by chunk (chunk_partition). After each chunk it runs a cache-write step
(kv_cache_flag["is_cache_step"]) over every clean chunk so far, under a flex-attention BlockMask that is causal by
chunk: it stores each layer's pre-RoPE keys and values, the oldest chunks patched coarsely by far_patch_embedding
(compressed_cache) and the last full_chunk_limit - 1 at full resolution (full_cache). Each denoising step of the
next chunk (the inference path) then attends from the chunk's tokens to [compressed cache | full cache | chunk],
the rotary positions of all three from the chunk partition. kiln exports that denoising step as a step function,
the cache-write step staying in PyTorch as Wan-Animate 2's reference pass does: the two caches are inputs
[layers, 2 (keys, values), batch, heads, frames, rows, cols, head_dim], the rotary tables come from the sizes and
the flex attention is an SDPA. The check against PyTorch fills the model's own cache dicts with the inputs and calls
the original forward with a chunk partition of those sizes, as the pipeline calls it.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    Patch,
    _batch,
    _forward_and_attention,
    _spatial,
    _text,
    exported_or_original,
    rotate_pairs,
    supported_hint,
    wan_grid_angles,
)
from kiln.optimizer.importers.video_adapters import CLIP_IMAGE_TOKENS
from kiln.targets import DimRange

FLEX_BLOCK = 128  # the flex processor pads the chunk's tokens to a multiple of this with zero keys and values


def _grid_angles(model, frames, rows, cols, start, stride):
    """[frames x rows x cols, head_dim / 2] rotary angles of a grid whose frames start at `start`, as
    AnyFlowCausalRotaryPosEmbed makes them: a grid patched `stride` times coarser averages the full table's stride
    unit rotations, which (normalised) is the rotation at the middle position, row x stride + (stride - 1) / 2."""
    import torch

    middle = (stride - 1) / 2
    positions = (torch.arange(frames) + start, torch.arange(rows) * stride + middle, torch.arange(cols) * stride + middle)
    return wan_grid_angles(torch, model.config.attention_head_dim, *positions)


def rotary(model, compressed, cached, frames, rows, cols):
    """((cos, sin) of the chunk's queries, (cos, sin) of [compressed | cached | chunk] keys): frames are numbered
    across the three, the compressed ones on the coarse grid."""
    import torch

    stride = model.config.compressed_patch_size[1] // model.config.patch_size[1]
    coarse = _grid_angles(model, compressed, rows // stride, cols // stride, 0, stride)
    full = _grid_angles(model, cached + frames, rows, cols, compressed, 1)
    keys = torch.cat([coarse, full])
    queries = full[cached * rows * cols :]
    return (queries.cos(), queries.sin()), (keys.cos(), keys.sin())


def padding_bias(torch, queries, keys, device=None):
    """[1, keys + 1] additive attention bias for [keys | one zero key]: the flex processor attends, unmasked, to the
    zero keys it pads the queries' length to a multiple of FLEX_BLOCK with; each adds exp(0) to the softmax's sum
    and nothing to its output, as one zero key weighted by their count does (log 0 = -inf: none)."""
    count = torch.full((1,), (FLEX_BLOCK - queries % FLEX_BLOCK) % FLEX_BLOCK, dtype=torch.float32, device=device)
    return torch.cat([torch.zeros(keys, device=device), count.log()])[None]


def _attention(attn, hidden_states, rotary_emb, attention_mask, kv_cache, **_):
    """AnyFlowCausalAttnProcessor's cache-read path on whole tensors: kv_cache is this layer's (compressed, full)
    caches [2, B, heads, tokens, head_dim], pre-RoPE; rotary_emb the queries' and keys' (cos, sin); attention_mask
    padding_bias. The flex kernel's head-dim padding changes nothing, so it is left out."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    dtype = hidden_states.dtype
    query = attn.norm_q(attn.to_q(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(attn.to_k(hidden_states)).to(dtype).unflatten(2, (attn.heads, -1))
    value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    compressed, full = (x.transpose(2, 3) for x in kv_cache)  # [2, B, tokens, heads, head_dim]
    zero = value.new_zeros(value.shape[0], 1, *value.shape[2:])
    key = torch.cat([compressed[0], full[0], key], dim=1)
    value = torch.cat([compressed[1], full[1], value, zero], dim=1)
    (query_cos, query_sin), (key_cos, key_sin) = rotary_emb
    query = rotate_pairs(query, query_cos[:, None], query_sin[:, None])
    key = torch.cat([rotate_pairs(key, key_cos[:, None], key_sin[:, None]), zero], dim=1)
    hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask.to(query.dtype))
    return attn.to_out[1](attn.to_out[0](hidden_states.flatten(2, 3).type_as(query)))


def _time_embeddings(embedder, timestep, r_timestep, text, tokens_per_frame):
    """forward_timestep on the chunk's frames: (temb [B, tokens, dim], its projection [B, tokens, 6, dim]), each
    frame's embedding repeated over its tokens by expand (repeat_interleave's count would be traced as a constant)."""
    delta = r_timestep if embedder.deltatime_type == "r" else timestep - r_timestep
    temb, proj = embedder.forward_timestep(timestep, delta, text, 1)
    batch, frames = timestep.shape
    temb, proj = (x[:, :, None].expand(-1, -1, tokens_per_frame, -1).reshape(batch, frames * tokens_per_frame, -1)
                  for x in (temb, proj))  # fmt: skip
    return temb, proj.unflatten(2, (6, -1))


def _forward(self, hidden_states, encoder_hidden_states, timestep, r_timestep, compressed_cache, full_cache,
             encoder_hidden_states_image=None):  # fmt: skip
    """AnyFlowFARTransformer3DModel._forward_inference on tensors: latents [B, C, frames, H, W], timesteps [B, frames],
    the caches [layers, 2, B, heads, frames, rows, cols, head_dim]; returns [B, C, frames, H, W]."""
    import torch

    config = self.config
    batch, _, frames, height, width = hidden_states.shape
    tokens = self.patch_embedding(hidden_states)
    rows, cols = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2)

    embedder = self.condition_embedder
    temb, timestep_proj = _time_embeddings(embedder, timestep, r_timestep, encoder_hidden_states, rows * cols)
    text = embedder.text_embedder(encoder_hidden_states)
    if encoder_hidden_states_image is not None:
        text = torch.cat([embedder.image_embedder(encoder_hidden_states_image), text], dim=1)

    compressed_frames, cached_frames = compressed_cache.shape[4], full_cache.shape[4]
    rotary_emb = rotary(self, compressed_frames, cached_frames, frames, rows, cols)
    compressed, full = compressed_cache.flatten(4, 6), full_cache.flatten(4, 6)
    keys = compressed.shape[4] + full.shape[4] + tokens.shape[1]
    bias = padding_bias(torch, tokens.shape[1], keys, tokens.device)
    for idx, block in enumerate(self.blocks):
        tokens = block(tokens, text, timestep_proj, rotary_emb, bias, (compressed[idx], full[idx]), None)

    shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).chunk(2, dim=2)
    tokens = (self.norm_out(tokens.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(tokens)
    out = self.proj_out(tokens)
    _, ph, pw = config.patch_size
    out = out.view(batch, frames, rows, cols, ph, pw, config.out_channels)
    return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(batch, config.out_channels, frames, height, width)


STEP_PATCH = Patch(
    "AnyFlow-FAR's denoising step with the chunk cache as inputs",
    "the cache-read pass takes its token counts from kv_cache_flag and chunk_partition (Python ints), reads the cache "
    "from per-layer dicts of preallocated buffers, makes its rotary tables in float64 complex numbers (the compressed "
    "grid's by complex average pooling) and attends with flex_attention, the chunk's queries padded to a multiple of "
    "128 with as many zero keys and values, unmasked, all "
    "fixed by tracing; kiln exports a forward that takes the caches as tensors, makes the rotary angles from the "
    "sizes in float32 and attends with an SDPA, the padding's zero keys as one zero key weighted by their count",
    lambda m: _forward_and_attention(m, _forward, [block.attn1 for block in m.blocks], _attention),
)


def _original_cache(compressed_cache, full_cache):
    """The pipeline's kv_cache: per layer {"compressed_cache", "full_cache"} [2, B, heads, tokens, head_dim], here
    exactly the tokens cached (the pipeline's buffers are longer; the step reads only these)."""
    return {idx: {"compressed_cache": c.flatten(3, 5), "full_cache": f.flatten(3, 5)}
            for idx, (c, f) in enumerate(zip(compressed_cache, full_cache, strict=True))}  # fmt: skip


def chunk_partition(config, compressed, cached, frames):
    """A chunk partition the step reads these many frames with: full_chunk_limit chunks at full resolution, this
    chunk the last, the cached frames in the first of the others (the step only sums them) and the compressed
    frames in one chunk before, which makes it the full window's first chunk past the limit."""
    return [compressed, cached] + [0] * (config.full_chunk_limit - 2) + [frames]


def _original_step(model, given):
    """The pipeline's cache-read call, its cache filled with the inputs: the check the step function (STEP_PATCH)
    is verified against."""
    compressed, full = given.pop("compressed_cache"), given.pop("full_cache")
    partition = chunk_partition(model.config, compressed.shape[4], full.shape[4], given["hidden_states"].shape[2])
    flag = {"num_cached_chunks": len(partition) - 1, "is_cache_step": False}
    out = model(**given | {"hidden_states": given["hidden_states"].transpose(1, 2)}, chunk_partition=partition,
                kv_cache=_original_cache(compressed, full), kv_cache_flag=flag, return_dict=False)[0]  # fmt: skip
    return out.transpose(1, 2)


def _anyflow_far(model, config) -> Adapter:
    pt, ph, pw = config["patch_size"]
    ct, ch, cw = config["compressed_patch_size"]
    stride = ch // ph
    if pt != 1 or ct != 1 or ph != pw or ch != cw or ch % ph or stride > 6 or config["full_chunk_limit"] < 2:
        # the cache counts a token a frame; the coarse rotary is the middle position's for strides up to 2π
        raise InputError(f"kiln exports {type(model).__name__} with square patches one frame deep, the compressed one "
                         f"a multiple (up to 6) of the full one, and full_chunk_limit 2 or more, not {pt}x{ph}x{pw}, "
                         f"{ct}x{ch}x{cw} and {config['full_chunk_limit']}", hint=supported_hint())  # fmt: skip
    heads, head_dim, layers = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    table = config["rope_max_seq_len"]
    why = f"its patches are {ph} and {ch} a side, and its rotary tables cover {table} patches a side"
    height = DimRule("height", _spatial(ch, table * ph), multiple=ch, max=table * ph // ch * ch, why=why)
    width = DimRule("width", _spatial(ch, table * pw), multiple=ch, max=table * pw // ch * ch, why=why)
    why = f"the rotary table covers {table} frames in all (compressed, cached and this chunk's): a third each"
    frames, compressed, cached = (DimRule(name, DimRange(1, 2, 4), max=table // 3, why=why)
                                  for name in ("frames", "compressed_frames", "cached_frames"))  # fmt: skip

    def cache(count, patch):  # a cache's axes: count its frames dim, patch its patch side
        return layers, 2, "batch", heads, count, f"height/{patch}", f"width/{patch}", head_dim

    inputs = [InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["text_dim"])),
              InputRule("timestep", ("batch", "frames"), "uniform", 1000.0),
              InputRule("r_timestep", ("batch", "frames"), "uniform", 1000.0),
              InputRule("compressed_cache", cache("compressed_frames", ch)),
              InputRule("full_cache", cache("cached_frames", ph))]  # fmt: skip
    if config.get("image_dim"):
        inputs.append(InputRule("encoder_hidden_states_image", ("batch", CLIP_IMAGE_TOKENS, config["image_dim"])))
    notes = (
        "one denoising step of a chunk (the cache-read path): hidden_states is the chunk's noisy latents, frames its "
        "frames; timestep and r_timestep (the flow map's two times) per frame, as the pipeline passes them",
        f"compressed_cache and full_cache are each layer's kv_cache['compressed_cache'] and ['full_cache'] [2 (keys, "
        f"values), batch, heads, tokens, head_dim] that the pipeline's cache-write step (encode_kv_cache, left to "
        f"PyTorch) fills, pre-RoPE, cut to the tokens cached, tokens unflattened to [frames, rows, cols] and the "
        f"layers stacked: [{layers}, 2, batch, {heads}, compressed_frames, height/{ch}, width/{ch}, {head_dim}] and "
        f"[{layers}, 2, batch, {heads}, cached_frames, height/{ph}, width/{ph}, {head_dim}]",
        f"the step of a chunk past the first {config['full_chunk_limit']}, when both caches hold frames "
        f"(compressed_frames: the chunks before the last {config['full_chunk_limit'] - 1}; cached_frames: those); "
        f"the first {config['full_chunk_limit']} chunks have no graph here: the first has no cache, the next "
        "ones only full_cache",
        "rotary angles in float32 (the original's are float64 complex numbers); the flex kernel's zero-padded keys "
        "(up to 127, as many as make the chunk's tokens a multiple of 128) take part in the softmax as there, as "
        "one zero key with an additive bias of log(their count)",
    )
    return Adapter(type(model).__name__, "anyflow-far", tuple(inputs),
                   (_batch(), frames, height, width, _text(), compressed, cached),
                   call=exported_or_original([i.name for i in inputs], _original_step),
                   output_axes=("batch", None, "frames", "height", "width"),
                   patches=(STEP_PATCH,), notes=notes)  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"AnyFlowFARTransformer3DModel": _anyflow_far}
