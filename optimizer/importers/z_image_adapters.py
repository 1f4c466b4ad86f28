"""The adapter for Z-Image (ZImageTransformer2DModel): lists of latents and captions as batched tensors.

Z-Image's forward takes a list of latents and a list of captions, each caption only its valid tokens;
it pads each caption and image to a multiple of 32 tokens with learned pad tokens, numbers positions
from the padded caption's length, and joins [image, caption] per sample, in Python loops over the lists.
Traced, every length would be fixed. kiln's ONNX takes latents [batch, C, H, W] and captions [batch,
text_len, D] with the tokenizer's mask, and exports a forward that lays out the same sequences with the
lengths counted from the mask: captions in a buffer of text_len rounded up to 32, each sample's tokens
past its padded length masked out of attention, where PyTorch's buffers end at the longest sample.
The check against PyTorch calls the original forward with the lists the pipeline passes.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    InputRule,
    Patch,
    _batch,
    _instance_method,
    _sides,
    _text,
    grid_positions,
)

_MULTIPLE = 32  # Z-Image pads every sequence to a multiple of this (SEQ_MULTI_OF)


def _angles(self, positions):
    """The rope embedder's complex angles at positions [..., 3], computed as its tables are (float64 products,
    rounded to float32) instead of looked up."""
    import torch

    rope, parts = self.rope_embedder, []
    for axis, dim in enumerate(rope.axes_dims):
        inverse = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angle = (positions[..., axis].double()[..., None] * inverse).float()
        parts.append(torch.polar(torch.ones_like(angle), angle))
    return torch.cat(parts, dim=-1)


def _forward(self, latents, t, captions, mask, patch_size=2, f_patch_size=1):
    """Z-Image's forward (text-to-image) on batched tensors: latents [B, C, H, W], captions [B, T, D] with the
    tokenizer's mask [B, T]; returns [B, C, H, W]."""
    import torch

    batch, channels, height, width = latents.shape
    rows, cols, text = height // patch_size, width // patch_size, captions.shape[1]
    image_len = rows * cols
    image_padded = (image_len + _MULTIPLE - 1) // _MULTIPLE * _MULTIPLE
    buffer = (text + _MULTIPLE - 1) // _MULTIPLE * _MULTIPLE
    length = mask.sum(dim=1, keepdim=True)  # [B, 1]
    padded = (length + _MULTIPLE - 1) // _MULTIPLE * _MULTIPLE
    adaln = self.t_embedder(t * self.t_scale).type_as(latents)

    # Image tokens, then pad tokens to a multiple of 32, at (caption's padded length + 1, row, col); pads at 0.
    tokens = latents.view(batch, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    x = self.all_x_embedder[f"{patch_size}-{f_patch_size}"](tokens.reshape(batch, image_len, -1))
    x = torch.cat([x, self.x_pad_token.to(x.dtype).expand(batch, image_padded - image_len, -1)], dim=1)
    pads = torch.zeros(image_padded - image_len, dtype=torch.int64)
    row, col = (torch.cat([axis, pads]) for axis in grid_positions(torch, rows, cols))
    first = (padded + 1) * (torch.arange(image_padded) < image_len)  # [B, image_padded]; pads at (0, 0, 0)
    x_positions = torch.stack([first, row.expand(batch, -1), col.expand(batch, -1)], dim=-1)
    x_freqs = _angles(self, x_positions)
    for layer in self.noise_refiner:
        x = layer(x, None, x_freqs, adaln, None, None, None)

    # Caption tokens, pad tokens to the caption's multiple of 32, then the buffer's padding (masked).
    j = torch.arange(buffer)[None]
    caption = self.cap_embedder(torch.cat([captions, captions.new_zeros(batch, buffer - text, captions.shape[2])], 1))
    caption = torch.where((j >= length)[..., None], self.cap_pad_token.to(caption.dtype), caption)
    caption = caption * (j < padded)[..., None]
    in_caption = j < padded
    zeros = torch.zeros_like(j).expand(batch, -1)
    cap_freqs = _angles(self, torch.stack([(j + 1).expand(batch, -1), zeros, zeros], dim=-1)) * in_caption[..., None]
    for layer in self.context_refiner:
        caption = layer(caption, in_caption, cap_freqs)

    # [image, caption] per sample, then the layers and the final layer; the image's tokens back to latents.
    unified = torch.cat([x, caption], dim=1)
    unified_mask = torch.cat([torch.ones_like(in_caption[:, :1]).expand(batch, image_padded), in_caption], dim=1)
    freqs = torch.cat([x_freqs, cap_freqs], dim=1)
    for layer in self.layers:
        unified = layer(unified, unified_mask, freqs, adaln, None, None, None)
    unified = self.all_final_layer[f"{patch_size}-{f_patch_size}"](unified, c=adaln)
    out = unified[:, :image_len].reshape(batch, rows, cols, 1, patch_size, patch_size, -1)
    return out.permute(0, 6, 3, 1, 4, 2, 5).reshape(batch, -1, height, width)


BATCHED_PATCH = Patch(
    "Z-Image's sequences laid out on batched tensors",
    "forward takes lists of latents and of captions (each its valid tokens), pads and joins them in Python loops "
    "and numbers positions from Python lengths, which tracing fixes; kiln exports a forward that lays out the "
    "same sequences on batched tensors from the mask's lengths",
    lambda m: _instance_method(m, "forward", _forward),
)


def _z_image_call(model, latents, timestep, captions, mask):
    """The pipeline's call: lists of [C, 1, H, W] latents and of valid caption tokens; while exporting, kiln's
    batched forward (BATCHED_PATCH) takes the tensors themselves."""
    import torch

    if torch.compiler.is_exporting():
        return model(latents, timestep, captions, mask)
    lengths = mask.sum(dim=1).tolist()
    out = model(list(latents.unsqueeze(2).unbind(0)), timestep,
                [c[:n] for c, n in zip(captions, lengths, strict=True)], return_dict=False)[0]  # fmt: skip
    return torch.stack(out).squeeze(2)


def _z_image(model, config) -> Adapter:
    patch = config["all_patch_size"][0]
    height, width = _sides(patch, ())
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
              InputRule("timestep", ("batch",), "uniform", 1000.0 / config["t_scale"]),
              InputRule("cap_feats", ("batch", "text_len", config["cap_feat_dim"])),
              InputRule("cap_mask", ("batch", "text_len"), "mask"))  # fmt: skip
    return Adapter(
        type(model).__name__, "z-image", inputs, (_batch(), height, width, _text()), call=_z_image_call,
        output_axes=("batch", None, "height", "width"), patches=(BATCHED_PATCH,),
        notes=("cap_feats holds each sample's caption padded to text_len, cap_mask the tokenizer's mask; the "
               "pipeline passes the valid tokens alone",),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"ZImageTransformer2DModel": _z_image}
