"""The adapter for Cosmos 3 (Cosmos3OmniTransformer): one sample's packed multimodal sequence per batch row.

Cosmos 3 is a language model that denoises: its forward takes one packed sequence of a prompt's token ids
(the causal "understanding" prefix) and the vision tokens after them (the "generation" part, attending to
everything), with each one's index in the sequence, mRoPE position ids, the lengths as Python ints
(und_len, sequence_length) and lists of per-item latents and shapes. Its pipeline runs one sample a call,
the positions numbered from the prompt's length. Traced, every length would be fixed, and two samples
packed into one sequence would attend to each other. kiln's ONNX takes latents [batch, C, frames, height,
width], the prompt's token ids [batch, text_len] and the timestep, one sample per row, and exports a
forward that runs the same layers on batched sequences, with the positions made inside the graph from the
sizes. The check against PyTorch calls the original forward for each row with what the pipeline passes.
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
    _forward_and_attention,
    _spatial,
    _text,
    grid_positions,
    interleaved_mrope_angles,
)
from kiln.targets import DimRange

PIPELINE_FPS = 24.0  # Cosmos3OmniPipeline's default fps; with fps modulation, frame positions scale by base_fps / fps


def positions(torch, config, text_len, frames, rows, cols):
    """[3, text_len + frames x rows x cols] mRoPE positions as the pipeline numbers them: text token i at i on all
    three axes; the vision token at (frame, row, col) at (text_len + margin + frame x base_fps / fps, row, col),
    row and col moved by the same offset unless the config resets spatial ids."""
    offset = text_len + config["unified_3d_mrope_temporal_modality_margin"]
    scale = config["base_fps"] / PIPELINE_FPS if config["enable_fps_modulation"] else 1.0
    text = torch.arange(text_len).float()[None].expand(3, -1)
    row, col = grid_positions(torch, rows, cols)
    spatial = 0 if config["unified_3d_mrope_reset_spatial_ids"] else offset
    t = (torch.arange(frames).float() * scale + offset)[:, None].expand(-1, rows * cols)
    row, col = (axis[None].expand(frames, -1).float() + spatial for axis in (row, col))
    vision = torch.stack([t, row, col]).reshape(3, -1)
    return torch.cat([text, vision], dim=1)


def _rotary(rope, ids, dtype):
    """(cos, sin) [N, head_dim] as Cosmos3VLTextRotaryEmbedding makes them from ids [3, N] (interleaved mRoPE), the
    angles as products where it has a MatMul: positions pass 15000, where float16 steps by 8."""
    import torch

    angles = interleaved_mrope_angles(torch, ids.T, rope.inv_freq, rope.rope_axes_dim)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _attention(attn, und_seq, gen_seq, rotary_emb):
    """Cosmos3AttnProcessor on batched sequences [B, N, D] (the original flattens all tokens into one sequence)."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_cosmos3 import _rotate_half

    def heads(x, proj, count):
        return proj(x).unflatten(-1, (count, attn.head_dim))

    def rotate(x, cos, sin):  # cos, sin: [N, head_dim], broadcast over the batch and the heads
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]

    q_und = attn.norm_q(heads(und_seq, attn.to_q, attn.num_attention_heads))
    k_und = attn.norm_k(heads(und_seq, attn.to_k, attn.num_key_value_heads))
    v_und = heads(und_seq, attn.to_v, attn.num_key_value_heads)
    k_und_for_gen = attn.k_norm_und_for_gen(k_und) if attn.k_norm_und_for_gen is not None else k_und
    q_gen = attn.norm_added_q(heads(gen_seq, attn.add_q_proj, attn.num_attention_heads))
    k_gen = attn.norm_added_k(heads(gen_seq, attn.add_k_proj, attn.num_key_value_heads))
    v_gen = heads(gen_seq, attn.add_v_proj, attn.num_key_value_heads)
    cos_und, sin_und, cos_gen, sin_gen = rotary_emb
    q_und, k_und, k_und_for_gen = (rotate(x, cos_und, sin_und) for x in (q_und, k_und, k_und_for_gen))
    q_gen, k_gen = (rotate(x, cos_gen, sin_gen) for x in (q_gen, k_gen))
    causal = dispatch_attention_fn(q_und, k_und, v_und, is_causal=True, enable_gqa=True)
    full = dispatch_attention_fn(q_gen, torch.cat([k_und_for_gen, k_gen], dim=1), torch.cat([v_und, v_gen], dim=1),
                                 is_causal=False, enable_gqa=True)  # fmt: skip
    return attn.to_out(causal.flatten(-2, -1)), attn.to_add_out(full.flatten(-2, -1))


