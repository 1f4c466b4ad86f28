"""Adapters for QwenImage (and its layered variant) and NucleusMoE-Image: packed latents whose rotary
positions are centred on the image.

Their rope modules slice precomputed complex tables with the Python ints of `img_shapes` and int(text
length), through caches keyed on them: traced, every size would be fixed at the export's, and ONNX export
takes complex products but not complex reshapes. kiln exports a rope that makes the same angles inside
the graph from the symbolic sizes and turns q and k by them in real arithmetic, and takes the latents as
images, [batch, C, H, W], packed 2x2 into tokens inside the graph as the pipelines pack them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    Patch,
    _batch,
    _instance_method,
    _module_attribute,
    rotate_pairs,
    _spatial,
    _text,
    timestep_high,
)
from kiln.optimizer.importers.packed_adapters import PACK, pack, unpack
from kiln.targets import DimRange


def _angles(torch, positions, dim: int, theta: float):
    """positions x frequencies, as the rope modules' rope_params make them before torch.polar."""
    inverse = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
    return torch.outer(positions, inverse)


def _centred(torch, size):
    """Positions of a side centred on 0, as scale_rope takes them: -(size - size//2) .. size//2 - 1."""
    return torch.arange(size) - (size - size // 2)


def _rope(self, video_fhw, device=None, max_txt_seq_len=None):
    """forward of QwenEmbedRope, QwenEmbedLayer3DRope and NucleusMoEEmbedRope for one sample's grids,
    (1, height, width) each and all of one size: the first len - 1 are at frame positions 0, 1, ..., the
    last at -1 under the layered rope (its condition image). Returns (image angles, text angles)."""
    import torch

    grids = video_fhw[0] if isinstance(video_fhw, list) else video_fhw
    grids = grids if isinstance(grids, (list, Grids)) else [grids]
    _, height, width = grids[0]
    count, layered = grids.count if isinstance(grids, Grids) else len(grids), type(self).__name__ == "QwenEmbedLayer3DRope"
    frame_dim, row_dim, col_dim = self.axes_dim
    frames = torch.arange(count)
    if layered:
        frames = torch.where(frames == count - 1, -1, frames)
    if self.scale_rope:
        rows, cols, reach = _centred(torch, height), _centred(torch, width), torch.sym_max(height // 2, width // 2)
    else:
        rows, cols, reach = torch.arange(height), torch.arange(width), torch.sym_max(height, width)
    if layered:
        reach = torch.sym_max(reach, count - 1)
    shape = (count, height, width, -1)
    image = torch.cat([
        _angles(torch, frames, frame_dim, self.theta).view(count, 1, 1, -1).expand(*shape),
        _angles(torch, rows, row_dim, self.theta).view(1, height, 1, -1).expand(*shape),
        _angles(torch, cols, col_dim, self.theta).view(1, 1, width, -1).expand(*shape),
    ], dim=-1).reshape(count * height * width, -1)  # fmt: skip
    text = torch.cat([_angles(torch, reach + torch.arange(max_txt_seq_len), d, self.theta) for d in self.axes_dim], dim=1)
    return image, text


def _rotate(x, angles, use_real=False, use_real_unbind_dim=-1):
    """apply_rotary_emb_qwen with use_real=False, in real arithmetic: x [B, S, H, D] turned by angles [S, D/2]."""
    import torch

    return rotate_pairs(x, torch.cos(angles)[:, None], torch.sin(angles)[:, None])


@dataclasses.dataclass(frozen=True)
class Grids:
    """count grids of one size, as the layered img_shapes lists them, where count is symbolic (a Python list
    of a symbolic length would fix it); only kiln's rope, exported in place of the model's, takes it."""

    grid: tuple
    count: object

    def __getitem__(self, index):
        return self.grid


def _qwen_call(names: tuple[str, ...], layered: bool):
    """Pack the latents (each layer's, then the condition image's), pass img_shapes from their sizes, unpack
    the output (the layers only, as the layered pipeline keeps)."""

    def call(model, *tensors):
        import torch

        given = dict(zip(names, tensors, strict=True))
        latents = given.pop("hidden_states")
        height, width = latents.shape[-2], latents.shape[-1]
        batch, grid = latents.shape[0], (1, height // PACK, width // PACK)  # every sample's grid
        if layered:
            condition, layers = given.pop("image_latents"), latents.shape[1]
            images = torch.cat([latents, condition[:, None]], dim=1)
            tokens = pack(images.flatten(0, 1)).unflatten(0, (batch, layers + 1)).flatten(1, 2)
            count = layers + 1
            img_shapes = [[grid] * count if isinstance(count, int) else Grids(grid, count)]
        else:
            tokens, img_shapes = pack(latents), [grid]  # the rope reads the first sample's only
        out = model(hidden_states=tokens, img_shapes=img_shapes, **given, return_dict=False)[0]
        if not layered:
            return unpack(out, height, width)
        per_layer = out.unflatten(1, (layers + 1, -1))[:, :layers]
        return unpack(per_layer.flatten(0, 1), height, width).unflatten(0, (batch, layers))

    return call


def _text_length(encoder_hidden_states, encoder_hidden_states_mask):
    """compute_text_seq_len_from_mask as forward uses it: the text length, and the mask as booleans (its
    per-sample lengths, which forward drops, take torch.as_tensor of the length, which tracing fixes)."""
    import torch

    mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.to(torch.bool)
    return encoder_hidden_states.shape[1], None, mask


@contextlib.contextmanager
def _dynamic_rope(model) -> Iterator[None]:
    module = sys.modules[type(model).__module__]
    length, rotate = (("compute_text_seq_len_from_mask", "apply_rotary_emb_qwen") if hasattr(module, "apply_rotary_emb_qwen")
                      else ("_compute_text_seq_len_from_mask", "_apply_rotary_emb_nucleus"))  # fmt: skip
    with (_instance_method(model.pos_embed, "forward", _rope), _module_attribute(module, length, _text_length),
          _module_attribute(module, rotate, _rotate)):  # fmt: skip
        yield


ROPE_PATCH = Patch(
    "rotary angles made inside the graph from the sizes",
    "the rope module slices precomputed complex tables with the Python ints of img_shapes and int(text length), "
    "and forward takes torch.as_tensor of the text length, which tracing fixes at the export size (and ONNX export "
    "takes no complex reshapes); kiln exports a rope that makes the same angles from the symbolic sizes and turns "
    "q and k by them in real arithmetic, and the text length without as_tensor",
    _dynamic_rope,
)


def _qwen(model, config) -> Adapter:
    layered = bool(config.get("use_layer3d_rope"))
    channels = config["in_channels"] // (PACK * PACK)
    why = f"a token packs {PACK}x{PACK} latent pixels"
    height = DimRule("height", _spatial(PACK), multiple=PACK, why=why)
    dims = [_batch(), height, dataclasses.replace(height, name="width"), _text()]
    image = ("batch", channels, "height", "width")
    inputs = [InputRule("hidden_states", ("batch", "layers", *image[1:]) if layered else image)]
    if layered:
        dims.append(DimRule("layers", DimRange(1, 2, 4)))
        inputs.append(InputRule("image_latents", image))
    inputs += [InputRule("encoder_hidden_states", ("batch", "text_len", config["joint_attention_dim"])),
               InputRule("encoder_hidden_states_mask", ("batch", "text_len"), "mask"),
               InputRule("timestep", ("batch",), "uniform", timestep_high(model, config))]  # fmt: skip
    if config.get("guidance_embeds"):
        inputs.append(InputRule("guidance", ("batch",), "uniform", 8.0))
    if config.get("use_additional_t_cond"):
        inputs.append(InputRule("additional_t_cond", ("batch",), "int", 2))  # the layered pipeline's is_rgb
    notes = [f"latents are taken as [batch, {channels}, height, width] and packed into tokens inside the graph "
             f"({PACK}x{PACK} pixels a token), with the rotary angles made there from the sizes"]  # fmt: skip
    if layered:
        notes.append("hidden_states holds the layers' latents [batch, layers, C, H, W] and image_latents the condition "
                     "image at the same size; the output is the layers' prediction, as the pipeline keeps")  # fmt: skip
    return Adapter(
        type(model).__name__, "qwenimage", tuple(inputs), tuple(dims),
        call=_qwen_call(tuple(i.name for i in inputs), layered),
        output_axes=("batch", "layers", None, "height", "width") if layered else ("batch", None, "height", "width"),
        patches=(ROPE_PATCH,), notes=tuple(notes),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {
    "QwenImageTransformer2DModel": _qwen,
    "NucleusMoEImageTransformer2DModel": _qwen,
}
