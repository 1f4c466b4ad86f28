"""kiln's rewritten forwards compute what diffusers' do, on inputs the import's check does not draw: HunyuanVideo
1.5 in text-to-video (image_embeds all zero), with padded text masks."""

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import diffusers_suite as suite  # noqa: E402

from kiln.optimizer.importers.hunyuan_adapters import CONTEXT_PATCH  # noqa: E402


def test_hunyuan_video15_text_to_video_matches_diffusers():
    case = next(c for c in suite.TRANSFORMERS if c.class_name == "HunyuanVideo15Transformer3DModel")
    torch.manual_seed(0)
    model = diffusers.HunyuanVideo15Transformer3DModel(**case.config).eval()
    generator = torch.Generator().manual_seed(0)

    def mask(n, kept):
        return (torch.arange(n)[None] < torch.tensor(kept)[:, None]).long()

    inputs = dict(
        hidden_states=torch.randn(2, 4, 2, 8, 6, generator=generator),
        timestep=torch.tensor([300.0, 700.0]),
        encoder_hidden_states=torch.randn(2, 6, case.config["text_embed_dim"], generator=generator),
        encoder_attention_mask=mask(6, [6, 3]),
        encoder_hidden_states_2=torch.randn(2, 4, case.config["text_embed_2_dim"], generator=generator),
        encoder_attention_mask_2=mask(4, [1, 4]),
    )
    for image in (torch.zeros(2, 3, case.config["image_embed_dim"]), torch.randn(2, 3, case.config["image_embed_dim"])):
        with torch.no_grad():
            want = model(**inputs, image_embeds=image, return_dict=False)[0]
            with CONTEXT_PATCH.apply(model):
                got = model(**inputs, image_embeds=image, return_dict=False)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
