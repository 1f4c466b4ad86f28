"""Adapters for video VAEs' decoders that decode a whole clip in one call: latent_sample [batch, C, frames,
height, width] -> sample [batch, 3, first + step (frames - 1), f height, f width].

Their decoders are causal 3D convolutions over the whole clip (HunyuanVideo, LTX-Video, LTX-2, Mochi,
Cosmos, Stable Video Diffusion's temporal decoder), so one graph takes any number of frames. Wan's decodes
one latent frame at a time with a cache, which over a whole clip is zero padding: kiln exports that decode
(WAN_PATCH), and the check compares it with diffusers' loop. diffusers' framewise and tiled decoding split
a long clip into overlapping chunks and blend them, to save memory; kiln's graph decodes the clip whole,
and the check against PyTorch calls the decoder the same way. How many frames come out of the first latent
frame and of each one after it, and the spatial scale, are measured by decoding a small probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    Patch,
    _batch,
    _first,
    _instance_method,
    _module_attribute,
    _spatial,
    supported_hint,
)
from kiln.targets import DimRange

# diffusers' switches that split a decode into chunks: off, for one whole-clip graph
_CHUNKING = ("use_tiling", "use_framewise_decoding", "use_slicing")


def whole_clip(model, decode: Callable):
    """decode() with the model's chunking switches off."""
    with contextlib.ExitStack() as stack:
        for name in _CHUNKING:
            if isinstance(getattr(model, name, None), bool):
                stack.enter_context(_module_attribute(model, name, False))
        return decode()[0]


def _clip_call(model, latents, *timestep):
    kwargs = {"temb": timestep[0]} if timestep else {}
    return whole_clip(model, lambda: model.decode(latents, return_dict=False, **kwargs))


def _folded_call(model, latents):
    """Stable Video Diffusion's decoder takes frames folded into the batch, with num_frames beside them."""
    b, c, f, h, w = latents.shape
    folded = latents.transpose(1, 2).reshape(b * f, c, h, w)
    video = whole_clip(model, lambda: model.decode(folded, num_frames=f, return_dict=False))
    return video.reshape(b, f, *video.shape[1:]).transpose(1, 2)


def _framewise_norm(self, x):
    """MochiChunkedGroupNorm3D in one call: a group norm of each frame, all frames at once."""
    b = x.shape[0]
    frames = self.norm_layer(x.permute(0, 2, 1, 3, 4).flatten(0, 1))
    return frames.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)


def _replace_forwards(stack: contextlib.ExitStack, modules, class_name: str, forward) -> None:
    """Every module of class_name among modules runs forward instead of its own, until stack closes."""
    for module in modules:
        if type(module).__name__ == class_name:
            stack.enter_context(_instance_method(module, "forward", forward))


def _forwards_of(class_name: str, forward):
    """A Patch's apply: every module of class_name in the model's decoder runs forward instead of its own."""

    @contextlib.contextmanager
    def apply(model):
        with contextlib.ExitStack() as stack:
            _replace_forwards(stack, model.decoder.modules(), class_name, forward)
            yield

    return apply


MOCHI_NORM_PATCH = Patch(
    "Mochi's frame norms in one call",
    "MochiChunkedGroupNorm3D normalises frames in chunks of 8 with a Python loop over split, which fixes "
    "the chunk count when traced; the frames are independent, so kiln exports one group norm over them all",
    _forwards_of("MochiChunkedGroupNorm3D", _framewise_norm),
)


