"""The refined Lee filter as first written (eight full-image correlations with the half-window kernels,
then a per-pixel pick; scipy's reflect padding): the reference the compiled filter in
``sarlang_ray.sar`` must match. Kept here, not in the library, so the library has one implementation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _local_stats(x: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``x`` under a (0/1) kernel, by correlation."""
    k = kernel / kernel.sum()
    mean = ndimage.correlate(x, k, mode="reflect")
    mean_sq = ndimage.correlate(x * x, k, mode="reflect")
    return mean, np.maximum(mean_sq - mean * mean, 0.0)


def _lee_weighting(x: np.ndarray, mean: np.ndarray, var: np.ndarray, looks: float) -> np.ndarray:
    """Lee's MMSE estimate: mean + b (x - mean), b = var_signal / var_observed (multiplicative noise)."""
    noise_var = 1.0 / max(looks, 1e-6)
    var_signal = (var - mean * mean * noise_var) / (1.0 + noise_var)
    b = np.clip(var_signal / np.maximum(var, 1e-20), 0.0, 1.0)
    return mean + b * (x - mean)


def _fill_invalid(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = np.isfinite(x)
    if valid.all():
        return x, valid
    filled = x.copy()
    filled[~valid] = np.nanmedian(x) if valid.any() else 0.0
    return filled, valid


def _half_window_masks(window: int) -> list[np.ndarray]:
    """The 8 edge-aligned half windows of refined Lee: each keeps the side of one of 8 directions."""
    r = window // 2
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    masks = []
    for k in range(8):
        angle = k * np.pi / 4
        ny, nx = -np.cos(angle), np.sin(angle)  # k=0 points up (towards smaller row index)
        masks.append(((dy * ny + dx * nx) >= -1e-9).astype(np.float64))
    return masks


def refined_lee_filter(intensity: np.ndarray, window: int = 7, looks: float = 4.0) -> np.ndarray:
    """Refined Lee filter (Lee 1981) on linear intensity.

    Per pixel, the 3x3 grid of 3x3-means inside the window gives the gradient along four axes; on the
    axis with the strongest gradient, the half window on the side more similar to the centre is used for
    the local statistics, so edges are kept sharp while homogeneous areas are smoothed.
    """
    x, valid = _fill_invalid(intensity.astype(np.float64))
    step = max(1, (window // 2) - 1)  # offset of the sub-window means (2 for a 7x7 window)
    m3 = ndimage.uniform_filter(x, size=3, mode="reflect")

    def shifted(oy: int, ox: int) -> np.ndarray:
        return ndimage.shift(m3, (-oy, -ox), order=0, mode="nearest")

    centre = m3
    # (side a, side b) of each axis, as offsets of the sub-window means; the masks index matches
    axes = [
        ((-step, 0), (step, 0)),  # vertical gradient: up (mask 0) vs down (mask 4)
        ((-step, step), (step, -step)),  # up-right (mask 1) vs down-left (mask 5)
        ((0, step), (0, -step)),  # right (mask 2) vs left (mask 6)
        ((step, step), (-step, -step)),  # down-right (mask 3) vs up-left (mask 7)
    ]
    gradients = []
    choices = []
    for k, (a, b) in enumerate(axes):
        ma, mb = shifted(*a), shifted(*b)
        gradients.append(np.abs(ma - mb))
        # keep the half window whose side mean is closer to the centre mean
        choices.append(np.where(np.abs(ma - centre) <= np.abs(mb - centre), k, k + 4))
    axis = np.argmax(np.stack(gradients), axis=0)
    direction = np.take_along_axis(np.stack(choices), axis[None], axis=0)[0]

    masks = _half_window_masks(window)
    out = np.empty_like(x)
    for k, mask in enumerate(masks):
        sel = direction == k
        if not sel.any():
            continue
        mean, var = _local_stats(x, mask)
        out[sel] = _lee_weighting(x, mean, var, looks)[sel]
    out = out.astype(np.float32)
    out[~valid] = np.nan
    return out


