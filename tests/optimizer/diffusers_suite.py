"""diffusers' own test suite, as import cases: each image and video model class it tests, at the tiny
configuration its tests build (diffusers tests/models/transformers and tests/models/autoencoders, read at
commit 58eb52c for diffusers 0.42: the numbers are facts about the models; the table is ours).

A class with several configurations its tests build differently (CogVideoX 1.0 and 1.5, SD3 and 3.5,
HunyuanVideo's image conditions) has a case for each. Kiln's own changes: "guidance" (Flux with guidance
embeds, as FLUX.1-dev) is added; CogVideoX 1.5 has attention_head_dim 16, not 8 (its rotary table splits
the head into quarters and eighths, and diffusers' test passes no rotary embeddings); PRX is 32 wide, 2
heads and 2 blocks deep (diffusers' test builds it 1792 wide: 300 million parameters); VidTok is 32 wide, not
128 (200 million parameters at diffusers' width, 12 million at 32). AutoencoderRAE is
left out: its encoders come from transformers, and its test registers an encoder of its own.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Case:
    class_name: str
    label: str
    config: dict

    @property
    def name(self) -> str:
        return self.class_name if self.label == "default" else f"{self.class_name}[{self.label}]"


# fmt: off
TRANSFORMERS = [
    Case("AceStepTransformer1DModel", "default", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0, rms_norm_eps=1e-06, sliding_window=16)),
    Case("AllegroTransformer3DModel", "default", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8)),
    Case("AnyFlowFARTransformer3DModel", "default", dict(patch_size=[1, 2, 2], compressed_patch_size=[1, 4, 4], full_chunk_limit=3, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type='r')),
    Case("AnyFlowTransformer3DModel", "default", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type='r')),
    Case("AuraFlowTransformer2DModel", "default", dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, out_channels=4, pos_embed_max_size=256)),
    Case("BriaFiboTransformer2DModel", "default", dict(patch_size=1, in_channels=48, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])),
    Case("BriaTransformer2DModel", "default", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])),
    Case("ChromaTransformer2DModel", "default", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)),
    Case("ChronoEditTransformer3DModel", "default", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm='rms_norm_across_heads', eps=1e-06, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=64, pos_embed_seq_len=None, rope_temporal_skip_len=8)),
    Case("CogVideoXTransformer3DModel", "cogvideox_1_0", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8)),
    Case("CogVideoXTransformer3DModel", "cogvideox_1_5", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)),
    Case("CogView3PlusTransformer2DModel", "default", dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8)),
    Case("CogView4Transformer2DModel", "default", dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4)),
    Case("ConsisIDTransformer3DModel", "default", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False, is_train_face=True, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1)),
    Case("Cosmos3OmniTransformer", "default_1x1", dict(head_dim=6, hidden_act='relu2', hidden_size=12, intermediate_size=24, latent_channel=2, latent_patch_size=1, num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1, patch_latent_dim=2, qk_norm_for_text=False, rms_norm_eps=1e-05, rope_axes_dim=[1, 1, 1], rope_theta=100000000.0, vocab_size=32)),
    Case("Cosmos3OmniTransformer", "action_workflow", dict(head_dim=6, hidden_act='relu2', hidden_size=12, intermediate_size=24, latent_channel=2, latent_patch_size=1, num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1, patch_latent_dim=2, qk_norm_for_text=False, rms_norm_eps=1e-05, rope_axes_dim=[1, 1, 1], rope_theta=100000000.0, vocab_size=32, action_dim=3, action_gen=True, num_embodiment_domains=2)),
    Case("CosmosTransformer3DModel", "text_to_world", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=[4, 32, 32], patch_size=[1, 2, 2], rope_scale=[2.0, 1.0, 1.0], concat_padding_mask=True, extra_pos_embed_type='learnable')),
    Case("CosmosTransformer3DModel", "video_to_world", dict(in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=[4, 32, 32], patch_size=[1, 2, 2], rope_scale=[2.0, 1.0, 1.0], concat_padding_mask=True, extra_pos_embed_type='learnable')),
    Case("DiTTransformer2DModel", "default", dict(in_channels=4, out_channels=8, activation_fn='gelu-approximate', num_attention_heads=2, attention_head_dim=4, attention_bias=True, num_layers=1, norm_type='ada_norm_zero', num_embeds_ada_norm=8, patch_size=2, sample_size=8)),
    Case("EasyAnimateTransformer3DModel", "default", dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2, out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8, time_position_encoding_type='3d_rope', timestep_activation_fn='silu')),
    Case("ErnieImageTransformer2DModel", "default", dict(hidden_size=16, num_attention_heads=1, num_layers=1, ffn_hidden_size=16, in_channels=16, out_channels=16, patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=[8, 4, 4], eps=1e-06, qk_layernorm=True)),
    Case("Flux2Transformer2DModel", "default", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4])),
    Case("FluxTransformer2DModel", "default", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])),
    Case("FluxTransformer2DModel", "guidance", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)),
    Case("GlmImageTransformer2DModel", "default", dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64)),
    Case("HeliosTransformer3DModel", "default", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm='rms_norm_across_heads', rope_dim=[4, 4, 4], has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False)),
    Case("HiDreamImageTransformer2DModel", "default", dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2, axes_dims_rope=[4, 2, 2], max_resolution=[32, 32], llama_layers=[0, 1], force_inference_output=True)),
    Case("HunyuanDiT2DModel", "default", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4, text_len_t5=4, activation_fn='gelu-approximate')),
    Case("HunyuanVideo15Transformer3DModel", "default", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=[2, 2, 4], target_size=16, task_type='t2v')),
    Case("HunyuanVideoFramepackTransformer3DModel", "default", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=[2, 4, 4], image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)),
    Case("HunyuanVideoTransformer3DModel", "t2v_guidance_embeds", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=[2, 4, 4], image_condition_type=None)),
    Case("HunyuanVideoTransformer3DModel", "i2v_latent_concat", dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=[2, 4, 4], image_condition_type='latent_concat')),
    Case("HunyuanVideoTransformer3DModel", "token_replace", dict(in_channels=2, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=[2, 4, 4], image_condition_type='token_replace')),
    Case("Ideogram4Transformer2DModel", "default", dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32, adaln_dim=16, llm_features_dim=24, rope_theta=10000, mrope_section=[2, 1, 1], norm_eps=1e-05)),
    Case("JoyImageEditPlusTransformer3DModel", "default", dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6], theta=256)),
    Case("JoyImageEditTransformer3DModel", "default", dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6], theta=256)),
    Case("Krea2Transformer2DModel", "default", dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=[4, 2, 2], rope_theta=1000.0, norm_eps=1e-05)),
    Case("LatteTransformer3DModel", "default", dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn='gelu-approximate', num_embeds_ada_norm=1000, norm_type='ada_norm_single', norm_elementwise_affine=False, norm_eps=1e-06)),
    Case("LongCatImageTransformer2DModel", "default", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])),
    Case("LTX2VideoTransformer3DModel", "default", dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm='rms_norm_across_heads', caption_channels=16, rope_double_precision=False)),
    Case("LTXVideoTransformer3DModel", "default", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=1, qk_norm='rms_norm_across_heads', caption_channels=16)),
    Case("Lumina2Transformer2DModel", "default", dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-05, scaling_factor=1.0, axes_dim_rope=[4, 2, 2], axes_lens=[128, 128, 128], cap_feat_dim=32)),
    Case("LuminaNextDiT2DModel", "default", dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_attention_heads=3, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-05, learn_sigma=False, qk_norm=True, cross_attention_dim=32, scaling_factor=1.0)),
    Case("MiniMaxH3Transformer3DModel", "default", dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=2, ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=[1, 2, 2], text_dim=8, freq_dim=8, time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2)),
    Case("MochiTransformer3DModel", "default", dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm='rms_norm', text_embed_dim=16, time_embed_dim=4, activation_fn='swiglu', max_sequence_length=16)),
    Case("MotifVideoTransformer3DModel", "default", dict(in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1, num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm='rms_norm', norm_type='layer_norm', text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=[4, 4, 4], enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False)),
    Case("NucleusMoEImageTransformer2DModel", "default", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=[8, 4, 4], moe_enabled=False, capacity_factors=[8.0, 8.0])),
    Case("OmniGenTransformer2DModel", "default", dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=20, pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4, rope_scaling={'long_factor': [1, 2], 'short_factor': [1, 2]})),
    Case("OvisImageTransformer2DModel", "default", dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8])),
    Case("PixArtTransformer2DModel", "default", dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=2, num_attention_heads=2, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn='gelu-approximate', num_embeds_ada_norm=8, norm_type='ada_norm_single', norm_elementwise_affine=False, norm_eps=1e-06, use_additional_conditions=False, caption_channels=None)),
    Case("PriorTransformer", "default", dict(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8, num_embeddings=7, additional_embeddings=4)),
    Case("PRXTransformer2DModel", "default", dict(in_channels=16, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=3.5, num_heads=2, depth=2, axes_dim=[8, 8], theta=10000)),
    Case("QwenImageTransformer2DModel", "default", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=[8, 4, 4])),
    Case("QwenImageTransformer2DModel", "layered", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=[8, 4, 4], use_layer3d_rope=True, use_additional_t_cond=True)),
    Case("SanaTransformer2DModel", "default", dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=32)),
    Case("SanaVideoTransformer3DModel", "default", dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=[1, 2, 2], norm_elementwise_affine=False, norm_eps=1e-06, qk_norm='rms_norm_across_heads', rope_max_seq_len=32)),
    Case("SD3Transformer2DModel", "sd3", dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96, dual_attention_layers=[], qk_norm=None)),
    Case("SD3Transformer2DModel", "sd3.5", dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96, dual_attention_layers=[0], qk_norm='rms_norm')),
    Case("SkyReelsV2Transformer3DModel", "default", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm='rms_norm_across_heads', rope_max_seq_len=32)),
    Case("TransformerTemporalModel", "default", dict(num_attention_heads=8, attention_head_dim=4, in_channels=4, num_layers=1, norm_num_groups=1)),
    Case("WanAnimate2Transformer3DModel", "default", dict(patch_size=[1, 2, 2], text_len=16, in_dim=36, dim=128, ffn_dim=256, freq_dim=64, text_dim=32, out_dim=16, num_heads=4, num_layers=2, cross_attn_norm=True, use_img_emb=True)),
    Case("WanAnimateTransformer3DModel", "default", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm='rms_norm_across_heads', image_dim=16, rope_max_seq_len=32, motion_encoder_channel_sizes={'4': 16, '8': 16, '16': 16}, motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=2)),
    Case("WanTransformer3DModel", "default", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm='rms_norm_across_heads', rope_max_seq_len=32)),
    Case("WanVACETransformer3DModel", "default", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True, qk_norm='rms_norm_across_heads', rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=48)),
    Case("ZImageTransformer2DModel", "default", dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=16, n_layers=1, n_refiner_layers=1, n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])),
]

VAES = [
    Case("AsymmetricAutoencoderKL", "default", dict(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D', 'DownEncoderBlock2D'], down_block_out_channels=[2, 4], layers_per_down_block=1, up_block_types=['UpDecoderBlock2D', 'UpDecoderBlock2D'], up_block_out_channels=[2, 4], layers_per_up_block=1, act_fn='silu', latent_channels=4, norm_num_groups=2, sample_size=32, scaling_factor=0.18215)),
    Case("AutoencoderDC", "default", dict(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=['ResBlock', 'EfficientViTBlock'], decoder_block_types=['ResBlock', 'EfficientViTBlock'], encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], encoder_qkv_multiscales=[[], [5]], decoder_qkv_multiscales=[[], [5]], encoder_layers_per_block=[1, 1], decoder_layers_per_block=[1, 1], downsample_block_type='conv', upsample_block_type='interpolate', decoder_norm_types='rms_norm', decoder_act_fns='silu', scaling_factor=0.41407)),
    Case("AutoencoderKL", "default", dict(block_out_channels=[2, 4], in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D', 'DownEncoderBlock2D'], up_block_types=['UpDecoderBlock2D', 'UpDecoderBlock2D'], latent_channels=4, norm_num_groups=2)),
    Case("AutoencoderKLCogVideoX", "default", dict(in_channels=3, out_channels=3, down_block_types=['CogVideoXDownBlock3D', 'CogVideoXDownBlock3D', 'CogVideoXDownBlock3D', 'CogVideoXDownBlock3D'], up_block_types=['CogVideoXUpBlock3D', 'CogVideoXUpBlock3D', 'CogVideoXUpBlock3D', 'CogVideoXUpBlock3D'], block_out_channels=[8, 8, 8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)),
    Case("AutoencoderKLCosmos", "default", dict(in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=[8, 8, 8, 8], decode_block_out_channels=[8, 8, 8, 8], attention_resolutions=[8], resolution=64, num_layers=2, patch_size=4, patch_type='haar', scaling_factor=1.0, spatial_compression_ratio=4, temporal_compression_ratio=4)),
    Case("AutoencoderKLHunyuanVideo", "default", dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=['HunyuanVideoDownBlock3D', 'HunyuanVideoDownBlock3D', 'HunyuanVideoDownBlock3D', 'HunyuanVideoDownBlock3D'], up_block_types=['HunyuanVideoUpBlock3D', 'HunyuanVideoUpBlock3D', 'HunyuanVideoUpBlock3D', 'HunyuanVideoUpBlock3D'], block_out_channels=[8, 8, 8, 8], layers_per_block=1, act_fn='silu', norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True)),
    Case("AutoencoderKLKVAE", "default", dict(in_channels=3, channels=32, num_enc_blocks=1, num_dec_blocks=1, z_channels=4, double_z=True, ch_mult=[1, 2], sample_size=32)),
    Case("AutoencoderKLKVAEVideo", "default", dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=4, temporal_compress_times=2)),
    Case("AutoencoderKLLTX2Video", "default", dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=[8, 8, 8, 8], decoder_block_out_channels=[16, 32, 64], layers_per_block=[1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1], spatio_temporal_scaling=[True, True, True, True], decoder_spatio_temporal_scaling=[True, True, True], decoder_inject_noise=[False, False, False, False], downsample_type=['spatial', 'temporal', 'spatiotemporal', 'spatiotemporal'], upsample_residual=[True, True, True], upsample_factor=[2, 2, 2], timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode='zeros', decoder_spatial_padding_mode='zeros')),
    Case("AutoencoderKLLTXVideo", "ltx_0.9.0", dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=[8, 8, 8, 8], decoder_block_out_channels=[8, 8, 8, 8], layers_per_block=[1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1, 1], spatio_temporal_scaling=[True, True, False, False], decoder_spatio_temporal_scaling=[True, True, False, False], decoder_inject_noise=[False, False, False, False, False], upsample_residual=[False, False, False, False], upsample_factor=[1, 1, 1, 1], timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)),
    Case("AutoencoderKLLTXVideo", "ltx_0.9.1", dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=[8, 8, 8, 8], decoder_block_out_channels=[16, 32, 64], layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1], spatio_temporal_scaling=[True, True, True, False], decoder_spatio_temporal_scaling=[True, True, True], decoder_inject_noise=[True, True, True, False], upsample_residual=[True, True, True], upsample_factor=[2, 2, 2], timestep_conditioning=True, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)),
    Case("AutoencoderKLMagvit", "default", dict(in_channels=3, latent_channels=4, out_channels=3, block_out_channels=[8, 8, 8, 8], down_block_types=['SpatialDownBlock3D', 'SpatialTemporalDownBlock3D', 'SpatialTemporalDownBlock3D', 'SpatialTemporalDownBlock3D'], up_block_types=['SpatialUpBlock3D', 'SpatialTemporalUpBlock3D', 'SpatialTemporalUpBlock3D', 'SpatialTemporalUpBlock3D'], layers_per_block=1, norm_num_groups=8, spatial_group_norm=True)),
    Case("AutoencoderKLMiniMaxH3", "default", dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, spatial_downsample_factors=[2, 2], temporal_downsample_factors=[2, 2], norm_num_groups=8, decoder_num_layers=2, decoder_num_attention_heads=2, decoder_attention_head_dim=8, decoder_num_register_tokens=2, decoder_ffn_mult=2, clip_length=17, token_drop=3, latents_mean=[0.0, 0.0, 0.0, 0.0], latents_std=[1.0, 1.0, 1.0, 1.0])),
    Case("AutoencoderKLMochi", "default", dict(in_channels=15, out_channels=3, latent_channels=4, encoder_block_out_channels=[32, 32, 32, 32], decoder_block_out_channels=[32, 32, 32, 32], layers_per_block=[1, 1, 1, 1, 1], act_fn='silu', scaling_factor=1)),
    Case("AutoencoderKLTemporalDecoder", "default", dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D', 'DownEncoderBlock2D'], latent_channels=4, layers_per_block=2)),
    Case("AutoencoderKLWan", "default", dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])),
    Case("AutoencoderTiny", "default", dict(in_channels=3, out_channels=3, encoder_block_out_channels=[32, 32], decoder_block_out_channels=[32, 32], num_encoder_blocks=[1, 1], num_decoder_blocks=[1, 1])),
    Case("AutoencoderVidTok", "default", dict(is_causal=False, in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2, 4, 4, 4], z_channels=6, double_z=False, num_res_blocks=2, regularizer='fsq', codebook_size=262144)),
    Case("ConsistencyDecoderVAE", "default", dict(encoder_block_out_channels=[2, 4], encoder_in_channels=3, encoder_out_channels=4, encoder_down_block_types=['DownEncoderBlock2D', 'DownEncoderBlock2D'], decoder_add_attention=False, decoder_block_out_channels=[2, 4], decoder_down_block_types=['ResnetDownsampleBlock2D', 'ResnetDownsampleBlock2D'], decoder_downsample_padding=1, decoder_in_channels=7, decoder_layers_per_block=1, decoder_norm_eps=1e-05, decoder_norm_num_groups=2, encoder_norm_num_groups=2, decoder_num_train_timesteps=1024, decoder_out_channels=6, decoder_resnet_time_scale_shift='scale_shift', decoder_time_embedding_type='learned', decoder_up_block_types=['ResnetUpsampleBlock2D', 'ResnetUpsampleBlock2D'], scaling_factor=1, latent_channels=4)),
    Case("LTX2VideoDiffusionDecoderModel", "default", dict(out_channels=3, latent_channels=8, patch_size=2, decoder_head_dim=16, decoder_stage_channels=[64, 32, 16, 16, 16], decoder_stage_depths=[1, 1, 1, 1, 2], decoder_stage_kernels=[[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], decoder_upsample_strides=[[1, 2, 2], [2, 1, 1], [2, 2, 2], [2, 2, 2]], decoder_upsample_channel_reductions=[2, 2, 1, 1], decoder_stage5_kernel=[3, 3, 3], decoder_t_emb_dim=32, spatial_compression_ratio=16, temporal_compression_ratio=8)),
    Case("VQModel", "default", dict(block_out_channels=[8, 16], norm_num_groups=8, in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D', 'DownEncoderBlock2D'], up_block_types=['UpDecoderBlock2D', 'UpDecoderBlock2D'], latent_channels=3)),
]
# fmt: on


# Batch up to 2 (the import's default reaches 4): the checks' largest shapes cost half as much, for CI's time.
SHAPES = [("--shapes", "batch=1..2..2")]
# Video VAEs decode 1..3 latent frames of 4..8 a side (the import's defaults reach 4 frames of 32 a side: 16 times
# the pixels), for CI's time.
VIDEO_DECODER_SHAPES = [("--shapes", "frames=1..2..3"), ("--shapes", "height=4..6..8"), ("--shapes", "width=4..6..8")]


def shapes(case: Case) -> list[tuple[str, str]]:
    from kiln.optimizer.importers.step_decoders import STEP_FAMILIES
    from kiln.optimizer.importers.video_decoders import FAMILIES as VIDEO_DECODERS

    if case.class_name == "AutoencoderVidTok":  # frames in fours; its 5 levels make a 2x2 latent 32x32 pixels
        return [("--shapes", "batch=1..1..1"), ("--shapes", "frames=4..4..8"), ("--shapes", "height=2..2..3"),
                ("--shapes", "width=2..2..3")]  # fmt: skip
    if case.class_name == "AutoencoderKLKVAEVideo":  # one graph takes 3 latent frames or more
        return SHAPES + [("--shapes", "frames=3..3..4"), *VIDEO_DECODER_SHAPES[1:]]
    if case.class_name in VIDEO_DECODERS:
        return SHAPES + VIDEO_DECODER_SHAPES
    return SHAPES + (VIDEO_DECODER_SHAPES[1:] if case.class_name in STEP_FAMILIES else [])  # a step decoder: no frames dim


def run(case: Case, work, fp16: bool = True) -> dict:
    """Write the case's model, import it at batch 1..2 (export and check against PyTorch in fp32), then
    build and verify it in fp16 on the cpu target (forced for Flux, which kiln refuses in fp16 by default:
    the tiny random model holds float16, the real one does not). Returns {"fp32": "ok" | error, "fp16": "ok" | error |
    None, "onnx": the export's path (in work) | None, "seconds"}."""
    import io
    import json
    import time
    import types
    from contextlib import redirect_stderr, redirect_stdout
    from pathlib import Path

    from kiln.optimizer.cli import main as kiln
    from kiln.optimizer.errors import KilnError
    from kiln.optimizer.examples.tiny_diffusers import write_model
    from kiln.optimizer.importers.diffusers import import_diffusers

    work = Path(work)
    started = time.perf_counter()
    result = {"case": case.name, "fp32": None, "fp16": None, "onnx": None}
    try:
        model_dir = write_model(case.class_name, work / "model", config=case.config)
        onnx_path, _, _ = import_diffusers(model_dir, work, types.SimpleNamespace(shapes=shapes(case), seed=0))
        result["fp32"], result["onnx"] = "ok", str(onnx_path)
    except KilnError as exc:
        result["fp32"] = str(exc)
    except Exception as exc:  # a crash is a result too: the suite names it
        result["fp32"] = f"crash: {type(exc).__name__}: {exc}"
    if result["fp32"] == "ok" and fp16:
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            code = kiln(["optimize", str(onnx_path), "-o", str(work / "fp16"), "--target", "cpu", "--precision", "fp16",
                         "--bench-runs", "0", "--json", "-q", "--force-precision"])  # fmt: skip
        report = json.loads(out.getvalue() or "{}")
        result["fp16"] = "ok" if code == 0 else f"exit {code}: {report.get('error', {}).get('message', report)}"
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
