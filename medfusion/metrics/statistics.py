"""Image statistics and gradient metrics: MEAN, SD, SF, AG, EI, EOG, and the correlations CC, SCD.

The single-image metrics look at the fused image only; all values are in 8-bit grey levels
(inputs are mapped to 0-255 through ``data_range``, see ``_common``).
"""

from __future__ import annotations

import numpy as np

from medfusion.metrics import _compiled
from medfusion.metrics._common import (
    GREY_MAX,
    MetricInputError,
    pad_border,
    pearson,
    prepare,
    too_small,
    undefined,
)


def _single(img: object, data_range: float) -> np.ndarray:
    image, _ = prepare(img, [], data_range, min_sources=0)
    return image


def mean_intensity(img: object, data_range: float = GREY_MAX) -> float:
    """MEAN: average grey level ``mean(F)``; range [0, 255]. Brightness, not a quality ranking."""
    return float(_single(img, data_range).mean())


def standard_deviation(img: object, data_range: float = GREY_MAX) -> float:
    """SD (STD): population standard deviation ``sqrt(mean((F - mean F)^2))`` (contrast).

    Reference: VIFB ``metricsVariance`` (divides by M*N). Range [0, 127.5]; higher is better.
    """
    return float(_single(img, data_range).std())


def spatial_frequency(img: object, data_range: float = GREY_MAX) -> float:
    """SF: ``sqrt(RF^2 + CF^2)``, RF/CF the RMS of horizontal/vertical first differences.

    ``RF^2 = sum (F[i,j] - F[i,j-1])^2 / (M (N-1))``, ``CF^2`` likewise over ``(M-1) N``.
    Reference: Eskicioglu & Fisher, IEEE Trans. Commun. 43 (1995); VIFB
    ``metricsSpatial_frequency``. Range [0, ~360]; higher is better (more detail).
    """
    image = _single(img, data_range)
    if min(image.shape) < 2:
        return too_small("SF", image.shape, 2)
    rf = np.mean(np.diff(image, axis=1) ** 2)
    cf = np.mean(np.diff(image, axis=0) ** 2)
    return float(np.sqrt(rf + cf))


def average_gradient(
    img: object, data_range: float = GREY_MAX, operator: str = "central"
) -> float:
    """AG (GRAD): mean of ``sqrt((Fx^2 + Fy^2) / 2)``.

    ``operator="central"`` (default, VIFB ``metricsAvg_gradient``): MATLAB ``gradient``
    (central differences, one-sided at the border) summed over all pixels and divided by
    ``(M-1)(N-1)``. ``operator="forward"``: the textbook form with forward differences over the
    ``(M-1)(N-1)`` interior (Cui et al., Opt. Commun. 341, 2015). Range [0, 255]; higher is
    better (sharper).
    """
    image = _single(img, data_range)
    if min(image.shape) < 2:
        return too_small("AG", image.shape, 2)
    rows, cols = image.shape
    if operator == "central":
        gy, gx = np.gradient(image)
        return float(np.sqrt((gx * gx + gy * gy) / 2.0).sum() / ((rows - 1) * (cols - 1)))
    if operator == "forward":
        gx = image[:-1, 1:] - image[:-1, :-1]
        gy = image[1:, :-1] - image[:-1, :-1]
        return float(np.sqrt((gx * gx + gy * gy) / 2.0).mean())
    raise MetricInputError(f"AG operator must be 'central' or 'forward', got {operator!r}")


def edge_intensity(img: object, data_range: float = GREY_MAX) -> float:
    """EI: mean Sobel gradient magnitude ``mean(sqrt(Sx^2 + Sy^2))``, replicate border.

    Reference: Rajalingam & Priya (2018); VIFB ``metricsEdge_intensity`` (``imfilter`` with
    ``fspecial('sobel')``, 'replicate'). Range [0, ~1440]; higher is better.
    """
    image = _single(img, data_range)
    return float(_compiled.gradient_magnitude(pad_border(image, "nearest"), 2.0).mean())


def energy_of_gradient(
    img: object, data_range: float = GREY_MAX, reduce: str = "mean"
) -> float:
    """EOG: energy of the forward-difference gradient ``sum (Fx^2 + Fy^2)``.

    Over the ``(M-1)(N-1)`` pixels with both differences. ``reduce="mean"`` (default) divides by
    that count so slices of any size compare; ``reduce="sum"`` is the focus-measure form of
    Huang & Jing (Pattern Recognit. Lett. 28, 2007). Higher is better (more edge energy).
    """
    image = _single(img, data_range)
    if min(image.shape) < 2:
        return too_small("EOG", image.shape, 2)
    gx = image[:-1, 1:] - image[:-1, :-1]
    gy = image[1:, :-1] - image[:-1, :-1]
    energy = gx * gx + gy * gy
    if reduce == "mean":
        return float(energy.mean())
    if reduce == "sum":
        return float(energy.sum())
    raise MetricInputError(f"EOG reduce must be 'mean' or 'sum', got {reduce!r}")


def correlation_coefficient(
    fused: object, *sources: object, data_range: float = GREY_MAX
) -> float:
    """CC: mean over sources of the Pearson correlation ``r(S, F)`` (MATLAB ``corr2``).

    Reference: as reported by Tang et al. / Zhou et al. (mean of the two sources). Range
    [-1, 1]; higher is better. NaN + warning when an image is constant.
    """
    image, checked = prepare(fused, sources, data_range)
    values = [pearson(s, image) for s in checked]
    if np.isnan(values).any():
        return undefined("CC", "an image is constant")
    return float(np.mean(values))


def scd(fused: object, *sources: object, data_range: float = GREY_MAX) -> float:
    """SCD: sum of correlations of differences ``sum_i r(F - sum_{j!=i} S_j, S_i)``.

    For two sources ``r(F - B, A) + r(F - A, B)``. Reference: Aslantas & Bendes, AEU Int. J.
    Electron. Commun. 69 (2015). Range [-2, 2] for two sources; higher is better.
    NaN + warning when a difference image or a source is constant.
    """
    image, checked = prepare(fused, sources, data_range, min_sources=2)
    total = np.sum(checked, axis=0)
    values = [pearson(image - (total - s), s) for s in checked]
    if np.isnan(values).any():
        return undefined("SCD", "a source or a difference image is constant")
    return float(np.sum(values))
