"""Adapters for HunyuanVideo 1.5 and FramePack, whose forwards lay out their context in Python loops.

HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel) joins three conditions (image tokens, ByT5 text, the MLLM's text) into one context,
each sample's valid tokens first: forward picks them with boolean indexing in a Python loop over the
batch, and decides text-to-video (image_embeds all zero) with a Python `if` on the data. Traced, the
counts would be fixed. kiln exports a forward that puts every token where PyTorch puts it, with the
positions computed from the masks' lengths (text masks are a tokenizer's: valid tokens first), and the
text-to-video case chosen with tensor arithmetic.

FramePack (HunyuanVideoFramepackTransformer3DModel) masks each sample's padding by slicing with its
length in a Python loop over the batch (and, for one sample, cuts the text to its length instead).
kiln exports the same mask made by comparing positions with the lengths, for every batch size; the
valid tokens' results are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.optimizer.importers.diffusion_adapters import Adapter, DimRule, InputRule, Patch, _instance_method
from kiln.optimizer.importers.video_adapters import video_dims
from kiln.targets import DimRange


def _joined_context(image, image_valid, byt5, byt5_mask, mllm, mllm_mask):
    """[valid image, valid ByT5, valid MLLM, invalid image, invalid ByT5 (zeros), invalid MLLM (zeros)] per
    sample, and its mask, as forward's loop joins them. image_valid: [B, 1], 1 where image tokens count."""
    import torch

    batch, n_image, n_byt5, n_mllm = image.shape[0], image.shape[1], byt5.shape[1], mllm.shape[1]
    v = image_valid * n_image  # [B, 1]: valid image tokens
    l2, l1 = byt5_mask.sum(dim=1, keepdim=True), mllm_mask.sum(dim=1, keepdim=True)
    valid = v + l2 + l1
    k = torch.arange(n_image + n_byt5 + n_mllm)[None]
    zero_row = n_image + n_byt5 + n_mllm  # a row of zeros appended to the sources
    j = k - valid  # position in the invalid part
    source = torch.where(
        k < v, k, torch.where(
            k < v + l2, n_image + k - v, torch.where(
                k < valid, n_image + n_byt5 + k - v - l2, torch.where(
                    j < n_image - v, v + j, zero_row))))  # fmt: skip
    rows = torch.cat([image, byt5, mllm, image.new_zeros(batch, 1, image.shape[2])], dim=1)
    joined = torch.gather(rows, 1, source[..., None].expand(-1, -1, rows.shape[2]))
    return joined, k < valid


