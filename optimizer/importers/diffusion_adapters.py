"""What each diffusers model family takes, for the diffusers importer: one `Adapter` per family.

An adapter names the ONNX inputs and says how to make each from the config and the dim sizes (batch,
latent height and width, frames, text length), which dims are dynamic and what they must satisfy
(multiples of the patch size, the reach of a positional table, a fixed length), how to call the model
(return_dict=False; the output is 'sample'), and any change to the model needed while exporting. This
module also picks where to trace and where to check. torch and diffusers are imported only inside
functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
from collections.abc import Callable, Iterator, Mapping, Sequence

from kiln.optimizer.errors import InputError
from kiln.optimizer.shapes import parse_shape_spec
from kiln.targets import DimRange
from kiln.targets.profile import base_dim, dim_size

BATCH_DEFAULT = DimRange(1, 2, 4)
TEXT_DEFAULT = DimRange(4, 8, 16)


@dataclasses.dataclass(frozen=True)
class DimRule:
    """A dim the model's inputs share, in latent pixels (or frames, or text tokens), and its limits."""

    name: str
    default: DimRange
    multiple: int = 1  # sizes must be multiples of this (the patch size)
    max: int | None = None  # the largest size the model takes (its positional table)
    min: int | None = None  # the smallest size one graph takes (smaller ones take other paths when traced)
    fixed: int | None = None  # the only size the model takes: the dim is static in the export
    same_as: str | None = None  # always equal to that dim (square latents): not a dim of its own
    avoid: tuple[int, ...] = ()  # sizes that take a special path when traced: never the export size
    why: str = ""  # why multiple / max / fixed / same_as, for messages


@dataclasses.dataclass(frozen=True)
class InputRule:
    """One ONNX input: its axes (dim names or static sizes) and how to make seeded values for it."""

    name: str
    axes: tuple[str | int, ...]
    # normal: N(0, 1) floats; uniform: floats in [0, high); int: int64 in [0, high); mask: int64 [batch, n]
    # attention masks of the form a tokenizer gives (ones, then zeros for the padding; at least one token);
    # left_mask: the same, padded on the left;
    # bool: booleans, each true or false with even odds
    kind: str = "normal"
    high: float = 1.0


