"""ACE-Step 1.5's music transformer: a diffusion transformer over a sequence of audio latent frames, the one
audio model in diffusers' test suite. Its inputs are plain tensors, so its ONNX takes them as the pipeline passes
them at each step; the rotary table and the sliding-window mask follow the sequence length in the graph.
"""

from __future__ import annotations

from kiln.optimizer.importers.diffusion_adapters import Adapter, DimRule, InputRule, _batch, _text
from kiln.targets import DimRange


def _ace_step_call(model, latents, timestep, timestep_r, text, context):
    return model(hidden_states=latents, timestep=timestep, timestep_r=timestep_r, encoder_hidden_states=text,
                 context_latents=context, return_dict=False)[0]  # fmt: skip


def _ace_step(model, config) -> Adapter:
    p, acoustic = config["patch_size"], config["audio_acoustic_hidden_dim"]
    text_width = config.get("encoder_hidden_size") or config["hidden_size"]
    frames = DimRule("audio_len", DimRange(4 * p, 16 * p, 32 * p), multiple=p,
                     why=f"a patch is {p} latent frames (the model pads other lengths with a Python if)")  # fmt: skip
    inputs = (InputRule("hidden_states", ("batch", "audio_len", acoustic)),
              InputRule("timestep", ("batch",), "uniform", 1.0),  # t in [0, 1]: the embedding scales by 1000
              InputRule("timestep_r", ("batch",), "uniform", 1.0),
              InputRule("encoder_hidden_states", ("batch", "text_len", text_width)),
              InputRule("context_latents", ("batch", "audio_len", config["in_channels"] - acoustic)))  # fmt: skip
    return Adapter(
        type(model).__name__, "ace-step", inputs, (_batch(), frames, _text()), call=_ace_step_call,
        output_axes=("batch", "audio_len", None),
        notes=("an audio model: hidden_states are its noisy latent frames [batch, audio_len, channels], "
               "context_latents the source latents and chunk masks its pipeline puts beside them",
               "timestep_r is the mean-flow reference time; the pipeline passes timestep itself (t - r = 0), the "
               "check takes any r in [0, 1)"),
    )  # fmt: skip


FAMILIES = {"AceStepTransformer1DModel": _ace_step}