def _wan_upsample(self, x, feat_cache=None, feat_idx=(0,)):
    """WanResample over a whole clip, as its frame loop computes it: the first latent frame is not doubled
    in time (its chunk skips time_conv); the others go through time_conv causally, seeing zeros before
    frame 1 (the loop's "Rep" cache), and each becomes two frames. Zeroing frame 0 gives time_conv exactly
    that window, and keeps one graph for any number of frames, 1 included."""
    import torch

    if self.mode == "upsample3d":
        b, c, t, h, w = x.shape
        later = (torch.arange(t, device=x.device) > 0).to(x.dtype)[:, None, None]  # masks, not slices: no size-1 guards
        doubled = self.time_conv(x * later).reshape(b, 2, c, t, h, w)
        doubled = torch.stack((doubled[:, 0], doubled[:, 1]), 3).reshape(b, c, 2 * t, h, w)[:, :, 1:]
        first = (torch.arange(2 * t - 1, device=x.device) == 0)[:, None, None]
        x = torch.where(first, x[:, :, :1], doubled)
    b, c, t, h, w = x.shape
    x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def _wan_decode(self, z, return_dict=True):
    """AutoencoderKLWan._decode over the whole clip in one call: every causal convolution pads with zeros
    where the frame loop's cache is empty, which is what the cache amounts to over a whole clip."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_wan import DecoderOutput, unpatchify

    # first_chunk: Wan 2.2's DupUp3D shortcut drops the copies before frame 0, over a whole clip the first ones
    out = self.decoder(self.post_quant_conv(z), first_chunk=True)
    if self.config.patch_size is not None:
        out = unpatchify(out, patch_size=self.config.patch_size)
    out = torch.clamp(out, min=-1.0, max=1.0)
    return DecoderOutput(sample=out) if return_dict else (out,)


@contextlib.contextmanager
def _wan_whole_clip(model):
    with contextlib.ExitStack() as stack:
        stack.enter_context(_instance_method(model, "_decode", _wan_decode))
        _replace_forwards(stack, model.decoder.modules(), "WanResample", _wan_upsample)
        yield


WAN_PATCH = Patch(
    "Wan's frame loop as one whole-clip decode",
    "AutoencoderKLWan decodes one latent frame at a time in a Python loop, carrying each causal "
    "convolution's last two input frames in a cache; kiln exports the same decode over the whole clip, "
    "each causal convolution zero-padded as the empty cache is, so one graph takes any number of frames",
    _wan_whole_clip,
)


# KVAE-Video decodes a clip in segments of 16 frames (the first 17), each after the one before through a cache
KVAE_SEGMENT = 17


def _kvae_call(model, latents):
    """KVAE-Video's decode of a clip of one segment: one decoder call on a fresh cache, as decode makes it (its
    split into segments, from Python arithmetic on the frame count, would fix the count when traced)."""
    return model.decoder(latents, model._make_decoder_cache())


def _fresh_causal_conv(self, input, cache):
    """KVAECachedCausalConv3d on a fresh cache: a causal convolution whose past is the first frame repeated.
    The original computes the same in two parts, at offsets from Python arithmetic on the frame count."""
    import torch
    import torch.nn.functional as F

    padded = F.pad(input, (self.height_pad, self.height_pad, self.width_pad, self.width_pad, 0, 0), mode="replicate")
    past = padded[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
    return self.conv(torch.cat([past, padded], dim=2))


KVAE_PATCH = Patch(
    "KVAE-Video's causal convolutions on a fresh cache in one call",
    "KVAECachedCausalConv3d splits its output at offsets computed with math.ceil and math.trunc from the frame "
    "count, which fix the count when traced; on the first segment its past is the first frame repeated, and kiln "
    "exports that convolution in one call",
    _forwards_of("KVAECachedCausalConv3d", _fresh_causal_conv),
)


def _probe(model, call, channels: int, timestep: bool, multiple: int = 1) -> tuple[int, int, int, int]:
    """(frames out of the first latent frame, frames out of each next one, spatial scale, output channels),
    from decoding 8x8 latents of 2 and 3 frames (or of the two smallest multiples of multiple)."""
    import torch

    counts = (2, 3) if multiple == 1 else (multiple, 2 * multiple)
    sizes = []
    with torch.no_grad():
        for frames in counts:
            extra = (torch.zeros(1),) if timestep else ()
            sizes.append(call(model, torch.zeros(1, channels, frames, 8, 8), *extra).shape)
    step = (sizes[1][2] - sizes[0][2]) // (counts[1] - counts[0])
    return sizes[0][2] - step * (counts[0] - 1), step, sizes[0][-1] // 8, sizes[0][1]


def _batched_upsample(self, x):
    """VidTokUpsample3D, non-causal: its per-sample loop over the batch (which fixes the batch when traced) as
    one interpolation of the batch, the same values."""
    import torch.nn.functional as F

    alpha = self.mix_factor.sigmoid()
    x = F.interpolate(x.float(), scale_factor=[2.0, 1.0, 1.0], mode=self.interpolation_mode).to(x.dtype)
    return alpha * x + (1 - alpha) * self.conv(x)


@contextlib.contextmanager
def _vidtok_batched(model):
    with contextlib.ExitStack() as stack:
        if not model.config.is_causal:
            _replace_forwards(stack, model.decoder.modules(), "VidTokUpsample3D", _batched_upsample)
        yield


VIDTOK_PATCH = Patch(
    "VidTok's upsampling over the batch at once",
    "VidTokUpsample3D interpolates each sample of the batch in a Python loop, which fixes the batch size when "
    "traced; kiln exports one interpolation of the whole batch, which computes the same",
    _vidtok_batched,
)


def _vidtok_call(model, latents):
    """VidTok's decode returns the tensor itself (and crops a causal model's first frames)."""
    return whole_clip(model, lambda: (model.decode(latents),))


@contextlib.contextmanager
def _randn(draw: Callable):
    """torch.randn is draw(size) inside the block: LTX-Video 0.9.1's decoder calls it for its noise. The swap is
    process-wide while the block runs (an import is one thread)."""
    import torch

    original = torch.randn
    torch.randn = lambda *size, **kwargs: draw(size[0] if len(size) == 1 else size)
    try:
        yield
    finally:
        torch.randn = original


def _noise_scales(model, call, channels: int, timestep: bool) -> list[int]:
    """The spatial scale of each noise draw of one decode (of 8x8 latents), in order."""
    import torch

    sizes = []
    with torch.no_grad(), _randn(lambda size: sizes.append(tuple(size)) or torch.zeros(size)):
        call(model, torch.zeros(1, channels, 2, 8, 8), *((torch.zeros(1),) if timestep else ()))
    return [w // 8 for _, w in sizes]


def _noise_input(call, scales: list[int]):
    """call(model, latents[, timestep]) with its noise draws taken from noise [Σ s², height, width]: each draw of
    [s height, s width] with its s x s pixel blocks folded into channels, shared by the batch as diffusers draws it."""

    def noisy(model, latents, *rest):
        *timestep, noise = rest
        _, h, w = noise.shape
        parts = noise.split([s * s for s in scales])
        draws = iter(p.reshape(s, s, h, w).permute(2, 0, 3, 1).reshape(h * s, w * s) for p, s in zip(parts, scales, strict=True))

        def draw(size):
            value = next(draws, None)
            if value is None:
                raise RuntimeError(f"{type(model).__name__} drew noise more than the {len(scales)} times kiln counted")
            return value

        with _randn(draw):
            return call(model, latents, *timestep)

    return noisy


def _video_decoder(model, config) -> Adapter:
    cls = type(model).__name__
    channels = _first(config, "latent_channels", "z_channels", "z_dim")
    timestep = bool(config.get("timestep_conditioning"))  # LTX-Video 0.9.1 decodes at a timestep
    call = {"AutoencoderKLTemporalDecoder": _folded_call, "AutoencoderVidTok": _vidtok_call,
            "AutoencoderKLKVAEVideo": _kvae_call}.get(cls, _clip_call)  # fmt: skip
    # VidTok's non-causal decoder takes latent frames in groups (it drops a remainder)
    group = 1 if config.get("is_causal", True) else model.num_latent_frames_batch_size
    noise = any(config.get("decoder_inject_noise") or ())  # LTX-Video 0.9.1 adds fresh noise in its blocks
    scales = _noise_scales(model, call, channels, timestep) if noise else []
    first, step, scale, out_channels = _probe(model, call, channels, timestep, group)
    height = DimRule("height", _spatial(1))
    frames = DimRule("frames", DimRange(group, 2 * group, 4 * group), multiple=group,
                     why=f"its decoder takes latent frames in groups of {group} (num_latent_frames_batch_size)")  # fmt: skip
    if cls == "AutoencoderKLKVAEVideo":
        most = -(-KVAE_SEGMENT // config["temporal_compress_times"])
        if most < 3:
            raise InputError(f"kiln cannot export {cls} with temporal_compress_times {config['temporal_compress_times']} "
                             f"yet: its first segment ({KVAE_SEGMENT} frames) is {most} latent frames, and one graph "
                             "takes 3 or more", hint=supported_hint())  # fmt: skip
        frames = dataclasses.replace(frames, default=DimRange(3, min(4, most), min(5, most)), min=3, max=most,
                                     why=f"kiln decodes one segment ({KVAE_SEGMENT} frames, {most} latent frames), "
                                     "of 3 latent frames or more (fewer take other paths when traced); its later "
                                     "segments go through a cache kiln does not export yet")  # fmt: skip
    inputs = [InputRule("latent_sample", ("batch", channels, "frames", "height", "width"))]
    if timestep:
        inputs.append(InputRule("timestep", ("batch",), "uniform", 1.0))
    if noise:
        inputs.append(InputRule("noise", (sum(s * s for s in scales), "height", "width")))
        call = _noise_input(call, scales)
    out_frames = "frames" if (first, step) == (1, 1) else f"{first}+{step}*(frames-1)"
    return Adapter(
        cls, "video-vae-decoder", tuple(inputs), (_batch(), frames, height, dataclasses.replace(height, name="width")),
        call=call, patches=PATCHES.get(cls, ()), output_axes=("batch", None, out_frames, f"{scale}*height", f"{scale}*width"),
        notes=(f"the decoder of {cls} alone: latent_sample [batch, {channels}, frames, height, width] -> sample "
               f"[batch, {out_channels}, {out_frames}, {scale}*height, {scale}*width], the whole clip in one call "
               "(diffusers' tiled and framewise decoding, which blend overlapping chunks to save memory, are off)",
               *(("timestep is the decode timestep LTX-Video's pipeline passes (decode_timestep)",) if timestep else ()),
               *((f"noise holds the {len(scales)} draws of noise its decoder adds (any N(0, 1) values), each of "
                  "[s height, s width] with its s x s pixel blocks folded into channels",) if noise else ())),
    )  # fmt: skip


PATCHES = {"AutoencoderKLMochi": (MOCHI_NORM_PATCH,), "AutoencoderKLWan": (WAN_PATCH,), "AutoencoderVidTok": (VIDTOK_PATCH,),
           "AutoencoderKLKVAEVideo": (KVAE_PATCH,)}  # fmt: skip
FAMILIES: dict[str, Callable[..., Adapter]] = {
    name: _video_decoder
    for name in ("AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video", "AutoencoderKLMochi",
                 "AutoencoderKLCosmos", "AutoencoderKLTemporalDecoder", "AutoencoderKLWan", "AutoencoderVidTok", "AutoencoderKLKVAEVideo")
}  # fmt: skip
