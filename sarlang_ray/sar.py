"""SAR radiometry: unit conversion, speckle filters (Lee, refined Lee) and the stretch to uint8.

All filters work on *linear intensity* with NaN for invalid pixels; the stretch works in dB. The
SARLANG-1M paper filtered speckle with refined Lee and then applied a log stretch; that is the default.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sarlang_ray.config import SpeckleSection, StretchSection

UNITS = ("intensity", "amplitude", "db")
_TINY = 1e-10  # floor of linear intensity before taking the log (-100 dB)


def to_intensity(values: np.ndarray, units: str) -> np.ndarray:
    """Convert amplitude / dB / intensity to linear intensity (float32); non-finite stays NaN."""
    x = values.astype(np.float32, copy=True)
    x[~np.isfinite(x)] = np.nan
    if units == "intensity":
        pass
    elif units == "amplitude":
        x = x * x
    elif units == "db":
        x = np.power(np.float32(10.0), x / np.float32(10.0))
    else:
        raise ValueError(f"unknown SAR units {units!r}; use one of {UNITS}")
    x[x < 0] = np.nan  # negative intensity is not physical: treat as invalid
    return x


def to_db(intensity: np.ndarray) -> np.ndarray:
    return (10.0 * np.log10(np.maximum(intensity, _TINY))).astype(np.float32)


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


def lee_filter(intensity: np.ndarray, window: int = 7, looks: float = 4.0) -> np.ndarray:
    """Classic Lee filter (square window) on linear intensity."""
    x, valid = _fill_invalid(intensity.astype(np.float64))
    mean, var = _local_stats(x, np.ones((window, window)))
    out = _lee_weighting(x, mean, var, looks).astype(np.float32)
    out[~valid] = np.nan
    return out


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


def despeckle(intensity: np.ndarray, cfg: SpeckleSection, looks_scale: float = 1.0) -> np.ndarray:
    """Apply the configured speckle filter. ``looks_scale`` > 1 for tiles averaged from finer pixels."""
    looks = cfg.looks * looks_scale
    if cfg.filter == "none":
        return intensity
    if cfg.filter == "lee":
        return lee_filter(intensity, cfg.window, looks)
    if cfg.filter == "refined_lee":
        return refined_lee_filter(intensity, cfg.window, looks)
    raise ValueError(f"unknown speckle filter {cfg.filter!r}; use none, lee or refined_lee")


def stretch_to_uint8(db: np.ndarray, cfg: StretchSection) -> tuple[np.ndarray, float, float]:
    """Clip dB values (per-tile percentiles or fixed range) and scale to 0..255; NaN becomes 0.

    Returns the image and the dB values mapped to 0 and 255.
    """
    valid = np.isfinite(db)
    if cfg.mode == "fixed" or not valid.any():
        lo, hi = cfg.db_min, cfg.db_max
    else:
        lo, hi = (float(v) for v in np.percentile(db[valid], [cfg.low, cfg.high]))
    if hi - lo < 1e-6:
        hi = lo + 1e-6
    scaled = np.clip((db - lo) / (hi - lo), 0.0, 1.0) * 255.0
    out = np.where(valid, np.rint(scaled), 0).astype(np.uint8)
    return out, float(lo), float(hi)
