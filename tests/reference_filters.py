"""The refined Lee filter as first written (eight full-image correlations with the half-window kernels,
then a per-pixel pick; scipy's reflect padding): the reference the compiled filter in
``sarlang_ray.sar`` must match. Kept here, not in the library, so the library has one implementation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# helpers the original shared with the rest of the module, and that are unchanged there
from sarlang_ray.sar import _fill_invalid, _half_window_masks, _lee_weighting, _local_stats


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
