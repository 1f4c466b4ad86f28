"""Video VAE decoders as step functions: one step of diffusers' own decode loop per call, its latent frames in
and its frames out, every causal convolution's cache as an explicit input and output. A long clip decodes
step after step in the memory of one, the caches left on the device between steps (`kiln decode`).

    latent_sample [batch, C, frames, height, width], first [1] (1 on a clip's first step, else 0),
    cache_in_00 ... -> sample [batch, 3, frames out, f height, f width], cache_out_00 ...

Each cache holds the last two input frames of one causal convolution. A cache at s times the latent size is
stored with its s x s pixel blocks folded into channels, [batch, C s², 2, height, width], so every input and
output shares the latent's batch, height and width, and no dim is a multiple of another. A clip's first step
differs in each family's loop; `first` selects it inside the one graph:
- Wan 2.1 (1 latent frame a step, 4 frames out): the loop's first step does not double frames in its time
  upsamplers and yields 1 frame. The graph keeps one shape: with first=1 each upsampler repeats its frames,
  every causal convolution zeroes all but the last frame of its input and of its cache (an empty cache is
  zero padding), the upsamplers' caches stay empty, and the last of the 4 frames out is the clip's frame 0.
- Magvit (1 latent frame a step): the first step pads with copies of its first frame and skips the time
  upsamplers; the graph always upsamples, which makes copies the copy padding leaves unchanged.
- CogVideoX (2 latent frames a step, 3 on the first when the count is odd): the first step pads with copies
  of its first frame; the parity branches of its upsamplers and spatial norms become arithmetic, so one graph
  takes 1, 2 or 3 latent frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.diffusion_adapters import Adapter, DimRule, InputRule, _batch, _instance_method, _spatial
from kiln.targets import DimRange

STEP_METADATA_KEY = "kiln.decoder_step"  # JSON: what `kiln decode` needs to drive the step graph
FIRST = "first"
CACHE_FRAMES = 2  # diffusers' CACHE_T: a causal convolution's kernel reaches two frames back
REPORT = "report the class to kiln, with this message"


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """What a step graph takes and gives, beside the latent frames."""

    latent_frames: int  # latent frames a step takes; a clip's remainder joins its first step (chunks)
    frames_out: dict[int, int]  # frames out of a step, by the latent frames it took
    scale: int  # sample pixels per latent pixel
    first_frames: int | None  # the clip's frames among the first step's: its last first_frames (None: all)
    caches: tuple[tuple[int, int], ...]  # (channels, spatial scale) of each cache, in the decoder's order

    def cache_names(self, direction: str) -> list[str]:
        return [f"cache_{direction}_{k:02d}" for k in range(len(self.caches))]

    def to_json(self) -> str:
        return json.dumps({"latent_frames": self.latent_frames, "frames_out": self.frames_out,
                           "first_frames": self.first_frames, "inputs": self.cache_names("in"),
                           "outputs": self.cache_names("out")})  # fmt: skip


def chunks(count: int, size: int) -> list[tuple[int, int]]:
    """diffusers' split of a clip's latent frames into steps (CogVideoX's _decode): steps of size, the
    remainder joining the first; one step when the clip is shorter."""
    steps, extra = max(count // size, 1), count % size
    return [(size * i + (0 if i == 0 else extra), min(size * (i + 1) + extra, count)) for i in range(steps)]


def kept_frames(frames: int, first: bool, first_frames: int | None) -> range:
    """Which of a step's frames are the clip's: the last first_frames of the first step's (all if None), all after."""
    return range(frames - first_frames if first and first_frames else 0, frames)


def clip_frames(count: int, layout: dict) -> int:
    """Frames out of a clip of count latent frames, from a step graph's metadata (StepLayout.to_json)."""
    steps = [b - a for a, b in chunks(count, layout["latent_frames"])]
    first = layout["first_frames"] or layout["frames_out"][str(steps[0])]
    return first + sum(layout["frames_out"][str(n)] for n in steps[1:])


def fold(cache, scale: int):
    """[b, c, t, s h, s w] -> [b, c s², t, h, w]."""
    if scale == 1:
        return cache
    b, c, t, h, w = cache.shape
    blocks = cache.reshape(b, c, t, h // scale, scale, w // scale, scale).permute(0, 1, 4, 6, 2, 3, 5)
    return blocks.reshape(b, c * scale * scale, t, h // scale, w // scale)


def unfold(cache, scale: int):
    """fold's inverse."""
    if scale == 1:
        return cache
    b, cs, t, h, w = cache.shape
    blocks = cache.reshape(b, cs // (scale * scale), scale, scale, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return blocks.reshape(b, cs // (scale * scale), t, h * scale, w * scale)


def _real_frames(first, frames: int, dtype):
    """[frames, 1, 1]: 1 for frames that hold data. On the first step only the last does; the ones before it
    stand where the loop's first iteration has no frame at all, and must read as its zero padding."""
    import torch

    before_last = (torch.arange(frames, device=first.device) < frames - 1).to(dtype)
    return (1 - first.to(dtype) * before_last)[:, None, None]


@contextlib.contextmanager
def _stepping(model, first):
    """The decoder's causal convolutions and time upsamplers run one step of the loop, first given."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    def conv(self, x, cache_x=None):
        if cache_x is not None:  # a clip's first step starts from the loop's empty caches, whatever is passed
            cache_x = cache_x * (1 - first.to(x.dtype))
        return WanCausalConv3d.forward(self, x * _real_frames(first, x.shape[2], x.dtype), cache_x)

    def resample(self, x, feat_cache=None, feat_idx=(0,)):
        import torch

        if self.mode == "upsample3d":
            b, c, t, h, w = x.shape
            idx, cache = feat_idx[0], feat_cache[feat_idx[0]] * (1 - first.to(x.dtype))
            feat_cache[idx] = torch.cat([cache, x], 2)[:, :, -CACHE_FRAMES:] * (1 - first.to(x.dtype))
            feat_idx[0] += 1
            doubled = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
            doubled = torch.stack((doubled[:, 0], doubled[:, 1]), 3).reshape(b, c, 2 * t, h, w)
            x = torch.where(first.bool(), x.repeat_interleave(2, dim=2), doubled)
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)

    with contextlib.ExitStack() as stack:
        for module in model.decoder.modules():
            if isinstance(module, WanCausalConv3d):
                stack.enter_context(_instance_method(module, "forward", conv))
            elif isinstance(module, WanResample):
                stack.enter_context(_instance_method(module, "forward", resample))
        yield


def _wan_step(model, latent, first, caches: list):
    """One iteration of AutoencoderKLWan's decode loop: (sample, caches after it), unfolded."""
    import torch

    with _stepping(model, first):
        out = model.decoder(model.post_quant_conv(latent), feat_cache=caches, feat_idx=[0])
    # After the first step a cache holds its convolution's one real input frame, after a zero one.
    kept = _real_frames(first, CACHE_FRAMES, latent.dtype)
    return torch.clamp(out, min=-1.0, max=1.0), [c * kept for c in caches]


def _magvit_step(model, latent, first, caches: list | None):
    """One iteration of AutoencoderKLMagvit's decode loop: (sample, caches after it), unfolded; caches None: a
    first step with no cache inputs (to learn their shapes). Its causal convolutions pad a chunk with the
    cache, and the first chunk with copies of its first frame; its time upsamplers skip the first chunk. The
    step graph always upsamples: on the first step that makes copies of the one frame, which the copies
    padding it leave unchanged, so each of the 4 frames out is the clip's frame 0."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_magvit import EasyAnimateCausalConv3d, EasyAnimateUpsampler3D

    after = []

    def conv(self, x):
        if self.temporal_padding == 0:
            return torch.nn.Conv3d.forward(self, x)
        copies = x[:, :, :1].expand(-1, -1, self.temporal_padding, -1, -1)
        cache = copies if caches is None else torch.where(first.bool(), copies, caches[len(after)])
        x = torch.cat([cache, x], 2)
        after.append(x[:, :, -self.temporal_padding :])
        return torch.nn.Conv3d.forward(self, x)  # the loop's sliding windows, at the decoder's time stride of 1

    def upsample(self, x):
        x = self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
        if self.temporal_upsample:
            x = F.interpolate(x, scale_factor=(2, 1, 1), mode="nearest" if self.spatial_group_norm else "trilinear")
        return x

    with contextlib.ExitStack() as stack:
        for module in model.decoder.modules():
            if isinstance(module, EasyAnimateCausalConv3d):
                if module.t_stride != 1 or module.temporal_padding not in (0, CACHE_FRAMES):
                    raise InputError(f"kiln's step decoder of {type(model).__name__} takes causal convolutions of time "
                                     f"stride 1 reaching {CACHE_FRAMES} frames back; this one has stride "
                                     f"{module.t_stride}, reach {module.temporal_padding}", hint=REPORT)  # fmt: skip
                stack.enter_context(_instance_method(module, "forward", conv))
            elif isinstance(module, EasyAnimateUpsampler3D):
                stack.enter_context(_instance_method(module, "forward", upsample))
        out = model.decoder(model.post_quant_conv(latent))
    return out, after


def _cogvideox_stepper(model):
    """One iteration of AutoencoderKLCogVideoX's decode loop, as run(model, latent, first, caches) for step. Its
    loop takes 2 latent frames a step, 3 on the first when a clip's count is odd (13, as CogVideoX samples), 1
    for a one-frame clip; where its upsamplers and spatial norms branch in Python on the frame count's parity,
    the step graph computes the same frames with the parity as a number, so one graph takes 1, 2 or 3 frames.
    Its causal convolutions pad a clip's first chunk with copies of its first frame."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d, CogVideoXSpatialNorm3D
    from diffusers.models.upsampling import CogVideoXUpsample3D

    def framewise(x, resize):
        b, c, t, h, w = x.shape
        y = resize(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    # The frames each spatial norm sees per latent frame (1, 2 or 4), from the decoder run on 2 latent frames.
    repeats = {}
    norms = [m for m in model.decoder.modules() if isinstance(m, CogVideoXSpatialNorm3D)]
    hooks = [m.register_forward_pre_hook(lambda m, args: repeats.__setitem__(m, args[0].shape[2] // args[1].shape[2]))
             for m in norms]  # fmt: skip
    try:
        with torch.no_grad():
            model.decoder(torch.zeros(1, model.config.latent_channels, 2, 6, 5))
    finally:
        for hook in hooks:
            hook.remove()

    def run(model, latent, first, caches):
        after = []

        def conv(self, inputs, conv_cache=None):
            k = self.time_kernel_size
            if self.pad_mode == "replicate" or k == 1:  # no cache: kernel 1 reads none (its returned one is dead)
                return CogVideoXCausalConv3d.forward(self, inputs)[0], None
            if k != CACHE_FRAMES + 1:
                raise InputError(f"kiln's step decoder of {type(model).__name__} takes causal convolutions reaching "
                                 f"{CACHE_FRAMES} frames back; this one reaches {k - 1}", hint=REPORT)  # fmt: skip
            copies = inputs[:, :, :1].expand(-1, -1, k - 1, -1, -1)
            cache = copies if caches is None else torch.where(first.bool(), copies, caches[len(after)])
            x = torch.cat([cache, inputs], 2)
            after.append(x[:, :, 1 - k :])
            return self.conv(x), None

        def norm(self, f, zq, conv_cache=None):
            # nearest resizing of the latents to f's frames: frame 0 once and the others k times when the count is
            # odd, every frame k times when even
            k = repeats[self]
            zq = zq.repeat_interleave(k, dim=2)[:, :, (k - 1) * (zq.shape[2] % 2) :]
            zq = framewise(zq, lambda x: F.interpolate(x, size=f.shape[-2:]))
            return self.norm_layer(f) * self.conv_y(zq)[0] + self.conv_b(zq)[0], None

        def upsample(self, x):
            frames = x.shape[2]
            x = framewise(x, lambda x: F.interpolate(x, scale_factor=2.0))
            if self.compress_time:  # each frame twice, frame 0 once when the count is odd
                x = x.repeat_interleave(2, dim=2)[:, :, frames % 2 :]
            return framewise(x, self.conv)

        with contextlib.ExitStack() as stack:
            for module in model.decoder.modules():
                forward = {CogVideoXCausalConv3d: conv, CogVideoXSpatialNorm3D: norm, CogVideoXUpsample3D: upsample}.get(type(module))
                if forward is not None:
                    stack.enter_context(_instance_method(module, "forward", forward))
            z = model.post_quant_conv(latent) if model.post_quant_conv is not None else latent
            return model.decoder(z)[0], after

    return run


def step(model, run, layout: StepLayout, latent, first, *caches):
    """One iteration of the family's decode loop, run: (sample, *caches after it), caches folded."""
    unfolded = [unfold(c, scale) for c, (_, scale) in zip(caches, layout.caches, strict=True)]
    out, after = run(model, latent, first, unfolded)
    return (out, *(fold(c, scale) for c, (_, scale) in zip(after, layout.caches, strict=True)))


def _wan_layout(model, channels: int) -> StepLayout:
    """The caches diffusers' loop keeps, from two iterations of it on 6x5 latents."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    model.clear_cache()
    try:
        with torch.no_grad():
            x = model.post_quant_conv(torch.zeros(1, channels, 2, 6, 5))
            model.decoder(x[:, :, :1], feat_cache=model._feat_map, feat_idx=[0], first_chunk=True)
            out = model.decoder(x[:, :, 1:], feat_cache=model._feat_map, feat_idx=[0])
        shapes = [tuple(c.shape) for c in model._feat_map if c is not None]
    finally:
        model.clear_cache()
    if model.config.patch_size:
        out = unpatchify(out, patch_size=model.config.patch_size)
    caches = tuple((c * (w // 5) ** 2, w // 5) for _, c, _, _, w in shapes)
    return StepLayout(1, {1: out.shape[2]}, out.shape[-1] // 5, 1, caches)


def _probed_layout(model, run, channels: int, latent_frames: int, first_frames: int | None) -> StepLayout:
    """The caches and frame counts of first steps (no cache inputs) on 6x5 latents."""
    import torch

    frames_out = {}
    with torch.no_grad():
        for n in range(1, 2 * latent_frames):
            out, caches = run(model, torch.zeros(1, channels, n, 6, 5), torch.ones(1, dtype=torch.int64), None)
            frames_out[n] = out.shape[2]
    scale = out.shape[-1] // 5
    return StepLayout(latent_frames, frames_out, scale, first_frames,
                      tuple((c.shape[1] * (c.shape[-1] // 5) ** 2, c.shape[-1] // 5) for c in caches))  # fmt: skip


def decode_steps(run, latents, layout: StepLayout):
    """Decode latents [batch, C, frames, h, w] (numpy) one step at a time through run(feeds) -> outputs, as
    `kiln decode` does: the whole clip [batch, 3, frames out, H, W]."""
    import numpy as np

    b, _, count, h, w = latents.shape
    caches = {name: np.zeros((b, c, CACHE_FRAMES, h, w), latents.dtype)
              for name, (c, _) in zip(layout.cache_names("in"), layout.caches, strict=True)}  # fmt: skip
    clip = []
    for i, (start, end) in enumerate(chunks(count, layout.latent_frames)):
        out = run({"latent_sample": latents[:, :, start:end], FIRST: np.array([int(i == 0)], np.int64), **caches})
        kept = kept_frames(out["sample"].shape[2], i == 0, layout.first_frames)
        clip.append(out["sample"][:, :, kept.start :])
        caches = dict(zip(layout.cache_names("in"), (out[n] for n in layout.cache_names("out")), strict=True))
    return np.concatenate(clip, axis=2)


def check_against_decode(model, layout: StepLayout, channels: int, onnx_path, sizes, providers, seed: int = 0) -> list[dict]:
    """The step graph on ONNX Runtime (on providers), chunk after chunk, against diffusers' own decode (on the
    model's device) of the same latents (of sizes' batch, height and width), at two frame counts that take two
    steps or more, one with a remainder for the first; InputError at the first that misses 1e-4 · max(1, max |torch|)."""
    import numpy as np
    import torch

    from kiln.optimizer.importers.diffusers import checking_session
    from kiln.optimizer.importers.video_decoders import whole_clip

    session = checking_session(onnx_path, providers)
    names = [o.name for o in session.get_outputs()]
    device = next(model.parameters()).device
    results = []
    for count in (2 * layout.latent_frames, 2 * layout.latent_frames + 1):
        shape = (sizes["batch"], channels, count, sizes["height"], sizes["width"])
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed + count))
        with torch.no_grad():
            want = whole_clip(model, lambda: model.decode(latents.to(device), return_dict=False)).cpu().numpy()
        got = decode_steps(lambda feeds: dict(zip(names, session.run(None, feeds), strict=True)), latents.numpy(), layout)
        limit = 1e-4 * max(1.0, float(np.abs(want).max()))
        result = {"frames": count, "shape": list(shape), "max_abs": None, "limit": limit}
        if got.shape == want.shape:
            result["max_abs"] = float(np.abs(got - want).max())
        results.append(result)
        if result["max_abs"] is None or result["max_abs"] > limit:
            what = (f"max |onnx - torch| = {result['max_abs']:.3g} > {limit:.3g}" if result["max_abs"] is not None
                    else f"{list(got.shape)} frames from the steps, {list(want.shape)} from diffusers")  # fmt: skip
            raise InputError(f"the step decoder of {type(model).__name__}, run chunk after chunk, does not match "
                             f"diffusers' decode of {count} latent frames: {what}", hint=REPORT)  # fmt: skip
    return results


def _step_decoder(model, channels: int, run, layout: StepLayout) -> Adapter:
    cls = type(model).__name__
    height = DimRule("height", _spatial(1))
    dims = [_batch(), height, dataclasses.replace(height, name="width")]
    frames: str | int = 1
    if layout.latent_frames > 1:  # a step takes latent_frames, or up to twice as many less one on a clip's first
        frames = "frames"
        dims.append(DimRule("frames", DimRange(1, layout.latent_frames, 2 * layout.latent_frames - 1)))
    out_frames = layout.frames_out[1] if frames == 1 else None
    caches = tuple(InputRule(name, ("batch", c, CACHE_FRAMES, "height", "width"))
                   for name, (c, _) in zip(layout.cache_names("in"), layout.caches, strict=True))  # fmt: skip
    first = (f"the last {layout.first_frames} of the first step's frames are the clip's" if layout.first_frames else
             f"a clip's first step takes its first {layout.latent_frames} latent frames and the remainder")  # fmt: skip
    return Adapter(
        cls, "video-vae-step-decoder",
        (InputRule("latent_sample", ("batch", channels, frames, "height", "width")), InputRule(FIRST, (1,), "int", 2), *caches),
        tuple(dims),
        call=lambda m, latent, first, *c: step(m, run, layout, latent, first, *c),
        outputs=("sample", *layout.cache_names("out")),
        output_axes=("batch", None, out_frames, f"{layout.scale}*height", f"{layout.scale}*width"),
        output_like=dict(zip(layout.cache_names("out"), layout.cache_names("in"), strict=True)),
        metadata={STEP_METADATA_KEY: layout.to_json()},
        check=lambda m, path, sizes, providers: check_against_decode(m, layout, channels, path, sizes, providers),
        notes=(f"the decoder of {cls} as a step function: latent_sample [batch, {channels}, {frames}, height, width], "
               f"first and {len(caches)} caches -> sample [batch, 3, frames out {layout.frames_out}, {layout.scale}*height, "
               f"{layout.scale}*width] and the caches after it; `kiln decode` runs it chunk after chunk, first=1 on a "
               f"clip's first step ({first})",),
    )  # fmt: skip


def _wan(model, config) -> Adapter:
    if config.get("is_residual"):
        raise InputError(f"kiln exports the step decoder of Wan 2.1's {type(model).__name__}, not yet Wan 2.2's "
                         "(is_residual: its upsamplers' shortcut drops frames on the first chunk)",
                         hint="decode whole clips: leave out --video-decoder step")  # fmt: skip
    return _step_decoder(model, config["z_dim"], _wan_step, _wan_layout(model, config["z_dim"]))


def _magvit(model, config) -> Adapter:
    channels = config["latent_channels"]
    layout = _probed_layout(model, _magvit_step, channels, model.num_latent_frames_batch_size, 1)
    return _step_decoder(model, channels, _magvit_step, layout)


def _cogvideox(model, config) -> Adapter:
    channels = config["latent_channels"]
    run = _cogvideox_stepper(model)
    return _step_decoder(model, channels, run, _probed_layout(model, run, channels, model.num_latent_frames_batch_size, None))


STEP_FAMILIES = {"AutoencoderKLWan": _wan, "AutoencoderKLMagvit": _magvit, "AutoencoderKLCogVideoX": _cogvideox}
