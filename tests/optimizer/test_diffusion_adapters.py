"""The diffusers adapters on their own, without exporting: which adapter a model gets, the inputs it makes
(and that the PyTorch model runs on them), and the dim ranges it accepts. Models are the tiny seeded ones."""

from __future__ import annotations

import functools
import inspect

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from kiln.optimizer.errors import InputError  # noqa: E402
from kiln.optimizer.examples.tiny_diffusers import TINY, tiny_model  # noqa: E402
from kiln.optimizer.importers import diffusion_adapters as A  # noqa: E402
from kiln.targets import DimRange  # noqa: E402

SUPPORTED = "kiln has adapters for " + ", ".join(sorted(A.all_families()))
# Sizes unlike the defaults and unlike each other (height != width), so a swapped axis shows.
SIZES = {"batch": 3, "height": 12, "width": 10, "text_len": 5, "frames": 2}
# class -> (family, {input: (dtype, shape at SIZES)}, output shape). DiT's width follows its height, Latte's
# frames are fixed at video_length 3, CogVideoX's text at max_text_seq_length 6; the VAE decoder upsamples 2x.
EXPECTED = {
    "DiTTransformer2DModel": ("dit", {
        "hidden_states": (torch.float32, (3, 4, 12, 12)), "timestep": (torch.int64, (3,)),
        "class_labels": (torch.int64, (3,))}, (3, 4, 12, 12)),
    "PixArtTransformer2DModel": ("pixart", {
        "hidden_states": (torch.float32, (3, 4, 12, 10)), "encoder_hidden_states": (torch.float32, (3, 5, 12)),
        "timestep": (torch.int64, (3,))}, (3, 8, 12, 10)),
    "SD3Transformer2DModel": ("sd3", {
        "hidden_states": (torch.float32, (3, 4, 12, 10)), "encoder_hidden_states": (torch.float32, (3, 5, 12)),
        "pooled_projections": (torch.float32, (3, 10)), "timestep": (torch.float32, (3,))}, (3, 4, 12, 10)),
    "CogVideoXTransformer3DModel": ("cogvideox", {
        "hidden_states": (torch.float32, (3, 2, 4, 12, 10)), "encoder_hidden_states": (torch.float32, (3, 6, 12)),
        "timestep": (torch.int64, (3,))}, (3, 2, 4, 12, 10)),
    "LatteTransformer3DModel": ("latte", {
        "hidden_states": (torch.float32, (3, 4, 3, 12, 10)), "encoder_hidden_states": (torch.float32, (3, 5, 12)),
        "timestep": (torch.int64, (3,))}, (3, 8, 3, 12, 10)),
    "AutoencoderKL": ("vae-decoder", {"latent_sample": (torch.float32, (3, 4, 12, 10))}, (3, 3, 24, 20)),
}  # fmt: skip


@functools.cache
def model(class_name: str):
    """One tiny seeded model per class for the whole module (building takes a fraction of a second each)."""
    return tiny_model(class_name, seed=0)


def fake(class_name: str, forward, **config):
    """A stand-in model: adapter_for reads only type(model).__name__, model.config and forward's signature."""
    return type(class_name, (), {"config": config, "forward": forward})()


def sizes_for(adapter: A.Adapter) -> dict[str, int]:
    return {r.name: SIZES[r.name] for r in adapter.dynamic_dims}


def refusal(call, *args) -> InputError:
    with pytest.raises(InputError) as info:
        call(*args)
    return info.value


# --- adapter_for -------------------------------------------------------------------------------------


def test_every_tiny_class_has_its_family():
    assert set(EXPECTED) == set(TINY)
    for class_name, (family, _, _) in EXPECTED.items():
        adapter = A.adapter_for(model(class_name))
        assert (adapter.class_name, adapter.family) == (class_name, family)


def test_rotary_cogvideox_without_patch_size_t_is_refused():
    error = refusal(A.adapter_for, tiny_model("CogVideoXTransformer3DModel", use_rotary_positional_embeddings=True))
    assert error.message == (
        "CogVideoXTransformer3DModel with rotary embeddings and no patch_size_t (CogVideoX 1.0 at 5B) takes rotary "
        "embeddings that its pipeline crops to a region rounded from the latent size in Python "
        "(get_resize_crop_region_for_grid); kiln cannot make them inside the graph yet"
    )
    assert error.hint == "kiln exports CogVideoX 1.5 (patch_size_t set) with rotary embeddings, and CogVideoX-2b with sincos ones"


