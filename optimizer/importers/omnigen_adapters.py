"""OmniGen's adapter, for text-to-image generation.

OmniGen reads one sequence per sample: the prompt's tokens (left-padded to the batch's longest), a timestep
token, then the image's patches; its pipeline makes a position id for each token and a [seq, seq] attention
mask (causal over the prompt and the timestep token, bidirectional over the image, padding left out). kiln's
ONNX takes what the pipeline has at each step: the latents, the token ids and the tokenizer's mask. Its graph
makes the positions and the mask from them, at every size the profile allows.
"""

from __future__ import annotations

import dataclasses
import math

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    Patch,
    _batch,
    _instance_method,
    _spatial,
    _text,
)


def sequence_layout(text_mask, image_tokens: int):
    """(position ids [batch, seq], attention mask [batch, seq, seq], 1 where a token may attend) for prompts of
    text_mask [batch, text_len] (left-padded, 1 on the tokens), a timestep token and image_tokens patches."""
    import torch

    batch, text_len = text_mask.shape
    tokens = text_mask.sum(-1, keepdim=True)
    text_positions = (text_mask.cumsum(-1) - 1).clamp(min=0)  # the padding is at position 0
    rest = tokens + torch.arange(image_tokens + 1, device=text_mask.device)  # the timestep token, then the image
    positions = torch.cat([text_positions, rest], dim=-1)

    seq = positions.shape[-1]
    index = torch.arange(seq, device=text_mask.device)
    real = torch.cat([text_mask, text_mask.new_ones(batch, image_tokens + 1)], dim=-1).bool()  # [batch, seq]
    row, col = index[:, None], index[None, :]
    in_image = (row > text_len)[None]  # image rows see every real token, prompt rows the ones up to themselves
    allowed = real[:, None, :] & ((col <= row)[None] | in_image)
    padding_row = ~real[:, :, None]  # the pipeline lets the padding rows see everything (nothing reads them)
    return positions, (allowed | padding_row).to(torch.float32)


def _su_scaled_rope(self, hidden_states, position_ids):
    """OmniGenSuScaledRotaryEmbedding.forward with its choice of long or short factors made by a where on the
    positions, not a Python if; it keeps the model's reading of the first sample's positions for every sample."""
    import torch

    device = hidden_states.device
    long = torch.tensor(self.long_factor, dtype=torch.float32, device=device)
    short = torch.tensor(self.short_factor, dtype=torch.float32, device=device)
    factors = torch.where(position_ids.max() + 1 > self.original_max_position_embeddings, long, short)
    exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
    inv_freq = 1.0 / (factors * self.base**exponents)
    freqs = position_ids[0].float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = self.max_position_embeddings / self.original_max_position_embeddings
    factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))
    return emb.cos() * factor, emb.sin() * factor


ROPE_PATCH = Patch(
    "OmniGen's rotary factors chosen in the graph",
    "OmniGenSuScaledRotaryEmbedding picks its long or short factors with a Python if on the largest position id, "
    "which tracing cannot keep; kiln exports the same choice as a where",
    lambda m: _instance_method(m.rope, "forward", _su_scaled_rope),
)


def _omnigen_call(model, latents, input_ids, text_mask, timestep):
    p = model.config.patch_size
    image_tokens = (latents.shape[-2] // p) * (latents.shape[-1] // p)
    positions, mask = sequence_layout(text_mask, image_tokens)
    return model(hidden_states=latents, timestep=timestep, input_ids=input_ids, input_img_latents=[],
                 input_image_sizes={}, attention_mask=mask, position_ids=positions, return_dict=False)[0]  # fmt: skip


def _omnigen(model, config) -> Adapter:
    p = config["patch_size"]
    side = config["pos_embed_max_size"] * p
    height = DimRule("height", _spatial(p, side), multiple=p, max=side,
                     why=f"a patch is {p}x{p} latent pixels, and the positional table holds {config['pos_embed_max_size']} a side")  # fmt: skip
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
              InputRule("input_ids", ("batch", "text_len"), "int", config["vocab_size"]),
              InputRule("attention_mask", ("batch", "text_len"), "left_mask"),
              InputRule("timestep", ("batch",), "uniform", 1.0))  # fmt: skip
    return Adapter(
        type(model).__name__, "omnigen", inputs, (_batch(), height, dataclasses.replace(height, name="width"), _text()),
        call=_omnigen_call, patches=(ROPE_PATCH,),
        notes=("text-to-image: the prompt's token ids and its tokenizer mask (left-padded, as the pipeline pads) are "
               "taken; input images interleaved in the prompt are not",
               "the position ids and the causal-then-bidirectional attention mask are made in the graph from the "
               "mask and the latents' size, as the pipeline makes them",
               "the model turns every row by the first row's positions: batch the rows as the pipeline does (the "
               "conditional prompt first, its guidance rows after it in the same call)",
               "timestep is the flow time in [0, 1), as the pipeline's scheduler gives it in diffusers' tests "
               "(num_train_timesteps 1)"),
    )  # fmt: skip


FAMILIES = {"OmniGenTransformer2DModel": _omnigen}
