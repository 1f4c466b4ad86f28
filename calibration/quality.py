"""Quality of an approximate output against a reference: relative L2, max abs, PSNR and SSIM.

Used by quantization (sensitivity, fallback) and by reports. PSNR and SSIM are per image and then
averaged, as the SVDQuant evaluation does; SSIM uses an 11-tap Gaussian window (sigma 1.5) and the
constants of Wang et al. (K1 0.01, K2 0.03), shrinking the window for images smaller than it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

_WINDOW, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def max_abs(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) if np.size(want) else 0.0


def _images(x: np.ndarray) -> np.ndarray:
    """[images, channels, H, W] from [N, C, H, W], [N, C, F, H, W] (frames become images) or [H, W]."""
    x = np.asarray(x, np.float64)
    if x.ndim == 5:
        x = x.transpose(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *x.shape[3:])
    while x.ndim < 4:
        x = x[None]
    return x.reshape(-1, *x.shape[-3:])


def psnr(got: np.ndarray, want: np.ndarray, data_range: float | None = None) -> float:
    """Mean over images of 10 log10(range^2 / MSE); range defaults to the reference's max - min over
    all images. Identical images count as 100 dB."""
    got, want = _images(got), _images(want)
    span = float(want.max() - want.min()) if data_range is None else data_range
    values = []
    for g, w in zip(got, want):
        mse = float(np.mean((g - w) ** 2))
        values.append(100.0 if mse == 0 else min(100.0, 10 * math.log10(max(span, 1e-30) ** 2 / mse)))
    return float(np.mean(values))


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Valid-mode separable filtering over the last two axes."""
    x = np.lib.stride_tricks.sliding_window_view(x, len(kernel), axis=-1) @ kernel
    return np.moveaxis(np.lib.stride_tricks.sliding_window_view(np.moveaxis(x, -1, -2), len(kernel), axis=-1) @ kernel, -1, -2)


def ssim(got: np.ndarray, want: np.ndarray, data_range: float | None = None) -> float:
    """Mean over images (and their channels) of the structural similarity index."""
    got, want = _images(got), _images(want)
    span = float(want.max() - want.min()) if data_range is None else data_range
    span = max(span, 1e-30)
    size = min(_WINDOW, *got.shape[-2:])
    size -= 1 - size % 2  # odd
    taps = np.exp(-0.5 * ((np.arange(size) - size // 2) / _SIGMA) ** 2)
    kernel = taps / taps.sum()
    c1, c2 = (_K1 * span) ** 2, (_K2 * span) ** 2
    mu_g, mu_w = _blur(got, kernel), _blur(want, kernel)
    var_g = _blur(got * got, kernel) - mu_g**2
    var_w = _blur(want * want, kernel) - mu_w**2
    cov = _blur(got * want, kernel) - mu_g * mu_w
    index = ((2 * mu_g * mu_w + c1) * (2 * cov + c2)) / ((mu_g**2 + mu_w**2 + c1) * (var_g + var_w + c2))
    return float(index.reshape(len(got), -1).mean(axis=1).mean())


def compare_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], images: bool = True) -> dict[str, dict]:
    """Per output: rel_l2 and max_abs, and (images, for outputs of 2 or more spatial dims) PSNR and SSIM."""
    result = {}
    for name, w in want.items():
        g = got[name]
        row = {"rel_l2": rel_l2(g, w), "max_abs": max_abs(g, w)}
        if images and np.ndim(w) >= 3 and min(np.shape(w)[-2:]) >= 2:
            row.update(psnr=psnr(g, w), ssim=ssim(g, w))
        result[name] = row
    return result
