"""The adapter for MiniMax-H3's transformer (MiniMaxH3Transformer3DModel): joint video and audio, text to both.

MiniMax-H3 runs one stack of blocks over one packed sequence; its caller lays the sequence out and describes
every row: its modality tag, the index of its timestep, its (t, h, w) rotary position, and where the rows of each
modality sit. For a text-to-video-and-audio request (the pipeline's t2va) the layout is [text | audio | video]:
text rows at time 0, 1, 2, ..., then the stereo audio rows channel by channel and the video patches frame by frame,
both on one clock that starts where the text ends. kiln's ONNX takes the tensors the pipeline denoises, video
latents [batch, C, frames, height, width] and audio latents [batch, 2, C, audio_len] (the two stereo channels, as
the audio VAE takes them), and builds the layout inside the graph from their sizes and the text length, so it
follows every size of the profile.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.diffusion_adapters import Adapter, DimRule, InputRule, grid_positions, supported_hint
from kiln.optimizer.importers.hunyuan_adapters import _unpatchify
from kiln.optimizer.importers.video_adapters import _patches, patch_sizes, video_dims
from kiln.targets import DimRange

STEREO = 2  # the pipeline's audio channels, packed channel-major (MINIMAX_H3_AUDIO_CHANNELS)
VIDEO_TAG, TEXT_TAG, AUDIO_TAG = 0, 1, 2  # the modality tags, which index the AdaLN table
# Rotary time runs 5/3 a pixel frame; the video VAE's latent frames stand for 1, 4, 4, 4, 4 pixel frames (17 a chunk).
FRAME_GROUPS, CHUNK_FRAMES = 5, 17
SPATIAL_SCALE = 32  # each spatial axis: centred on the unit interval, normalised by sqrt(area), times 32


def _frame_times(torch, frames, device):
    """Rotary time of each latent frame, in thirds: 5 per pixel frame, 17 pixel frames to 5 latent ones."""
    k = torch.arange(frames, device=device)
    return 5 * (CHUNK_FRAMES * (k // FRAME_GROUPS) + (4 * (k % FRAME_GROUPS) - 3).clamp(min=0))


def _side_positions(torch, cells, patch: int, side, root, device):
    """One spatial axis's rotary coordinates, the pipeline's np.linspace over the centred interval in one division:
    16 + 16 (2 patch i - side) / sqrt(height width) for each of its cells (side and root: float tensors)."""
    i = torch.arange(cells, device=device, dtype=torch.float32)
    half = SPATIAL_SCALE / 2
    return half + half * (2 * patch * i - side) / root


def layout(torch, text_len, audio_len, frames, height, width, patch: int, device):
    """(position_ids [seq, 3], token_tags [seq], timestep_indices [seq]) of the t2va layout [text | audio | video]
    for latents of frames x height x width and audio_len audio latents a channel; timestep 0 is the video's (which
    the text rows share), 1 the audio's."""
    rows, cols = height // patch, width // patch
    # The sizes as float tensors: Python floats of them would fix them when traced.
    side_h = torch.ones(height, device=device).sum()
    side_w = torch.ones(width, device=device).sum()
    root = torch.sqrt(side_h * side_w)
    h = _side_positions(torch, rows, patch, side_h, root, device)
    w = _side_positions(torch, cols, patch, side_w, root, device)
    start = torch.ones(text_len, device=device).sum()  # the media clock starts where the text ends

    text_t = torch.arange(text_len, device=device, dtype=torch.float32)
    text = torch.stack([text_t, text_t * 0, text_t * 0], dim=-1)
    # Audio: one unit a latent, no height; the two channels pinned to the width axis's two ends.
    audio_t = (start + torch.arange(audio_len, device=device, dtype=torch.float32)).repeat(STEREO)
    channel = torch.arange(STEREO * audio_len, device=device) // audio_len
    audio = torch.stack([audio_t, audio_t * 0, torch.where(channel == 0, w[0], w[-1])], dim=-1)
    # Video: frame by frame, each frame's patches row by row. Times in thirds keep them exact until the one division.
    frame_t = (3 * start + _frame_times(torch, frames, device)) / 3
    row, col = grid_positions(torch, rows, cols, device)
    video = torch.stack([frame_t[:, None].expand(frames, rows * cols), h[row][None].expand(frames, -1),
                         w[col][None].expand(frames, -1)], dim=-1).reshape(-1, 3)  # fmt: skip
    positions = torch.cat([text, audio, video])

    def fill(length, value):
        return torch.full((length,), value, dtype=torch.int64, device=device)

    n_audio, n_video = STEREO * audio_len, frames * rows * cols
    tags = torch.cat([fill(text_len, TEXT_TAG), fill(n_audio, AUDIO_TAG), fill(n_video, VIDEO_TAG)])
    timestep_indices = torch.cat([fill(text_len, 0), fill(n_audio, 1), fill(n_video, 0)])
    return positions, tags, timestep_indices


