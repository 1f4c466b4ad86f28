"""Short seeded sampling loops of a diffusers model, over any runner (ONNX Runtime, an engine, PyTorch).

Calibration records the inputs of such loops (activation ranges change with the timestep), and quality
is judged on their final latents: what a user sees, after the errors of every step have compounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kiln import targets
from kiln.calibration import DataError, Sample
from kiln.optimizer.lazy import require

LATENTS, TIMESTEP = "hidden_states", "timestep"
STEPS = 8
# Quality is measured on the final latents of this many samples (images, or videos).
QUALITY_SAMPLES = 16


def is_diffusion(profile: targets.Profile, source: dict) -> bool:
    """A diffusers model that denoises latents at a timestep (not a VAE decoder)."""
    return source.get("format") == "diffusers" and {LATENTS, TIMESTEP} <= {s.name for s in profile.inputs}


def timestep_dtype(profile: targets.Profile) -> str:
    return next(s.dtype for s in profile.inputs if s.name == TIMESTEP)


def timestep_max(source: dict) -> float:
    """The top of the timesteps the model takes, as its importer recorded it: 1000, or 1 where the pipeline
    passes t / 1000 (Flux, QwenImage, AuraFlow, Z-Image, ...)."""
    return float(source.get("timestep_max") or 1000.0)


def _scheduler(timestep_dtype: str):
    """DDIM over 1000 training steps for integer timesteps (epsilon-predicting DiTs, PixArt, Latte,
    CogVideoX), flow-matching Euler for float ones (SD3)."""
    diffusers = require("diffusers", "torch", "running a diffusers sampling loop")
    if np.dtype(timestep_dtype).kind == "f":
        return diffusers.FlowMatchEulerDiscreteScheduler()
    return diffusers.DDIMScheduler(num_train_timesteps=1000)


def scheduler_name(timestep_dtype: str) -> str:
    return type(_scheduler(timestep_dtype)).__name__


def _prediction(output: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """The model's noise (or velocity) prediction: its output, less the learned-variance half a DiT adds."""
    output = np.asarray(output, np.float32)
    if output.shape == latents.shape:
        return output
    if output.shape[0] == latents.shape[0] and output.shape[1] == 2 * latents.shape[1]:
        return output[:, : latents.shape[1]]
    raise DataError(f"the model's output {list(output.shape)} is not a prediction for latents {list(latents.shape)}")


def sample_loop(run: Callable[[dict], np.ndarray], feeds: dict, timestep_dtype: str, steps: int = STEPS,
                record: list | None = None, label: str = "", timestep_max: float = 1000.0) -> np.ndarray:  # fmt: skip
    """The final latents of `steps` scheduler steps from feeds[LATENTS] (noise); run(feeds) gives the
    model's output, its timestep the scheduler's (over 1000) scaled to timestep_max. Each step's inputs are
    appended to record."""
    import torch

    scheduler = _scheduler(timestep_dtype)
    scheduler.set_timesteps(steps)
    latents = feeds[LATENTS] * float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow matching starts at unit noise
    batch, scale = latents.shape[0], timestep_max / 1000.0
    for i, t in enumerate(scheduler.timesteps):
        given = np.full(batch, float(t) * scale).astype(timestep_dtype)
        step = dict(feeds, **{LATENTS: latents.astype(np.float32), TIMESTEP: given})
        if record is not None:
            record.append(Sample(f"{label}step {i + 1} of {steps} (t={float(t):g})", step))
        prediction = _prediction(run(step), latents)
        latents = scheduler.step(torch.from_numpy(prediction), t, torch.from_numpy(latents)).prev_sample.numpy()
    return latents


def starting_inputs(profile: targets.Profile, seed: int, loops: int) -> list[dict[str, np.ndarray]]:
    """The first inputs of `loops` loops at the opt shape: unit noise and conditioning (class labels,
    text embeddings) drawn from seed, seed + 1, ..."""
    shapes = profile.shapes(profile.sizes("opt") if profile.dims else {})
    starts = []
    for i in range(loops):
        feeds = profile.random_inputs(shapes, seed + i)
        feeds[LATENTS] = np.random.default_rng(seed + i).standard_normal(shapes[LATENTS]).astype(np.float32)
        starts.append(feeds)
    return starts


def quality_loops(profile: targets.Profile, seed: int) -> list[dict[str, np.ndarray]]:
    """Starting inputs of enough loops for QUALITY_SAMPLES samples at the opt batch."""
    batch = profile.shapes(profile.sizes("opt") if profile.dims else {})[LATENTS][0]
    return starting_inputs(profile, seed, math.ceil(QUALITY_SAMPLES / batch))