@dataclasses.dataclass(frozen=True)
class Patch:
    """A change to the model made only while exporting; the check against PyTorch runs the original."""

    what: str
    why: str
    apply: Callable  # (model) -> context manager


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How to export one diffusers model class: inputs, dims, the call, and export-time patches."""

    class_name: str
    family: str
    inputs: tuple[InputRule, ...]
    dims: tuple[DimRule, ...]
    call: Callable  # (model, *tensors in input order) -> the output tensor, or a tuple of them in outputs' order
    outputs: tuple[str, ...] = ("sample",)
    output_axes: tuple[str | int | None, ...] = ()  # names for the first output's dims; None: as exported
    output_like: Mapping[str, str] = dataclasses.field(default_factory=dict)  # an output shaped as that input
    patches: tuple[Patch, ...] = ()
    notes: tuple[str, ...] = ()
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)  # written into the ONNX model's
    check: Callable | None = None  # (model, onnx path, sizes, providers) -> results: a check beyond the per-shape parity

    def rule(self, name: str) -> DimRule:
        return next(r for r in self.dims if r.name == name)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def dynamic_dims(self) -> list[DimRule]:
        """The dims a range is given for: not fixed, not following another dim."""
        return [r for r in self.dims if r.fixed is None and r.same_as is None]

    def int_ranges(self) -> dict[str, list[int]]:
        """Integer inputs and the [low, high) their values come from (an embedding table's size); masks are
        all ones in kiln's random inputs (verification against PyTorch takes padded ones too)."""
        ranges = {i.name: [0, int(i.high)] for i in self.inputs if i.kind == "int"}
        return ranges | {i.name: [1, 2] for i in self.inputs if i.kind in ("mask", "left_mask")}


def _align_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _spatial(multiple: int, limit: int | None = None) -> DimRange:
    """The default latent side: 8..16..32 in multiples of the patch size, within the model's limit."""
    lo, opt, hi = (_align_up(v, multiple) for v in (8, 16, 32))
    if limit is not None:
        hi = min(hi, limit // multiple * multiple)
        opt, lo = min(opt, hi), min(lo, hi)
    return DimRange(lo, opt, hi)


def grid_positions(torch, rows, cols, device=None):
    """(row, col) of each cell of a rows x cols grid, row by row: the order patch tokens take."""
    row = torch.arange(rows, device=device)[:, None].expand(rows, cols).reshape(-1)
    col = torch.arange(cols, device=device)[None, :].expand(rows, cols).reshape(-1)
    return row, col


def interleaved_mrope_angles(torch, positions, inv_freq, sections):
    """[..., len(inv_freq)] rotary angles of interleaved mRoPE from positions [..., 3] (t, h, w): frequency k turns
    with the h position where k % 3 == 1 and the w position where k % 3 == 2, within 3 x that axis' section, else
    with t. As products, not the models' matmul and indexed writes: kiln's fp16 build keeps elementwise chains
    before Sin and Cos in float32, and these positions pass float16's steps (Ideogram 4's start at 65536)."""
    axis = [0] * inv_freq.shape[0]
    for a in (1, 2):
        for k in range(a, min(3 * sections[a], len(axis)), 3):
            axis[k] = a
    # index_select: a Gather, which the fp16 build follows back to the positions (a GatherND it would not)
    chosen = positions.float().index_select(-1, torch.tensor(axis, device=positions.device))
    return chosen * inv_freq.float()


def wan_grid_angles(torch, head_dim, frames, rows, cols):
    """[len(frames) x len(rows) x len(cols), head_dim / 2] rotary angles of a token grid, in float32, as Wan's rope
    tables make them (theta 10000; head_dim - 4 (head_dim // 6) of the dims turn with the frame position, 2
    (head_dim // 6) each with the row's and the col's) at these positions of each axis."""

    def axis(positions, dim):
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        return positions.float()[:, None] * inv_freq

    side = 2 * (head_dim // 6)
    shape = (frames.shape[0], rows.shape[0], cols.shape[0], -1)  # not len(): a symbolic size is no Python int
    t = axis(frames, head_dim - 2 * side)[:, None, None].expand(shape)
    h = axis(rows, side)[None, :, None].expand(shape)
    w = axis(cols, side)[None, None, :].expand(shape)
    return torch.cat([t, h, w], dim=-1).flatten(0, 2)


def rotate_pairs(x, cos, sin):
    """Rotary embedding on interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), in float32: the
    complex product (x0 + i x1)(cos + i sin) in real arithmetic."""
    import torch

    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def _kwargs_call(names: Sequence[str], grouped: Mapping[str, str] | None = None):
    """call(model, *tensors) -> model(name=tensor, ..., return_dict=False)[0].

    grouped maps an input name to the dict kwarg it goes into (PixArt's added_cond_kwargs).
    """
    grouped = dict(grouped or {})
    order = [*names, *grouped]

    def call(model, *tensors):
        given = dict(zip(order, tensors, strict=True))
        kwargs = {name: given[name] for name in names}
        for name, group in grouped.items():
            kwargs.setdefault(group, {})[name] = given[name]
        return model(**kwargs, return_dict=False)[0]

    return call


def _first(config: Mapping, *keys):
    return next((config[k] for k in keys if config.get(k) is not None), None)


def _text_width(config: Mapping) -> int | None:
    return _first(config, "caption_channels", "joint_attention_dim", "text_embed_dim", "text_dim", "cap_feat_dim",
                  "context_in_dim", "cross_attention_dim")  # fmt: skip


def _batch() -> DimRule:
    return DimRule("batch", BATCH_DEFAULT)


def _text(fixed: int | None = None, why: str = "") -> DimRule:
    if fixed is not None:
        return DimRule("text_len", DimRange(fixed, fixed, fixed), fixed=fixed, why=why)
    return DimRule("text_len", TEXT_DEFAULT)


def _sides(patch: int, avoid: tuple[int, ...], limit: int | None = None, why: str = "", square: bool = False):
    """height and width rules for latents patched by patch x patch."""
    why = f"its patch_size is {patch}{why}"
    height = DimRule("height", _spatial(patch, limit), multiple=patch, max=limit, avoid=avoid, why=why)
    if square:
        why = "its unpatchify assumes square latents"
        return height, dataclasses.replace(height, name="width", same_as="height", why=why)
    return height, dataclasses.replace(height, name="width")


@contextlib.contextmanager
def _module_attribute(module, name: str, value) -> Iterator[None]:
    """module.name is value inside the block."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def _instance_method(obj, name: str, function) -> Iterator[None]:
    """obj.name is function bound to obj, on this instance only, inside the block."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, types.MethodType(function, obj))
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _forward_and_attention(model, forward, attentions, processor) -> Iterator[None]:
    """model.forward is forward, and each of the attention modules' processor is processor, inside the block: the
    export-time forwards that run a model's own layers on batched tensors."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_instance_method(model, "forward", forward))
        for attention in attentions:
            stack.enter_context(_module_attribute(attention, "processor", processor))
        yield


def exported_or_original(names, original) -> Callable:
    """An adapter's call for a model with an export-time forward (a Patch): while exporting, the patched forward
    takes the inputs by name; otherwise original(model, inputs by name) calls the model as its pipeline does, the
    check the export is verified against."""

    def call(model, *tensors):
        import torch

        given = dict(zip(names, tensors, strict=True))
        return model(**given) if torch.compiler.is_exporting() else original(model, given)

    return call


# -- DiT: class-conditional, square latents -------------------------------------------------------


def _dit_forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
    """DiTTransformer2DModel.forward, but the unpatchify takes the grid from the input, not sqrt(tokens)."""
    import torch
    import torch.nn.functional as F

    p = self.patch_size
    height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
    hidden_states = self.pos_embed(hidden_states)
    for block in self.transformer_blocks:
        hidden_states = block(hidden_states, timestep=timestep, class_labels=class_labels,
                              cross_attention_kwargs=cross_attention_kwargs)  # fmt: skip
    conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
    shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
    hidden_states = self.proj_out_2(hidden_states)
    hidden_states = hidden_states.reshape(-1, height, width, p, p, self.out_channels)
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    output = hidden_states.reshape(-1, self.out_channels, height * p, width * p)
    return (output,) if not return_dict else {"sample": output}


def _dit(model, config) -> Adapter:
    patch = config["patch_size"]
    height, width = _sides(patch, (config["sample_size"],), square=True)
    names = ("hidden_states", "timestep", "class_labels")
    return Adapter(
        type(model).__name__, "dit",
        inputs=(InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
                InputRule("timestep", ("batch",), "int", 1000),
                InputRule("class_labels", ("batch",), "int", config.get("num_embeds_ada_norm") or 1000)),
        dims=(_batch(), height, width),
        call=_kwargs_call(names),
        output_axes=("batch", None, "height", "width"),
        patches=(Patch(
            "DiT unpatchify from the input's height and width",
            "DiTTransformer2DModel.forward takes the latent side from int(sqrt(tokens)), which tracing fixes at "
            "the export size; kiln exports a copy of forward that takes it from hidden_states' shape",
            lambda m: _instance_method(m, "forward", _dit_forward)),),
        notes=(f"latents are square (width follows height) in multiples of the patch size {patch}",),
    )  # fmt: skip


# -- PixArt-alpha and -sigma ----------------------------------------------------------------------


def _pixart(model, config) -> Adapter:
    height, width = _sides(config["patch_size"], (config["sample_size"],))
    names = ("hidden_states", "encoder_hidden_states", "timestep")
    inputs = [
        InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
        InputRule("encoder_hidden_states", ("batch", "text_len", _text_width(config))),
        InputRule("timestep", ("batch",), "int", 1000),
    ]
    grouped = {}
    if getattr(model, "use_additional_conditions", False):
        # PixArt-alpha at 1024: the image's resolution in pixels and its aspect ratio, as the pipeline passes them.
        inputs += [InputRule("resolution", ("batch", 2), "uniform", 2048.0),
                   InputRule("aspect_ratio", ("batch", 1), "uniform", 4.0)]  # fmt: skip
        grouped = {"resolution": "added_cond_kwargs", "aspect_ratio": "added_cond_kwargs"}
    return Adapter(type(model).__name__, "pixart", tuple(inputs), (_batch(), height, width, _text()),
                   call=_kwargs_call(names, grouped), output_axes=("batch", None, "height", "width"))  # fmt: skip


# -- Stable Diffusion 3 and 3.5 -------------------------------------------------------------------


def _sd3(model, config) -> Adapter:
    patch, table = config["patch_size"], config.get("pos_embed_max_size")
    limit = table * patch if table else None
    why = f", and its positional table covers {table} patches a side (pos_embed_max_size)" if table else ""
    height, width = _sides(patch, (config.get("sample_size") or 0,), limit, why)
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    return Adapter(
        type(model).__name__, "sd3",
        inputs=(InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
                InputRule("encoder_hidden_states", ("batch", "text_len", config["joint_attention_dim"])),
                InputRule("pooled_projections", ("batch", config["pooled_projection_dim"])),
                InputRule("timestep", ("batch",), "uniform", 1000.0)),
        dims=(_batch(), height, width, _text()),
        call=_kwargs_call(names),
        output_axes=("batch", None, "height", "width"),
    )  # fmt: skip


# -- CogVideoX (video): hidden_states [batch, frames, channels, height, width] --------------------


def _cog_positional_embeddings(self, sample_height, sample_width, sample_frames, device=None):
    """CogVideoXPatchEmbed._get_positional_embeddings without its in-place write through .data."""
    import torch
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    grid_h, grid_w = sample_height // self.patch_size, sample_width // self.patch_size
    frames = (sample_frames - 1) // self.temporal_compression_ratio + 1
    pos = get_3d_sincos_pos_embed(self.embed_dim, (grid_w, grid_h), frames, self.spatial_interpolation_scale,
                                  self.temporal_interpolation_scale, device=device, output_type="pt")  # fmt: skip
    text = pos.new_zeros(self.max_text_seq_length, self.embed_dim)
    return torch.cat([text, pos.flatten(0, 1)], dim=0)[None]


def _cog_rotary_call(names, config):
    """CogVideoX 1.5's call with its rotary embeddings made inside the graph as its pipeline makes them: a
    table over the config's sample size, sliced to the latent grid."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    patch, patch_t = config["patch_size"], config["patch_size_t"]
    table = (config["sample_height"] // patch, config["sample_width"] // patch)

    def call(model, *tensors):
        given = dict(zip(names, tensors, strict=True))
        latents = given["hidden_states"]
        frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
        rope = get_3d_rotary_pos_embed(config["attention_head_dim"], None, (height // patch, width // patch),
                                       (frames + patch_t - 1) // patch_t, grid_type="slice", max_size=table,
                                       device=latents.device)  # fmt: skip
        return model(**given, image_rotary_emb=rope, return_dict=False)[0]

    return call


def _scales_listed(call, index: int):
    """call, with the input at index ([scales, ...], one ONNX input) passed as the list of its scales."""

    def listed(model, *tensors):
        tensors = list(tensors)
        tensors[index] = list(tensors[index].unbind(0))
        return call(model, *tensors)

    return listed


def _cogvideox(model, config) -> Adapter:
    cls = type(model).__name__
    rotary = bool(config.get("use_rotary_positional_embeddings"))
    if rotary and not config.get("patch_size_t"):
        raise InputError(
            f"{cls} with rotary embeddings and no patch_size_t (CogVideoX 1.0 at 5B) takes rotary embeddings that its "
            "pipeline crops to a region rounded from the latent size in Python (get_resize_crop_region_for_grid); "
            "kiln cannot make them inside the graph yet",
            hint="kiln exports CogVideoX 1.5 (patch_size_t set) with rotary embeddings, and CogVideoX-2b with sincos ones",
        )
    patch, patch_t, text_len = config["patch_size"], config.get("patch_size_t") or 1, config["max_text_seq_length"]
    latent_frames = (config["sample_frames"] - 1) // config["temporal_compression_ratio"] + 1
    why, limit = f"its patch_size is {patch}", None
    if rotary:  # the pipeline's rotary table covers the config's sample size
        limit = config["sample_height"]
        why += f", and its rotary table covers sample_height = {limit} latent pixels"
    height = DimRule("height", _spatial(patch, limit), multiple=patch, max=limit, avoid=(config["sample_height"],), why=why)
    width = dataclasses.replace(height, name="width", max=config["sample_width"] if rotary else None,
                                avoid=(config["sample_width"],))  # fmt: skip
    frames = DimRule("frames", DimRange(*(_align_up(v, patch_t) for v in (1, 2, 4))), multiple=patch_t,
                     avoid=(latent_frames,), why=f"its patch_size_t is {patch_t}")  # fmt: skip
    text = _text(text_len, f"its joint positional embedding covers max_text_seq_length = {text_len} text tokens")
    inputs = [
        InputRule("hidden_states", ("batch", "frames", config["in_channels"], "height", "width")),
        InputRule("encoder_hidden_states", ("batch", "text_len", config["text_embed_dim"])),
        InputRule("timestep", ("batch",), "int", 1000),
    ]
    if config.get("ofs_embed_dim"):  # CogVideoX 1.5 image-to-video
        inputs.append(InputRule("ofs", ("batch",), "uniform", 4.0))
    dims = [_batch(), frames, height, width, text]
    if config.get("is_train_face"):  # ConsisID: the face's identity embedding and its ViT features at each scale
        inputs += [InputRule("id_cond", ("batch", config["LFE_id_dim"])),
                   InputRule("id_vit_hidden", (config["LFE_num_scale"], "batch", "vit_tokens", config["LFE_vit_dim"]))]
        dims.append(DimRule("vit_tokens", DimRange(1, 2, 4)))
    patches = (Patch(
        "CogVideoX positional table built with torch.cat",
        "CogVideoXPatchEmbed writes its positional table through .data, which torch.export cannot trace; kiln "
        "exports the same table built with torch.cat",
        lambda m: _instance_method(m.patch_embed, "_get_positional_embeddings", _cog_positional_embeddings)),)  # fmt: skip
    names = [i.name for i in inputs]
    call = _cog_rotary_call(names, config) if rotary else _kwargs_call(names)
    if config.get("is_train_face"):
        call = _scales_listed(call, names.index("id_vit_hidden"))
    return Adapter(
        cls, "cogvideox", tuple(inputs), tuple(dims),
        call=call,
        output_axes=("batch", "frames", None, "height", "width"),
        patches=patches,
        notes=(f"text length is fixed at max_text_seq_length = {text_len}",),
    )


# -- Latte (video): hidden_states [batch, channels, frames, height, width] ------------------------


def _latte(model, config) -> Adapter:
    length = config["video_length"]
    height, width = _sides(config["patch_size"], (config["sample_size"],))
    frames = DimRule("frames", DimRange(length, length, length), fixed=length,
                     why=f"its temporal positional embedding covers video_length = {length} frames")  # fmt: skip
    names = ("hidden_states", "encoder_hidden_states", "timestep")
    return Adapter(
        type(model).__name__, "latte",
        inputs=(InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
                InputRule("encoder_hidden_states", ("batch", "text_len", config["caption_channels"])),
                InputRule("timestep", ("batch",), "int", 1000)),
        dims=(_batch(), frames, height, width, _text()),
        call=_kwargs_call(names),
        output_axes=("batch", None, "frames", "height", "width"),
        notes=(f"frames are fixed at video_length = {length}",),
    )  # fmt: skip


# -- The VAE's decoder alone: latents -> image ----------------------------------------------------


def _decoder(cls: str, channels: int, factor: int, out_channels: int, note: str = "") -> Adapter:
    """A VAE's decoder alone: latent_sample [batch, channels, height, width] -> sample, factor times larger."""
    height = DimRule("height", _spatial(1))
    return Adapter(
        cls, "vae-decoder",
        inputs=(InputRule("latent_sample", ("batch", channels, "height", "width")),),
        dims=(_batch(), height, dataclasses.replace(height, name="width")),
        call=lambda model, z: model.decode(z, return_dict=False)[0],
        output_axes=("batch", None, f"{factor}*height", f"{factor}*width"),
        notes=(f"the decoder of {cls} alone: latent_sample [batch, {channels}, height, width] -> sample [batch, "
               f"{out_channels}, {factor}*height, {factor}*width]{note}",),
    )  # fmt: skip


def _vae_decoder(model, config) -> Adapter:
    factor = 2 ** (len(config["block_out_channels"]) - 1)  # a 2x upsampler in every decoder block but the last
    note = (f"; it does not scale latents (divide them by scaling_factor {config.get('scaling_factor')} first, as "
            "the pipeline does)")  # fmt: skip
    return _decoder(type(model).__name__, config["latent_channels"], factor, config.get("out_channels", 3), note)


def _image_decoder(model, config) -> Adapter:
    """The decoder of another image VAE (Tiny, VQ, Asymmetric, DC, KVAE); its upscale is measured by decoding
    an 8x8 latent once."""
    import torch

    channels = _first(config, "latent_channels", "z_channels")
    with torch.no_grad():
        probe = model.decode(torch.zeros(1, channels, 8, 8), return_dict=False)[0]
    return _decoder(type(model).__name__, channels, probe.shape[-1] // 8, probe.shape[1])


# -- Other image transformers: inputs guessed from forward's parameters and the config ------------

# Micro-conditions some image models take beside the text ([batch, 2] each, as CogView's pipelines pass
# them): the image's size before and after resizing, in pixels, and the crop's top-left corner.
_SIZE_CONDITIONS = {"original_size": 2048.0, "target_size": 2048.0, "crop_coords": 512.0}
_MASKS = ("encoder_attention_mask", "encoder_hidden_states_mask")
_GUESSABLE = {"hidden_states", "encoder_hidden_states", "timestep", "pooled_projections", "class_labels", "guidance",
              *_SIZE_CONDITIONS, *_MASKS}  # fmt: skip


def timestep_high(model, config) -> float:
    """The top of the timesteps model takes: 1000, or 1 where its timestep embedding scales by 1000 (AuraFlow,
    QwenImage, PRX: their pipelines pass t / 1000). Beyond it, sin and cos take arguments of up to 10^6 radians,
    where float32 PyTorch and ONNX Runtime differ by 1e-4 and more."""
    from diffusers.models.embeddings import Timesteps

    modules = model.modules() if hasattr(model, "modules") else ()
    scales = [m.scale for m in modules if isinstance(m, Timesteps) and getattr(m, "scale", 1) != 1]
    scales += [config["time_factor"]] if config.get("time_factor") else []  # PRX's
    return 1000.0 / max(scales) if scales else 1000.0


def _generic_transformer(model, config) -> Adapter:
    import inspect

    cls = type(model).__name__
    supported = supported_hint()
    params = inspect.signature(model.forward).parameters
    required = [n for n, p in params.items()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
    unknown = [n for n in required if n not in _GUESSABLE]
    patch, channels = config.get("patch_size"), config.get("in_channels")
    if unknown:
        raise InputError(f"kiln has no adapter for {cls}: its forward needs {', '.join(unknown)}, which kiln cannot "
                         "make from the config", hint=supported)  # fmt: skip
    if "hidden_states" not in params or not patch or not channels:
        raise InputError(f"kiln has no adapter for {cls}: it takes no hidden_states, or its config gives no "
                         "in_channels and patch_size to make latents from", hint=supported)  # fmt: skip
    if "3D" in cls or (isinstance(patch, (list, tuple)) and len(patch) == 3):
        from kiln.optimizer.importers.video_adapters import guessed_video  # it builds on this module

        return guessed_video(model, config, required)
    table = config.get("pos_embed_max_size")
    why = f", and its positional table covers {table} patches a side (pos_embed_max_size)" if table else ""
    height, width = _sides(patch, (config.get("sample_size") or 0,), table * patch if table else None, why)
    inputs, dims = [InputRule("hidden_states", ("batch", channels, "height", "width"))], [_batch(), height, width]
    if "encoder_hidden_states" in params and _text_width(config):
        inputs.append(InputRule("encoder_hidden_states", ("batch", "text_len", _text_width(config))))
        dims.append(_text())
        inputs += [InputRule(name, ("batch", "text_len"), "mask") for name in _MASKS if name in required]
    inputs += [InputRule(name, ("batch", 2), "uniform", high) for name, high in _SIZE_CONDITIONS.items() if name in required]
    if "pooled_projections" in params and config.get("pooled_projection_dim"):
        inputs.append(InputRule("pooled_projections", ("batch", config["pooled_projection_dim"])))
    if "timestep" in params:
        inputs.append(InputRule("timestep", ("batch",), "uniform", timestep_high(model, config)))
    classes = _first(config, "num_classes", "num_embeds_ada_norm")
    if "class_labels" in params and classes:
        inputs.append(InputRule("class_labels", ("batch",), "int", classes))
    if "guidance" in params and config.get("guidance_embeds"):
        inputs.append(InputRule("guidance", ("batch",), "uniform", 8.0))
    missing = [n for n in required if n not in {i.name for i in inputs}]
    if missing:
        raise InputError(f"kiln has no adapter for {cls}: its forward needs {', '.join(missing)}, and its config "
                         "does not give their sizes", hint=supported)  # fmt: skip
    return Adapter(
        cls, "generic", tuple(inputs), tuple(dims), call=_kwargs_call([i.name for i in inputs]),
        output_axes=("batch", None, "height", "width"),
        notes=(f"kiln has no adapter written for {cls}: its inputs were guessed from forward's parameters and the config",),
    )


def _ernie_call(model, latents, timestep, text, mask):
    """ERNIE-Image takes each sample's text length (text_lens), which kiln counts from the tokenizer's mask."""
    return model(hidden_states=latents, timestep=timestep, text_bth=text, text_lens=mask.sum(dim=1), return_dict=False)[0]


def _ernie(model, config) -> Adapter:
    height, width = _sides(config["patch_size"], ())
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
              InputRule("timestep", ("batch",), "uniform", timestep_high(model, config)),
              InputRule("text_bth", ("batch", "text_len", config["text_in_dim"])),
              InputRule("text_mask", ("batch", "text_len"), "mask"))  # fmt: skip
    return Adapter(type(model).__name__, "ernie-image", inputs, (_batch(), height, width, _text()), call=_ernie_call,
                   output_axes=("batch", None, "height", "width"),
                   notes=("text_mask is the tokenizer's mask; the text lengths are counted from it inside the graph",))  # fmt: skip


# -- The unCLIP / Kandinsky prior --------------------------------------------------------------------


def _prior(model, config) -> Adapter:
    """PriorTransformer diffuses a CLIP image embedding from the text's (Kandinsky 2.x, unCLIP): embeddings in and
    out, the text's token states at their fixed count (its positional table holds exactly num_embeddings)."""
    width, tokens = config["embedding_dim"], config["num_embeddings"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    text_width = width if config.get("encoder_hid_proj_type") == "linear" else inner
    names = ("hidden_states", "timestep", "proj_embedding", "encoder_hidden_states", "attention_mask")
    inputs = (InputRule("hidden_states", ("batch", width)), InputRule("timestep", ("batch",), "int", 1000),
              InputRule("proj_embedding", ("batch", config.get("embedding_proj_dim") or width)),
              InputRule("encoder_hidden_states", ("batch", tokens, text_width)),
              InputRule("attention_mask", ("batch", tokens), "mask"))  # fmt: skip
    return Adapter(type(model).__name__, "prior", inputs, (_batch(),), call=_kwargs_call(names), output_axes=("batch", None),
                   notes=(f"the noisy image embedding, the text embedding (proj_embedding) and the text's {tokens} token "
                          "states in; the predicted image embedding out",))  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {
    "PriorTransformer": _prior,
    "DiTTransformer2DModel": _dit,
    "ErnieImageTransformer2DModel": _ernie,
    "PixArtTransformer2DModel": _pixart,
    "SD3Transformer2DModel": _sd3,
    "CogVideoXTransformer3DModel": _cogvideox,
    "ConsisIDTransformer3DModel": _cogvideox,
    "LatteTransformer3DModel": _latte,
    "AutoencoderKL": _vae_decoder,
    "AutoencoderTiny": _image_decoder,
    "VQModel": _image_decoder,
    "AsymmetricAutoencoderKL": _image_decoder,
    "AutoencoderDC": _image_decoder,
    "AutoencoderKLKVAE": _image_decoder,
}


OTHER_AUDIO = ("LongCatAudioDiTTransformer", "MiniMaxMusic3Transformer1DModel")  # audio models beside ACE-Step


def all_families() -> dict[str, Callable[..., Adapter]]:
    """Every class kiln has an adapter written for, and the function that makes it."""
    from kiln.optimizer.importers import (  # they build on this module
        ace_step_adapters,
        anyflow_far_adapters,
        cosmos3_adapters,
        cropped_rope,
        glm_adapters,
        hidream_adapters,
        hunyuan_adapters,
        ideogram_adapters,
        lumina_adapters,
        lumina_next_adapters,
        minimax_adapters,
        noisy_decoders,
        omnigen_adapters,
        packed_adapters,
        qwen_adapters,
        video_adapters,
        video_decoders,
        wan_animate2_adapters,
        z_image_adapters,
    )

    return {**FAMILIES, **packed_adapters.FAMILIES, **qwen_adapters.FAMILIES, **lumina_adapters.FAMILIES,
            **hidream_adapters.FAMILIES, **cropped_rope.FAMILIES, **video_adapters.FAMILIES,
            **hunyuan_adapters.FAMILIES, **z_image_adapters.FAMILIES, **video_decoders.FAMILIES,
            **noisy_decoders.FAMILIES, **glm_adapters.FAMILIES, **lumina_next_adapters.FAMILIES,
            **ideogram_adapters.FAMILIES, **minimax_adapters.FAMILIES, **cosmos3_adapters.FAMILIES,
            **omnigen_adapters.FAMILIES, **ace_step_adapters.FAMILIES, **wan_animate2_adapters.FAMILIES,
            **anyflow_far_adapters.FAMILIES}  # fmt: skip


def supported_hint() -> str:
    return f"kiln has adapters for {', '.join(sorted(all_families()))}"


def adapter_for(model, step: bool = False) -> Adapter:
    """The adapter for a loaded diffusers model: written for its family, else guessed, else an error saying why.
    step: a video VAE's decoder as a step function, its caches as inputs and outputs (step_decoders); the
    only form of a decoder with no whole-clip one."""
    from kiln.optimizer.importers.step_decoders import STEP_FAMILIES

    config, name, families = dict(model.config), type(model).__name__, all_families()
    if step or (name in STEP_FAMILIES and name not in families):
        if name not in STEP_FAMILIES:
            raise InputError(f"kiln exports a step decoder for {', '.join(STEP_FAMILIES)}, not for {name}",
                             hint="leave out --video-decoder step: kiln exports whole-clip decoders of video VAEs")  # fmt: skip
        return STEP_FAMILIES[name](model, config)
    if name in families:
        return families[name](model, config)
    if name in OTHER_AUDIO:
        raise InputError(f"kiln has no adapter for {name} yet: it is an audio-only model, and the one audio-only "
                         "transformer kiln exports is ACE-Step's", hint=supported_hint())  # fmt: skip
    if name.startswith("Autoencoder") or name == "LTX2VideoDiffusionDecoderModel":
        decoders = ", ".join(n for n in sorted({*families, *STEP_FAMILIES}) if "Autoencoder" in n or "Decoder" in n or n == "VQModel")
        raise InputError(f"kiln has no adapter for {name} yet: kiln exports the decoders of {decoders}; this one "
                         "carries state between chunks differently, blends overlapping windows or runs a diffusion "
                         "loop of its own", hint=supported_hint())  # fmt: skip
    if "UNet" in name or "ControlNet" in name:
        raise InputError(f"kiln has no adapter for {name} yet: its inputs and outputs are not a latent transformer's",
                         hint=supported_hint())  # fmt: skip
    return _generic_transformer(model, config)


# -- Ranges, sizes, inputs ------------------------------------------------------------------------


def _dim_name(adapter: Adapter, name: str, where: str) -> str:
    """A dim name, or INPUT:AXIS, as the adapter's dim name."""
    if name in {r.name for r in adapter.dims}:
        return name
    dims = f"its dims: {', '.join(r.name for r in adapter.dynamic_dims)}"
    input_name, _, axis = name.rpartition(":")
    axes = next((i.axes for i in adapter.inputs if i.name == input_name), None)
    if axes is not None and re.fullmatch(r"-?\d+", axis):
        if -len(axes) <= int(axis) < len(axes) and isinstance(axes[int(axis)], str):
            dim = axes[int(axis)]
            if base_dim(dim) != dim:
                raise InputError(f"{where}: axis {axis} of {input_name} is {dim}, which follows {base_dim(dim)!r}",
                                 hint=f"give {base_dim(dim)} a range instead")  # fmt: skip
            return dim
        raise InputError(f"{where}: axis {axis} of {input_name} is not a dynamic dim of {adapter.class_name}", hint=dims)
    raise InputError(f"{where}: {adapter.class_name} has no dim {name!r}", hint=dims)


def check_range(adapter: Adapter, rule: DimRule, r: DimRange, where: str) -> None:
    """Raise InputError if the range holds a size the model cannot take."""
    cls, m = adapter.class_name, rule.multiple
    if rule.fixed is not None:
        raise InputError(f"{where}: {cls} takes {rule.name} {rule.fixed} only ({rule.why}), so it is not a dynamic dim",
                         hint=f"leave {rule.name} out of --shapes")  # fmt: skip
    if rule.same_as is not None:
        raise InputError(f"{where}: {cls} takes {rule.name} equal to {rule.same_as} ({rule.why})",
                         hint=f"set {rule.same_as} only; {rule.name} follows it")  # fmt: skip
    bad = [v for v in (r.min, r.opt, r.max) if v % m]
    if bad:
        lo = _align_up(r.min, m)
        hi = max(lo, r.max // m * m)
        opt = min(max(_align_up(r.opt, m), lo), hi)
        raise InputError(f"{where}: {cls} takes {rule.name} in multiples of {m} ({rule.why}); {bad[0]} is not",
                         hint=f"e.g. --shapes {rule.name}={lo}..{opt}..{hi}")  # fmt: skip
    if rule.min is not None and r.min < rule.min:
        raise InputError(f"{where}: {cls} takes {rule.name} from {rule.min} ({rule.why}); {r.min} is less",
                         hint=f"keep {rule.name} at least {rule.min}")  # fmt: skip
    if rule.max is not None and r.max > rule.max:
        raise InputError(f"{where}: {cls} takes {rule.name} up to {rule.max} ({rule.why}); {r.max} is more",
                         hint=f"keep {rule.name} at most {rule.max}")  # fmt: skip
    for i in adapter.inputs:  # an axis derived from this dim (frames-1) must stay at least 1
        for index, axis in enumerate(i.axes):
            if isinstance(axis, str) and base_dim(axis) == rule.name != axis and dim_size(axis, {rule.name: r.min}) < 1:
                least = next(v for v in range(r.min, r.min + 64) if dim_size(axis, {rule.name: v}) >= 1)
                raise InputError(f"{where}: axis {index} of {cls}'s {i.name} is {axis}, which {rule.name}={r.min} makes "
                                 f"{dim_size(axis, {rule.name: r.min})}", hint=f"keep {rule.name} at least {least}")  # fmt: skip


def resolve_ranges(adapter: Adapter, specs: Sequence[tuple[str, str]]) -> tuple[dict[str, DimRange], list[str]]:
    """Ranges of the adapter's dynamic dims: its defaults, overridden by (source, 'NAME=MIN..OPT..MAX') specs,
    later ones winning. Each range given is checked against the model's constraints here, before export.
    Returns the ranges and a note for each default used."""
    ranges = {r.name: r.default for r in adapter.dynamic_dims}
    given = set()
    for source, text in specs:
        where = f"{source} {text!r}"
        name, r = parse_shape_spec(text, source)
        name = _dim_name(adapter, name, where)
        check_range(adapter, adapter.rule(name), r, where)
        ranges[name] = r
        given.add(name)
    notes = [f"{name}={r} (the default for {adapter.class_name}; set it with --shapes {name}=MIN..OPT..MAX)"
             for name, r in ranges.items() if name not in given]  # fmt: skip
    return ranges, notes


def all_sizes(adapter: Adapter, sizes: Mapping[str, int]) -> dict[str, int]:
    """Sizes of every dim, fixed ones and followers included, from the dynamic dims' sizes."""
    full = {**sizes, **{r.name: r.fixed for r in adapter.dims if r.fixed is not None}}
    full.update({r.name: full[r.same_as] for r in adapter.dims if r.same_as is not None})
    return full


def export_sizes(adapter: Adapter, ranges: Mapping[str, DimRange]) -> dict[str, int]:
    """Where to trace each dynamic dim: near opt, in multiples of the dim's step and at least two steps
    (tracing specialises a size of 1), off the sizes the model treats specially (its config's sample
    size, where DiT and PixArt take their stored positional table), and unlike the other dims and the
    inputs' static sizes, so tracing cannot take one size for another. It may lie outside the range."""
    taken = {a for i in adapter.inputs for a in i.axes if isinstance(a, int)}
    taken |= {r.fixed for r in adapter.dims if r.fixed is not None}
    sizes = {}
    for rule in adapter.dynamic_dims:
        r, m = ranges[rule.name], rule.multiple
        top = rule.max if rule.max is not None else 4 * max(r.max, 2 * m)
        inside = list(range(_align_up(r.min, m), r.max + 1, m))
        outside = [v for v in range(m, top + 1, m) if not r.min <= v <= r.max and v >= (rule.min or 1)]
        candidates = sorted(inside, key=lambda v: (abs(v - r.opt), v))
        candidates += sorted(outside, key=lambda v: (min(abs(v - r.min), abs(v - r.max)), v))
        good = [v for v in candidates if v // m >= 2 and v not in rule.avoid]
        fresh = [v for v in good if v not in taken]
        sizes[rule.name] = (fresh or good or candidates or [r.opt])[0]
        taken.add(sizes[rule.name])
    return sizes


def check_sizes(adapter: Adapter, ranges: Mapping[str, DimRange]) -> list[tuple[str, dict[str, int]]]:
    """(label, sizes) to check an export at: min, opt, max, and one shape that is none of those."""
    dims = adapter.dynamic_dims
    result: list[tuple[str, dict[str, int]]] = []
    for corner in ("min", "opt", "max"):
        sizes = {r.name: getattr(ranges[r.name], corner) for r in dims}
        if sizes not in [s for _, s in result]:
            result.append((corner, sizes))
    # Off the corners: above opt for the first dim, below it for the next and so on, each unlike the sizes
    # picked before, so that dims with equal ranges (height, width) differ here as they never do at the
    # corners, and an export that took one for the other fails.
    off: dict[str, int | None] = {}
    for i, rule in enumerate(dims):
        r, m = ranges[rule.name], rule.multiple
        between = [v for v in range(_align_up(r.min, m), r.max + 1, m) if v not in (r.min, r.opt, r.max)]
        upper, lower = [v for v in between if v > r.opt], [v for v in between if v < r.opt]
        pool = next((p for p in ([upper, lower] if i % 2 == 0 else [lower, upper]) if p), [])
        pool = [v for v in pool if v not in off.values()] or pool
        off[rule.name] = pool[len(pool) // 2] if pool else None
    sizes = None
    if any(v is not None for v in off.values()):
        sizes = {r.name: ranges[r.name].opt if off[r.name] is None else off[r.name] for r in dims}
    elif len(dims) >= 2:  # every range holds corner sizes only: mix them
        sizes = {r.name: ranges[r.name].min if i % 2 else ranges[r.name].max for i, r in enumerate(dims)}
    if sizes is not None and sizes not in [s for _, s in result]:
        result.append(("off-corner", sizes))
    return result


def input_shapes(adapter: Adapter, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    full = all_sizes(adapter, sizes)
    return {i.name: tuple(dim_size(a, full) if isinstance(a, str) else a for a in i.axes) for i in adapter.inputs}


def make_inputs(adapter: Adapter, sizes: Mapping[str, int], seed: int) -> list:
    """Seeded torch tensors for the adapter's inputs at these dim sizes (fp32 floats, int64 integers)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for rule, shape in zip(adapter.inputs, input_shapes(adapter, sizes).values(), strict=True):
        if rule.kind == "int":
            tensors.append(torch.randint(0, int(rule.high), shape, generator=generator, dtype=torch.int64))
        elif rule.kind in ("mask", "left_mask"):
            kept = torch.randint(1, shape[-1] + 1, (*shape[:-1], 1), generator=generator)
            mask = (torch.arange(shape[-1]) < kept).to(torch.int64)
            tensors.append(mask.flip(-1) if rule.kind == "left_mask" else mask)
        elif rule.kind == "bool":
            tensors.append(torch.randint(0, 2, shape, generator=generator) == 1)
        elif rule.kind == "uniform":
            tensors.append(torch.rand(shape, generator=generator, dtype=torch.float32) * rule.high)
        else:
            tensors.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return tensors


def fmt_sizes(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def shapes_spec(ranges: Mapping[str, DimRange]) -> str:
    """Ranges as kiln's shapes metadata: 'batch=1..2..4,height=8..16..32'."""
    return ",".join(f"{name}={r}" for name, r in ranges.items())
