"""A small DiT kiln trains, for quantization quality work: random weights lack the activation outliers
that make 8-bit arithmetic hard, so quality figures on them say little.

The data is drawn, not downloaded: 4-channel 16x16 images of ten classes of shapes (disc, square, ring,
stripes three ways, checkerboard, cross, gradient, blob) at seeded positions, sizes and colours. The
model (DiTTransformer2DModel, 4 layers, width 64, patch 2) learns to predict the noise of DDPM's 1000-step
schedule, class-conditioned, with AdamW; about three minutes on two CPU cores, seeded throughout.

kiln ships the weights its own run of this training gave (dit-trained/, its training.json naming the configuration's
hash), so `kiln example dit-trained DIR` copies that save_pretrained folder at once. A configuration that
differs from the shipped one is trained on first use and cached under $KILN_CACHE_DIR/examples (else
~/.cache/kiln/examples) by its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kiln.optimizer.lazy import check_installed, require
from kiln.optimizer.outdir import atomic_file

CONFIG = dict(
    num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4, sample_size=16,
    patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
)  # fmt: skip
TRAINING = dict(steps=1500, batch=64, lr=3e-4, seed=0, images=8192)
CLASSES = 10
SIDE = 16


def shapes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [count, 4, 16, 16] in [-1, 1], class labels [count]): seeded procedural shapes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    grid = np.linspace(-1, 1, SIDE)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    cx, cy = rng.uniform(-0.4, 0.4, (2, count, 1, 1))
    size = rng.uniform(0.3, 0.7, (count, 1, 1))
    freq = rng.uniform(2.0, 5.0, (count, 1, 1))
    angle = rng.uniform(0, np.pi, (count, 1, 1))
    dx, dy = xx - cx, yy - cy
    radius = np.hypot(dx, dy)
    masks = np.stack([
        radius < size,
        np.maximum(abs(dx), abs(dy)) < size * 0.8,
        abs(radius - size) < 0.15,
        np.sin(yy * freq * np.pi) > 0,
        np.sin(xx * freq * np.pi) > 0,
        np.sin((xx + yy) * freq * np.pi / 2) > 0,
        np.sin(xx * freq * 2) * np.sin(yy * freq * 2) > 0,
        np.minimum(abs(dx), abs(dy)) < size * 0.25,
        (xx * np.cos(angle) + yy * np.sin(angle) + 1) / 2 + 0 * cx,
        np.exp(-(radius**2) / (size**2 * 0.5)),
    ]).astype(np.float32)  # [classes, count, 16, 16]
    mask = np.clip(masks[labels, np.arange(count)], 0, 1)  # the diagonal gradient reaches past [0, 1]
    background, foreground = rng.uniform(-1, 1, (2, count, 4, 1, 1)).astype(np.float32)
    images = background + (foreground - background) * mask[:, None]
    return images.astype(np.float32), labels.astype(np.int64)


def _key() -> str:
    text = json.dumps({"config": CONFIG, "training": TRAINING, "version": 2}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    from kiln.calibration.cache import kiln_cache_root

    return kiln_cache_root() / "examples" / f"dit-trained-{_key()}"


def train(directory: Path, progress=None) -> dict:
    """Train the model and save_pretrained it into directory; returns the training record. progress
    (kiln's Progress) gets a line every tenth of the steps."""
    why = "training the dit-trained example"
    torch = require("torch", "torch", why)
    diffusers = require("diffusers", "torch", why)
    torch.manual_seed(TRAINING["seed"])
    model = diffusers.DiTTransformer2DModel(**CONFIG)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    images, labels = shapes(TRAINING["images"], TRAINING["seed"])
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(TRAINING["seed"])
    losses = []
    model.train()
    for step in range(TRAINING["steps"]):
        index = torch.randint(0, len(images), (TRAINING["batch"],), generator=generator)
        clean, label = images[index], labels[index]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, 1000, (TRAINING["batch"],), generator=generator)
        noisy = scheduler.add_noise(clean, noise, t)
        predicted = model(noisy, timestep=t, class_labels=label).sample
        loss = torch.nn.functional.mse_loss(predicted, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None and (step + 1) % (TRAINING["steps"] // 10) == 0:
            progress.line(f"training dit-trained: step {step + 1} of {TRAINING['steps']}, loss {np.mean(losses[-50:]):.4f}")
    model.eval()
    model.save_pretrained(os.fspath(directory), safe_serialization=True)
    record = {"key": _key(), "steps": TRAINING["steps"], "first_loss": float(np.mean(losses[:50])), "final_loss": float(np.mean(losses[-100:]))}
    (directory / "training.json").write_text(json.dumps({**record, "config": CONFIG, "training": TRAINING}, indent=2) + "\n")
    return record


SHIPPED = Path(__file__).resolve().parent / "dit-trained"


def shipped_key() -> str | None:
    """The configuration hash of the weights kiln ships, None if they are missing."""
    try:
        return json.loads((SHIPPED / "training.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def trained_dir(progress=None) -> Path:
    """The trained model: the shipped weights if they are this configuration's, else the cached ones, training
    them first if they are not there (written whole, then renamed)."""
    check_installed(["torch", "diffusers", "safetensors"], "torch", "the dit-trained example")
    if shipped_key() == _key():
        return SHIPPED
    final = cache_dir()
    if (final / "training.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        train(staging, progress)
        os.replace(staging, final) if not final.exists() else shutil.rmtree(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def write_trained_dit(directory: Path, progress=None) -> Path:
    """Copy the trained model (training it first if need be) into directory, file by file, each whole."""
    source = trained_dir(progress)
    for path in sorted(source.iterdir()):
        with atomic_file(directory / path.name) as tmp:  # a write failure is an InputError naming the file
            shutil.copyfile(path, tmp)
    return directory
