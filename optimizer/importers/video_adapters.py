"""Adapters for video transformers that take latents as [batch, channels, frames, height, width] (Wan and
the models built on it, HunyuanVideo, Mochi, Allegro, Motif, Sana-Video, and any other 3D transformer,
guessed) or packed into tokens with the grid given beside them (LTX-Video).

Their rotary tables come from the latents' shape inside forward, so the export computes them from the
dynamic sizes. A text attention mask, where the model takes one, is an input of the ONNX model, as the
pipelines pass the tokenizer's mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    _MASKS,
    Patch,
    _align_up,
    _batch,
    _instance_method,
    _kwargs_call,
    _spatial,
    _text,
    _text_width,
    rotate_pairs,
    supported_hint,
)
from kiln.targets import DimRange


def patch_sizes(config) -> tuple[int, int]:
    """(frames, height and width) of a latent patch: patch_size may be an int, with patch_size_t beside it,
    or a list (1, 2, 2) as Wan's."""
    patch = config.get("patch_size") or 1
    if isinstance(patch, (list, tuple)):
        return (int(patch[0]), int(patch[1])) if len(patch) == 3 else (1, int(patch[0]))
    return int(config.get("patch_size_t") or 1), int(patch)


def video_dims(config, rope_limit: int | None = None) -> tuple[DimRule, ...]:
    """batch, frames, height, width in multiples of the patch, and text length."""
    patch_t, patch = patch_sizes(config)
    limit = rope_limit * patch if rope_limit else None
    why = f"its patch is {patch_t}x{patch}x{patch} (frames x height x width)"
    if limit:
        why += f", and its rotary table covers {rope_limit} patches a side (rope_max_seq_len)"
    height = DimRule("height", _spatial(patch, limit), multiple=patch, max=limit, why=why)
    frames = DimRule("frames", DimRange(*(_align_up(v, patch_t) for v in (1, 2, 4))), multiple=patch_t, why=why)
    return (_batch(), frames, height, dataclasses.replace(height, name="width"), _text())


