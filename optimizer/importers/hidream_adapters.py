"""The adapter for HiDream-I1 (HiDreamImageTransformer2DModel): square latents, experts computed densely.

HiDream's patchify takes non-square latents another way (padded to max_seq tokens whose keys are zeroed,
not masked, so the padding changes the result), decided in Python from the shape; kiln exports square
latents, as for DiT. Its unpatchify loops over a tensor of per-sample sizes, and its mixture of experts
routes tokens with bincount and a Python loop over the counts: both data-dependent. kiln exports an
unpatchify from the symbolic sizes, and runs every routed expert on every token, weighted by the gate's
top-k weights (zero where an expert was not chosen): the same sum, at the cost of running all experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    InputRule,
    Patch,
    _batch,
    _instance_method,
    _kwargs_call,
    _sides,
    _text,
    grid_positions,
)


def _patchify(self, hidden_states):
    """HiDream's patchify of square latents: (tokens, no mask, the grid's sides, position ids)."""
    import torch

    batch, channels, height, width = hidden_states.shape
    p = self.config.patch_size
    rows, cols = height // p, width // p
    row, col = grid_positions(torch, rows, cols)
    # float64 ids: the rope multiplies them by float64 frequencies, which PyTorch promotes and ONNX must be told
    ids = torch.stack([torch.zeros_like(row), row, col], dim=-1).double()[None].expand(batch, -1, -1)
    tokens = hidden_states.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
    return tokens.reshape(batch, rows * cols, p * p * channels), None, (rows, cols), ids


def _unpatchify(self, x, img_sizes, is_training):
    """HiDream's unpatchify at inference, for every sample at once: img_sizes is _patchify's (rows, cols)."""
    rows, cols = img_sizes
    p = self.config.patch_size
    batch = x.shape[0]
    grid = x[:, : rows * cols].reshape(batch, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return grid.reshape(batch, -1, rows * p, cols * p)


def _dense_experts(self, x, flat_expert_indices, flat_expert_weights):
    """MOEFeedForwardSwiGLU.moe_infer without routing: each expert on every token, times its gate weight."""
    chosen = flat_expert_indices.view(x.shape[0], -1)
    weights = flat_expert_weights.view(x.shape[0], -1)
    out = x.new_zeros(x.shape)
    for index, expert in enumerate(self.experts):
        out = out + expert(x) * (weights * (chosen == index)).sum(dim=-1, keepdim=True)
    return out


@contextlib.contextmanager
def _traceable(model) -> Iterator[None]:
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    with contextlib.ExitStack() as stack:
        stack.enter_context(_instance_method(model, "patchify", _patchify))
        stack.enter_context(_instance_method(model, "unpatchify", _unpatchify))
        for module in model.modules():
            if isinstance(module, MOEFeedForwardSwiGLU):
                stack.enter_context(_instance_method(module, "moe_infer", _dense_experts))
        yield


TRACEABLE_PATCH = Patch(
    "HiDream's patchify, unpatchify and experts without data-dependent shapes",
    "its unpatchify loops over a tensor of per-sample sizes and its experts route tokens with bincount and a "
    "Python loop over the counts, which tracing cannot follow; kiln exports an unpatchify from the symbolic sizes "
    "and every expert run on every token, weighted by the gate's top-k weights",
    _traceable,
)


def _hidream(model, config) -> Adapter:
    height, width = _sides(config["patch_size"], (), square=True)
    width = dataclasses.replace(width, why="non-square latents are padded to max_seq tokens whose keys are zeroed, "
                                           "not masked, which changes the result; kiln exports square latents")  # fmt: skip
    t5_width, llama_width = config["caption_channels"]
    llama_states = max(config["llama_layers"]) + 1
    inputs = (
        InputRule("hidden_states", ("batch", config["in_channels"], "height", "width")),
        InputRule("timesteps", ("batch",), "uniform", 1000.0),
        InputRule("encoder_hidden_states_t5", ("batch", "text_len", t5_width)),
        InputRule("encoder_hidden_states_llama3", (llama_states, "batch", "text_len", llama_width)),
        InputRule("pooled_embeds", ("batch", config["text_emb_dim"])),
    )
    return Adapter(
        type(model).__name__, "hidream", inputs, (_batch(), height, width, _text()),
        call=_kwargs_call([i.name for i in inputs]),
        output_axes=("batch", None, "height", "width"),
        patches=(TRACEABLE_PATCH,),
        notes=("latents are square (width follows height)",
               f"encoder_hidden_states_llama3 holds the Llama's hidden states after each of its first {llama_states} "
               "layers (the model reads layers llama_layers)",
               "every routed expert runs on every token (exported densely)"),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"HiDreamImageTransformer2DModel": _hidream}