def _unpatchify(tokens, frames, rows, cols, p_t, p):
    """[B, frames x rows x cols, C p_t p p] -> [B, C, frames p_t, rows p, cols p], as both forwards end."""
    grid = tokens.reshape(tokens.shape[0], frames, rows, cols, -1, p_t, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return grid.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, timestep_r=None,
             encoder_hidden_states_2=None, encoder_attention_mask_2=None, image_embeds=None, attention_kwargs=None,
             return_dict=True):  # fmt: skip
    """HunyuanVideo15Transformer3DModel.forward with the context joined by _joined_context."""
    import torch

    batch, _, frames, height, width = hidden_states.shape
    p_t, p = self.config.patch_size_t, self.config.patch_size
    rope = self.rope(hidden_states)
    temb = self.time_embed(timestep, timestep_r=timestep_r)
    hidden_states = self.x_embedder(hidden_states)

    def typed(states, kind):  # the condition-type embedding each stream adds
        return states + self.cond_type_embed(torch.full_like(states[:, :, 0], kind, dtype=torch.long))

    mllm = typed(self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask), 0)
    byt5 = typed(self.context_embedder_2(encoder_hidden_states_2), 1)
    image_valid = torch.any(image_embeds != 0).to(mllm.dtype).reshape(1, 1).expand(batch, 1)  # all zero: text-to-video
    image = typed(self.image_embedder(image_embeds) * image_valid[..., None], 2)
    context, mask = _joined_context(image, image_valid.long(), byt5, encoder_attention_mask_2.bool().long(),
                                    mllm, encoder_attention_mask.bool().long())  # fmt: skip
    for block in self.transformer_blocks:
        hidden_states, context = block(hidden_states, context, temb, mask, rope)
    output = _unpatchify(self.proj_out(self.norm_out(hidden_states, temb)), frames // p_t, height // p, width // p, p_t, p)
    return (output,) if not return_dict else {"sample": output}


CONTEXT_PATCH = Patch(
    "HunyuanVideo 1.5's context joined with gathers",
    "forward joins its image, ByT5 and MLLM tokens, valid ones first, by boolean indexing in a Python loop over "
    "the batch, and takes text-to-video from a Python if on image_embeds; kiln exports a forward that puts each "
    "token in the same place with gathers from the masks' lengths",
    lambda m: _instance_method(m, "forward", _forward),
)


def _hunyuan_video15(model, config) -> Adapter:
    dims = (*video_dims(config), DimRule("text_len_2", DimRange(2, 4, 8)), DimRule("image_tokens", DimRange(1, 2, 4)))
    inputs = (
        InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
        InputRule("timestep", ("batch",), "uniform", 1000.0),
        InputRule("encoder_hidden_states", ("batch", "text_len", config["text_embed_dim"])),
        InputRule("encoder_attention_mask", ("batch", "text_len"), "mask"),
        InputRule("encoder_hidden_states_2", ("batch", "text_len_2", config["text_embed_2_dim"])),
        InputRule("encoder_attention_mask_2", ("batch", "text_len_2"), "mask"),
        InputRule("image_embeds", ("batch", "image_tokens", config["image_embed_dim"])),
    )
    names = [i.name for i in inputs]
    return Adapter(
        type(model).__name__, "hunyuan-video-1.5", inputs, dims,
        call=lambda model, *tensors: model(**dict(zip(names, tensors, strict=True)), return_dict=False)[0],
        output_axes=("batch", None, "frames", "height", "width"),
        patches=(CONTEXT_PATCH,),
        notes=("text_len is the MLLM's text, text_len_2 ByT5's; image_embeds all zero is text-to-video, as the "
               "pipeline passes it",),
    )  # fmt: skip


def _framepack_forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                       pooled_projections, image_embeds, indices_latents, guidance=None, latents_clean=None,
                       indices_latents_clean=None, latents_history_2x=None, indices_latents_history_2x=None,
                       latents_history_4x=None, indices_latents_history_4x=None, attention_kwargs=None,
                       return_dict=True):  # fmt: skip
    """HunyuanVideoFramepackTransformer3DModel.forward with its attention mask from a comparison."""
    import torch

    _, _, frames, height, width = hidden_states.shape
    p, p_t = self.config.patch_size, self.config.patch_size_t
    rows, cols = height // p, width // p
    tokens = frames // p_t * rows * cols

    def rope(indices):
        return self.rope(frame_indices=indices, height=height, width=width, device=hidden_states.device)

    hidden_states = self.x_embedder(hidden_states)
    clean, history_2x, history_4x = self.clean_x_embedder(latents_clean, latents_history_2x, latents_history_4x)
    hidden_states, image_rotary_emb = self._pack_history_states(
        hidden_states, clean, history_2x, history_4x, rope(indices_latents), rope(indices_latents_clean),
        rope(indices_latents_history_2x), rope(indices_latents_history_4x), rows, cols)  # fmt: skip
    temb, _ = self.time_text_embed(timestep, pooled_projections, guidance)
    text = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    image = self.image_projection(image_embeds)
    context = torch.cat([image, text], dim=1)
    valid = image.shape[1] + encoder_attention_mask.sum(dim=1, keepdim=True)  # the context's valid tokens
    length = hidden_states.shape[1] + context.shape[1]
    mask = (torch.arange(length)[None] < hidden_states.shape[1] + valid)[:, None, None, :]
    for block in (*self.transformer_blocks, *self.single_transformer_blocks):
        hidden_states, context = block(hidden_states, context, temb, mask, image_rotary_emb)
    output = _unpatchify(self.proj_out(self.norm_out(hidden_states[:, -tokens:], temb)), frames // p_t, rows, cols, p_t, p)
    return (output,) if not return_dict else {"sample": output}


FRAMEPACK_MASK_PATCH = Patch(
    "FramePack's attention mask from a comparison",
    "forward masks each sample's padding by slicing with its length in a Python loop over the batch (and for one "
    "sample cuts the text instead), which tracing fixes; kiln exports the same mask made by comparing positions "
    "with the lengths",
    lambda m: _instance_method(m, "forward", _framepack_forward),
)

# FramePack's context: clean frames beside the latents, and history at 2x and 4x less resolution, each with
# its frames' positions in the video (a frame count of its own, and indices the pipeline numbers).
_FRAMEPACK_CONTEXT = (("latents_clean", "clean_frames", DimRange(1, 1, 2), 1),
                      ("latents_history_2x", "history_2x_frames", DimRange(2, 2, 4), 2),
                      ("latents_history_4x", "history_4x_frames", DimRange(4, 4, 8), 4))  # fmt: skip


def _framepack(model, config) -> Adapter:
    channels = config["in_channels"]
    inputs = [InputRule("hidden_states", ("batch", channels, "frames", "height", "width")),
              InputRule("indices_latents", ("frames",), "int", 64)]  # fmt: skip
    dims = list(video_dims(config))
    for name, frames, default, multiple in _FRAMEPACK_CONTEXT:
        inputs += [InputRule(name, ("batch", channels, frames, "height", "width")),
                   InputRule(f"indices_{name}", (frames,), "int", 64)]  # fmt: skip
        dims.append(DimRule(frames, default, multiple=multiple, why=f"{name} is cut into {multiple}-frame patches"))
    inputs += [InputRule("encoder_hidden_states", ("batch", "text_len", config["text_embed_dim"])),
               InputRule("encoder_attention_mask", ("batch", "text_len"), "mask"),
               InputRule("pooled_projections", ("batch", config["pooled_projection_dim"])),
               InputRule("image_embeds", ("batch", "image_tokens", config["image_proj_dim"])),
               InputRule("timestep", ("batch",), "uniform", 1000.0)]  # fmt: skip
    if config.get("guidance_embeds"):
        inputs.append(InputRule("guidance", ("batch",), "uniform", 8.0))
    dims.append(DimRule("image_tokens", DimRange(1, 2, 4)))
    names = [i.name for i in inputs]
    return Adapter(
        type(model).__name__, "hunyuan-video-framepack", tuple(inputs), tuple(dims),
        call=lambda model, *tensors: model(**dict(zip(names, tensors, strict=True)), return_dict=False)[0],
        output_axes=("batch", None, "frames", "height", "width"),
        patches=(FRAMEPACK_MASK_PATCH,),
        notes=("indices_* are each frame's position in the video, as the pipeline numbers them; the clean "
               "frames and the 2x and 4x history are given at the latents' height and width",),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {
    "HunyuanVideo15Transformer3DModel": _hunyuan_video15,
    "HunyuanVideoFramepackTransformer3DModel": _framepack,
}
