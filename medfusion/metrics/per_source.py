"""Per-source edge preservation ``Q^{S/F}`` and the weaker source's share ``min_S Q^{S/F}``.

QAB/F pools all sources' edges into one number, so a fusion that copies the source with the
strongest edges and drops the other can still score well. ``Q^{S/F}`` is the same
Xydeas-Petrovic edge preservation computed against one source ``S`` and weighted by that
source's own Sobel strength::

    Q^{S/F} = sum_px Q^SF(px) g_S(px) / sum_px g_S(px)

(same sigmoids and Sobel convention as :func:`medfusion.metrics.qabf`; QAB/F is the
``g_S``-weighted mean of the per-source values). ``min_S Q^{S/F}`` (QSF_MIN) is the share of
the weaker-preserved source's edges that survive: high only when every source is kept.
"""

from __future__ import annotations

from medfusion.metrics._common import GREY_MAX, prepare, undefined
from medfusion.metrics.structural import edge_sums


def per_source_qabf(fused: object, *sources: object, data_range: float = GREY_MAX) -> list[float]:
    """``[Q^{S/F} for S in sources]``, each in [0, ~0.975]; NaN (+ warning) for a flat source."""
    image, checked = prepare(fused, sources, data_range)
    values: list[float] = []
    for index, source in enumerate(checked, start=1):
        numerator, weight = edge_sums(source, image)
        if weight == 0.0:
            values.append(undefined("QSF", f"source {index} has no edge (constant)"))
            continue
        values.append(numerator / weight)
    return values


def weaker_source_share(fused: object, *sources: object, data_range: float = GREY_MAX) -> float:
    """``min_S Q^{S/F}``: edge preservation of the worst-kept source (higher is better)."""
    values = [v for v in per_source_qabf(fused, *sources, data_range=data_range) if v == v]
    if not values:
        return undefined("QSF_MIN", "no source has any edge (all constant)")
    return min(values)


def stronger_source_share(fused: object, *sources: object, data_range: float = GREY_MAX) -> float:
    """``max_S Q^{S/F}``: edge preservation of the best-kept source (descriptive)."""
    values = [v for v in per_source_qabf(fused, *sources, data_range=data_range) if v == v]
    if not values:
        return undefined("QSF_MAX", "no source has any edge (all constant)")
    return max(values)
