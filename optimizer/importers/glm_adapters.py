"""The adapter for GLM-Image's diffusion transformer (GlmImageTransformer2DModel), text to image.

Beside the latents and the glyph text, it takes one prior token per latent patch from GLM-Image's
autoregressive model, and a flag per token that drops its embedding (the pipeline's unconditional pass
drops them all). The model takes them as flat rows of (height/p)(width/p) tokens, a dim no single range can
describe; kiln's engine takes them as the patch grid, [batch, height/p, width/p], row by row, which a
reshape of the pipeline's tensors gives. Image editing (the key-value caches of reference images) is not
exported.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.optimizer.importers.diffusion_adapters import (
    _SIZE_CONDITIONS,
    Adapter,
    InputRule,
    _batch,
    _sides,
    _text,
)


def _glm_image_call(model, latents, text, prior_ids, prior_drop, timestep, target_size, crop_coords):
    return model(hidden_states=latents, encoder_hidden_states=text, prior_token_id=prior_ids.flatten(1),
                 prior_token_drop=prior_drop.flatten(1), timestep=timestep, target_size=target_size,
                 crop_coords=crop_coords, return_dict=False)[0]  # fmt: skip


def _glm_image(model, config) -> Adapter:
    p = config["patch_size"]
    height, width = _sides(p, ())
    grid = ("batch", f"height/{p}", f"width/{p}")
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["text_embed_dim"])),
              InputRule("prior_token_id", grid, "int", config["prior_vq_quantizer_codebook_size"]),
              InputRule("prior_token_drop", grid, "bool"),
              InputRule("timestep", ("batch",), "uniform", 1000.0),
              InputRule("target_size", ("batch", 2), "uniform", _SIZE_CONDITIONS["target_size"]),
              InputRule("crop_coords", ("batch", 2), "uniform", _SIZE_CONDITIONS["crop_coords"]))  # fmt: skip
    return Adapter(
        type(model).__name__, "glm-image", inputs, (_batch(), height, width, _text()), call=_glm_image_call,
        output_axes=("batch", None, "height", "width"),
        notes=(f"prior_token_id and prior_token_drop are the pipeline's [batch, tokens] as the patch grid, "
               f"[batch, height/{p}, width/{p}]; text to image only (no key-value caches of reference images)",),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"GlmImageTransformer2DModel": _glm_image}