class MochiMaskedAttention:
    """Mochi's joint attention with the text mask applied as one masked attention over the batch.

    diffusers' MochiAttnProcessor2_0 gathers each sample's valid text tokens (torch.nonzero), which fixes
    the count when traced. With the tokenizer's masks (valid tokens first) both give the same outputs: the
    valid tokens attend to each other, and the padding's outputs are zero."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        import torch
        import torch.nn.functional as F

        def heads(x, norm):
            x = x.unflatten(2, (attn.heads, -1))
            return norm(x) if norm is not None else x

        q, k = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states), None)
        if image_rotary_emb is not None:
            q, k = rotate_pairs(q, *image_rotary_emb), rotate_pairs(k, *image_rotary_emb)
        text_q = heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)
        text_k = heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)
        text_v = heads(attn.add_v_proj(encoder_hidden_states), None)
        tokens, text = q.shape[1], text_q.shape[1]
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((q, text_q), (k, text_k), (v, text_v)))
        valid = torch.cat([attention_mask.new_ones(attention_mask.shape[0], tokens), attention_mask], dim=1).bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        out = (out * valid[:, None, :, None]).transpose(1, 2).flatten(2, 3)
        hidden_states, encoder_hidden_states = out.split_with_sizes((tokens, text), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


@contextlib.contextmanager
def _processors(model, processor) -> Iterator[None]:
    """Every attention module of model computes with processor inside the block."""
    saved = {m: m.processor for m in model.modules() if hasattr(m, "processor")}
    for module in saved:
        module.processor = processor
    try:
        yield
    finally:
        for module, old in saved.items():
            module.processor = old


MOCHI_PATCH = Patch(
    "Mochi's text mask as one masked attention",
    "MochiAttnProcessor2_0 gathers each sample's valid text tokens with torch.nonzero, which fixes their "
    "count when traced; kiln exports an attention that masks the padding instead (the same outputs for "
    "masks with the valid tokens first, as tokenizers make them)",
    lambda m: _processors(m, MochiMaskedAttention()),
)


def _mochi_positions(self, num_frames, height, width, device=None, dtype=None):
    """MochiRoPE._get_positions in tensor arithmetic: the bin centres of height (and width) bins over
    [-height * scale / 2, height * scale / 2], scale = sqrt(target_area / (height * width))."""
    import torch

    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    n_rows, n_cols = torch.ones_like(rows).sum(), torch.ones_like(cols).sum()  # the sizes as tensors, not Python floats
    scale = torch.sqrt(self.target_area / (n_rows * n_cols))
    h, w = (rows + 0.5 - n_rows / 2) * scale, (cols + 0.5 - n_cols / 2) * scale
    t = torch.arange(num_frames, device=device, dtype=torch.float32)
    grid = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack(grid, dim=-1).view(-1, 3).to(dtype or torch.float32)


MOCHI_ROPE_PATCH = Patch(
    "Mochi's rotary positions in tensor arithmetic",
    "MochiRoPE places positions with torch.linspace over bounds computed as Python floats from the latent size, "
    "which fixes the size when traced; kiln exports the same positions computed with tensors",
    lambda m: _instance_method(m.rope, "_get_positions", _mochi_positions),
)


def _video(family: str, *, timestep: str = "int", mask: str | None = None, extra: Callable | None = None,
           patches: tuple[Patch, ...] = ()):  # fmt: skip
    """An adapter for a [batch, C, frames, H, W] video transformer called with keywords. mask: the name of
    its text mask argument, if it takes one; extra(config) -> more InputRules (after the latents)."""

    def adapter(model, config) -> Adapter:
        params = inspect.signature(model.forward).parameters
        channels = config["in_channels"]
        inputs = [InputRule("hidden_states", ("batch", channels, "frames", "height", "width"))]
        inputs += extra(config) if extra else []
        inputs.append(InputRule("encoder_hidden_states", ("batch", "text_len", _text_width(config))))
        if mask:
            inputs.append(InputRule(mask, ("batch", "text_len"), "mask"))
        if "pooled_projections" in params and config.get("pooled_projection_dim"):
            inputs.append(InputRule("pooled_projections", ("batch", config["pooled_projection_dim"])))
        inputs.append(InputRule("timestep", ("batch",), *(("int", 1000) if timestep == "int" else ("uniform", 1000.0))))
        if "guidance" in params and config.get("guidance_embeds"):
            inputs.append(InputRule("guidance", ("batch",), "uniform", 8.0))
        return Adapter(
            type(model).__name__, family, tuple(inputs), video_dims(config, config.get("rope_max_seq_len")),
            call=_kwargs_call([i.name for i in inputs]),
            output_axes=("batch", None, "frames", "height", "width"),
            patches=patches,
        )  # fmt: skip

    return adapter


# LTX-Video's pipeline scales rotary positions by the VAE's compression over the frame rate (8 / 25 for
# time, 32 for space at its default 25 fps); kiln passes the same.
LTX_ROPE_SCALE = (8 / 25, 32, 32)


def _ltx_call(model, latents, text, mask, timestep):
    """LTX-Video takes its latents as tokens, [batch, frames x height x width, C], and the grid beside them."""
    b, c, f, h, w = latents.shape
    tokens = latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
    out = model(hidden_states=tokens, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timestep,
                num_frames=f, height=h, width=w, rope_interpolation_scale=LTX_ROPE_SCALE, return_dict=False)[0]  # fmt: skip
    return out.reshape(b, f, h, w, -1).permute(0, 4, 1, 2, 3)


def _ltx(model, config) -> Adapter:
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["caption_channels"])),
              InputRule("encoder_attention_mask", ("batch", "text_len"), "mask"),
              InputRule("timestep", ("batch",), "int", 1000))  # fmt: skip
    return Adapter(
        type(model).__name__, "ltx-video", inputs, video_dims(config), call=_ltx_call,
        output_axes=("batch", None, "frames", "height", "width"),
        notes=("latents are taken as [batch, C, frames, height, width] and made tokens inside the graph; rotary "
               f"positions are scaled as LTX-Video's pipeline scales them at 25 fps {LTX_ROPE_SCALE}",),
    )  # fmt: skip


# LTX-2's pipeline default frame rate, which its rotary positions for video are scaled by.
LTX2_FPS = 24.0


def _ltx2_call(model, latents, audio, text, audio_text, mask, timestep):
    """LTX-2 takes video latents as tokens beside the grid, and audio latents [batch, audio frames, C]; it returns
    both, denoised. Its pipeline passes one text mask for both streams, and the timestep as sigma too."""
    b, c, f, h, w = latents.shape
    tokens = latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
    video, audio = model(hidden_states=tokens, audio_hidden_states=audio, encoder_hidden_states=text,
                         audio_encoder_hidden_states=audio_text, timestep=timestep, sigma=timestep,
                         encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f, height=h,
                         width=w, fps=LTX2_FPS, audio_num_frames=audio.shape[1], return_dict=False)  # fmt: skip
    return video.reshape(b, f, h, w, -1).permute(0, 4, 1, 2, 3), audio


def _ltx2(model, config) -> Adapter:
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
              InputRule("audio_hidden_states", ("batch", "audio_len", config["audio_in_channels"])),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["caption_channels"])),
              InputRule("audio_encoder_hidden_states", ("batch", "text_len", config["caption_channels"])),
              InputRule("encoder_attention_mask", ("batch", "text_len"), "mask"),
              InputRule("timestep", ("batch",), "uniform", 1000.0))  # fmt: skip
    return Adapter(
        type(model).__name__, "ltx2", inputs, (*video_dims(config), DimRule("audio_len", DimRange(4, 8, 16))),
        call=_ltx2_call, outputs=("sample", "audio_sample"), output_axes=("batch", None, "frames", "height", "width"),
        notes=("video latents are taken as [batch, C, frames, height, width] and made tokens inside the graph, audio "
               "latents as [batch, audio_len, C]; two outputs, sample (video) and audio_sample; one text mask for both "
               f"streams, as LTX-2's pipeline passes; video rotary positions at its default {LTX2_FPS:g} fps",),
    )  # fmt: skip


def _anyflow_call(model, latents, text, timestep, r_timestep):
    """AnyFlow takes latents as [batch, frames, C, H, W] (and returns them so), and a timestep per frame."""
    out = model(hidden_states=latents.transpose(1, 2), timestep=timestep, r_timestep=r_timestep,
                encoder_hidden_states=text, return_dict=False)[0]  # fmt: skip
    return out.transpose(1, 2)


def _anyflow(model, config) -> Adapter:
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["text_dim"])),
              InputRule("timestep", ("batch", "frames"), "uniform", 1000.0),
              InputRule("r_timestep", ("batch", "frames"), "uniform", 1000.0))  # fmt: skip
    return Adapter(
        type(model).__name__, "anyflow", inputs, video_dims(config, config.get("rope_max_seq_len")), call=_anyflow_call,
        output_axes=("batch", None, "frames", "height", "width"),
        notes=("timestep and r_timestep (the flow map's two times) are given per frame",),
    )  # fmt: skip


def _temporal_call(model, latents):
    """TransformerTemporalModel (a video UNet's temporal block) takes the frames folded into the batch."""
    b, c, f, h, w = latents.shape
    out = model(latents.transpose(1, 2).reshape(b * f, c, h, w), num_frames=f, return_dict=False)[0]
    return out.reshape(b, f, c, h, w).transpose(1, 2)


def _temporal(model, config) -> Adapter:
    frames = DimRule("frames", DimRange(1, 2, 4))
    height = DimRule("height", _spatial(1))
    return Adapter(
        type(model).__name__, "temporal-block",
        (InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),),
        (_batch(), frames, height, dataclasses.replace(height, name="width")), call=_temporal_call,
        output_axes=("batch", None, "frames", "height", "width"),
        notes=("a video UNet's temporal transformer block alone: attention across frames at each pixel",),
    )  # fmt: skip


