"""Decoders that draw random noise as they decode, with the noise made an input: the consistency decoder of
DALL-E 3 (ConsistencyDecoderVAE), a two-step diffusion model that starts from noise and adds noise between
its steps.

The noise input holds every draw at the latent's size, each output pixel block folded into channels
([batch, draws · 3 · s², height, width] for s times the latent size), so it shares the latent's dims; any
N(0, 1) values are valid noise. The check against PyTorch runs diffusers' own decode with its draws taken
from that input, so both see the same noise.
"""

from __future__ import annotations

import contextlib
import dataclasses

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    DimRule,
    InputRule,
    Patch,
    _batch,
    _instance_method,
    _module_attribute,
    _spatial,
)

STEPS = 2  # the consistency scheduler takes exactly 2 steps


def _unfolded(noise, scale: int):
    """[b, draws·3·s², h, w] -> draws tensors [b, 3, s h, s w]."""
    b, _, h, w = noise.shape
    blocks = noise.reshape(b, STEPS, 3, scale, scale, h, w).permute(1, 0, 2, 5, 3, 6, 4)
    return blocks.reshape(STEPS, b, 3, h * scale, w * scale).unbind(0)


@contextlib.contextmanager
def _draws_from(noise, scale: int):
    """diffusers' randn_tensor, in the decoder and its scheduler, returns the next draw from noise."""
    from diffusers.models.autoencoders import consistency_decoder_vae
    from diffusers.schedulers import scheduling_consistency_decoder

    draws = iter(_unfolded(noise, scale))

    def drawn(shape, generator=None, device=None, dtype=None, layout=None):
        return next(draws)

    with contextlib.ExitStack() as stack:
        for module in (consistency_decoder_vae, scheduling_consistency_decoder):
            stack.enter_context(_module_attribute(module, "randn_tensor", drawn))
        yield


def _scale(model) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


def _consistency_call(model, latents, noise):
    with _draws_from(noise, _scale(model)):
        return model.decode(latents, return_dict=False)[0]


def _coefficients(scheduler) -> list[dict[str, float]]:
    """Per step, the numbers ConsistencyDecoderScheduler multiplies by, read before tracing."""
    scheduler.set_timesteps(STEPS)
    steps = [int(t) for t in scheduler.timesteps]
    return [{"t": t, "c_in": float(scheduler.c_in[t]), "c_out": float(scheduler.c_out[t]), "c_skip": float(scheduler.c_skip[t]),
             "signal": float(scheduler.sqrt_alphas_cumprod[t]), "noise": float(scheduler.sqrt_one_minus_alphas_cumprod[t])}
            for t in steps]  # fmt: skip


@contextlib.contextmanager
def _unrolled(model):
    """ConsistencyDecoderVAE.decode with its two steps unrolled and the scheduler's coefficients as numbers: its
    step finds the timestep's index with torch.where and branches on it, which tracing cannot follow."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.autoencoders import consistency_decoder_vae

    steps = _coefficients(model.decoder_scheduler)

    def decode(self, z, generator=None, return_dict=True, num_inference_steps=STEPS):
        draw = consistency_decoder_vae.randn_tensor  # the noise input's draws (_consistency_call)
        z = (z * self.config.scaling_factor - self.means) / self.stds
        z = F.interpolate(z, mode="nearest", scale_factor=_scale(self))
        b, _, h, w = z.shape
        x_t = steps[0]["noise"] * draw((b, 3, h, w), dtype=z.dtype, device=z.device)
        for step, after in zip(steps, [*steps[1:], None]):
            out = self.decoder_unet(torch.concat([x_t * step["c_in"], z], dim=1), torch.tensor(step["t"])).sample[:, :3]
            x_t = step["c_out"] * out + step["c_skip"] * x_t
            if after is not None:
                x_t = after["signal"] * x_t + after["noise"] * draw(x_t.shape, dtype=x_t.dtype, device=x_t.device)
        return (x_t,)

    with _instance_method(model, "decode", decode):
        yield


UNROLLED_PATCH = Patch(
    "the consistency decoder's two steps unrolled",
    "ConsistencyDecoderScheduler.step finds the timestep's index with torch.where and branches on it in Python, "
    "which tracing cannot follow; kiln exports the same two steps unrolled, the scheduler's coefficients as numbers",
    _unrolled,
)


def _consistency(model, config) -> Adapter:
    scale = _scale(model)
    height = DimRule("height", _spatial(1))
    inputs = (InputRule("latent_sample", ("batch", config["latent_channels"], "height", "width")),
              InputRule("noise", ("batch", STEPS * 3 * scale * scale, "height", "width")))  # fmt: skip
    return Adapter(
        type(model).__name__, "consistency-decoder", inputs, (_batch(), height, dataclasses.replace(height, name="width")),
        call=_consistency_call, patches=(UNROLLED_PATCH,), output_axes=("batch", None, f"{scale}*height", f"{scale}*width"),
        notes=(f"the consistency decoder: latent_sample and noise [batch, {STEPS * 3 * scale * scale}, height, width] "
               f"(its {STEPS} draws of [3, {scale}*height, {scale}*width], each {scale}x{scale} pixel block folded into "
               "channels; any N(0, 1) values) -> sample; its two diffusion steps in one graph",),
    )  # fmt: skip


FAMILIES = {"ConsistencyDecoderVAE": _consistency}