@pytest.mark.parametrize("class_name", ["UNet2DConditionModel", "ControlNetModel"])
def test_non_transformers_are_refused(class_name):
    error = refusal(A.adapter_for, fake(class_name, lambda self, sample, timestep: None, in_channels=4, patch_size=2))
    assert error.message == (
        f"kiln has no adapter for {class_name} yet: its inputs and outputs are not a latent transformer's"
    )
    assert error.hint == SUPPORTED


@pytest.mark.parametrize("class_name", ["LongCatAudioDiTTransformer", "MiniMaxMusic3Transformer1DModel"])
def test_audio_models_beside_ace_step_are_refused(class_name):
    error = refusal(A.adapter_for, fake(class_name, lambda self, hidden_states, timestep: None, in_channels=4))
    assert error.message == (
        f"kiln has no adapter for {class_name} yet: it is an audio-only model, and the one audio-only transformer kiln "
        "exports is ACE-Step's"
    )


@pytest.mark.parametrize("config", [dict(extra_pos_embed_type=None), dict(extra_pos_embed_type="learnable", use_crossattn_projection=True)],
                         ids=["cosmos2", "cosmos2.5"])  # fmt: skip
def test_cosmos_2_configs_are_refused(config):
    error = refusal(A.adapter_for, fake("CosmosTransformer3DModel", lambda self, hidden_states: None, **config))
    assert error.message == (
        "kiln exports Cosmos 1.0's CosmosTransformer3DModel (learnt positions, no cross-attention projection), not "
        "this config, which is Cosmos 2's or 2.5's: their pipelines pass other fps and timesteps, which kiln has no "
        "adapter for yet"
    )
    assert error.hint == SUPPORTED


def test_chunked_video_vaes_are_refused():
    error = refusal(A.adapter_for, fake("AutoencoderKLMiniMaxH3", lambda self, sample: None, in_channels=3))
    assert error.message == (
        "kiln has no adapter for AutoencoderKLMiniMaxH3 yet: kiln exports the decoders of AsymmetricAutoencoderKL, "
        "AutoencoderDC, AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLCosmos, AutoencoderKLHunyuanVideo, "
        "AutoencoderKLKVAE, AutoencoderKLKVAEVideo, AutoencoderKLLTX2Video, AutoencoderKLLTXVideo, AutoencoderKLMagvit, AutoencoderKLMochi, "
        "AutoencoderKLTemporalDecoder, AutoencoderKLWan, AutoencoderTiny, AutoencoderVidTok, ConsistencyDecoderVAE, "
        "VQModel; this one carries state between chunks differently, blends overlapping windows or runs a diffusion "
        "loop of its own"
    )


def test_unknown_transformer_refused_when_its_inputs_cannot_be_made():
    def rotary(self, hidden_states, image_rotary_emb):
        pass

    def text(self, hidden_states, encoder_hidden_states):
        pass

    error = refusal(A.adapter_for, fake("FancyTransformer2DModel", rotary, in_channels=4, patch_size=2))
    assert error.message == ("kiln has no adapter for FancyTransformer2DModel: its forward needs image_rotary_emb, "
                             "which kiln cannot make from the config")  # fmt: skip
    assert error.hint == SUPPORTED
    error = refusal(A.adapter_for, fake("FancyTransformer2DModel", text, in_channels=4))  # no patch_size
    assert error.message == ("kiln has no adapter for FancyTransformer2DModel: it takes no hidden_states, or its "
                             "config gives no in_channels and patch_size to make latents from")  # fmt: skip
    error = refusal(A.adapter_for, fake("FancyTransformer2DModel", text, in_channels=4, patch_size=2))  # no text width
    assert error.message == ("kiln has no adapter for FancyTransformer2DModel: its forward needs encoder_hidden_states, "
                             "and its config does not give their sizes")  # fmt: skip


