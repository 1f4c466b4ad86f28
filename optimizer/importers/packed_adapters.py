"""Adapters for transformers that take their latents packed into a token sequence, with the tokens'
positions beside them as ids (Flux and the families built on it: Chroma, Bria, Fibo, Ovis, LongCat, Flux.2).

The pipelines pack each 2x2 block of latent pixels into one token and make the position ids for one image
size. kiln's ONNX takes the latents as an image, [batch, channels, height, width], as every other image
model's; its graph packs them, makes the ids from the height, width and text length it is given, and
unpacks the output. The ids, and the rotary tables the model makes from them, so follow every size the
profile allows instead of being fixed at the size of the export.
"""

from __future__ import annotations

import dataclasses
import inspect
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
    timestep_high,
)

PACK = 2  # latent pixels per token, each way (the pipelines' _pack_latents)


@dataclasses.dataclass(frozen=True)
class Ids:
    """How a family's pipeline numbers positions: text token i and the latent token at (row, col)."""

    text: Callable  # (torch, i: int64 [n]) -> [n, axes]
    image: Callable  # (torch, row: int64 [n], col: int64 [n]) -> [n, axes]


def _stack(torch, *columns):
    return torch.stack([c.float() for c in columns], dim=-1)


# Flux, Chroma, Bria: text at the origin, image tokens at (0, row, col).
FLUX_IDS = Ids(lambda t, i: _stack(t, i * 0, i * 0, i * 0), lambda t, r, c: _stack(t, r * 0, r, c))
# Ovis: text tokens along the diagonal.
OVIS_IDS = Ids(lambda t, i: _stack(t, i * 0, i, i), FLUX_IDS.image)
# LongCat: text along the diagonal; the image as modality 1, past the longest text (512 tokens).
LONGCAT_IDS = Ids(OVIS_IDS.text, lambda t, r, c: _stack(t, r * 0 + 1, r + 512, c + 512))
# Flux.2: four axes (time, row, col, layer); text tokens along the last.
FLUX2_IDS = Ids(lambda t, i: _stack(t, i * 0, i * 0, i * 0, i), lambda t, r, c: _stack(t, r * 0, r, c, r * 0))