def _joy_rope(self, vis_rope_size, txt_rope_size=None):
    """JoyImageEditTransformer3DModel.get_rotary_pos_embed with its grid from arange (linspace(0, s, s + 1)[:s]
    gives the same integers) and the text's start from sym_max (not .item()), so the sizes stay symbolic."""
    import torch

    sizes = [1] * (3 - len(vis_rope_size)) + list(vis_rope_size)
    dims = self.rope_dim_list or [self.hidden_size // self.num_attention_heads // 3] * 3
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in sizes], indexing="ij"))

    def embed(positions):
        cos, sin = [], []
        for i, dim in enumerate(dims):
            inverse = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: (dim // 2)] / dim))
            angles = torch.outer(positions[i].float(), inverse)
            cos.append(angles.cos().repeat_interleave(2, dim=1))
            sin.append(angles.sin().repeat_interleave(2, dim=1))
        return torch.cat(cos, dim=1), torch.cat(sin, dim=1)

    image = embed([grid[i].reshape(-1) for i in range(3)])
    if txt_rope_size is None:
        return image, None
    text = torch.arange(txt_rope_size) + torch.sym_max(*sizes)  # the largest grid index, plus one
    return image, embed([text] * 3)


JOY_ROPE_PATCH = Patch(
    "JoyImage's rotary grid from arange",
    "get_rotary_pos_embed spreads its grid with torch.linspace over the Python sizes and starts the text after "
    ".item() of the grid's maximum, which fix the sizes when traced; kiln exports the same positions from arange "
    "and the sizes",
    lambda m: _instance_method(m, "get_rotary_pos_embed", _joy_rope),
)


class _EverySample:
    """JoyImage-Edit-Plus's shape_list where every sample has the same components: item i is the one list."""

    def __init__(self, components):
        self.components = components

    def __getitem__(self, index):
        return self.components


def _joy_plus_forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_mask=None,
                      shape_list=None, return_dict=True):  # fmt: skip
    """JoyImageEditPlusTransformer3DModel.forward for a batch whose samples share their components and hold no
    padding: one rotary table for the whole batch (from symbolic sizes), every image token valid."""
    import torch

    batch, patches, *_, patch_t, patch_h, patch_w = hidden_states.shape
    _, vec, txt = self.condition_embedder(timestep, encoder_hidden_states)
    img = self.img_in(hidden_states.flatten(0, 1)).reshape(batch, patches, -1)
    tables, offset = [], 0
    for frames, rows, cols in shape_list[0]:
        tables.append(self._get_rotary_pos_embed_for_range((offset, 0, 0), (offset + frames, rows, cols)))
        offset = offset + frames
    rotary = tuple(torch.cat(part).to(img.device).expand(batch, -1, -1) for part in zip(*tables, strict=True))
    mask = None
    if encoder_hidden_states_mask is not None:
        image_mask = encoder_hidden_states_mask.new_ones(batch, patches)
        mask = torch.cat([image_mask, encoder_hidden_states_mask], dim=1)[:, None, None].bool()
    for block in self.double_blocks:
        img, txt = block(hidden_states=img, encoder_hidden_states=txt, temb=vec.unflatten(1, (6, -1)),
                         image_rotary_emb=rotary, attention_mask=mask)  # fmt: skip
    out = self.proj_out(self.norm_out(img)).reshape(batch, patches, patch_t, patch_h, patch_w, self.out_channels)
    return (out.permute(0, 1, 5, 2, 3, 4),)