def test_unknown_transformer_inputs_guessed_from_forward_and_config():
    def forward(self, hidden_states, encoder_hidden_states, timestep, guidance=None, return_dict=True):
        pass

    adapter = A.adapter_for(fake("FancyTransformer2DModel", forward, in_channels=4, patch_size=2,
                                 joint_attention_dim=12, guidance_embeds=True))  # fmt: skip
    assert adapter.family == "generic"
    assert adapter.input_names == ["hidden_states", "encoder_hidden_states", "timestep", "guidance"]
    assert A.input_shapes(adapter, sizes_for(adapter)) == {
        "hidden_states": (3, 4, 12, 10), "encoder_hidden_states": (3, 5, 12), "timestep": (3,), "guidance": (3,),
    }  # fmt: skip
    assert adapter.notes == ("kiln has no adapter written for FancyTransformer2DModel: its inputs were guessed from "
                             "forward's parameters and the config",)  # fmt: skip


# --- the inputs each adapter makes -----------------------------------------------------------------


@pytest.mark.parametrize("class_name", sorted(EXPECTED))
def test_inputs_are_what_the_model_takes(class_name):
    m = model(class_name)
    adapter = A.adapter_for(m)
    _, inputs, output_shape = EXPECTED[class_name]
    assert adapter.input_names == list(inputs)
    if class_name != "AutoencoderKL":  # the VAE's call is decode(latents), not forward
        assert set(adapter.input_names) <= set(inspect.signature(m.forward).parameters)
    tensors = A.make_inputs(adapter, sizes_for(adapter), seed=0)
    assert {n: (t.dtype, tuple(t.shape)) for n, t in zip(adapter.input_names, tensors, strict=True)} == inputs
    with torch.no_grad():
        out = adapter.call(m, *tensors)
    assert tuple(out.shape) == output_shape and torch.isfinite(out).all()


