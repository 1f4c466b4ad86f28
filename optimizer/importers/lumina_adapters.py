"""The adapter for Lumina 2 (Lumina2Transformer2DModel): its joint sequence laid out inside the graph.

Lumina 2 joins each sample's caption and image tokens into one sequence, the caption cut to its own
length: forward reads the lengths from the mask with .tolist() and lays the sequence out in Python loops,
and its rope module gathers complex angle tables at positions made the same way. Traced, the lengths
would be fixed at the export's. kiln exports a forward that lays the same sequence out with gathers
indexed by the mask's lengths, and rotates q and k by the same angles (the tables' cos and sin, made from
the float64 tables) in real arithmetic; the tokens past each sample's sequence are padding, masked out of
attention, where PyTorch's sequence ends at the longest sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    Patch,
    _generic_transformer,
    _instance_method,
    _module_attribute,
    grid_positions,
    rotate_pairs,
)


def _lookup(rope, ids):
    """(cos, sin) [..., D/2] of the rope module's angles at ids [..., 3]: one table per axis."""
    import torch

    cos, sin = [], []
    for axis, table in enumerate(rope.freqs_cis):
        rows = ids[..., axis]
        cos.append(table.real.float()[rows])
        sin.append(table.imag.float()[rows])
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def _rotate(x, freqs, use_real=False, use_real_unbind_dim=-1, sequence_dim=2):
    """apply_rotary_emb with use_real=False, in real arithmetic: x [B, S, H, D] turned by freqs = (cos, sin),
    [B, S, D/2] each."""
    return rotate_pairs(x, *(f[:, :, None] for f in freqs))


def _lumina2_forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                     attention_kwargs=None, return_dict=True):  # fmt: skip
    """Lumina2Transformer2DModel.forward, its joint sequence laid out with gathers (see the module's doc)."""
    import torch

    batch, channels, height, width = hidden_states.shape
    p = self.config.patch_size
    rows, cols = height // p, width // p
    image_len, text_len = rows * cols, encoder_attention_mask.shape[1]
    temb, encoder_hidden_states = self.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
    caption = encoder_attention_mask.sum(dim=1, keepdim=True)  # [B, 1]: masks are ones, then the padding's zeros

    # Positions: caption token j at (j, 0, 0); image token (r, c) at (caption length, r, c).
    text = torch.arange(text_len)
    zeros = torch.zeros_like(text)
    text_cos, text_sin = _lookup(self.rope_embedder, torch.stack([text, zeros, zeros], dim=-1))
    valid = (text[None] < caption)[..., None]  # padded caption tokens take angle 0 with length 0, as PyTorch's
    text_rope = (text_cos * valid, text_sin * valid)
    row, col = grid_positions(torch, rows, cols)
    image_ids = torch.stack([caption.expand(batch, image_len), row[None].expand(batch, -1), col[None].expand(batch, -1)], -1)
    image_rope = _lookup(self.rope_embedder, image_ids)

    tokens = hidden_states.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
    hidden_states = self.x_embedder(tokens)
    for layer in self.context_refiner:
        encoder_hidden_states = layer(encoder_hidden_states, encoder_attention_mask, text_rope)
    for layer in self.noise_refiner:
        hidden_states = layer(hidden_states, None, image_rope, temb)

    # The joint sequence: sample i's caption (caption_i tokens), its image tokens, then padding.
    k = torch.arange(text_len + image_len)[None]
    source = torch.where(k < caption, k, text_len + k - caption).clamp(max=text_len + image_len - 1)
    in_sequence = k < caption + image_len

    def joined(text_part, image_part):
        both = torch.cat([text_part.expand(batch, -1, -1), image_part], dim=1)
        return torch.gather(both, 1, source[..., None].expand(batch, -1, both.shape[-1]))

    joint = joined(encoder_hidden_states, hidden_states) * in_sequence[..., None]
    rope = (joined(text_rope[0], image_rope[0]), joined(text_rope[1], image_rope[1]))
    for layer in self.layers:
        joint = layer(joint, in_sequence, rope, temb)
    joint = self.norm_out(joint, temb)

    image = torch.gather(joint, 1, (caption + torch.arange(image_len)[None])[..., None].expand(-1, -1, joint.shape[-1]))
    output = image.view(batch, rows, cols, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
    output = output.reshape(batch, self.out_channels, height, width)
    return (output,) if not return_dict else {"sample": output}


@contextlib.contextmanager
def _joint_sequence(model) -> Iterator[None]:
    module = sys.modules[type(model).__module__]
    with _instance_method(model, "forward", _lumina2_forward), _module_attribute(module, "apply_rotary_emb", _rotate):
        yield


JOINT_SEQUENCE_PATCH = Patch(
    "Lumina 2's joint sequence laid out with gathers",
    "forward reads each sample's caption length from the mask with .tolist() and lays out the joint sequence and "
    "its complex rotary angles in Python loops, which tracing fixes at the export size; kiln exports a forward "
    "that lays out the same sequence with gathers indexed by the lengths, and turns q and k by the same angles "
    "in real arithmetic",
    _joint_sequence,
)


def _lumina2(model, config) -> Adapter:
    adapter = _generic_transformer(model, config)
    return dataclasses.replace(adapter, family="lumina2", patches=(JOINT_SEQUENCE_PATCH,), notes=(
        "encoder_attention_mask is a tokenizer's mask (ones, then zeros for the padding): each sample's caption "
        "is cut to its length inside the graph",))  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"Lumina2Transformer2DModel": _lumina2}
