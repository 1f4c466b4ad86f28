"""The adapter for Ideogram 4 (Ideogram4Transformer2DModel), text to image.

The model takes one packed sequence per sample: the text slots (the pipeline left-pads each prompt to
max_sequence_length), then the image's 2x2 patches, with a (t, h, w) position, a segment id (tokens attend
within their segment) and a role indicator per token, all of which the pipeline builds in Python for one
image size and set of prompt lengths. kiln's ONNX takes the latents as an image, [batch, C, H, W], the text
features and the tokenizer's mask of them; its graph builds the packed sequence and the ids from the mask and
the symbolic sizes, and unpacks the image's tokens of the output.
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
    _spatial,
    _text,
    grid_positions,
    interleaved_mrope_angles,
)

PATCH = 2  # latent pixels per token, each way (the pipeline's patch_size)
# The role indicators (image and text as transformer_ideogram4 names them; 0 where the pipeline leaves its zeros)
# and the image positions' offset.
PAD, IMAGE, TEXT = 0, 2, 3
IMAGE_OFFSET = 65536


def _pack(latents):
    """[batch, C, H, W] -> [batch, (H/2)(W/2), 2*2*C]: a token's channels in (row, col, channel) order, the
    inverse of the pipeline's unpacking before the VAE."""
    b, c, h, w = latents.shape
    grid = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    return grid.reshape(b, (h // PATCH) * (w // PATCH), -1)


def _unpack(tokens, height, width):
    """_pack's inverse, as the pipeline unpacks its latents: [batch, (H/2)(W/2), 2*2*C] -> [batch, C, H, W]."""
    b, _, d = tokens.shape
    grid = tokens.reshape(b, height // PATCH, width // PATCH, PATCH, PATCH, d // (PATCH * PATCH))
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, height, width)


def _text_ids(torch, mask):
    """(position ids [batch, text_len, 3], segment ids, indicator) of the text slots: the i-th token of the mask at
    (i, i, i), in segment 1, marked as text; padding at 0, in segment -1 (apart from the text and image),
    marked as padding."""
    kept = mask > 0
    i = torch.where(kept, mask.cumsum(dim=1) - 1, 0)
    return i[..., None].expand(-1, -1, 3), torch.where(kept, 1, -1), torch.where(kept, TEXT, PAD)


def _image_ids(torch, batch, rows, cols, device):
    """(position ids [batch, rows*cols, 3], segment ids, indicator) of the image tokens: (0, row, col) past
    IMAGE_OFFSET, in segment 1, marked as the output image."""
    row, col = grid_positions(torch, rows, cols, device)
    ids = torch.stack([row * 0, row, col], dim=-1) + IMAGE_OFFSET
    ones = (row * 0 + 1)[None].expand(batch, -1)
    return ids[None].expand(batch, -1, -1), ones, ones * IMAGE


def _mrope(self, position_ids):
    """Ideogram4MRoPE.forward with the angles its matmul and indexed writes make, as products."""
    import torch

    angles = interleaved_mrope_angles(torch, position_ids, self.inv_freq, self.mrope_section)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


MROPE_PATCH = Patch(
    "Ideogram 4's rotary angles as elementwise products",
    "Ideogram4MRoPE makes its angles with a matmul of one-element rows and writes the h and w frequencies in by "
    "index (ScatterND); kiln's fp16 build keeps only elementwise chains before Sin and Cos in float32, and image "
    f"positions start at {IMAGE_OFFSET}, past float16's range, so kiln exports the same angles as products",
    lambda m: _instance_method(m.rotary_emb, "forward", _mrope),
)


def _ideogram_call(model, latents, text, mask, timestep):
    """[text slots][image tokens] with their ids, as the pipeline's conditional pass packs them; the text slots
    carry zero latents and the image tokens zero text features. Returns the image tokens' output as an image."""
    import torch

    batch, text_len = mask.shape
    height, width = latents.shape[-2], latents.shape[-1]
    tokens = _pack(latents)
    text_parts = _text_ids(torch, mask)
    image_parts = _image_ids(torch, batch, height // PATCH, width // PATCH, latents.device)
    positions, segments, indicator = (torch.cat(pair, dim=1) for pair in zip(text_parts, image_parts, strict=True))
    hidden = torch.cat([tokens.new_zeros(batch, text_len, tokens.shape[-1]), tokens], dim=1)
    features = torch.cat([text, text.new_zeros(batch, tokens.shape[1], text.shape[-1])], dim=1)
    out = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=features, position_ids=positions,
                segment_ids=segments, indicator=indicator, return_dict=False)[0]  # fmt: skip
    return _unpack(out[:, text_len:], height, width)


def _ideogram(model, config) -> Adapter:
    channels = config["in_channels"] // (PATCH * PATCH)
    height = DimRule("height", _spatial(PATCH), multiple=PATCH, why=f"a token packs {PATCH}x{PATCH} latent pixels")
    text = dataclasses.replace(_text(), max=IMAGE_OFFSET, why=f"text positions stay below the image's, {IMAGE_OFFSET}")
    inputs = (InputRule("hidden_states", ("batch", channels, "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["llm_features_dim"])),
              InputRule("encoder_attention_mask", ("batch", "text_len"), "left_mask"),
              InputRule("timestep", ("batch",), "uniform", 1.0))  # fmt: skip
    return Adapter(
        type(model).__name__, "ideogram4", inputs, (_batch(), height, dataclasses.replace(height, name="width"), text),
        call=_ideogram_call, output_axes=("batch", None, "height", "width"), patches=(MROPE_PATCH,),
        notes=(f"latents are taken as [batch, {channels}, height, width] and packed 2x2 into tokens inside the graph, "
               "channels in the order the pipeline unpacks them for the VAE; the output is unpacked the same way",
               "encoder_hidden_states are the text slots and encoder_attention_mask the tokenizer's mask of them "
               "(padded on the left, as the pipeline pads; on the right gives the same output); the packed sequence "
               "and its position, segment and indicator ids are made inside the graph from the mask and the sizes",
               "timestep is the model's time in [0, 1] (1 - sigma, as the pipeline passes it)",
               "the unconditional transformer's pass (image tokens alone, zero text features) is an all-zero mask, "
               "at any text_len: padding sits in a segment of its own, so the image tokens see only each other",
               "text to image only: one image per row, no packing of several samples into one sequence"),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"Ideogram4Transformer2DModel": _ideogram}