def test_input_values_are_seeded_and_in_range():
    dit = A.adapter_for(model("DiTTransformer2DModel"))  # 10 classes; integer timesteps below 1000
    sizes = {"batch": 64, "height": 8}
    first, again, other = (A.make_inputs(dit, sizes, seed) for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    _, timestep, labels = first
    assert 0 <= int(labels.min()) and int(labels.max()) < 10 and int(timestep.max()) < 1000
    assert dit.int_ranges() == {"timestep": [0, 1000], "class_labels": [0, 10]}
    sd3 = A.adapter_for(model("SD3Transformer2DModel"))  # float timesteps, uniform in [0, 1000)
    timestep = A.make_inputs(sd3, {"batch": 64, "height": 8, "width": 8, "text_len": 4}, seed=0)[-1]
    assert 0.0 <= float(timestep.min()) and float(timestep.max()) < 1000.0 and float(timestep.max()) > 100.0


# --- resolve_ranges ----------------------------------------------------------------------------------


def test_default_ranges_and_their_notes():
    ranges, notes = A.resolve_ranges(A.adapter_for(model("DiTTransformer2DModel")), [])
    assert ranges == {"batch": DimRange(1, 2, 4), "height": DimRange(8, 16, 32)}  # width follows height
    assert notes == [
        "batch=1..2..4 (the default for DiTTransformer2DModel; set it with --shapes batch=MIN..OPT..MAX)",
        "height=8..16..32 (the default for DiTTransformer2DModel; set it with --shapes height=MIN..OPT..MAX)",
    ]
    # Fixed dims take no range: CogVideoX's text length, Latte's frames.
    cog, _ = A.resolve_ranges(A.adapter_for(model("CogVideoXTransformer3DModel")), [])
    assert cog == {"batch": DimRange(1, 2, 4), "frames": DimRange(1, 2, 4), "height": DimRange(8, 16, 32),
                   "width": DimRange(8, 16, 32)}  # fmt: skip
    latte, _ = A.resolve_ranges(A.adapter_for(model("LatteTransformer3DModel")), [])
    assert set(latte) == {"batch", "height", "width", "text_len"}


def test_default_ranges_stay_within_the_positional_table():
    """An SD3 whose table covers 6 patches a side takes latents up to 12: the default stops there, and the
    model itself refuses one patch more."""
    m = tiny_model("SD3Transformer2DModel", pos_embed_max_size=6)
    adapter = A.adapter_for(m)
    ranges, _ = A.resolve_ranges(adapter, [])
    assert ranges["height"] == ranges["width"] == DimRange(8, 12, 12)
    with pytest.raises(ValueError, match="cannot be greater than `pos_embed_max_size`"), torch.no_grad():
        adapter.call(m, *A.make_inputs(adapter, {"batch": 1, "height": 14, "width": 12, "text_len": 4}, seed=0))
    error = refusal(A.resolve_ranges, adapter, [("--shapes", "height=8..12..14")])
    assert error.message == (
        "--shapes 'height=8..12..14': SD3Transformer2DModel takes height up to 12 (its patch_size is 2, and its "
        "positional table covers 6 patches a side (pos_embed_max_size)); 14 is more"
    )
    assert error.hint == "keep height at most 12"


def test_ranges_given_win_over_defaults_and_earlier_specs():
    pixart = A.adapter_for(model("PixArtTransformer2DModel"))
    specs = [("--shapes", "text_len=2..4"), ("recipe r.toml", "encoder_hidden_states:1=3..6..9"), ("--shapes", "width=8")]
    ranges, notes = A.resolve_ranges(pixart, specs)
    assert ranges["text_len"] == DimRange(3, 6, 9) and ranges["width"] == DimRange(8, 8, 8)
    assert [n.split(" ")[0] for n in notes] == ["batch=1..2..4", "height=8..16..32"]  # defaults only


def test_range_off_the_patch_size_is_refused_with_an_aligned_hint():
    pixart = A.adapter_for(model("PixArtTransformer2DModel"))
    error = refusal(A.resolve_ranges, pixart, [("--shapes", "width=8..15..31")])
    assert error.message == (
        "--shapes 'width=8..15..31': PixArtTransformer2DModel takes width in multiples of 2 (its patch_size is 2); "
        "15 is not"
    )
    assert error.hint == "e.g. --shapes width=8..16..30"
    # Named by input and axis (hidden_states is [batch, 4, height, width]); opt defaults to the middle, 12.
    sd3 = A.adapter_for(model("SD3Transformer2DModel"))
    error = refusal(A.resolve_ranges, sd3, [("recipe r.toml", "hidden_states:-1=9..16")])
    assert error.message == (
        "recipe r.toml 'hidden_states:-1=9..16': SD3Transformer2DModel takes width in multiples of 2 (its patch_size "
        "is 2, and its positional table covers 16 patches a side (pos_embed_max_size)); 9 is not"
    )
    assert error.hint == "e.g. --shapes width=10..12..16"


def test_range_beyond_the_positional_table_is_refused():
    sd3 = A.adapter_for(model("SD3Transformer2DModel"))  # pos_embed_max_size 16, patch 2: up to 32
    # (opt given: with MIN..MAX alone, opt is the middle, 21, and the multiple is checked first)
    error = refusal(A.resolve_ranges, sd3, [("recipe r.toml", "width=8..16..34")])
    assert error.message == (
        "recipe r.toml 'width=8..16..34': SD3Transformer2DModel takes width up to 32 (its patch_size is 2, and its "
        "positional table covers 16 patches a side (pos_embed_max_size)); 34 is more"
    )
    assert error.hint == "keep width at most 32"


def test_static_and_fixed_dims_take_no_range():
    dit = A.adapter_for(model("DiTTransformer2DModel"))
    error = refusal(A.resolve_ranges, dit, [("--shapes", "hidden_states:1=4")])  # the channel axis is static
    assert error.message == "--shapes 'hidden_states:1=4': axis 1 of hidden_states is not a dynamic dim of DiTTransformer2DModel"  # fmt: skip
    assert error.hint == "its dims: batch, height"
    latte = A.adapter_for(model("LatteTransformer3DModel"))
    error = refusal(A.resolve_ranges, latte, [("--shapes", "frames=3")])
    assert error.message == ("--shapes 'frames=3': LatteTransformer3DModel takes frames 3 only (its temporal "
                             "positional embedding covers video_length = 3 frames), so it is not a dynamic dim")  # fmt: skip
    assert error.hint == "leave frames out of --shapes"


def test_derived_axes_take_no_range_and_stay_at_least_one():
    """Wan-Animate's pose video is a frame shorter than its latents (frames-1): frames=1 would make it empty."""
    import diffusers_suite as suite
    from diffusers import WanAnimateTransformer3DModel

    case = next(c for c in suite.TRANSFORMERS if c.class_name == "WanAnimateTransformer3DModel")
    adapter = A.adapter_for(WanAnimateTransformer3DModel(**case.config))
    error = refusal(A.resolve_ranges, adapter, [("--shapes", "frames=1..2..3")])
    assert error.message == ("--shapes 'frames=1..2..3': axis 2 of WanAnimateTransformer3DModel's pose_hidden_states "
                             "is frames-1, which frames=1 makes 0")  # fmt: skip
    assert error.hint == "keep frames at least 2"
    error = refusal(A.resolve_ranges, adapter, [("--shapes", "face_pixel_values:2=5..9")])
    assert error.message == "--shapes 'face_pixel_values:2=5..9': axis 2 of face_pixel_values is 4*frames-7, which follows 'frames'"
    assert error.hint == "give frames a range instead"


def test_consistency_decoder_noise_input_holds_diffusers_draws():
    """The consistency decoder's noise input is its two draws, each [batch, 3, 2h, 2w] with 2x2 pixel blocks folded
    into channels: folding the draws a seeded generator makes gives diffusers' own decode with that generator."""
    import diffusers_suite as suite
    from diffusers import ConsistencyDecoderVAE
    from diffusers.utils.torch_utils import randn_tensor

    case = next(c for c in suite.VAES if c.class_name == "ConsistencyDecoderVAE")
    torch.manual_seed(0)
    model = ConsistencyDecoderVAE(**case.config).eval()
    adapter = A.adapter_for(model)
    assert adapter.input_names == ["latent_sample", "noise"]
    latents = torch.randn(2, 4, 5, 6)
    generator = torch.Generator().manual_seed(7)
    draws = [randn_tensor((2, 3, 10, 12), generator=generator) for _ in range(2)]
    folded = torch.stack(draws, 1).reshape(2, 2, 3, 5, 2, 6, 2).permute(0, 1, 2, 4, 6, 3, 5).reshape(2, 24, 5, 6)
    with torch.no_grad():
        want = model.decode(latents, generator=torch.Generator().manual_seed(7)).sample
        got = adapter.call(model, latents, folded)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_omnigen_layout_is_its_pipelines():
    """OmniGen's positions and attention mask, made in the graph from the left-padded tokenizer mask, are what
    its pipeline's collator makes for a batch of prompts of different lengths."""
    import torch
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

    from kiln.optimizer.importers.omnigen_adapters import sequence_layout

    text_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    positions, mask = sequence_layout(text_mask, image_tokens=4)
    collator = OmniGenCollator()
    assert torch.equal(positions, collator.create_position(text_mask, [4, 4, 4]))
    assert torch.equal(mask, collator.create_mask(text_mask, [4, 4, 4])[0])


@pytest.mark.parametrize("length", [10, 40])  # below and past original_max_position_embeddings
def test_omnigen_rope_factors_chosen_in_the_graph_match_the_models_if(length):
    import torch
    from diffusers.models.transformers.transformer_omnigen import OmniGenSuScaledRotaryEmbedding

    from kiln.optimizer.importers.omnigen_adapters import _su_scaled_rope

    rope = OmniGenSuScaledRotaryEmbedding(8, max_position_embeddings=64, original_max_position_embeddings=16,
                                          rope_scaling={"long_factor": [1, 2, 3, 4], "short_factor": [1, 1.5, 2, 2.5]})  # fmt: skip
    positions = torch.arange(length)[None].repeat(2, 1)
    hidden = torch.zeros(2, length, 8)
    for ours, theirs in zip(_su_scaled_rope(rope, hidden, positions), rope(hidden, positions), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_ideogram_layout_is_its_pipelines():
    """Ideogram 4's position, segment and indicator ids, made in the graph from the left-padded mask and the grid,
    are what its pipeline's _prepare_ids makes for prompts of different lengths."""
    import torch
    from diffusers.models.transformers import transformer_ideogram4 as model_module
    from pipeline_source import pipeline_definitions

    from kiln.optimizer.importers.ideogram_adapters import _image_ids, _text_ids

    constants = {n: getattr(model_module, n) for n in ("IMAGE_POSITION_OFFSET", "LLM_TOKEN_INDICATOR",
                                                        "OUTPUT_IMAGE_INDICATOR", "SEQUENCE_PADDING_INDICATOR")}  # fmt: skip
    pipeline = pipeline_definitions("pipelines.ideogram4.pipeline_ideogram4", "_prepare_ids", torch=torch, **constants)
    lengths, text_len, rows, cols = [5, 2, 3], 5, 3, 4
    mask = (torch.arange(text_len) >= text_len - torch.tensor(lengths)[:, None]).long()  # left-padded
    ours = [torch.cat(pair, dim=1) for pair in zip(_text_ids(torch, mask), _image_ids(torch, 3, rows, cols, None), strict=True)]
    for got, want in zip(ours, pipeline._prepare_ids(lengths, rows, cols, text_len, "cpu"), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("config", [
    dict(base_fps=24, enable_fps_modulation=False, unified_3d_mrope_reset_spatial_ids=True, unified_3d_mrope_temporal_modality_margin=10),
    dict(base_fps=30, enable_fps_modulation=True, unified_3d_mrope_reset_spatial_ids=False, unified_3d_mrope_temporal_modality_margin=3),
], ids=["plain", "fps-modulated"])  # fmt: skip
@pytest.mark.parametrize("sizes", [(5, 1, 2, 3), (2, 4, 3, 2)], ids=["image", "video"])
def test_cosmos3_positions_are_its_pipelines(config, sizes):
    """Cosmos 3's mRoPE positions, made in the graph from the sizes, are what its pipeline's helpers make."""
    import math

    import torch
    from pipeline_source import pipeline_definitions

    from kiln.optimizer.importers.cosmos3_adapters import PIPELINE_FPS, positions

    pipeline = pipeline_definitions("pipelines.cosmos.pipeline_cosmos3_omni", "get_3d_mrope_ids_text_tokens",
                                    "get_3d_mrope_ids_vae_tokens", torch=torch, math=math)  # fmt: skip
    text_len, frames, rows, cols = sizes
    text, offset = pipeline.get_3d_mrope_ids_text_tokens(text_len, 0, use_float_positions=config["enable_fps_modulation"])
    vision, _ = pipeline.get_3d_mrope_ids_vae_tokens(
        frames, rows, cols, offset + config["unified_3d_mrope_temporal_modality_margin"],
        reset_spatial_indices=config["unified_3d_mrope_reset_spatial_ids"],
        fps=PIPELINE_FPS if config["enable_fps_modulation"] else None, base_fps=float(config["base_fps"]))  # fmt: skip
    torch.testing.assert_close(positions(torch, config, text_len, frames, rows, cols), torch.cat([text, vision], 1).float(),
                               rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("sizes", [(3, 1, 10, 14, 5), (7, 5, 18, 8, 13), (2, 6, 6, 20, 2)])
def test_minimax_h3_layout_is_its_pipelines(sizes):
    """MiniMax-H3's t2va layout, made in the graph from the sizes, is what its modular pipeline's
    build_packed_sequence and build_row_timesteps make (positions to float32's rounding of their float64)."""
    import numpy as np
    import torch
    from pipeline_source import pipeline_definitions

    from kiln.optimizer.importers.minimax_adapters import AUDIO_TAG, STEREO, TEXT_TAG, VIDEO_TAG, layout

    pipeline = pipeline_definitions(
        "modular_pipelines.minimax_h3.before_denoise", "_ROPE_FRAME_RESCALE", "_ROPE_FRAMES_PER_LATENT",
        "_ROPE_SPATIAL_SCALE", "_spatial_position_grid", "_frame_position_grid", "_temporal_position_grid",
        "build_packed_sequence", "build_row_timesteps", torch=torch, np=np)  # fmt: skip
    text_len, frames, height, width, audio_len = sizes
    positions, tags, _, audio, _, _, _ = pipeline.build_packed_sequence(
        torch.full((text_len,), TEXT_TAG), frames, height, width, audio_len, (1, 2, 2), STEREO, AUDIO_TAG, VIDEO_TAG)
    video = torch.arange(text_len + STEREO * audio_len, positions.shape[0])
    _, indices = pipeline.build_row_timesteps(video, audio, 0, 0, text_len, 0.25, 0.75, 0.25, 1.0)
    got = layout(torch, text_len, audio_len, frames, height, width, 2, None)
    torch.testing.assert_close(got[0], positions.float(), rtol=0, atol=4e-6)
    assert torch.equal(got[1], tags) and torch.equal(got[2], indices)