def _forward(self, latents, input_ids, timestep):
    """Cosmos3OmniTransformer.forward for text-to-image/video on batched tensors: latents [B, C, T, H, W] (every
    frame noisy), input_ids [B, L] and timestep [B]; returns the velocity [B, C, T, H, W]."""
    import torch

    batch, channels, frames, height, width = latents.shape
    p = self.config.latent_patch_size
    rows, cols, text_len = height // p, width // p, input_ids.shape[1]
    und_seq = self.embed_tokens(input_ids)
    # Patches in (frame, row, col) order, each (p, q, channel): the original's _patchify_and_pack_latents.
    tokens = latents.reshape(batch, channels, frames, rows, p, cols, p).permute(0, 2, 3, 5, 4, 6, 1)
    gen_seq = self.proj_in(tokens.reshape(batch, frames * rows * cols, p * p * channels))
    time_dtype = next(self.time_embedder.parameters()).dtype
    temb = self.time_embedder(self.time_proj(timestep * self.config.timestep_scale).to(time_dtype))
    gen_seq = gen_seq + temb.to(gen_seq.dtype)[:, None]
    ids = positions(torch, self.config, text_len, frames, rows, cols).to(latents.device)
    cos, sin = _rotary(self.rotary_emb, ids, gen_seq.dtype)
    rotary = (cos[:text_len], sin[:text_len], cos[text_len:], sin[text_len:])
    _, gen_out = self._run_decoder_stack(und_seq, gen_seq, rotary)
    out = self.proj_out(gen_out).reshape(batch, frames, rows, cols, p, p, channels)
    return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(batch, channels, frames, height, width)


BATCHED_PATCH = Patch(
    "Cosmos 3's packed sequence on batched tensors",
    "forward packs one sample's text and vision tokens into one sequence at index tensors, with its lengths as "
    "Python ints and its latents as lists, which tracing fixes, and its attention flattens every token into one "
    "sequence; kiln exports a forward that runs the same layers on [batch, tokens, hidden] sequences, the text "
    "first and the vision tokens after it, with the positions made from the sizes and the rotary angles as products "
    "(float32 in kiln's fp16 build)",
    lambda m: _forward_and_attention(m, _forward, [layer.self_attn for layer in m.layers], _attention),
)


def _original_one_sample(model, latent, input_ids, timestep):
    """The original forward on one sample, as the pipeline calls it for text-to-image/video: latent [1, C, T, H,
    W], input_ids [L], timestep [] -> [1, C, T, H, W]."""
    import torch

    p = model.config.latent_patch_size
    frames, rows, cols = latent.shape[2], latent.shape[3] // p, latent.shape[4] // p
    text_len, tokens = input_ids.shape[0], frames * rows * cols
    vision = torch.arange(text_len, text_len + tokens)  # the vision tokens' indexes, after the text's
    out = model(input_ids=input_ids, text_indexes=torch.arange(text_len), und_len=text_len,
                position_ids=positions(torch, model.config, text_len, frames, rows, cols),
                sequence_length=text_len + tokens, vision_tokens=[latent], vision_token_shapes=[(frames, rows, cols)],
                vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                vision_timesteps=timestep.expand(tokens), vision_noisy_frame_indexes=[torch.arange(frames)],
                return_dict=False)  # fmt: skip
    return out[0][0]


def _cosmos3_call(model, latents, input_ids, timestep):
    """One pipeline call per row; while exporting, kiln's batched forward (BATCHED_PATCH) takes the tensors."""
    import torch

    if torch.compiler.is_exporting():
        return model(latents, input_ids, timestep)
    rows = zip(latents.split(1), input_ids, timestep, strict=True)
    return torch.cat([_original_one_sample(model, *row) for row in rows])


def _cosmos3(model, config) -> Adapter:
    p, channels = config["latent_patch_size"], config["latent_channel"]
    why = f"its latent_patch_size is {p} (the model pads other sizes; kiln exports whole patches)"
    height = DimRule("height", _spatial(p), multiple=p, why=why)
    frames = DimRule("frames", DimRange(1, 2, 4))
    inputs = (InputRule("hidden_states", ("batch", channels, "frames", "height", "width")),
              InputRule("input_ids", ("batch", "text_len"), "int", config["vocab_size"]),
              InputRule("timestep", ("batch",), "uniform", 1000.0))  # fmt: skip
    notes = [
        "one sample per batch row, as the pipeline calls the model once a sample (and once more for the negative "
        "prompt): input_ids is the prompt's whole tokenized sequence (the rows share its length), the latents' "
        "tokens follow it; no row attends to another",
        "text-to-image/video: every latent frame is noisy; conditioning frames (image- or video-to-world), sound "
        "and action tokens are not in the export",
        f"positions are the pipeline's at its default fps {PIPELINE_FPS:g}" + (
            f" (with fps modulation, frame positions scale by base_fps / fps = {config['base_fps']} / {PIPELINE_FPS:g})"
            if config["enable_fps_modulation"] else ""),
    ]  # fmt: skip
    if config.get("action_gen"):
        notes.append("the action head (action_gen) is left out: the pipeline's action modes (policy, forward and "
                     "inverse dynamics) condition on a first frame and add action tokens")  # fmt: skip
    dims = (_batch(), frames, height, dataclasses.replace(height, name="width"), _text())
    return Adapter(type(model).__name__, "cosmos3", inputs, dims, call=_cosmos3_call, patches=(BATCHED_PATCH,),
                   output_axes=("batch", None, "frames", "height", "width"), notes=tuple(notes))


FAMILIES: dict[str, Callable[..., Adapter]] = {"Cosmos3OmniTransformer": _cosmos3}