def _minimax_h3_call(model, latents, audio, text, timestep, audio_timestep):
    """One t2va step: the layout made from the sizes, the rows placed [text | audio | video], both outputs unpacked."""
    import torch

    b, _, frames, height, width = latents.shape
    patch, text_len, audio_len = model.config.patch_size[-1], text.shape[1], audio.shape[-1]
    positions, tags, timestep_indices = layout(torch, text_len, audio_len, frames, height, width, patch, latents.device)
    index = torch.arange(positions.shape[0], device=latents.device)
    audio_end = text_len + STEREO * audio_len
    video, sound = model(
        hidden_states=_patches(latents, 1, patch, patch).flatten(2),  # rows frame by frame, patches row by row
        audio_hidden_states=audio.transpose(2, 3).reshape(b, STEREO * audio_len, -1),  # channel-major rows
        encoder_hidden_states=text,
        timestep=torch.cat([timestep[:1], audio_timestep[:1]]),  # one pair for the whole batch: see the notes
        timestep_indices=timestep_indices, token_tags=tags, position_ids=positions,
        video_indices=index[audio_end:], audio_indices=index[text_len:audio_end], text_indices=index[:text_len],
        return_dict=False)  # fmt: skip
    video = _unpatchify(video, frames, height // patch, width // patch, 1, patch)
    return video, sound.reshape(b, STEREO, audio_len, -1).transpose(2, 3)


def _minimax_h3(model, config) -> Adapter:
    patch_t, patch = patch_sizes(config)
    if patch_t != 1 or config["patch_size"][-1] != patch:  # the pipeline's rotary grid: one frame, square patches
        raise InputError(f"kiln exports {type(model).__name__} with patches of 1 frame, square, not {config['patch_size']}",
                         hint=supported_hint())  # fmt: skip
    inputs = (InputRule("hidden_states", ("batch", config["in_channels"], "frames", "height", "width")),
              InputRule("audio_hidden_states", ("batch", STEREO, config["audio_in_channels"], "audio_len")),
              InputRule("encoder_hidden_states", ("batch", "text_len", config["text_dim"])),
              InputRule("timestep", ("batch",), "uniform", 1.0),
              InputRule("audio_timestep", ("batch",), "uniform", 1.0))  # fmt: skip
    return Adapter(
        type(model).__name__, "minimax-h3", inputs, (*video_dims(config), DimRule("audio_len", DimRange(4, 8, 16))),
        call=_minimax_h3_call, outputs=("sample", "audio_sample"), output_axes=("batch", None, "frames", "height", "width"),
        output_like={"audio_sample": "audio_hidden_states"},
        notes=("text to video and audio (the pipeline's t2va): video latents [batch, C, frames, height, width], "
               "stereo audio latents [batch, 2, C, audio_len]; the packed layout [text | audio | video], its rotary "
               "positions, modality tags and timestep indices are made inside the graph from the sizes",
               "timesteps are t = 1 - sigma in [0, 1] (1 clean), the video's and the audio's (their schedules differ); "
               "the model takes one pair for the whole batch, so the graph reads row 0 of each: every row of a batch "
               "must be at the same step, as in a batched sampling loop",
               "audio_len is a dim of its own; the pipeline takes round(40 / 24 x num_frames) audio latents a channel "
               "for num_frames = 17n + 5 pixel frames (5n + 2 latent frames), and text tagged as text throughout "
               "(no keyframes or references: fl2va and ref2va put conditioning rows in the sequence)"),
    )  # fmt: skip


FAMILIES: dict[str, Callable[..., Adapter]] = {"MiniMaxH3Transformer3DModel": _minimax_h3}