def pack(latents, size: int = PACK):
    """[batch, C, H, W] -> [batch, (H/size)(W/size), C size^2], as the pipelines' _pack_latents (size 2) and
    _pack_latents_no_patch (size 1)."""
    b, c, h, w = latents.shape
    tokens = latents.reshape(b, c, h // size, size, w // size, size).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, (h // size) * (w // size), c * size * size)


def unpack(tokens, height: int, width: int, size: int = PACK):
    """pack's inverse: [batch, (H/size)(W/size), C size^2] -> [batch, C, H, W]."""
    b, _, d = tokens.shape
    c = d // (size * size)
    grid = tokens.reshape(b, height // size, width // size, c, size, size).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, height, width)


def position_ids(ids: Ids, text_len: int, height: int, width: int, device, size: int = PACK) -> tuple:
    """(text ids [text_len, axes], image ids [(H/size)(W/size), axes]) for latents of height x width."""
    import torch

    rows, cols = height // size, width // size
    i = torch.arange(text_len, device=device)
    row, col = grid_positions(torch, rows, cols, device)
    return ids.text(torch, i), ids.image(torch, row, col)


def _packed_call(names: tuple[str, ...], ids: Ids, size: int):
    def call(model, *tensors):
        given = dict(zip(names, tensors, strict=True))
        latents, text = given.pop("hidden_states"), given["encoder_hidden_states"]
        height, width = latents.shape[-2], latents.shape[-1]
        txt_ids, img_ids = position_ids(ids, text.shape[1], height, width, latents.device, size)
        if "text_encoder_layers" in given:  # Fibo's: one ONNX input, [layers, batch, text_len, width]
            given["text_encoder_layers"] = list(given["text_encoder_layers"].unbind(0))
        out = model(hidden_states=pack(latents, size), img_ids=img_ids, txt_ids=txt_ids, **given, return_dict=False)[0]
        return unpack(out, height, width, size)

    return call


def _chroma_embedding(self, timestep):
    """ChromaCombinedTimestepTextProjEmbeddings.forward with its zero guidance made from timestep's shape."""
    import torch

    batch, index_length = timestep.shape[0], self.mod_proj.shape[0]
    times = self.time_proj(timestep).to(dtype=timestep.dtype)
    guidance = self.guidance_proj(timestep.new_zeros(batch, dtype=torch.int64)).to(dtype=timestep.dtype)
    mod = self.mod_proj.to(dtype=times.dtype, device=times.device).repeat(batch, 1, 1)
    both = torch.cat([times, guidance], dim=1).unsqueeze(1).repeat(1, index_length, 1)
    return torch.cat([both, mod], dim=-1).to(timestep.dtype)


CHROMA_PATCH = Patch(
    "Chroma's zero guidance from the timestep's shape",
    "ChromaCombinedTimestepTextProjEmbeddings makes its zero guidance with torch.tensor([0] * batch), which fixes "
    "the batch size when traced; kiln exports the same embedding with the zeros made from the timestep's shape",
    lambda m: _instance_method(m.time_text_embed, "forward", _chroma_embedding),
)


def _packed(ids: Ids, family: str, patches: tuple[Patch, ...] = (), size: int = PACK):
    def adapter(model, config) -> Adapter:
        params = inspect.signature(model.forward).parameters
        channels = config["in_channels"] // (size * size)
        why = f"a token packs {size}x{size} latent pixels"
        height = DimRule("height", _spatial(size), multiple=size, why=why)
        inputs = [InputRule("hidden_states", ("batch", channels, "height", "width")),
                  InputRule("encoder_hidden_states", ("batch", "text_len", config["joint_attention_dim"]))]  # fmt: skip
        if "text_encoder_layers" in params:  # Fibo: a text encoder layer's states for each block
            layers = config["num_layers"] + config["num_single_layers"]
            inputs.append(InputRule("text_encoder_layers", (layers, "batch", "text_len", config["text_encoder_dim"])))
        if "pooled_projections" in params and config.get("pooled_projection_dim"):
            inputs.append(InputRule("pooled_projections", ("batch", config["pooled_projection_dim"])))
        inputs.append(InputRule("timestep", ("batch",), "uniform", 1.0))  # the pipelines pass t / 1000
        if "guidance" in params and config.get("guidance_embeds"):
            inputs.append(InputRule("guidance", ("batch",), "uniform", 8.0))
        names = tuple(i.name for i in inputs)
        return Adapter(
            type(model).__name__, family, tuple(inputs),
            dims=(_batch(), height, dataclasses.replace(height, name="width"), _text()),
            call=_packed_call(names, ids, size),
            output_axes=("batch", None, "height", "width"),
            patches=patches,
            notes=(f"latents are taken as [batch, {channels}, height, width] and packed into tokens inside the graph "
                   f"({size}x{size} pixels a token), with the position ids made there from the sizes, as the "
                   f"pipeline makes them",),
        )  # fmt: skip

    return adapter


def _krea2_call(model, latents, text, mask, timestep):
    """Krea 2 takes the text and image ids as one position_ids [text_len + tokens, 3], and a boolean mask."""
    import torch

    height, width = latents.shape[-2], latents.shape[-1]
    txt_ids, img_ids = position_ids(FLUX_IDS, text.shape[1], height, width, latents.device)
    out = model(hidden_states=pack(latents), encoder_hidden_states=text, timestep=timestep,
                position_ids=torch.cat([txt_ids, img_ids]), encoder_attention_mask=mask.bool(), return_dict=False)[0]  # fmt: skip
    return unpack(out, height, width)


def _krea2(model, config) -> Adapter:
    channels = config["in_channels"] // (PACK * PACK)
    height = DimRule("height", _spatial(PACK), multiple=PACK, why=f"a token packs {PACK}x{PACK} latent pixels")
    inputs = (InputRule("hidden_states", ("batch", channels, "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["num_text_layers"], config["text_hidden_dim"])),
              InputRule("encoder_attention_mask", ("batch", "text_len"), "mask"),
              InputRule("timestep", ("batch",), "uniform", timestep_high(model, config)))  # fmt: skip
    return Adapter(
        type(model).__name__, "krea2", inputs, (_batch(), height, dataclasses.replace(height, name="width"), _text()),
        call=_krea2_call, output_axes=("batch", None, "height", "width"),
        notes=(f"latents are taken as [batch, {channels}, height, width] and packed into tokens inside the graph; "
               f"encoder_hidden_states holds the text encoder's {config['num_text_layers']} selected layers",),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {
    "FluxTransformer2DModel": _packed(FLUX_IDS, "flux"),
    "ChromaTransformer2DModel": _packed(FLUX_IDS, "flux", (CHROMA_PATCH,)),
    "BriaTransformer2DModel": _packed(FLUX_IDS, "flux"),
    "BriaFiboTransformer2DModel": _packed(FLUX_IDS, "flux", size=1),  # its pipeline packs no 2x2 patches
    "OvisImageTransformer2DModel": _packed(OVIS_IDS, "flux"),
    "LongCatImageTransformer2DModel": _packed(LONGCAT_IDS, "flux"),
    "Flux2Transformer2DModel": _packed(FLUX2_IDS, "flux2"),
    "Krea2Transformer2DModel": _krea2,
}
