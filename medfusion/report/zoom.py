"""Where to zoom a panel: the window where the weaker-kept source loses the most edges."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfusion.metrics._common import GREY_MAX
from medfusion.metrics.structural import _edge_preservation, _sobel_strength_orientation

WINDOW = 64


def edge_loss_map(fused: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Per pixel ``g_S (1 - Q^SF)``: the source's edge strength that the fusion does not keep."""
    g_f, a_f = _sobel_strength_orientation(np.asarray(fused, np.float64) * GREY_MAX)
    g_s, a_s = _sobel_strength_orientation(np.asarray(source, np.float64) * GREY_MAX)
    return g_s * (1.0 - _edge_preservation(g_s, a_s, g_f, a_f))


def worst_edge_window(
    fused: np.ndarray, sources: Sequence[np.ndarray], window: int = WINDOW
) -> tuple[slice, slice]:
    """The ``window``² crop with the largest edge loss of the weaker-kept source (images in
    [0, 1]); the weaker-kept source is the one with the lowest Q^{S/F}."""
    from medfusion.metrics import per_source_qabf

    shares = per_source_qabf(fused, *sources, data_range=1.0)
    weakest = int(np.nanargmin(shares)) if np.isfinite(shares).any() else 0
    loss = edge_loss_map(fused, sources[weakest])
    h, w = loss.shape
    size_h, size_w = min(window, h), min(window, w)
    total = np.pad(loss, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = (total[size_h:, size_w:] - total[:-size_h, size_w:] - total[size_h:, :-size_w]
            + total[:-size_h, :-size_w])
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return slice(int(top), int(top) + size_h), slice(int(left), int(left) + size_w)