JOY_PLUS_PATCH = Patch(
    "JoyImage-Edit-Plus's rotary table made once for the batch",
    "its forward builds each sample's rotary table and image mask in Python loops over the batch and over "
    "shape_list, padding to the longest sample, which fix the sizes when traced; kiln's samples share their "
    "components and hold no padding, so kiln exports one table from the symbolic sizes and an all-valid image mask",
    lambda m: _instance_method(m, "forward", _joy_plus_forward),
)


def _patches(latents, patch_t, patch_h, patch_w):
    """[batch, C, T, H, W] latents -> [batch, tokens, C, pt, ph, pw], tokens in (t, h, w) order, as JoyImage-Edit-
    Plus's pipeline cuts them."""
    batch, channels, frames, height, width = latents.shape
    grid = latents.reshape(batch, channels, frames // patch_t, patch_t, height // patch_h, patch_h, width // patch_w, patch_w)
    return grid.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(1, 3)


def _joy_plus_call(model, latents, reference, text, mask, timestep):
    """The target latents and one reference image's, cut into patches and joined as the pipeline joins them; the
    target's patches of the output, put back into [batch, C, frames, H, W]."""
    import torch

    patch_t, patch_h, patch_w = model.config.patch_size
    items = (latents, reference)
    components = [(x.shape[2] // patch_t, x.shape[3] // patch_h, x.shape[4] // patch_w) for x in items]
    tokens = torch.cat([_patches(x, patch_t, patch_h, patch_w) for x in items], dim=1)
    out = model(hidden_states=tokens, timestep=timestep, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                shape_list=_EverySample(components), return_dict=False)[0]  # fmt: skip
    batch, _, frames, height, width = latents.shape
    t, h, w = components[0]
    grid = out[:, : t * h * w].reshape(batch, t, h, w, -1, patch_t, patch_h, patch_w).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return grid.reshape(batch, -1, frames, height, width)


def _joy_plus(model, config) -> Adapter:
    """JoyImage-Edit-Plus: the target latents and one reference image, each a frame (as its pipeline makes them),
    the reference at the target's size."""
    if patch_sizes(config)[0] != 1:
        raise InputError(f"kiln exports {type(model).__name__} with a patch of 1 frame, not {patch_sizes(config)[0]}",
                         hint=supported_hint())  # fmt: skip
    channels = config["in_channels"]
    inputs = (InputRule("hidden_states", ("batch", channels, 1, "height", "width")),
              InputRule("reference_latents", ("batch", channels, 1, "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["text_dim"])),
              InputRule("encoder_hidden_states_mask", ("batch", "text_len"), "mask"),
              InputRule("timestep", ("batch",), "uniform", 1000.0))  # fmt: skip
    batch, _, height, width, text = video_dims(config)
    return Adapter(
        type(model).__name__, "joyimage-plus", inputs, (batch, height, width, text), call=_joy_plus_call,
        output_axes=("batch", None, None, "height", "width"), patches=(JOY_PLUS_PATCH,),
        notes=("one reference image, at the target's size, beside the target latents, each one frame (the pipeline "
               "takes any number of references, each at its own size); the output is the target's",),
    )  # fmt: skip


def _chrono_rope(self, hidden_states):
    """ChronoEditRotaryPosEmbed.forward with its frame positions chosen in tensor arithmetic: an image and its
    edit (2 frames) sit at frames 0 and temporal_skip_len - 1, other clips at 0, 1, 2, ..."""
    import torch

    _, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = self.patch_size
    ppf, pph, ppw = frames // p_t, height // p_h, width // p_w
    third = self.attention_head_dim // 3
    sizes = [self.attention_head_dim - 2 * third, third, third]
    pair = torch.ones(frames).sum() == 2  # the frame count as a tensor: a Python == would fix it when traced
    positions = torch.arange(ppf) * torch.where(pair, self.temporal_skip_len - 1, 1)

    def grid(table):
        f, h, w = table.split(sizes, dim=1)
        shape = (ppf, pph, ppw, -1)
        parts = [f[positions].view(ppf, 1, 1, -1).expand(*shape), h[:pph].view(1, pph, 1, -1).expand(*shape),
                 w[:ppw].view(1, 1, ppw, -1).expand(*shape)]  # fmt: skip
        return torch.cat(parts, dim=-1).reshape(1, ppf * pph * ppw, 1, -1)

    return grid(self.freqs_cos), grid(self.freqs_sin)


CHRONO_ROPE_PATCH = Patch(
    "ChronoEdit's frame positions chosen in tensor arithmetic",
    "ChronoEditRotaryPosEmbed places 2 frames (an image and its edit) at 0 and temporal_skip_len - 1 and other "
    "clips at 0, 1, 2, ..., chosen by a Python if on the frame count, which fixes it when traced; kiln exports "
    "the same choice made with tensors",
    lambda m: _instance_method(m.rope, "forward", _chrono_rope),
)


def guessed_video(model, config, required: list[str]) -> Adapter:
    """The adapter for a video transformer kiln has none written for: [batch, C, frames, H, W] latents and the
    inputs its forward requires, guessed from their names and the config."""
    cls = type(model).__name__
    mask = next((name for name in _MASKS if name in required), None)
    adapter = _video("generic", timestep="float", mask=mask)(model, config) if _text_width(config) else None
    missing = [n for n in required if n not in adapter.input_names] if adapter else ["encoder_hidden_states"]
    if missing:
        raise InputError(f"kiln has no adapter for {cls}: its forward needs {', '.join(missing)}, and its config "
                         "does not give their sizes", hint=supported_hint())  # fmt: skip
    note = f"kiln has no adapter written for {cls}: its inputs were guessed from forward's parameters and the config"
    return dataclasses.replace(adapter, notes=(note,))


def _vace_control(config) -> list[InputRule]:
    return [InputRule("control_hidden_states", ("batch", config["vace_in_channels"], "frames", "height", "width"))]


# The reference image's CLIP features Wan's image-to-video pipelines pass: ViT-H/14's 257 tokens at 224².
CLIP_IMAGE_TOKENS = 257


@contextlib.contextmanager
def _constant_qr(model) -> Iterator[None]:
    """torch.linalg.qr of Wan-Animate's motion encoder weight (the one call in its forward) answers with the QR
    computed once before the export; any other matrix gets the real thing."""
    import torch

    weight = model.motion_encoder.motion_synthesis_weight
    with torch.no_grad():
        q, r = torch.linalg.qr((weight + 1e-8).float())
    original = torch.linalg.qr

    def constant_qr(matrix, mode="reduced"):
        mine = mode == "reduced" and matrix.shape == weight.shape and matrix.dtype == torch.float32
        return torch.return_types.linalg_qr((q, r)) if mine else original(matrix, mode)

    torch.linalg.qr = constant_qr
    try:
        yield
    finally:
        torch.linalg.qr = original


CONSTANT_QR_PATCH = Patch(
    "Wan-Animate's motion basis as a constant",
    "its motion encoder orthogonalises a weight with torch.linalg.qr at every call, which ONNX has no op for; the "
    "basis depends on the weight alone, so kiln computes it once and exports it as a constant",
    _constant_qr,
)


ONE_MOTION_BATCH = 2**31 - 1  # more face frames than any batch holds


def _wan_animate_call(model, latents, image, pose, face, text, timestep):
    # One motion-encoder batch for the whole face video (the encoder treats each frame alone): torch.split into
    # the config's batch size over a dynamic count of frames cannot be exported.
    return model(hidden_states=latents, encoder_hidden_states_image=image, pose_hidden_states=pose,
                 face_pixel_values=face, encoder_hidden_states=text, timestep=timestep,
                 motion_encode_batch_size=ONE_MOTION_BATCH, return_dict=False)[0]  # fmt: skip


def _wan_animate(model, config) -> Adapter:
    """Wan-Animate: latents one frame longer than the pose video (the reference image's frame first), the face
    video in pixels 4(frames - 1) - 3 frames long, as its pipeline cuts segments (77 face frames, 21 latent)."""
    side = config["motion_encoder_size"]
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
              InputRule("encoder_hidden_states_image", ("batch", CLIP_IMAGE_TOKENS, config["image_dim"])),
              InputRule("pose_hidden_states", ("batch", config["latent_channels"], "frames-1", "height", "width")),
              InputRule("face_pixel_values", ("batch", 3, "4*frames-7", side, side)),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["text_dim"])),
              InputRule("timestep", ("batch",), "int", 1000))  # fmt: skip
    batch, frames, *rest = video_dims(config, config.get("rope_max_seq_len"))
    frames = dataclasses.replace(frames, default=DimRange(2, 3, 5), why="the pose video is a frame shorter than the latents")
    return Adapter(
        type(model).__name__, "wan-animate", inputs, (batch, frames, *rest), call=_wan_animate_call,
        output_axes=("batch", None, "frames", "height", "width"), patches=(CONSTANT_QR_PATCH,),
        notes=(f"frames counts the latents' frames; the pose video has frames - 1, the face video (pixels, {side}²) "
               f"4·frames − 7; the reference image's CLIP features are {CLIP_IMAGE_TOKENS} tokens",),
    )  # fmt: skip


# Cosmos's pipelines sample at 30 fps (the rotary positions scale time by base_fps / fps); kiln passes the same.
COSMOS_FPS = 30


class _NearestResize:
    """torchvision.transforms' resize, for Cosmos's padding mask where torchvision is not installed: for nearest
    interpolation torchvision calls torch's interpolate, as this does."""

    class InterpolationMode:
        NEAREST = "nearest"

    class functional:  # noqa: N801 (torchvision's name)
        @staticmethod
        def resize(image, size, interpolation="nearest"):
            import torch

            return torch.nn.functional.interpolate(image, size=list(size), mode="nearest")


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """Cosmos's module without torchvision gets _NearestResize as its transforms for the block, and only then."""
    import diffusers.models.transformers.transformer_cosmos as module

    if hasattr(module, "transforms"):
        yield
        return
    module.transforms = _NearestResize
    try:
        yield
    finally:
        del module.transforms


def _cosmos_positions(self, hidden_states):
    """CosmosLearnablePositionalEmbed.forward with its norm's scale from the hidden size alone: the original
    reads sqrt(numel ratio) through numpy, which fixes the token count when traced. The ratio is 1 / hidden size."""
    import torch

    batch, _, frames, height, width = hidden_states.shape
    patch_t, patch_h, patch_w = self.patch_size
    emb_t, emb_h, emb_w = self.pos_emb_t[: frames // patch_t], self.pos_emb_h[: height // patch_h], self.pos_emb_w[: width // patch_w]
    emb = (emb_t[:, None, None] + emb_h[None, :, None] + emb_w[None, None, :]).flatten(0, 2).expand(batch, -1, -1)
    norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True, dtype=torch.float32)
    return (emb / (self.eps + norm * emb.shape[-1] ** -0.5)).type_as(hidden_states)


COSMOS_POSITIONS_PATCH = Patch(
    "Cosmos's learnt positions normalised with the hidden size's scale",
    "its learnt position embedding scales the norm by sqrt(numel ratio) computed with numpy, which fixes the token "
    "count when traced; the ratio is 1 / hidden size, and kiln exports that",
    lambda m: _instance_method(m.learnable_pos_embed, "forward", _cosmos_positions),
)


def _cosmos_call(model, latents, *rest):
    """Cosmos concatenates a padding mask to the latents; its pipelines pass zeros (nothing padded), here at the
    latents' size, which the model's resize keeps."""
    *condition, text, timestep = rest  # video-to-world's condition mask first
    padding = latents.new_zeros(1, 1, *latents.shape[-2:])
    with _torchvision_stand_in():
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, fps=COSMOS_FPS,
                     condition_mask=condition[0] if condition else None, padding_mask=padding, return_dict=False)[0]  # fmt: skip


def _cosmos(model, config) -> Adapter:
    """Cosmos 1.0 (text-to-world, and video-to-world with its condition mask: in_channels counts the mask's
    channel); frames, height and width are bounded by its learnt position tables (max_size)."""
    import diffusers.models.transformers.transformer_cosmos as module

    if config.get("extra_pos_embed_type") != "learnable" or config.get("use_crossattn_projection"):
        raise InputError(f"kiln exports Cosmos 1.0's {type(model).__name__} (learnt positions, no cross-attention "
                         "projection), not this config, which is Cosmos 2's or 2.5's: their pipelines pass other fps "
                         "and timesteps, which kiln has no adapter for yet", hint=supported_hint())  # fmt: skip
    notes = [f"fps is {COSMOS_FPS}, as Cosmos's pipelines pass; the padding mask is zeros (nothing padded), as they pass"]
    if not hasattr(module, "transforms"):
        notes.append("torchvision is not installed: the padding mask's resize runs as torch's nearest interpolate, "
                     "which torchvision's resize calls for nearest")  # fmt: skip
    channels, mask_channels = config["out_channels"], config["in_channels"] - config["out_channels"]
    inputs = [InputRule("hidden_states", ("batch", channels, "frames", "height", "width"))]
    if mask_channels:
        inputs.append(InputRule("condition_mask", ("batch", mask_channels, "frames", "height", "width"), "uniform"))
    inputs += [InputRule("encoder_hidden_states", ("batch", "text_len", config["text_embed_dim"])),
               InputRule("timestep", ("batch",), "uniform", 1000.0)]  # fmt: skip
    batch, _, _, _, text = video_dims(config)
    patch_t, patch_h, patch_w = config["patch_size"]
    max_frames, max_height, max_width = (int(v) for v in config["max_size"])
    why = f"its patch is {patch_t}x{patch_h}x{patch_w} and its position tables cover {max_frames}x{max_height}x{max_width} (max_size)"
    frames = DimRule("frames", DimRange(*(min(_align_up(v, patch_t), max_frames) for v in (1, 2, 4))),
                     multiple=patch_t, max=max_frames, why=why)  # fmt: skip
    height = DimRule("height", _spatial(patch_h, max_height), multiple=patch_h, max=max_height, why=why)
    width = DimRule("width", _spatial(patch_w, max_width), multiple=patch_w, max=max_width, why=why)
    return Adapter(
        type(model).__name__, "cosmos", tuple(inputs), (batch, frames, height, width, text), call=_cosmos_call,
        output_axes=("batch", None, "frames", "height", "width"), notes=tuple(notes),
        patches=(COSMOS_POSITIONS_PATCH,) if model.learnable_pos_embed is not None else (),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {
    "CosmosTransformer3DModel": _cosmos,
    "WanTransformer3DModel": _video("wan"),
    "SkyReelsV2Transformer3DModel": _video("wan"),
    "HeliosTransformer3DModel": _video("wan"),
    "WanVACETransformer3DModel": _video("wan", extra=_vace_control),
    "HunyuanVideoTransformer3DModel": _video("hunyuan-video", timestep="float", mask="encoder_attention_mask"),
    "MotifVideoTransformer3DModel": _video("motif-video", mask="encoder_attention_mask"),
    "SanaVideoTransformer3DModel": _video("sana-video"),
    "AllegroTransformer3DModel": _video("allegro"),
    "LTXVideoTransformer3DModel": _ltx,
    "LTX2VideoTransformer3DModel": _ltx2,
    "AnyFlowTransformer3DModel": _anyflow,
    "TransformerTemporalModel": _temporal,
    "ChronoEditTransformer3DModel": _video("wan", patches=(CHRONO_ROPE_PATCH,)),
    "JoyImageEditTransformer3DModel": _video("joyimage", timestep="float", patches=(JOY_ROPE_PATCH,)),
    "JoyImageEditPlusTransformer3DModel": _joy_plus,
    "WanAnimateTransformer3DModel": _wan_animate,
    "MochiTransformer3DModel": _video("mochi", mask="encoder_attention_mask", patches=(MOCHI_PATCH, MOCHI_ROPE_PATCH)),
}
